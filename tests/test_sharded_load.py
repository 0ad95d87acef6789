"""train.build_model's meta-device construction with sharded loading (torchrun, 2 ranks, FSDP2 over gloo: each rank
reads only its shards' rows from the safetensors) against one process, and the bf16 frozen base (base_dtype):
storage dtypes, losses, the merge, the config error.

The one-process build is the oracle: the loader's and the training engine's own tests hold it to the files.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import load
import merge
import train
from parity import rel_err
from test_train import DIST, DIST_TOL, ROOT, checkpoint, fixture, losses, moments, torchrun, train_args, write_dataset

pytestmark = pytest.mark.usefixtures("one_thread", "default_denormals")  # tiny models, train.main runs

# one bf16 rounding: bf16 keeps 8 significant bits, so a stored value moves by at most 2^-9 of itself, 2^-8 of the
# spacing; see test_bf16_base_losses_are_within_bf16_rounding_of_the_fp32_base for why the loss stays inside it
BF16_TOL = 2.0 ** -8

# train.build_model under torchrun or one process, then every parameter's local tensor (a DTensor's shard) saved per
# rank, with the bytes load.py read from the safetensors files (its safe_open counted: slices are its only reads)
BUILD = """import json, os, sys
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
import load, train
real, nbytes = load.safe_open, [0]


class Slice:
    def __init__(self, s):
        self.s = s

    def get_shape(self):
        return self.s.get_shape()

    def __getitem__(self, rows):
        t = self.s[rows]
        nbytes[0] += t.nbytes
        return t


class Counted:
    def __init__(self, *args, **kw):
        self.f = real(*args, **kw)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_slice(self, key):
        return Slice(self.f.get_slice(key))


load.safe_open = Counted
cfg = train.load_config(sys.argv[2], sys.argv[3:])
rank, world, device = train.init_distributed(cfg)
m = train.build_model(cfg, load.load_tokenizer(load.resolve(cfg.base)), device)
params = dict(m.named_parameters())
save_file({n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in params.items()},
          os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(dict(world=world, bytes_read=nbytes[0], new=m.new_tensors,
                   trainable=[n for n, p in params.items() if p.requires_grad]), f)
train.end_distributed(world > 1)
"""


def build(tmp, args, ranks):
    """[({name: this rank's tensor}, info) per rank] of train.build_model in `ranks` processes (1: plain python)."""
    script, out = tmp / "build.py", tmp / f"ranks{ranks}"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\n" + BUILD)
    out.mkdir()
    if ranks == 1:
        p = subprocess.run([sys.executable, str(script), str(out), *args], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    else:
        torchrun(str(script), [str(out), *args], timeout=300)
    return [(load_file(out / f"rank{r}.safetensors"), json.load(open(out / f"rank{r}.json"))) for r in range(ranks)]


def stage(name, base, *overrides):
    return train_args(name, fixture(base), "unused-meta.json", "unused-out", *DIST, *overrides)


BUILDS = {
    # MP-GUI stage 1 from a plain InternVL2: the four parts it lacks drawn new, textual_perceiver drawn again
    # (init_parts), the vocabulary grown by EXTRA (head and embedding rows = the mean of the file's), LoRA on LLM + ViT
    "mpgui_stage1": stage("textual", "internvl2_tiny"),
    "mpgui_stage1_bf16": stage("textual", "internvl2_tiny", "--bf16=True"),  # frozen shards bf16, the rest fp32
    # Qwen2.5-VL: the tied head, the embedding's Parameter under FSDP2
    "qwen_tied": [os.path.join(ROOT, "configs", "tongui_3b.json"), f"--base={fixture('qwen2_5_vl_tiny')}",
                  "--out=unused-out", "--global_batch=2", "--micro_batch=1", "--bf16=False", "--lora_vit_r=4"],
}


@pytest.mark.parametrize("case", sorted(BUILDS))
def test_sharded_build_equals_one_process_bit_for_bit(case, tmp_path):
    """Rank r holds rows [r c, (r + 1) c) of every tensor, c = ceil(rows / 2) (FSDP2's dim-0 chunks), and they are the
    one-process model's rows bit for bit: the weights read, the new parts and adapters (drawn on every rank from the
    same seed), the grown vocabulary rows, in the same dtypes. Each rank reads well under the one process's bytes."""
    (one, info), = build(tmp_path, BUILDS[case], 1)
    ranks = build(tmp_path, BUILDS[case], 2)
    for local, rank_info in ranks:
        assert set(local) == set(one) and rank_info["world"] == 2
        assert rank_info["new"] == info["new"] and rank_info["trainable"] == info["trainable"]
    for name, full in one.items():
        c = math.ceil(full.shape[0] / 2)
        for r, (local, _) in enumerate(ranks):
            assert local[name].dtype == full.dtype and torch.equal(local[name], full[r * c:(r + 1) * c]), (name, r)
    # Bytes read from the files (printed with -s), one process / rank 0 / rank 1: mpgui_stage1 (fp32 files, so the
    # bf16 case too) 601,984 / 280,128 / 321,856, summing to the one process's: rank 1, which holds the grown rows,
    # also streams the file's embedding and head in full (4096-row chunks) for their mean, as one process does;
    # qwen_tied 732,288 / 366,144 / 366,144. So a rank reads and holds ~1/N of the weights.
    per_rank = [i["bytes_read"] for _, i in ranks]
    print(case, "bytes read: one process", info["bytes_read"], "per rank", per_rank)
    assert info["bytes_read"] > 0 and max(per_rank) <= 0.6 * info["bytes_read"]


# ----------------------------------------------------------------------------------------------------------------------
# training from a sharded load: MP-GUI stage 1 (the build above) in 2 ranks against one process


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def stage1(meta, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    runs = str(root / "one"), str(root / "two")
    train.main(train_args("textual", fixture("internvl2_tiny"), meta, runs[0], *DIST))
    torchrun(os.path.join(ROOT, "train.py"), train_args("textual", fixture("internvl2_tiny"), meta, runs[1], *DIST))
    return runs


def test_sharded_stage1_run_equals_one_process(stage1):
    """Losses and the first step's gradients (Adam's first moments) within DIST_TOL, as test_train's FSDP2 runs: not
    bit for bit, because gloo's reduction and the sharded clipping norm sum in another order than one process (the
    build itself is bit for bit, above). The weights after several steps are not compared, for the reason
    test_distributed_first_step_gradients_equal_single_process gives."""
    one, two = stage1
    ref, got = losses(one), losses(two)
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    assert all(abs(got[s] - ref[s]) / abs(ref[s]) <= DIST_TOL for s in ref), (ref, got)
    a, b = moments(one, 1), moments(two, 1)
    assert set(a) == set(b) and any(k.startswith("textual_perceiver.") for k in a)
    for k in a:
        if k.endswith("::exp_avg") and a[k].abs().max() > 0:
            assert rel_err(b[k], a[k]) <= DIST_TOL, k


# ----------------------------------------------------------------------------------------------------------------------
# the bf16 frozen base


def test_bf16_base_stores_frozen_weights_in_bf16_and_trained_and_new_ones_in_fp32():
    args = stage("textual", "internvl2_tiny", "--bf16=True")
    cfg = train.load_config(args[0], args[1:])
    assert cfg.base_dtype == "bfloat16"  # auto, with bf16 compute
    torch.manual_seed(0)
    m = train.build_model(cfg, load.load_tokenizer(cfg.base), torch.device("cpu"))
    p = dict(m.named_parameters())
    frozen = ["vision_model.embeddings.patch_embedding.weight", "mlp1.1.weight",
              "language_model.model.layers.0.attention.wqkv.weight", "language_model.model.norm.weight"]
    fp32 = ["language_model.model.layers.0.attention.wqkv.lora_A", "vision_model.encoder.layers.0.mlp.fc1.lora_B",
            "textual_perceiver.1.weight",  # trained
            "graphical_perceiver.1.weight", "language_model.output.weight"]  # new: drawn, and the grown head
    assert all(p[n].dtype == torch.bfloat16 and not p[n].requires_grad for n in frozen)
    assert all(p[n].dtype == torch.float32 for n in fp32)
    for n, t in p.items():
        assert t.dtype == (torch.float32 if t.requires_grad or n in m.new_tensors else torch.bfloat16), n


@pytest.fixture(scope="module")
def bf16_runs(meta, tmp_path_factory):
    """One process, bf16 compute (autocast), 3 steps of stage 4 on the tiny MP-GUI, the base stored in bf16 (auto)
    and in fp32."""
    root = tmp_path_factory.mktemp("bf16")
    runs = {dtype: str(root / dtype) for dtype in ("auto", "float32")}
    for dtype, run in runs.items():
        train.main(train_args("fusion", fixture("mpgui_tiny"), meta, run, *DIST, "--bf16=True", f"--base_dtype={dtype}"))
    return runs


def test_bf16_base_losses_are_within_bf16_rounding_of_the_fp32_base(bf16_runs):
    """Under autocast every matmul already rounds the fp32 base to bf16, so a bf16 base differs only where autocast
    keeps fp32: norm weights and biases added in fp32, the embedding (the residual stream now starts in bf16). Each is
    one bf16 rounding of a weight, and the loss, a mean of log-softmaxes, moves by a few such roundings of its
    logits: measured 1e-4 to 4e-4 relative over the 3 steps, under BF16_TOL (4e-3). A weight mis-read or left
    unfilled moves it by far more."""
    for dtype, stored in (("auto", "bfloat16"), ("float32", "float32")):
        with open(os.path.join(bf16_runs[dtype], "config.json")) as f:
            assert json.load(f)["base_dtype"] == stored  # the resolved value is what the run folder records
    ref, got = losses(bf16_runs["float32"]), losses(bf16_runs["auto"])
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    assert all(abs(got[s] - ref[s]) / abs(ref[s]) <= BF16_TOL for s in ref), (ref, got)
    assert ref != got  # the bf16 base is in use: its rounding shows in the losses


def test_merge_of_a_bf16_base_run_is_the_fp32_fold_of_its_adapters_into_the_base_files(bf16_runs, tmp_path):
    """merge.py rebuilds the base from its files in fp32, not from the run's bf16 copy: every merged tensor is the
    base file's tensor + B A alpha / r in fp32 (LoRA), or the run's fp32 master (trained parts), bit for bit."""
    run, out = bf16_runs["auto"], str(tmp_path / "merged")
    merge.main([run, out])
    trained = load_file(os.path.join(checkpoint(run, 3), checkpoints.TRAINABLE))
    assert trained and all(t.dtype == torch.float32 for t in trained.values())  # the masters
    base, merged = ({k: v for f in load.safetensors_files(d) for k, v in load_file(f).items()}
                    for d in (fixture("mpgui_tiny"), out))
    assert set(merged) == set(base)
    folded = 0
    for k, w in merged.items():
        layer = k[:-len(".weight")]
        if k in trained:
            want = trained[k]
        elif layer + ".lora_A" in trained:  # rank 4, alpha 8 on the LLM and the ViT (DIST)
            want = base[k] + (trained[layer + ".lora_B"] @ trained[layer + ".lora_A"]) * (8 / 4)
            folded += 1
        else:
            want = base[k]
        assert w.dtype == torch.float32 and torch.equal(w, want), k  # the fixture's storage dtype is float32
    assert folded > 10


def fsdp_bf16(meta, root, dtype):
    run = str(root / dtype)
    torchrun(os.path.join(ROOT, "train.py"), train_args("fusion", fixture("mpgui_tiny"), meta, run, *DIST,
                                                        "--bf16=True", f"--base_dtype={dtype}"))
    return run


def test_fsdp_bf16_base_equals_the_fp32_base_bit_for_bit(meta, tmp_path):
    """Under FSDP2 (param_dtype bf16) the fp32 base is all-gathered as its bf16 rounding, which is what a bf16 base
    stores: the same bf16 compute, the same fp32 trainable tensors and reductions, so the losses and the trained
    tensors agree to the last bit, at half the frozen weights' memory."""
    ref, got = fsdp_bf16(meta, tmp_path, "float32"), fsdp_bf16(meta, tmp_path, "auto")
    assert losses(ref) == losses(got) and sorted(losses(ref)) == [1, 2, 3]
    a, b = (load_file(os.path.join(checkpoint(r, 3), checkpoints.TRAINABLE)) for r in (ref, got))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)


# ----------------------------------------------------------------------------------------------------------------------
# config


def test_base_dtype_bfloat16_with_bf16_off_is_an_error_naming_both_fields():
    path = os.path.join(ROOT, "configs", "textual.json")
    with pytest.raises(ValueError, match="base_dtype bfloat16 needs bf16 compute, but bf16 is false") as e:
        train.load_config(path, ["--bf16=False", "--base_dtype=bfloat16"])
    assert path in str(e.value)
    with pytest.raises(ValueError, match="auto, bfloat16, float32"):
        train.load_config(path, ["--base_dtype=float16"])
    assert train.load_config(path, ["--bf16=False"]).base_dtype == "float32"  # auto follows bf16
    assert train.load_config(path).base_dtype == "bfloat16"
    assert train.load_config(path, ["--base_dtype=float32"]).base_dtype == "float32"  # fp32 storage, bf16 compute
