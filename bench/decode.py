"""Batched greedy decoding: our VLM.generate (static KV cache, as eval.py calls it) vs transformers'
generate, the same weights and the same left-padded prompts (a screenshot + text each), one process.

    python bench/decode.py                                   # tiny Qwen2-VL, CPU, fp32
    python bench/decode.py --size qwen2vl-2b --device cuda   # Qwen2-VL-2B shapes, random weights, bf16

Every sample decodes exactly --new tokens (no EOS stops either side); tokens/s = batch * new / time, prefill
included. Also prints how many generated tokens agree between the two (greedy on the same weights).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import load  # noqa: E402
import model as M  # noqa: E402
from train_step import SIZES, hf_qwen_config, ids_for  # noqa: E402


def prompts(S, B, grid, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, vs, ve, _ = ids_for(S)
    h, w = grid
    rows = [torch.randint(10, 400, (8 + 3 * (b % 7),), generator=g).tolist() for b in range(B)]
    rows = [r[:4] + [vs] + [img] * (h * w // 4) + [ve] + r[4:] for r in rows]
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])  # left padding (transformers' generate needs it)
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    pv = torch.randn(B * h * w, 3 * 2 * 14 * 14, generator=g)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pv.to(device),
                image_grid_thw=torch.tensor([[1, h, w]] * B, device=device))


def timed(fn, reps, device):
    fn()  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best, out = float("inf"), None
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    import transformers as T
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny", choices=["tiny", "qwen2vl-2b"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--grid", default="8,8", help="image patch grid h,w (ShowUI eval: e.g. 56,96 = 1344 tokens)")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.set_flush_denormal(True)
    S, dtype = SIZES[a.size], torch.bfloat16 if a.device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device(a.device):
            hf = T.Qwen2VLForConditionalGeneration._from_config(hf_qwen_config(S), dtype=dtype)
        hf.save_pretrained(tmp)
        ours = load.load_model(tmp, dtype=dtype, device=a.device).eval()
    hf = hf.eval()
    batch = prompts(S, a.batch, tuple(map(int, a.grid.split(","))), a.device)
    mm = (batch["input_ids"] == ids_for(S)[0]).int()
    t_ours, out_ours = timed(lambda: ours.generate(**batch, max_new_tokens=a.new, eos_token_ids=[-1]), a.reps,
                             a.device)
    with torch.no_grad():
        t_hf, out_hf = timed(lambda: hf.generate(**batch, mm_token_type_ids=mm, max_new_tokens=a.new,
                                                 min_new_tokens=a.new, do_sample=False, eos_token_id=None,
                                                 pad_token_id=0)[:, batch["input_ids"].shape[1]:], a.reps, a.device)
    n = a.batch * a.new
    agree = (out_ours == out_hf).float().mean().item() if out_ours.shape == out_hf.shape else float("nan")
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"size {a.size} on {dev}, {dtype}, batch {a.batch}, prompt {batch['input_ids'].shape[1]} tokens (left "
          f"padded), {a.new} new tokens each, best of {a.reps}; generated tokens identical: {agree:.1%}")
    print(f"| impl | s | tokens/s |\n|---|---|---|\n| ours VLM.generate | {t_ours:.3f} | {n / t_ours:.0f} |\n"
          f"| transformers {T.__version__} generate | {t_hf:.3f} | {n / t_hf:.0f} |\n"
          f"| ours/transformers | {t_ours / t_hf:.2f}x time | {t_hf / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
