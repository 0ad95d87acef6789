"""Greedy generation from a checkpoint folder (or hub id): screenshots + a prompt in, the model's answer out.

    python eval.py --model tests/fixtures/qwen2_vl_tiny --image examples/screen.png --prompt "Where is Save?"
"""
import argparse
import time

import torch
from PIL import Image

import data
import model as M

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encode(m, tok, prompt, images, a):
    """Token ids (T,) and the vision inputs for one prompt; every image becomes an <image> placeholder ahead of it:
    Qwen images at the --min/--max-pixels budget, InternVL images as up to --max-tiles 448-px tiles."""
    if m.cfg.arch == "internvl":
        tiles = [data.internvl_tiles(im, a.max_tiles, m.cfg.vit_image_size) for im in images]
        conv = [{"from": "human", "value": "<image>\n" * len(images) + prompt}]
        enc = data.encode_internvl(tok, conv, m.cfg.template, [len(t) for t in tiles], m.cfg.num_image_token,
                                   system=a.system)
        return enc["input_ids"], (dict(pixel_values=torch.cat(tiles)) if tiles else {})
    system = "You are a helpful assistant." if a.system is None else None if a.system.lower() == "none" else a.system
    content = "<image>" * len(images) + prompt
    enc = data.encode_qwen(tok, [{"role": "user", "content": content}], images, a.min_pixels, a.max_pixels, system)
    vision = dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]) if images else {}
    return enc["input_ids"], vision


def answer(m, tok, prompt, images, a):
    """One greedy answer for one prompt, cut at the end-of-turn token."""
    ids, vision = encode(m, tok, prompt, images, a)
    device = next(m.parameters()).device
    ids, vision = ids[None].to(device), {k: v.to(device) for k, v in vision.items()}
    eos = [i for i in (tok.token_to_id("<|im_end|>"),) if i is not None] or None  # the end-of-turn token
    out = m.generate(ids, None, max_new_tokens=a.max_new_tokens, eos_token_ids=eos, **vision)[0].tolist()
    if eos and eos[0] in out:
        out = out[:out.index(eos[0])]
    return tok.decode(out, skip_special_tokens=True), ids.shape[1], len(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder or hub id (config.json + safetensors)")
    p.add_argument("--image", action="append", default=[], help="screenshot path; repeat for several")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system message (default: the family's); 'none' omits Qwen's")
    p.add_argument("--min-pixels", type=int, default=256 * 28 * 28, help="Qwen pixel budget (ShowUI/TongUI: 256)")
    p.add_argument("--max-pixels", type=int, default=1344 * 28 * 28, help="Qwen pixel budget (ShowUI/TongUI: 1344)")
    p.add_argument("--max-tiles", type=int, default=12, help="InternVL: max 448-px tiles per image (+ thumbnail)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    t0 = time.time()
    m = M.load_model(a.model, dtype=DTYPES[a.dtype], device=a.device)
    tok = data.load_tokenizer(m.folder)
    images = [Image.open(path) for path in a.image]
    text, n_prompt, n_new = answer(m, tok, a.prompt, images, a)
    print(f"model {m.cfg.arch} from {m.folder} ({sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params, "
          f"{a.dtype}, {a.device})")
    print(f"prompt {n_prompt} tokens, {len(images)} image(s); generated {n_new} tokens in {time.time() - t0:.1f}s")
    print(f"answer: {text}")
    return text


if __name__ == "__main__":
    main()
