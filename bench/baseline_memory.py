"""Ours vs transformers + peft: the simulated peak memory of one training step on one GPU, bf16, activation
checkpointing, with bench/train_step.py's sizes, models and batch (FakeTensorMode on the CPU, torch's MemTracker).

    python bench/baseline_memory.py [--size qwen2vl-2b mpgui-stage4]

Both models are built in bf16 with fp32 adapters (as train_step.py builds them on a GPU) and run under bf16
autocast; the second of two steps is tracked, so Adam's moments exist. Ours computes its loss with the chunked
fused head, the baseline from `labels=` on the full logits (transformers' own loss)."""
import argparse
import contextlib
import os
import sys
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import train_step as TS  # noqa: E402
from tools.dry_run import Mixed  # noqa: E402


class _NoHook:
    def remove(self):
        pass


def peak(name, S, batch):
    """{category: bytes} at the tracked step's peak (the CPU device: fake tensors live there)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    to = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *a, **k: self  # fake parameters cannot be swapped; they are on the CPU already
    try:
        with mode:  # parameters fake: shapes, no memory
            m = (TS.build_ours if name == "ours" else TS.build_baseline)(S, "cpu", torch.bfloat16)
    finally:
        torch.nn.Module.to = to
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    n = (batch["labels"][:, 1:] != -100).sum()
    extra = {"mm_token_type_ids": (batch["input_ids"] == TS.ids_for(S)[0]).int()} if S["family"] == "qwen" else {}
    tracker = MemTracker()
    for q in m.parameters():  # torch's MemTracker hooks every parameter's gradient; a frozen one has none
        if not q.requires_grad:
            tracker._param_to_grad_hook_handles[q] = (_NoHook(), _NoHook())
    tracker.track_external(m, opt)
    for step in range(2):
        with contextlib.ExitStack() as stack:
            stack.enter_context(Mixed(mode))
            if step:
                stack.enter_context(tracker)
            with torch.autocast("cpu", torch.bfloat16):
                loss = m(**batch, return_loss=True) / n if name == "ours" else m(**batch, **extra).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    snap = tracker.get_tracker_snapshot("peak")
    return {getattr(k, "value", k): v for k, v in snap[torch.device("cpu")].items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", nargs="+", default=["qwen2vl-2b", "mpgui-stage4"], choices=list(TS.SIZES))
    a = p.parse_args(argv)
    gib = 2 ** 30
    print("| size | tokens | ours GiB | transformers + peft GiB | ratio | largest part: ours / baseline |")
    print("|---|---|---|---|---|---|")
    for size in a.size:
        S, t0 = dict(TS.SIZES[size], plain=False), time.time()
        batch = TS.make_batch(S, "cpu")
        TS.ids_for_batch[0], TS.qwen_flag[0] = TS.ids_for(S)[0], S["family"] == "qwen"
        ours, base = peak("ours", S, batch), peak("baseline", S, batch)
        top = lambda r: max((k for k in r if k != "Total"), key=r.get)  # noqa: E731
        print(f"| {size} | {int(batch['attention_mask'].sum())} | {ours['Total'] / gib:.2f} | "
              f"{base['Total'] / gib:.2f} | {ours['Total'] / base['Total']:.2f} | {top(ours)} "
              f"{ours[top(ours)] / gib:.2f} / {top(base)} {base[top(base)] / gib:.2f} |", f"({time.time() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
