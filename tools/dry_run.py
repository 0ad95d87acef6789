"""Will a recipe fit? One training step at the real shapes, simulated on the CPU in about a minute, with no weights
and no GPU.

    python tools/dry_run.py configs/textual.json --ranks 8 --gpu_memory_gb 80 [--key=value ...]
    python tools/dry_run.py configs/textual.json --ranks 1 --measure     # on a GPU: and the same step for real

The model is built from config.json alone (configs/models/ holds the four official bases' configs, written from their
published shapes) by train.py's own build_model, sharded by train.shard over a fake N-rank process group, and one
real-shaped micro-batch (micro_batch samples of max_length tokens, each with the largest image the recipe allows) runs
forward, backward and the optimizer twice on fake tensors (FakeTensorMode: shapes and dtypes, no memory): the first
step under FlopCounterMode, the second (it holds gradients and Adam's moments) under FSDP2's memory tracker.
Printed: rank 0's peak memory by category, model FLOPs per step beside train.step_flops (the formula train.py logs
MFU with), and whether it fits.

Token ids, masks and pixels stay real (small) tensors, so the model's data-dependent steps (counting image tokens,
building masks, ShowUI's UI graph) run for real; every op that touches a parameter or activation runs fake. This is
a tool, not part of the trainer: it needs torch's testing-only fake process group and its private memory tracker.
"""
import argparse
import contextlib
import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import load  # noqa: E402
import train  # noqa: E402

MODELS = os.path.join(ROOT, "configs", "models")
CATEGORIES = ("Sharded Param", "Unsharded Param", "Buffer", "Sharded Grad", "Unsharded Grad", "Activation", "Temp",
              "All Gather", "Reduce Scatter", "OptState", "Inputs", "Other")


SMALL = 1 << 16  # elements: a factory's output up to this size is made for real (positions, masks of short rows)


class Mixed(TorchDispatchMode):
    """Runs an op for real when none of its tensors is fake (token ids, masks, pixels), else under `fake`."""

    def __init__(self, fake):
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not tensors:  # a factory (zeros, arange, ...): real when small (positions), fake when activation-sized
            with self.fake:
                out = func(*args, **kwargs)
            small = all(t.numel() <= SMALL for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return func(*args, **kwargs) if small else out
        if not any(isinstance(t, FakeTensor) for t in tensors):
            return func(*args, **kwargs)
        if func is torch.ops.aten.index.Tensor:  # x[mask], a real mask: its real positions give the static shape
            idx = []
            for i in args[1]:
                real = i is not None and not isinstance(i, FakeTensor) and i.dtype == torch.bool
                idx.extend(i.nonzero(as_tuple=True) if real else [i])
            args = (args[0], idx)
        with self.fake:
            return func(*args, **kwargs)


def _cpu_attention(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v) // (1 + is_causal)  # a causal kernel skips the masked half


def _cpu_attention_backward(g, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(g, q, k, v) // (1 + is_causal)


# FlopCounterMode knows the CUDA attention kernels only; the CPU one that SDPA runs here, with the same count
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


class Vocab:
    """The tokenizer build_model asks for MP-GUI's EXTRA token: ids from the folder's added_tokens.json."""

    def __init__(self, folder, vocab_size):
        self.ids = load.read_json(folder, "added_tokens.json")
        self.size = max([vocab_size] + [i + 1 for i in self.ids.values()])

    def token_to_id(self, token):
        return self.ids.get(token)

    def add_special_tokens(self, tokens):
        for t in tokens:
            self.ids[t.content], self.size = self.size, self.size + 1


def base_folder(cfg):
    """The config folder for cfg.base: the folder itself when it holds config.json, else configs/models/NAME for a
    hub id OWNER/NAME; an MP-GUI stage after the first (base: the previous merge) has InternVL2-8B's shapes."""
    if os.path.isfile(os.path.join(cfg.base, "config.json")):
        return cfg.base
    for name in (os.path.basename(cfg.base), "InternVL2-8B" if cfg.mpgui else None):
        if name and os.path.isfile(os.path.join(MODELS, name, "config.json")):
            return os.path.join(MODELS, name)
    raise SystemExit(f"dry_run: no config.json for base {cfg.base!r} (none in configs/models/); give --base=FOLDER")


@contextlib.contextmanager
def weightless(mode):
    """train.build_model without weight files: load.index_weights lists every parameter as stored (the parts a
    checkpoint may lack as absent, so they are initialised as in a real run), load.read_rows returns empty rows
    (fake under FakeTensorMode), and Module.to(cpu) is a no-op (fake parameters cannot be swapped)."""
    saved = load.index_weights, load.read_rows, torch.nn.Module.to
    shapes = {}

    def index(model, folder, rename=None, optional=()):
        params = dict(model.named_parameters(remove_duplicate=False))
        shapes.update((n, p.shape) for n, p in params.items())
        tied = {"lm_head.weight"} if model.cfg.tie_word_embeddings else set()
        return {n: (None, n) for n in params if n not in tied and n.split(".")[0] not in optional}, list(optional)

    def rows(path, key, a, b, dtype=None):
        with mode:
            return torch.empty(b - a, *shapes[key][1:], dtype=dtype)

    load.index_weights, load.read_rows = index, rows
    torch.nn.Module.to = lambda self, *a, **k: self if a and str(a[0]) == "cpu" else saved[2](self, *a, **k)
    try:
        yield
    finally:
        load.index_weights, load.read_rows, torch.nn.Module.to = saved


def batch(m, cfg):
    """A micro-batch at the recipe's limits: each sample the largest image the recipe allows (InternVL: max_tiles
    448-px tiles + the thumbnail; Qwen: a 1920x1080 screen at max_pixels), text up to max_length, the text after the
    image supervised. Real tensors: pixels are random, ids a fixed filler token."""
    c, n = m.cfg, cfg.micro_batch
    if c.is_internvl:
        tiles = cfg.max_tiles + (cfg.max_tiles > 1)
        k = c.num_image_token * tiles
        image = [c.image_token_id] * k + ([c.extra_token_id] * k if c.is_mpgui else [])
        vision = dict(pixel_values=torch.randn(n * tiles, 3, c.vit_image_size, c.vit_image_size))
    else:
        h, w = data.smart_resize(1080, 1920, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        gh, gw = h // c.vit_patch, w // c.vit_patch
        image = [c.vision_start_token_id] + [c.image_token_id] * (gh * gw // c.vit_merge ** 2)
        vision = dict(pixel_values=torch.randn(n * gh * gw, 3 * c.vit_temporal_patch * c.vit_patch ** 2),
                      image_grid_thw=torch.tensor([[1, gh, gw]] * n))
    if len(image) >= cfg.max_length:
        raise SystemExit(f"dry_run: one image is {len(image)} tokens, max_length {cfg.max_length}")
    text = cfg.max_length - len(image)
    ids = torch.tensor([image + [c.pad_token_id + 1] * text] * n)
    labels = ids.masked_fill(torch.arange(cfg.max_length) < len(image), -100)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **vision)


def simulate(cfg, ranks, fake=True, device="cpu"):
    """Rank 0's peak {category: bytes}, sharded gradient bytes after backward, counted FLOPs and train.py's formula
    for one step after a first one (so Adam's moments exist), and the model. fake=False: the same step on real
    tensors (uninitialised weights) on `device`: on the CPU a tiny model, the tracker's own check; on a GPU
    (ranks 1) also `measured`, torch.cuda.max_memory_allocated of the tracked step, and no FLOPs counted (the
    counter keeps every layer's backward temporaries alive, see below)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    folder = base_folder(cfg)
    cfg, dev = dataclasses.replace(cfg, base=folder), torch.device(device)
    count = fake or dev.type == "cpu"
    with weightless(mode):  # under the fake group build_model shards before it fills the weights, as under torchrun
        m = train.build_model(cfg, Vocab(folder, load.read_json(folder, "config.json").get("vocab_size", 0)), dev)
    opt, _ = train.make_optimizer(m, [p for p in m.parameters() if p.requires_grad], cfg, 10, dev)
    b = batch(m, cfg)
    kw = {k: v.to(dev) for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")}
    _, vision = train.vision_inputs(b, m, True, dev)
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    tracker, flops = FSDPMemTracker(m, opt), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    m.train()
    # FLOPs counted in the first step, memory tracked in the second (it starts with Adam's moments, as every later
    # one): under FlopCounterMode autograd keeps each layer's backward temporaries to the end of backward (its
    # module hooks hold them), so the tracker saw about 0.5 GiB per decoder layer and 4096 tokens that a plain
    # step frees at once (measured on InternVL2-8B cut to 16 layers: Temp 9.5 GiB with the counter, none without)
    for step in range(2):
        with contextlib.ExitStack() as stack:
            for c in ([Mixed(mode)] if fake else []) + ([tracker] if step else [flops] if count else []):
                stack.enter_context(c)
            if step and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            loss = train.summed_loss(m, dict(kw, **vision), cfg.chunked_loss)
            (loss / int((kw["labels"] != -100).sum())).backward()
            grads = tracker.get_tracker_snapshot("current") if step else None  # every gradient exists only now
            opt.step()
            opt.zero_grad(set_to_none=True)
    def named(snap):  # the device's own entry (on a GPU the CPU holds a few real masks too)
        return {getattr(k, "value", k): v for k, v in next(v for d, v in snap.items() if d.type == dev.type).items()}
    peak, grads = named(tracker.get_tracker_snapshot("peak")), named(grads)
    measured = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    dist.destroy_process_group()
    return dict(peak=peak, grads=grads["Sharded Grad"], counted=flops.get_total_flops() if count else None, model=m,
                formula=train.step_flops(m, cfg, b), measured=measured)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="other --key=value: train.py overrides")
    p.add_argument("config", help="a training config (configs/*.json)")
    p.add_argument("--ranks", type=int, default=8, help="GPUs the run is sharded over (FSDP2)")
    p.add_argument("--gpu_memory_gb", type=float, default=80, help="memory of one GPU, GiB")
    p.add_argument("--measure", action="store_true", help="then run the same step for real on this machine's GPU "
                   "(--ranks 1; random weights, nothing read) and print torch.cuda.max_memory_allocated beside")
    a, overrides = p.parse_known_args(argv)
    cfg = train.load_config(a.config, overrides)
    t0 = time.time()
    r = simulate(cfg, a.ranks)
    peak, counted, formula, m = r["peak"], r["counted"], r["formula"], r["model"]
    gib = 2 ** 30
    total = peak.get("Total", sum(peak.values()))
    print(f"{a.config}: {m.cfg.arch} {sum(p.numel() for p in m.parameters()) / 1e9:.2f}B params, {a.ranks} ranks, "
          f"micro_batch {cfg.micro_batch} x {cfg.max_length} tokens, bf16 {cfg.bf16}, activation checkpointing "
          f"{cfg.activation_checkpointing} ({time.time() - t0:.0f} s)")
    for k in CATEGORIES:
        if peak.get(k):
            print(f"  {k:16s} {peak[k] / gib:8.2f} GiB")
    fits = "fits" if total / gib <= a.gpu_memory_gb else "does NOT fit"
    print(f"  {'peak (rank 0)':16s} {total / gib:8.2f} GiB: {fits} in {a.gpu_memory_gb:g} GiB")
    print(f"  FLOPs per micro-batch step: counted {counted / 1e12:.1f} TFLOP, train.step_flops (the MFU formula) "
          f"{formula / 1e12:.1f} TFLOP (ratio {formula / max(counted, 1):.3f})")
    if a.measure:
        if a.ranks != 1 or not torch.cuda.is_available():
            raise SystemExit("dry_run: --measure runs on one GPU: --ranks 1, and CUDA must be available")
        real = simulate(cfg, 1, fake=False, device="cuda")
        got, tracked = real["measured"] / gib, real["peak"]["Total"] / gib
        print(f"  measured on {torch.cuda.get_device_name()}: max_memory_allocated {got:.2f} GiB, the tracker on "
              f"the real tensors {tracked:.2f} GiB; predicted {total / gib:.2f} GiB ({total / gib / got:.3f}x)")
        r["measured"] = real["measured"]
    return dict(r, fits=total / gib <= a.gpu_memory_gb)


if __name__ == "__main__":
    main()
