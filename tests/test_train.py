"""The training engine end to end on the tiny fixtures: LoRA merge arithmetic, FSDP2 over gloo against one process,
exact resume, merge.py against transformers, the five MP-GUI stages chained through their merges, faults.

Every run is a real `train.main` / `merge.main` call (torchrun for the distributed ones) on a 24-image dataset
written here; the stage configs are shrunk to CPU size by overrides only.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoints
import data
import load
import lora
import merge
import model as M
import train
from parity import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
FAMILIES = ["qwen2_vl_tiny", "qwen2_5_vl_tiny", "internvl2_tiny", "internvl3_tiny", "mpgui_tiny"]
STAGES = ["textual", "graphical", "spatial", "fusion", "benchmark"]
SHRINK = ["--global_batch=4", "--micro_batch=2", "--max_steps=2", "--max_tiles=2", "--max_length=400", "--bf16=False",
          "--num_workers=0", "--lora_llm_r=4", "--lora_llm_alpha=8"]
VIT_LORA = ["--lora_vit_r=4", "--lora_vit_alpha=8"]
MERGE_TOL = 1e-5  # fp32: merged vs unmerged logits
# fp32, torchrun (2 ranks) vs one process, on the same micro-batches: what differs is the order of fp32 sums (the
# ranks' gradients reduced by gloo, the clipping norm over shards, kernels on FSDP's gathered copies). A sum of N
# terms reordered moves by at most about N * 2^-24 of its terms' magnitudes; a step sums at most N = 2 micro-batches
# x 2 samples x 400 tokens (max_length) = 1600 terms per weight, so 1600 * 6e-8 = 1e-4. The bugs this guards against
# (a rank's micro-batch dropped or counted twice, a per-rank instead of a global mean) move the loss and gradients by
# a target token's share at least, 1 / ~20 targets per step here: 500x over it.
DIST_TOL = 1e-4
RESUME_TOL = 0.0  # same process layout, same RNG states: bit-exact


# the in-process runs are single-threaded, as torchrun's ranks are; train.main turns on flushing of denormals
pytestmark = pytest.mark.usefixtures("one_thread", "default_denormals")


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def adapters(m):
    """The LoRA tensors alone, {name.lora_A / name.lora_B: tensor}."""
    return {k: v for k, v in m.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


def max_rel_state(a, b):
    assert set(a) == set(b)
    return max(rel_err(a[k], b[k]) for k in a)


def write_dataset(folder, n=24, width=None):
    """n coloured PNGs 120..400 (or all `width`) x 200 and one InternVL conversation each; returns the meta json's
    path."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "d.jsonl"), "w") as f:
        for i in range(n):
            w = width or 120 + (i * 37) % 281
            colour = (i * 40 % 256, i * 90 % 256, i * 150 % 256)
            Image.new("RGB", (w, 200), colour).save(os.path.join(folder, f"{i}.png"))
            f.write(json.dumps({"id": i, "image": f"{i}.png", "width": w, "height": 200, "conversations": [
                {"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": f"color {i}"}]}) + "\n")
    meta = os.path.join(folder, "meta.json")
    with open(meta, "w") as f:
        json.dump({"d": {"root": folder, "annotation": os.path.join(folder, "d.jsonl"), "data_augment": False,
                         "repeat_time": 1}}, f)
    return meta


def train_args(stage, base, meta, out, *overrides):
    return [os.path.join(ROOT, "configs", f"{stage}.json"), f"--base={base}", f"--meta={meta}", f"--out={out}",
            *overrides]


def losses(run):
    """{step: loss} from metrics.jsonl (a resumed run appends: the last record of a step wins)."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def checkpoint(run, step):
    return os.path.join(run, "checkpoints", f"step_{step:07d}")


def trainable(run, step):
    return load_file(os.path.join(checkpoint(run, step), checkpoints.TRAINABLE))


def fixture(name):
    return os.path.join(FIXTURES, name)


def batch(m, seed=0):
    """Two right-padded samples: one with an image (InternVL: 2 tiles, + EXTRA tokens for MP-GUI; Qwen: a 56 x 84
    image, 6 merged tokens) and <|im_start|> turns, one text only."""
    g = torch.Generator().manual_seed(seed)
    c = m.cfg
    text = lambda n: torch.randint(5, 95, (n,), generator=g)  # ordinary ids in every tiny tokenizer  # noqa: E731
    if c.arch in ("internvl", "mpgui"):
        tiles = 2
        vision = dict(pixel_values=torch.randn(tiles, 3, c.vit_image_size, c.vit_image_size, generator=g))
        img = [c.image_token_id] * c.num_image_token * tiles + [c.extra_token_id] * c.num_image_token * tiles * (
            c.arch == "mpgui")
    else:
        vision = dict(pixel_values=torch.randn(24, 3 * c.vit_temporal_patch * c.vit_patch ** 2, generator=g),
                      image_grid_thw=torch.tensor([[1, 4, 6]]))
        img = [c.image_token_id] * 6
    a = torch.cat([torch.tensor([3]), text(6), torch.tensor(img), text(6), torch.tensor([3]), text(4)])
    b = torch.cat([torch.tensor([3]), text(9)])
    ids = torch.zeros(2, len(a), dtype=torch.long)
    mask = torch.zeros(2, len(a), dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :len(b)], mask[1, :len(b)] = b, 1
    return dict(input_ids=ids, attention_mask=mask, **vision)


def add_lora(m, seed=0):
    torch.manual_seed(seed)  # lora_A's kaiming draw
    lora.add_adapters(m, 4, 8, 2, 4)
    return m


def randomise_lora_b(m, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(m):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


@torch.no_grad()
def logits(m, inputs):
    valid = inputs["attention_mask"].bool()
    return m(**inputs)[valid]


def file_digests(folder):
    def digest(name):
        with open(os.path.join(folder, name), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    return {name: digest(name) for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))


# ----------------------------------------------------------------------------------------------------------------------
# 1. LoRA: merge arithmetic and the zero-B identity, every family, adapters on the LLM and the ViT


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merged_logits_equal_unmerged(family):
    m = add_lora(load.load_model(fixture(family), dtype=torch.float32))
    base = load.load_model(fixture(family), dtype=torch.float32)
    randomise_lora_b(m)
    inputs = batch(m)
    unmerged = logits(m, inputs)
    assert rel_err(unmerged, logits(base, inputs)) > 1e-2  # the adapters matter
    lora.merge(m)
    assert not lora.lora_layers(m)
    assert rel_err(logits(m, inputs), unmerged) <= MERGE_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_zero_b_leaves_logits_bit_identical(family):
    m = load.load_model(fixture(family), dtype=torch.float32)
    inputs = batch(m)
    before = logits(m, inputs)
    add_lora(m)
    internvl = m.cfg.arch in ("internvl", "mpgui")
    assert {n.split(".")[0] for n, _ in lora.lora_layers(m)} == ({"language_model", "vision_model"} if internvl
                                                                  else {"model", "visual"})
    assert torch.equal(logits(m, inputs), before)


# ----------------------------------------------------------------------------------------------------------------------
# 2. distributed: torchrun, 2 ranks, FSDP2 over gloo vs one process with the same global batch

# stage 4 on the tiny MP-GUI: LoRA in every decoder block and the vision tower, perceivers and gate in the root unit,
# so every FSDP unit reduces gradients. Dropouts off (their draws differ per rank). Global batch 4: one process runs
# 2 micro-batches of 2 and accumulates, each rank runs one of them. A checkpoint each step: the first one's optimizer
# moments hold the first step's gradients.
DIST = ["--global_batch=4", "--micro_batch=2", "--max_steps=3", "--max_tiles=2", "--max_length=400", "--bf16=False",
        "--num_workers=0", "--lora_llm_r=4", "--lora_llm_alpha=8", *VIT_LORA, "--lora_dropout=0", "--drop_path=0",
        "--lr=1e-3", "--save_every=1"]


def torchrun(script, args, timeout=300, nproc=2):
    """nproc ranks of script over gloo; a run still going after `timeout` s (ranks waiting in collectives that do not
    match) fails, its process group killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # its own process group, killed whole on a hang
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"torchrun still running after {timeout} s (a hang):\n{out[-3000:]}{err[-3000:]}")
    assert p.returncode == 0, out[-3000:] + err[-3000:]


# checkpoints.save gathers only what it keeps; the files must stay those the former save wrote, which gathered the
# whole model with get_state_dict(full_state_dict=True) and kept the trainable names: that save is the oracle here


def old_save(run, m, opt, sched, step, position, rank, keep_last):
    """The former checkpoints.save's three files, into RUN_old/step_N (no temporary name, nothing removed)."""
    model_sd, opt_sd = get_state_dict(m, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {n for n, p in m.named_parameters() if p.requires_grad} | set(m.new_tensors)
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [checkpoints.rng_state()]
    if dist.is_initialized():
        dist.all_gather_object(rngs, checkpoints.rng_state())
    if rank == 0:
        folder = os.path.join(run + "_old", f"step_{step:07d}")
        os.makedirs(folder)
        kept = {k: v.contiguous() for k, v in model_sd.items() if k in names}
        save_file(kept, os.path.join(folder, checkpoints.TRAINABLE))
        moments = {f"{n}::{k}": v.contiguous() for n, s in opt_sd["state"].items() for k, v in s.items()}
        save_file(moments, os.path.join(folder, "optimizer.safetensors"))
        with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(dict(step=step, position=position, scheduler=sched.state_dict(),
                                    param_groups=opt_sd["param_groups"], rng=rngs)))


class Gathers(TorchDispatchMode):
    """The element count of every all-gather run under it: functional ones (DTensor.full_tensor, get_state_dict)
    and c10d ones of floating-point tensors (all_gather_object's pickles are uint8: not counted)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "gather" in func.name():
            got = out if func.name().startswith("_c10d_functional") else args[0]  # c10d: the output tensor(s)
            self.numels += [t.numel() for t in torch.utils._pytree.tree_leaves(got)
                            if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return out


REAL_SAVE = checkpoints.save  # the module's own, before any test patches it


def save_twice(run, m, *rest):
    """checkpoints.save as train.main calls it, after old_save; each one's all-gathers appended to
    RUN_gathers_RANK.jsonl."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    with Gathers() as old:
        old_save(run, m, *rest)
    with Gathers() as new:
        REAL_SAVE(run, m, *rest)
    with open(f"{run}_gathers_{rank}.jsonl", "a") as f:
        f.write(json.dumps(dict(old=old.numels, new=new.numels)) + "\n")


SAVE_LAUNCHER = """import sys
sys.path[:0] = [{root!r}, {tests!r}]
import checkpoints, train, test_train
checkpoints.save = test_train.save_twice
train.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def single(meta, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single") / "run")
    checkpoints.save = save_twice
    try:
        train.main(train_args("fusion", fixture("mpgui_tiny"), meta, out, *DIST))
    finally:
        checkpoints.save = REAL_SAVE
    return out


@pytest.fixture(scope="module")
def distributed(meta, tmp_path_factory):
    """torchrun --nproc_per_node 2 train.py: FSDP2 over gloo, each rank reading its half of every global batch; each
    checkpoint also written by old_save."""
    root = tmp_path_factory.mktemp("dist")
    out, script = str(root / "run"), root / "launch.py"
    script.write_text(SAVE_LAUNCHER.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    torchrun(str(script), train_args("fusion", fixture("mpgui_tiny"), meta, out, *DIST))
    return out


@pytest.mark.parametrize("run", ["single", "distributed"])
def test_checkpoint_files_equal_the_former_whole_model_save(run, request):
    out = request.getfixturevalue(run)
    for step in (1, 2, 3):
        assert file_digests(checkpoint(out, step)) == file_digests(os.path.join(out + "_old", f"step_{step:07d}"))


def test_checkpoint_gathers_only_the_tensors_it_saves(distributed):
    """Each rank: one all-gather per saved DTensor (the trainable weights and their Adam moments; `step` is a plain
    tensor), of its full size as FSDP2 pads it (dim 0 rounded up to a multiple of the 2 ranks); nothing of the
    frozen base, which the former save gathered whole."""
    base = load.load_model(fixture("mpgui_tiny"), dtype=torch.float32)
    for rank in (0, 1):
        with open(f"{distributed}_gathers_{rank}.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert len(records) == 3
        for step, r in enumerate(records, 1):
            saved = {**trainable(distributed, step), **moments(distributed, step)}
            padded = [-(-t.shape[0] // 2) * 2 * t[0].numel() for k, t in saved.items() if not k.endswith("::step")]
            assert sorted(r["new"]) == sorted(padded)
            frozen = sum(p.numel() for n, p in base.named_parameters() if n not in saved)
            assert frozen > 10_000 and sum(r["old"]) >= sum(r["new"]) + frozen  # the former save fails the above


def test_distributed_losses_equal_single_process(single, distributed):
    ref, got = losses(single), losses(distributed)
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    assert ref[3] < ref[1] - 0.1  # the weights move: later steps depend on the earlier updates
    for step in ref:
        assert abs(got[step] - ref[step]) / abs(ref[step]) <= DIST_TOL


def moments(run, step):
    return load_file(os.path.join(checkpoint(run, step), "optimizer.safetensors"))


def test_distributed_first_step_gradients_equal_single_process(single, distributed):
    """The weights are not compared: AdamW's first step moves each weight by lr * g / (|g| + eps), about lr * sign(g),
    so where a gradient lies within rounding of 0 (the gate's key biases: softmax is shift-invariant) the two runs'
    weights part by up to 2 lr, and later steps spread that; how far depends on the CPU's kernels. The first step's
    moments are plain functions of its (clipped) gradient g: exp_avg = (1 - b1) g, exp_avg_sq = (1 - b2) g^2, so
    they show every FSDP unit's reduced gradient, its scale too (which Adam's update hides), under DIST_TOL."""
    ref, got = moments(single, 1), moments(distributed, 1)
    assert set(ref) == set(got) and set(trainable(single, 3)) == set(trainable(distributed, 3))
    assert any(k.startswith("vision_model.") for k in ref) and any(k.startswith("fusion_gate.") for k in ref)
    for k in ref:
        a, b = (got[k], ref[k]) if k.endswith("::exp_avg") else (got[k].sqrt(), ref[k].sqrt())  # sq: as g's error
        if k.endswith("::step"):
            assert a.item() == b.item() == 1, k
        elif b.abs().max() == 0:  # lora_A: its first gradient is exactly 0 (B starts at 0)
            assert a.abs().max() == 0, k
        else:
            assert rel_err(a, b) <= DIST_TOL, k


# HSDP: 4 ranks as 2 replicas x 2 shards (dp_replicate=2) vs plain FSDP over 4 (dp_replicate=0: one node, so 1).
# Same micro-batches; what differs is how the 4 ranks' fp32 gradients are summed (a reduce-scatter over 4, or over 2
# then an all-reduce over 2): 4 terms reordered, a few ulp, far inside DIST_TOL. The layout each run had is recorded:
# the mesh of a decoder weight, and after the first forward which modules still hold gathered (plain) parameters.

LAYOUT_LAUNCHER = """import json, os, sys
sys.path[:0] = [{root!r}]
import train
shard, summed_loss, seen = train.shard, train.summed_loss, {{}}
def sharded(m, *a):
    m = shard(m, *a)
    w = next(m.decoder.layers[0].parameters())
    seen.update(mesh=list(w.device_mesh.shape), names=w.device_mesh.mesh_dim_names)
    return m
def loss(m, *a):
    out = summed_loss(m, *a)
    if "gathered" not in seen:  # after forward: a resharded module holds DTensors again, the others plain tensors
        kind = lambda mod: type(next(mod.parameters())).__name__
        seen.update(gathered=[kind(l) for l in m.decoder.layers] + [kind(m.vision), kind(m.decoder.embedding)])
        with open(sys.argv[1] + "_layout_" + os.environ["RANK"] + ".json", "w") as f:
            json.dump(seen, f)
    return out
train.shard, train.summed_loss = sharded, loss
train.main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def four_ranks(meta, tmp_path_factory):
    root = tmp_path_factory.mktemp("hsdp")
    script = root / "launch.py"
    script.write_text(LAYOUT_LAUNCHER.format(root=ROOT))
    runs = {}
    for rep in (0, 2):
        runs[rep] = str(root / f"dp_replicate_{rep}")
        args = train_args("fusion", fixture("mpgui_tiny"), meta, runs[rep], *DIST, "--micro_batch=1", "--max_steps=2",
                          f"--dp_replicate={rep}")
        torchrun(str(script), [runs[rep], *args], nproc=4)
    return runs


def test_hsdp_equals_plain_fsdp(four_ranks):
    fsdp, hsdp = four_ranks[0], four_ranks[2]
    layouts = {}
    for rep, run in four_ranks.items():
        for rank in range(4):
            with open(f"{run}_layout_{rank}.json") as f:
                layouts.setdefault(rep, []).append(json.load(f))
    assert all(x["mesh"] == [4] and x["names"] is None for x in layouts[0])
    assert all(x["mesh"] == [2, 2] and x["names"] == ["dp_replicate", "dp_shard"] for x in layouts[2])
    # every block but the last resharded after forward; the last one and the root (embedding) kept gathered
    for x in layouts[0] + layouts[2]:
        assert x["gathered"] == ["DTensor"] * (len(x["gathered"]) - 3) + ["Parameter", "DTensor", "Parameter"], x
    ref, got = losses(fsdp), losses(hsdp)
    assert sorted(ref) == sorted(got) == [1, 2]
    for step in ref:
        assert abs(got[step] - ref[step]) / abs(ref[step]) <= DIST_TOL
    a, b = moments(hsdp, 1), moments(fsdp, 1)  # the first step's gradients (see the test above)
    assert set(a) == set(b)
    for k in a:
        if not k.endswith("::step") and b[k].abs().max() > 0:
            assert rel_err(a[k], b[k]) <= DIST_TOL, k


def test_dp_replicate_must_divide_the_world(tmp_path):
    with pytest.raises(ValueError, match="dp_replicate 3 does not divide the world size 1"):
        train.main([config_file(tmp_path), "--dp_replicate=3"])


# a micro-batch whose samples were all skipped at read time on one rank only: that rank still runs every FSDP unit (a
# blank batch, its loss times 0), else the others wait in its all-gathers. One process skips the same micro-batch.

SKIP_LAUNCHER = """import os, sys
sys.path.insert(0, {root!r})
import formats, train
real, fetches = formats.InternVLDataset.__getitem__, []
skip = {skip!r}.get(int(os.environ.get("RANK", 0)), ())
def get(self, i):  # this process's fetches numbered in `skip` (from 0) come back skipped
    fetches.append(i)
    return dict(skip=("test", i, "skipped by the test")) if len(fetches) - 1 in skip else real(self, i)
formats.InternVLDataset.__getitem__ = get
train.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def one_rank_skips(meta, tmp_path_factory):
    """(one process, torchrun) runs whose first step's second micro-batch (order[2:4]) comes back all skipped: in one
    process its fetches 2 and 3, under torchrun rank 1's first two (rank_slice deals rank 1 that micro-batch)."""
    root = tmp_path_factory.mktemp("skip_rank")
    out = {}
    for name, skip in (("single", {0: (2, 3)}), ("dist", {1: (0, 1)})):
        script = root / f"{name}.py"
        script.write_text(SKIP_LAUNCHER.format(root=ROOT, skip=skip))
        out[name] = str(root / name)
        args = train_args("fusion", fixture("mpgui_tiny"), meta, out[name], *DIST, "--dist_timeout_min=1")
        if name == "dist":
            torchrun(str(script), args, timeout=120)  # a clean run takes ~10 s
        else:
            subprocess.run([sys.executable, str(script), *args], cwd=ROOT, check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    return out


def test_a_micro_batch_skipped_on_one_rank_neither_hangs_nor_counts(one_rank_skips):
    ref, got = losses(one_rank_skips["single"]), losses(one_rank_skips["dist"])
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    for run in one_rank_skips.values():
        with open(os.path.join(run, "metrics.jsonl")) as f:
            assert [r["skipped"] for r in map(json.loads, f)] == [2, 0, 0]  # all ranks' skips counted
    for step in ref:  # the blank batch adds no loss, no target and no gradient
        assert abs(got[step] - ref[step]) / abs(ref[step]) <= DIST_TOL


# ----------------------------------------------------------------------------------------------------------------------
# 3. resume: 4 steps in one go vs stopped after the step-2 checkpoint and re-run (dropouts on: RNG states matter;
# 3 steps per epoch: the resumed run crosses an epoch boundary)

RESUME = ["--global_batch=8", "--micro_batch=4", "--max_steps=4", "--save_every=2", "--max_tiles=2", "--max_length=400",
          "--bf16=False", "--num_workers=0", "--lora_llm_r=4", "--lora_llm_alpha=8", *VIT_LORA, "--lr=1e-3"]


def resume_args(meta, out):
    return train_args("fusion", fixture("mpgui_tiny"), meta, out, *RESUME)


@pytest.fixture(scope="module")
def uninterrupted(meta, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("resume") / "a")
    train.main(resume_args(meta, out))
    return out


@pytest.fixture(scope="module")
def resumed(meta, uninterrupted, tmp_path_factory):
    return rerun_from_step_2(uninterrupted, str(tmp_path_factory.mktemp("resume") / "b"),
                             lambda out: resume_args(meta, out))


def rerun_from_step_2(run, out, args):
    """A copy of run cut back to its step-2 checkpoint (the step-4 one and the records after step 2 gone), then
    train.main(args(out))."""
    shutil.copytree(run, out)
    shutil.rmtree(checkpoint(out, 4))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        head = f.readlines()[:2]
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(head)
    assert checkpoints.latest(out) == checkpoint(out, 2)
    train.main(args(out))
    return out


def test_resumed_losses_equal_uninterrupted(uninterrupted, resumed):
    ref, got = losses(uninterrupted), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(got[step] - ref[step]) / abs(ref[step]) <= RESUME_TOL


def test_resumed_trainable_weights_equal_uninterrupted(uninterrupted, resumed):
    assert max_rel_state(trainable(resumed, 4), trainable(uninterrupted, 4)) <= RESUME_TOL


# ----------------------------------------------------------------------------------------------------------------------
# 4. interop: a hand-made Qwen2-VL run merged by merge.py, loaded by transformers

QWEN_RUN = dict(mpgui=False, gate_mask="prompt_only", lora_llm_r=4, lora_llm_alpha=8, lora_vit_r=2, lora_vit_alpha=4)


def qwen_run(folder, base):
    """A run folder as train.py would leave it: config.json + checkpoints/step_0000001/trainable.safetensors with random
    adapters for every injected name. Returns (run, our unmerged model)."""
    run = os.path.join(folder, "run")
    os.makedirs(checkpoint(run, 1))
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(dict(QWEN_RUN, base=base), f)
    m = load.load_model(base, dtype=torch.float32)
    lora.add_adapters(m, 4, 8, 2, 4)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in adapters(m).items()}
    save_file(state, os.path.join(checkpoint(run, 1), checkpoints.TRAINABLE))
    assert set(state) == set(adapters(m))
    m.load_state_dict(state, strict=False)
    return run, m.eval()


@pytest.fixture(scope="module")
def qwen_merged(tmp_path_factory):
    """The Qwen2-VL fixture with its storage dtype under the 4.x key torch_dtype (which merge.py reads), merged."""
    root = str(tmp_path_factory.mktemp("interop"))
    base = os.path.join(root, "base")
    shutil.copytree(fixture("qwen2_vl_tiny"), base)
    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump({**cfg, "torch_dtype": "float32"}, f)
    run, ours = qwen_run(root, base)
    out = os.path.join(root, "merged")
    merge.main([run, out])
    return out, ours


def test_merged_qwen_loads_in_transformers_with_our_unmerged_logits(qwen_merged):
    transformers = pytest.importorskip("transformers")
    out, ours = qwen_merged
    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager",
                                                                       dtype=torch.float32).eval()
    tok = load.load_tokenizer(out)
    image = Image.new("RGB", (130, 90), (200, 40, 90))
    image.paste((10, 220, 30), (20, 10, 70, 60))
    enc = data.encode_qwen(tok, [{"role": "user", "content": "<image>\nwhere is save?"}], [image], 4 * 28 * 28,
                           60 * 28 * 28)
    ids = enc["input_ids"][None]
    vision = dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    with torch.no_grad():
        got = ref(input_ids=ids, mm_token_type_ids=(ids == ours.cfg.image_token_id).long(), **vision).logits.float()
        want = ours(ids, **vision)
        base = load.load_model(fixture("qwen2_vl_tiny"), dtype=torch.float32)(ids, **vision)
    assert int((ids == ours.cfg.image_token_id).sum()) > 0
    assert rel_err(want, base) > 1e-2  # the adapters matter
    assert rel_err(got, want) <= 1e-4


def test_merged_qwen_has_the_official_flat_layout(qwen_merged):
    out, ours = qwen_merged
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        keys = set(json.load(f)["weight_map"])
    assert {k.split(".")[0] for k in keys} == {"visual", "model"}
    assert "lm_head.weight" not in keys  # tied
    assert keys == set(ours.state_dict()) - {"lm_head.weight"} - set(adapters(ours))


def test_merge_keeps_the_storage_dtype_of_a_transformers5_config(tmp_path):
    from safetensors import safe_open
    run, _ = qwen_run(str(tmp_path), fixture("qwen2_vl_tiny"))  # config.json: "dtype": "float32"
    out = str(tmp_path / "merged")
    merge.main([run, out])
    with safe_open(os.path.join(out, "model-00001-of-00001.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_merge_replaces_only_what_it_wrote(tmp_path):
    run, _ = qwen_run(str(tmp_path), fixture("qwen2_vl_tiny"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    with pytest.raises(SystemExit, match="not written by merge.py"):
        merge.main([run, str(mine)])
    assert os.listdir(mine) == ["notes.txt"] and not os.path.exists(str(mine) + ".tmp")
    out = str(tmp_path / "merged")
    merge.main([run, out])
    first = file_digests(out)
    merge.main([run, out + "/"])  # its own output: replaced, nothing left beside it
    assert file_digests(out) == first and merge.MARKER in os.listdir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine", "run"]
    merge.main([run, str(mine), "--overwrite"])  # asked for: the user's folder goes
    assert file_digests(str(mine)) == first


def test_merge_refuses_the_run_or_its_base_as_out(tmp_path):
    base = str(tmp_path / "base")
    shutil.copytree(fixture("qwen2_vl_tiny"), base)
    run, _ = qwen_run(str(tmp_path), base)
    before = file_digests(base)
    for out in (base, run, os.path.join(run, "merged"), str(tmp_path)):
        with pytest.raises(SystemExit, match="overlaps"):
            merge.main([run, out, "--overwrite"])
    assert file_digests(base) == before


def test_merge_refuses_a_base_that_changed_since_training(tmp_path):
    base = str(tmp_path / "base")
    shutil.copytree(fixture("qwen2_vl_tiny"), base)
    run, _ = qwen_run(str(tmp_path), base)
    with open(os.path.join(run, "base.json"), "w") as f:  # as train.py records it
        json.dump(dict(folder=base, fingerprint=load.fingerprint(base)), f)
    merge.main([run, str(tmp_path / "first")])
    shutil.copy(os.path.join(tmp_path, "first", "model-00001-of-00001.safetensors"),
                os.path.join(base, "model.safetensors"))  # the base overwritten by a merge (other dtype, same keys)
    with pytest.raises(SystemExit, match="now holds other weights"):
        merge.main([run, str(tmp_path / "second")])
    assert not os.path.exists(tmp_path / "second")


def test_train_records_its_base(tmp_path):
    base = fixture("qwen2_vl_tiny")
    cfg = train.TrainConfig(base=base, out=str(tmp_path / "run"))
    train.write_run(cfg, load.load_tokenizer(base), base)
    assert load.read_json(cfg.out, "base.json") == dict(folder=os.path.abspath(base), fingerprint=load.fingerprint(base))


# ----------------------------------------------------------------------------------------------------------------------
# 5. chain: the five MP-GUI stages, each from the previous stage's merge (stage 1 from a plain InternVL2)


@pytest.fixture(scope="module")
def chain(meta, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    base, out = fixture("internvl2_tiny"), {}
    for stage in STAGES:
        run, merged = str(root / f"run_{stage}"), str(root / f"merged_{stage}")
        vit = VIT_LORA if stage in ("fusion", "benchmark") else []
        train.main(train_args(stage, base, meta, run, *SHRINK, *vit))
        out[stage] = dict(run=run, merged=merged, err=merge.main([run, merged]))
        base = merged
    return out


def test_chain_merges_are_exact(chain):
    for stage in STAGES:
        assert 0 <= chain[stage]["err"] <= MERGE_TOL, stage


def test_chain_losses_are_finite(chain):
    for stage in STAGES:
        got = losses(chain[stage]["run"])
        assert sorted(got) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in got.values()), stage


def test_chain_merges_load_as_mpgui_with_the_extra_token(chain):
    base_vocab = load.load_model(fixture("internvl2_tiny")).cfg.vocab_size
    for stage in STAGES:
        folder = chain[stage]["merged"]
        with open(os.path.join(folder, "config.json")) as f:
            assert json.load(f)["architectures"] == ["MPGUI"]
        m = load.load_model(folder)
        assert m.cfg.arch == "mpgui" and m.initialised == [], stage  # every part comes from the files
        assert m.cfg.vocab_size == base_vocab + 1 == m.cfg.extra_token_id + 1, stage


def trained_names(run):
    """The parameters the optimizer stepped (full state dict names)."""
    with open(os.path.join(checkpoint(run, 2), "state.json")) as f:
        return {n for g in json.load(f)["param_groups"] for n in g["params"]}


def test_chain_stage1_trains_only_the_textual_perceiver_and_llm_lora(chain):
    run = chain["textual"]["run"]
    names = trained_names(run)
    assert names and all(n.startswith("textual_perceiver.") or n.startswith("language_model.") and
                         n.endswith(("lora_A", "lora_B")) for n in names)
    assert any(n.startswith("textual_perceiver.") for n in names)
    saved = set(trainable(run, 2))  # + what the plain InternVL lacked: the other parts, the grown embedding and head
    new = {n for n in saved - names if n.split(".")[0] in M.MPGUI.PARTS}
    assert saved - names - new == {"language_model.model.tok_embeddings.weight", "language_model.output.weight"}
    assert {n.split(".")[0] for n in new} == {"graphical_perceiver", "spatial_perceiver", "fusion_gate"}


def test_chain_stage5_trains_no_perceiver_or_gate(chain):
    run = chain["benchmark"]["run"]
    saved = set(trainable(run, 2))
    assert saved == trained_names(run)
    assert all(n.endswith(("lora_A", "lora_B")) for n in saved)
    assert {n.split(".")[0] for n in saved} == {"language_model", "vision_model"}


# ----------------------------------------------------------------------------------------------------------------------
# 6. faults: a checkpoint write killed midway, a merge whose check fails


@pytest.fixture(scope="module")
def killed_write(meta, tmp_path_factory, uninterrupted):
    """The resume run, its step-4 checkpoint write killed after the weights (disk full), then run again."""
    out = str(tmp_path_factory.mktemp("killed") / "run")
    real = checkpoints.save_file

    def save(tensors, f, *a, **k):
        if str(f).endswith(os.path.join("step_0000004.tmp", "optimizer.safetensors")):
            raise OSError("disk full")
        return real(tensors, f, *a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoints, "save_file", save)
        with pytest.raises(OSError, match="disk full"):
            train.main(resume_args(meta, out))
    after_kill = dict(latest=checkpoints.latest(out), tmp=sorted(os.listdir(checkpoint(out, 4) + ".tmp")))
    train.main(resume_args(meta, out))
    return out, after_kill


def test_killed_checkpoint_write_leaves_the_previous_checkpoint_latest(killed_write):
    out, after_kill = killed_write
    assert after_kill == dict(latest=checkpoint(out, 2), tmp=[checkpoints.TRAINABLE])


def test_rerun_after_killed_write_resumes_and_finishes(killed_write, uninterrupted):
    out, _ = killed_write
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_0000002", "step_0000004"]
    assert losses(out) == losses(uninterrupted)
    assert max_rel_state(trainable(out, 4), trainable(uninterrupted, 4)) <= RESUME_TOL


def test_failed_merge_check_leaves_out_untouched(uninterrupted, tmp_path):
    out = str(tmp_path / "merged")
    merge.main([uninterrupted, out])
    before = file_digests(out)
    bad = str(tmp_path / "diverged")
    shutil.copytree(uninterrupted, bad)
    state = trainable(bad, 4)
    state[next(k for k in state if k.endswith("lora_B"))].fill_(float("nan"))
    save_file(state, os.path.join(checkpoint(bad, 4), checkpoints.TRAINABLE))
    with pytest.raises(SystemExit, match="merge check failed"):
        merge.main([bad, out])
    assert file_digests(out) == before
    assert os.path.isdir(out + ".tmp")  # the failed files, kept to inspect


# ----------------------------------------------------------------------------------------------------------------------
# 7b. run folders: a finished run run again, a kill before the first checkpoint, keep_last, fsync, a damaged
# checkpoint, --resume to an earlier checkpoint


def snapshot(folder):
    """{path under folder: (mtime in ns, sha256)} of every file, and {path: None} of every folder."""
    out = {}
    for d, dirs, files in os.walk(folder):
        out.update({os.path.relpath(os.path.join(d, x), folder): None for x in dirs})
        for x in files:
            p = os.path.join(d, x)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = (os.stat(p).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def steps_logged(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_rerun_of_a_finished_run_says_so_and_touches_nothing(meta, tmp_path, capsys):
    # max_steps=0: the data decides the total (24 samples / 12 a step = 2 steps), so the check follows build_dataset
    args = train_args("fusion", fixture("mpgui_tiny"), meta, str(tmp_path / "run"), *SHRINK, "--max_steps=0",
                      "--global_batch=12", "--micro_batch=6")
    train.main(args)
    out = str(tmp_path / "run")
    assert steps_logged(out) == [1, 2]
    before = snapshot(out)
    capsys.readouterr()
    train.main(args)  # returns: exit code 0
    assert f"{out} is finished: {checkpoint(out, 2)} is step 2 of 2; nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before  # config.json, base.json, tokenizer.json, metrics.jsonl: not even rewritten


def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(meta, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    args = train_args("fusion", fixture("mpgui_tiny"), meta, out, *SHRINK)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed before the first checkpoint")
    with monkeypatch.context() as mp:
        mp.setattr(checkpoints, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            train.main(args)
    first = losses(out)
    assert steps_logged(out) == [1, 2] and checkpoints.latest(out) is None
    train.main(args)  # no checkpoint: from step 0, metrics.jsonl cut to nothing first
    assert steps_logged(out) == [1, 2] and losses(out) == first


def test_keep_last_removes_only_older_checkpoints_train_wrote(meta, tmp_path, monkeypatch):
    real = checkpoints.save

    def save_then_annotate(run, m, opt, sched, step, *rest):  # a user's note in step 1: no longer only train.py's
        real(run, m, opt, sched, step, *rest)
        if step == 1:
            with open(os.path.join(checkpoint(run, 1), "notes.txt"), "w") as f:
                f.write("keep this one")
    monkeypatch.setattr(checkpoints, "save", save_then_annotate)
    for keep, kept in ((2, [1, 4, 5]), (0, [1, 2, 3, 4, 5])):
        out = str(tmp_path / f"keep{keep}")
        train.main(train_args("fusion", fixture("mpgui_tiny"), meta, out, *SHRINK, "--max_steps=5", "--save_every=1",
                              f"--keep_last={keep}"))
        assert os.listdir(os.path.join(out, "checkpoints")) and checkpoints.listed(os.path.join(out, "checkpoints")) \
            == [checkpoint(out, s) for s in kept], keep
        assert sorted(os.listdir(checkpoint(out, 1))) == sorted([*checkpoints.FILES, "notes.txt"])


class Recorder:
    """os.fsync and os.replace calls, in order, as ("fsync", real path) and ("replace", real src, real dst)."""

    def __init__(self, monkeypatch):
        self.events, fsync, replace = [], os.fsync, os.replace

        def record_fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return fsync(fd)

        def record_replace(src, dst):
            self.events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
            return replace(src, dst)
        monkeypatch.setattr(os, "fsync", record_fsync)
        monkeypatch.setattr(os, "replace", record_replace)

    def ordered(self, *groups):
        """Each event was recorded after all of the group before it; a group (a list) in any order within itself."""
        start = 0
        for g in groups:
            real = [(e[0], *map(os.path.realpath, e[1:])) for e in (g if isinstance(g, list) else [g])]
            if not all(e in self.events[start:] for e in real):
                return False
            start = max(self.events.index(e, start) for e in real) + 1
        return True


def test_checkpoint_and_run_files_are_synced_around_their_rename(meta, tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    out = str(tmp_path / "run")
    train.main(train_args("fusion", fixture("mpgui_tiny"), meta, out, *SHRINK, "--max_steps=1"))
    final = checkpoint(out, 1)
    tmp = final + ".tmp"
    state = os.path.join(tmp, "state.json")
    assert rec.ordered(("fsync", state + ".tmp"), ("replace", state + ".tmp", state))
    assert rec.ordered([("fsync", os.path.join(tmp, f)) for f in checkpoints.FILES], ("fsync", tmp),
                       ("replace", tmp, final), ("fsync", os.path.join(out, "checkpoints")))
    for name in ("config.json", "base.json", "tokenizer.json", "metrics.jsonl"):  # metrics.jsonl: the resume cut
        path = os.path.join(out, name)
        assert rec.ordered(("fsync", path + ".tmp"), ("replace", path + ".tmp", path), ("fsync", out)), name


def test_merge_syncs_its_files_before_the_swap(tmp_path, monkeypatch):
    run, _ = qwen_run(str(tmp_path), fixture("qwen2_vl_tiny"))
    out = str(tmp_path / "merged")
    rec = Recorder(monkeypatch)
    merge.main([run, out])
    files = [("fsync", os.path.join(out + ".tmp", f)) for f in sorted(os.listdir(out))]
    assert files and rec.ordered(files, ("fsync", out + ".tmp"), ("replace", out + ".tmp", out),
                                 ("fsync", str(tmp_path)))


def cut_in_half(path):
    with open(path, "rb") as f:
        b = f.read()
    with open(path, "wb") as f:
        f.write(b[:len(b) // 2])


DAMAGES = {"trainable.safetensors cut in half": (lambda c: cut_in_half(os.path.join(c, checkpoints.TRAINABLE)),
                                                 checkpoints.TRAINABLE, "incomplete metadata"),
           "state.json truncated": (lambda c: cut_in_half(os.path.join(c, "state.json")), "state.json",
                                    "JSONDecodeError"),
           "optimizer.safetensors missing": (lambda c: os.remove(os.path.join(c, "optimizer.safetensors")),
                                             "optimizer.safetensors", "FileNotFoundError")}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_latest_checkpoint_is_named_with_the_flag_to_resume_from_the_previous(
        damage, meta, uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(uninterrupted, out)
    hurt, name, cause = DAMAGES[damage]
    hurt(checkpoint(out, 4))
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train.main(resume_args(meta, out))
    msg = str(e.value)
    assert f"checkpoint {checkpoint(out, 4)} is damaged: {os.path.join(checkpoint(out, 4), name)}: " in msg
    assert cause in msg and msg.endswith(f"pass --resume={checkpoint(out, 2)} (the later checkpoints then move to "
                                         "checkpoints/abandoned/)")
    assert snapshot(out) == before  # nothing written, the damaged checkpoint kept as it is
    if damage == "trainable.safetensors cut in half":  # the advice followed: the run finishes as if never damaged
        train.main(resume_args(meta, out) + [f"--resume={checkpoint(out, 2)}"])
        assert max_rel_state(trainable(out, 4), trainable(uninterrupted, 4)) <= RESUME_TOL


def test_merge_names_a_damaged_checkpoint(tmp_path):
    run, _ = qwen_run(str(tmp_path), fixture("qwen2_vl_tiny"))
    cut_in_half(os.path.join(checkpoint(run, 1), checkpoints.TRAINABLE))
    with pytest.raises(SystemExit, match=f"{os.path.join(checkpoint(run, 1), checkpoints.TRAINABLE)}: SafetensorError"):
        merge.main([run, str(tmp_path / "merged")])


@pytest.fixture(scope="module")
def six(meta, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("six") / "run")
    train.main(resume_args(meta, out) + ["--max_steps=6"])  # checkpoints at 2, 4, 6
    return out


def test_resume_from_an_earlier_checkpoint_moves_the_later_ones_aside(meta, six, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(six, out)
    later = {s: file_digests(checkpoint(out, s)) for s in (4, 6)}
    train.main(resume_args(meta, out) + ["--max_steps=6", f"--resume={checkpoint(out, 2)}"])
    assert "the later checkpoints ['step_0000004', 'step_0000006'] -> " in capsys.readouterr().out
    (away,) = os.listdir(os.path.join(out, "checkpoints", "abandoned"))
    away = os.path.join(out, "checkpoints", "abandoned", away)
    assert {s: file_digests(os.path.join(away, f"step_{s:07d}")) for s in (4, 6)} == later  # kept, not deleted
    assert checkpoints.listed(os.path.join(out, "checkpoints")) == [checkpoint(out, s) for s in (2, 4, 6)]
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6] and losses(out) == losses(six)
    assert max_rel_state(trainable(out, 6), trainable(six, 6)) <= RESUME_TOL


# ----------------------------------------------------------------------------------------------------------------------
# 7. a non-finite loss stops the run and names the last good checkpoint


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(meta, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real = checkpoints.save

    def save_then_poison(run, m, *rest):  # the weights diverge right after the step-1 checkpoint
        real(run, m, *rest)
        with torch.no_grad():
            next(p for n, p in m.named_parameters() if n.endswith("lora_B")).fill_(float("nan"))
    monkeypatch.setattr(checkpoints, "save", save_then_poison)
    args = train_args("fusion", fixture("mpgui_tiny"), meta, out, *SHRINK, "--max_steps=3", "--save_every=1")
    with pytest.raises(FloatingPointError, match=f"at step 2; the last good checkpoint is {checkpoint(out, 1)}$"):
        train.main(args)
    assert sorted(losses(out)) == [1]  # nothing non-finite logged
    assert checkpoints.latest(out) == checkpoint(out, 1)


# ----------------------------------------------------------------------------------------------------------------------
# 8. config: what a --key=value override may be, by the field's type


def config_file(folder, raw=None):
    path = os.path.join(str(folder), "config.json")
    with open(path, "w") as f:
        json.dump({"_comment": "keys starting with _ document a config"} if raw is None else raw, f)
    return path


@pytest.mark.parametrize("override, value", [
    ("--bf16=False", False), ("--lr=2e-4", 2e-4), ("--lr=1", 1), ("--max_steps=3", 3), ("--out=123", "123"),
    ("--lm_skip_layer=[1,28,0]", "[1,28,0]"), ("--schedule=cosine", "cosine"),
    ("--datasets=['a:b.json']", ["a:b.json"]), ("--betas=[0.9,0.95]", [0.9, 0.95])])
def test_config_override_accepted(tmp_path, override, value):
    """bool fields take bools; float fields floats or ints (kept as given); str fields the text as it is."""
    got = getattr(train.load_config(config_file(tmp_path), [override]), override[2:].split("=")[0])
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override, error", [
    ("--bf16=1", TypeError), ("--bf16=0", TypeError), ("--bf16=yes", TypeError), ("--lr=abc", TypeError),
    ("--lr=[1]", TypeError), ("--max_steps=3.5", TypeError), ("--max_steps=x", TypeError), ("--datasets=a", TypeError),
    ("--betas=(0.9,0.95)", TypeError), ("--nope=1", KeyError), ("lr=1", ValueError), ("--lr", ValueError),
    ("--max_steps=True", TypeError), ("--schedule=cosin", ValueError), ("--mpgui_mode=textal", ValueError),
    ("--warmup_ratio=2.0", ValueError), ("--micro_batch=0", ValueError), ("--lm_skip_ratio=-0.1", ValueError),
    ("--keep_last=-1", ValueError), ("--keep_last=1.5", TypeError)])
def test_config_override_rejected(tmp_path, override, error):
    with pytest.raises(error):
        train.load_config(config_file(tmp_path), [override])


@pytest.mark.parametrize("raw, error, message", [
    ({"max_steps": "3"}, TypeError, "max_steps = '3' is not a int"), ({"bf16": 1}, TypeError, "bf16 = 1"),
    ({"max_steps": True}, TypeError, "max_steps = True"), ({"schedule": "cosin"}, ValueError, "linear, cosine"),
    ({"mpgui_mode": "textal"}, ValueError, "textual, graphical, spatial, fusion"),
    ({"warmup_ratio": 2.0}, ValueError, r"must be in \[0, 1\]"), ({"lr": 0}, ValueError, "must be > 0"),
    ({"lr": float("nan")}, ValueError, "must be > 0"), ({"save_every": -1}, ValueError, "must be >= 0"),
    ({"crop_min": 1.5, "crop_max": 1.2}, ValueError, "crop_min 1.5 > crop_max 1.2")])
def test_config_file_values_checked_before_any_work(tmp_path, raw, error, message):
    """A config file gets the overrides' type checks, its choices and ranges; the error names the file and key."""
    path = config_file(tmp_path, raw)
    with pytest.raises(error, match=message) as e:
        train.load_config(path)
    assert path in str(e.value)


def test_config_unknown_file_key_rejected(tmp_path):
    with pytest.raises(KeyError, match="unknown config key 'nope'"):
        train.load_config(config_file(tmp_path, {"nope": 1}))


def test_an_old_pickle_checkpoint_is_refused_not_loaded(tmp_path):
    old = tmp_path / "step_0000001"
    old.mkdir()
    (old / "trainable.pt").write_bytes(b"not read: a pickle could run code")
    with pytest.raises(SystemExit, match="loads no pickle"):
        checkpoints.load(str(old), None, None, None, 0)


def test_token_selection_on_an_internvl_base_is_an_error(tmp_path):
    base = fixture("internvl2_tiny")
    cfg = train.TrainConfig(base=base, lm_skip_ratio=0.5, out=str(tmp_path))
    with pytest.raises(ValueError, match="ShowUI's, for Qwen2-VL bases"):
        train.build_dataset(cfg, load.load_tokenizer(base), load.load_model(base).cfg)


def test_rerun_with_another_config_is_refused(tmp_path):
    import dataclasses
    cfg = train.TrainConfig(base="base", out=str(tmp_path / "run"), lr=6e-4, max_steps=20)
    train.check_rerun(cfg)  # a new folder: nothing to compare
    os.makedirs(cfg.out)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    train.check_rerun(dataclasses.replace(cfg, max_steps=30, save_every=5, keep_last=0, num_workers=0))  # allowed
    with pytest.raises(SystemExit, match=r"another config \(lr: 0.0006 there, 0.0005 now; schedule: 'linear' there, "
                                         r"'cosine' now\); to start a new run, pass another --out"):
        train.check_rerun(dataclasses.replace(cfg, max_steps=30, lr=5e-4, schedule="cosine"))
    # a run from before a key existed (here dp_replicate, compile, base_dtype): resumed where the key's old behaviour
    # is asked for (its default; base_dtype: the fp32 frozen base of then), refused otherwise
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("dp_replicate", "compile", "base_dtype")}
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(old, f)
    train.check_rerun(dataclasses.replace(cfg, base_dtype="float32"))
    with pytest.raises(SystemExit, match=r"base_dtype: 'float32' there, 'bfloat16' now"):
        train.check_rerun(dataclasses.replace(cfg, base_dtype="bfloat16"))
