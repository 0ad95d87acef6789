"""ShowUI's UI-guided visual token selection on the synthetic world's screenshots (world.make_screen): visual tokens,
UI components at the default threshold, tokens a selecting layer skips at ratio 0.5, and the time of one training
step (forward + backward) with selection off, on every layer, and on every other layer, for a small random Qwen2-VL.
Images go through the training pipeline's smart_resize (256..1344 tokens), at the world's size and 4x upscaled.

    python bench/ui_select.py [--screens 20] [--steps 5] [--layers 8] [--hidden 256] [--threads 1] [--device cpu]
"""
import argparse
import os
import statistics
import sys
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import load  # noqa: E402
import model as M  # noqa: E402
import token_select  # noqa: E402
from tools import world  # noqa: E402

IMG, VS, VE = 500, 501, 502
MIN, MAX = 256 * 28 * 28, 1344 * 28 * 28  # train.py's defaults (ShowUI's visual-token bounds)
RATIO = 0.5
SETTINGS = {"off": ("[1,28,0]", 0.0), "all layers": ("[1,28,1]", RATIO),
            "every other layer": (",".join(f"[{i},{i},1]" for i in range(2, 29, 2)), RATIO)}


def screen(seed, kind, scale):
    img, _ = world.make_screen(seed, kind)
    if scale != 1:  # a higher-resolution render of the same layout: crisp edges, flat regions stay flat
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return data.qwen_image(img, MIN, MAX)


def token_stats(n_screens):
    rows = []
    for scale in (1, 4):
        for kind in ("phone", "desktop"):
            tok, comp, kept, ms = [], [], [], []
            for seed in range(n_screens):
                pv, grid = screen(seed, kind, scale)
                t = time.perf_counter()
                ids = token_select.ui_graph(pv, grid[None], 2, M.ModelConfig.uigraph_threshold)
                ms.append((time.perf_counter() - t) * 1e3)
                tok.append(len(ids))
                comp.append(int(ids.max()) + 1)
                kept.append(int(token_select.select_mask(ids, RATIO).sum()))
            w, h = world.make_screen(0, kind)[0].size
            rows.append((f"{kind} {w * scale}x{h * scale}", statistics.mean(tok), statistics.mean(comp),
                         statistics.mean(kept), statistics.median(ms)))
    return rows


def tiny_qwen(layers, hidden, device):
    heads = hidden // 32
    cfg = load.config_from_hf(dict(
        architectures=["Qwen2VLForConditionalGeneration"], image_token_id=IMG, vision_start_token_id=VS,
        tie_word_embeddings=True, eos_token_id=2,
        text_config=dict(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         rope_scaling=dict(type="mrope", mrope_section=[4, 6, 6])),
        vision_config=dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_size=hidden)))
    torch.manual_seed(0)
    m = M.Qwen2VL(cfg).to(device).train()
    m.visual.requires_grad_(False)  # ShowUI trains the decoder (LoRA); the vision tower stays frozen
    return m


def step_times(m, kind, steps, device):
    pv, grid = screen(0, kind, 4)
    n = int(grid.prod()) // 4
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, 400, (20,), generator=g), torch.tensor([VS]), torch.full((n,), IMG),
                     torch.tensor([VE]), torch.randint(3, 400, (30,), generator=g)])[None].to(device)
    labels = ids.clone()
    labels[:, :-30] = -100  # the answer only
    pv, grid = pv.to(device), grid[None].to(device)

    def step():
        logits = m(ids, pixel_values=pv, image_grid_thw=grid)
        torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:]).backward()
        m.zero_grad(set_to_none=True)
        if device != "cpu":
            torch.cuda.synchronize()

    wall, cpu = {k: [] for k in SETTINGS}, {k: [] for k in SETTINGS}
    for r in range(steps + 1):  # interleaved rounds, the first a warm-up
        for name, (layers, ratio) in SETTINGS.items():
            m.cfg.lm_skip_layer, m.cfg.lm_skip_ratio = layers, ratio
            t, c = time.perf_counter(), time.process_time()
            step()
            if r:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    return ids.shape[1], n, {k: (statistics.median(wall[k]) * 1e3, statistics.median(cpu[k]) * 1e3) for k in wall}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--screens", type=int, default=20)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # tiny random models underflow into denormals, which CPUs process ~100x slower
    print(f"UI graph at threshold {M.ModelConfig.uigraph_threshold}, {a.screens} screens per row, selection ratio "
          f"{RATIO} (mean per screen)\n")
    print("| screen (px) | visual tokens | components | kept per selecting layer | removed per selecting layer | "
          "removed, token-layers, every other layer | graph ms |\n|---|---|---|---|---|---|---|")
    for name, tok, comp, kept, ms in token_stats(a.screens):
        print(f"| {name} | {tok:.0f} | {comp:.0f} ({comp / tok:.0%}) | {kept:.0f} | {tok - kept:.0f} "
              f"({1 - kept / tok:.0%}) | {(1 - kept / tok) / 2:.0%} | {ms:.1f} |")
    m = tiny_qwen(a.layers, a.hidden, a.device)
    n_par = sum(p.numel() for p in m.model.parameters()) / 1e6
    print(f"\nTraining step (fwd+bwd, batch 1, ViT frozen), random Qwen2-VL decoder {a.layers} x {a.hidden} "
          f"({n_par:.1f}M params), {a.device}, {torch.get_num_threads()} threads, median of {a.steps} steps; process "
          f"CPU time as well as wall time, as the CPU may be shared\n")
    print("| screen | sequence (image tokens) | selection | step ms (wall) | speed-up (wall) | step ms (CPU) | "
          "speed-up (CPU) |\n|---|---|---|---|---|---|---|")
    for kind in ("phone", "desktop"):
        T, n, ms = step_times(m, kind, a.steps, a.device)
        (w0, c0) = ms["off"]
        for name, (w, c) in ms.items():
            print(f"| {kind} 4x | {T} ({n}) | {name} | {w:.0f} | {w0 / w:.2f}x | {c:.0f} | {c0 / c:.2f}x |")


if __name__ == "__main__":
    main()
