"""GPU numerics against the CPU: the tiny fixtures' logits in fp32 on the GPU (TF32 off) equal the CPU's, and bf16
autocast stays within bf16 rounding of fp32. One line per fixture.

    python bench/gpu_parity.py [--device cuda]

Tolerances: fp32 GPU vs CPU 1e-4 of the logits' scale (different kernels sum in different orders: a few ulps per
reduction over these widths); bf16 vs fp32 5e-2 of the scale (bf16 keeps 8 bits, 2^-8 = 4e-3 per rounding, and a
few layers of roundings add up), and the same greedy next token for most positions."""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import load  # noqa: E402
from test_train import batch  # noqa: E402  (two padded samples, one with an image)

FIXTURES = ["qwen2_vl_tiny", "qwen2_5_vl_tiny", "internvl2_tiny", "internvl3_tiny", "mpgui_tiny"]


def logits(folder, device, bf16):
    m = load.load_model(folder, dtype=torch.float32, device=device).eval()
    b = {k: v.to(device) for k, v in batch(m).items()}
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        return m(**b).float().cpu(), b["attention_mask"].bool().cpu()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    bad = 0
    for name in FIXTURES:
        folder = os.path.join(ROOT, "tests", "fixtures", name)
        ref, mask = logits(folder, torch.device("cpu"), False)
        f32, _ = logits(folder, dev, False)
        b16, _ = logits(folder, dev, True)
        scale = ref[mask].abs().max()
        e32, e16 = ((x - ref)[mask].abs().max() / scale for x in (f32, b16))
        same = (b16.argmax(-1) == ref.argmax(-1))[mask].float().mean()
        ok = e32 < 1e-4 and e16 < 5e-2 and same > 0.9
        bad += not ok
        print(f"{name}: fp32 {a.device} vs cpu {e32:.1e}, bf16 vs fp32 {e16:.1e} of the logits' scale, bf16 greedy "
              f"token = fp32's at {same:.0%} of positions: {'ok' if ok else 'FAILED'}")
    print(f"parity: {len(FIXTURES) - bad} of {len(FIXTURES)} fixtures within the tolerances")
    return bad


if __name__ == "__main__":
    sys.exit(main())
