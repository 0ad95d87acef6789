"""Forward + backward time of one small Qwen2-VL / Qwen2.5-VL config: ours vs transformers, same weights, same batch,
one process, interleaved rounds. Informational (the training benchmark proper is bench/train_step.py).

    python bench/qwen_step.py [--arch qwen2_vl|qwen2_5_vl] [--steps 5] [--device cpu|cuda] [--dtype float32|bfloat16]
"""
import argparse
import os
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import load  # noqa: E402
import model as M  # noqa: E402

IMG, PAD, VS, VE = 500, 501, 502, 503


def hf_model(arch):
    import transformers as T
    text = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, rms_norm_eps=1e-6,
                tie_word_embeddings=True)
    ids = dict(image_token_id=IMG, video_token_id=PAD, vision_start_token_id=VS, vision_end_token_id=VE)
    if arch == "qwen2_vl":
        vis = dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=4, hidden_size=256)
        cfg = T.Qwen2VLConfig(text_config=text, vision_config=vis, **ids)
        cls = T.Qwen2VLForConditionalGeneration
    else:
        vis = dict(depth=4, hidden_size=128, intermediate_size=344, num_heads=4, out_hidden_size=256, window_size=112,
                   fullatt_block_indexes=[3])
        cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vis, **ids)
        cls = T.Qwen2_5_VLForConditionalGeneration
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).eval()


def batch(device):
    """2 samples, one screenshot each (448x448 and 336x560), 100 text tokens around each."""
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for h, w in ((448, 448), (336, 560))]
    pv, grid = data.qwen_images(imgs, 4 * 28 * 28, 1024 * 28 * 28)
    rows = []
    for k in range(2):
        n = int(grid[k].prod()) // 4
        rows.append(torch.cat([torch.randint(0, 400, (50,), generator=g), torch.tensor([VS]), torch.full((n,), IMG),
                               torch.tensor([VE]), torch.randint(0, 400, (50,), generator=g)]))
    T = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r, torch.zeros(T - len(r), dtype=torch.long)]) for r in rows])
    mask = torch.stack([torch.arange(T) < len(r) for r in rows]).long()
    return ids.to(device), mask.to(device), pv.to(device), grid.to(device)


def timed(step, n):
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    torch.set_num_threads(os.cpu_count())
    torch.set_flush_denormal(True)  # tiny random models underflow into denormals, which CPUs process ~100x slower
    ref = hf_model(a.arch)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = load.load_model(tmp, dtype=dtype, device=a.device).train()
    ref = ref.to(a.device, dtype).train()
    ids, mask, pv, grid = batch(a.device)
    mm = (ids == IMG).int()
    labels = ids.masked_fill(mask == 0, -100)

    def step_ours():
        logits = ours(ids, mask, pv, grid)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()

    def step_ref():
        logits = ref(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                     mm_token_type_ids=mm).logits.float()
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).backward()

    t_ours, t_ref = [], []
    for _ in range(a.rounds):  # interleaved, so drift in machine load hits both sides alike
        t_ours.append(timed(step_ours, a.steps))
        t_ref.append(timed(step_ref, a.steps))
    o, r = min(t_ours), min(t_ref)
    n_img = int((ids == IMG).sum())
    print(f"{a.arch} fwd+bwd, batch 2 x {ids.shape[1]} tokens ({n_img} image tokens, {pv.shape[0]} patches), "
          f"{a.dtype}, {a.device}, {torch.get_num_threads()} threads, best of {a.rounds} rounds x {a.steps} steps")
    print(f"| impl | step ms |\n|---|---|\n| ours | {o * 1e3:.1f} |\n| transformers {__import__('transformers').__version__}"
          f" | {r * 1e3:.1f} |\n| ratio ours/transformers | {o / r:.2f} |")


if __name__ == "__main__":
    main()
