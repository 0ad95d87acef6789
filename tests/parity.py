"""Parity checker for golden fixture folders (the format of tests/fixtures/*_tiny: config.json, model.safetensors,
cases.safetensors, CASES.md).

    python tests/parity.py FOLDER [FOLDER ...]

Loads each folder exactly as a real checkpoint is loaded, runs every case in cases.safetensors, prints the max
relative error (max |ours - expected| / max |expected|) per tensor and exits 1 if any exceeds 1e-4, a greedy token
differs, or the folder holds a case that no check here understands (a case is never skipped silently).
"""
import os
import re
import sys

import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import load  # noqa: E402
import model  # noqa: E402

TOL = 1e-4
INPUTS = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "greedy_prompt", "long_input_ids"}


def pad(seqs, side, pad_id=0):
    """Token lists -> (ids, attention mask), (B, T), padded on the left or the right (the live tests' batches)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    return ids, mask


def rel_err(ours, ref, where=None):
    """The max relative error every parity check states: max |ours - ref| / max |ref|, in float32, over the positions
    where the mask `where` (bool or 0/1, e.g. an attention mask) is set, or over all positions."""
    ours, ref = ours.float(), ref.float()
    if where is not None:
        ours, ref = ours[where.bool()], ref[where.bool()]
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def vision_inputs(cases):
    return {k: cases[k] for k in ("pixel_values", "image_grid_thw") if k in cases}


def leading_images(m, cases, prompt):
    """The vision inputs of the images that a single-sample prompt holds: the first images (Qwen) or tiles
    (InternVL) of the batch, as many as the prompt has image tokens for."""
    n_tok = int((prompt == m.cfg.image_token_id).sum())
    if m.cfg.arch == "internvl":
        return dict(pixel_values=cases["pixel_values"][:n_tok // m.cfg.num_image_token]) if n_tok else {}
    grid = cases["image_grid_thw"]
    per = (grid.prod(-1) // m.cfg.vit_merge ** 2).cumsum(0)
    k = int((per <= n_tok).sum())
    if n_tok and per[k - 1] != n_tok:
        raise ValueError(f"greedy_prompt has {n_tok} image tokens, not a whole number of leading images")
    rows = int(grid[:k].prod(-1).sum())
    return dict(pixel_values=cases["pixel_values"][:rows], image_grid_thw=grid[:k]) if k else {}


def cases_md(folder):
    path = os.path.join(folder, "CASES.md")
    return open(path).read() if os.path.exists(path) else ""


def pixel_settings(folder):
    """min/max pixels the fixture's image processor used, as CASES.md states them."""
    text = cases_md(folder)
    mn, mx = re.search(r"min_pixels=(\d+)", text), re.search(r"max_pixels=(\d+)", text)
    return (int(mn.group(1)), int(mx.group(1))) if mn and mx else None


def stand_in_id(folder, token):
    """Tiny fixtures have no tokenizer; CASES.md names the stand-in id of each special token ("<IMG_CONTEXT>=97")."""
    hit = re.search(re.escape(token) + r"=(\d+)", cases_md(folder))
    return int(hit.group(1)) if hit else None


def run(folder, log=print):
    """Returns a list of (case, measured, ok)."""
    cases = load_file(os.path.join(folder, "cases.safetensors"))
    ids = dict(image_token_id="<IMG_CONTEXT>", extra_token_id="<EXTRA_IMG_CONTEXT>")
    m = load.load_model(folder, dtype=torch.float32, **{k: stand_in_id(folder, t) for k, t in ids.items()})
    valid = cases["attention_mask"].bool() if "attention_mask" in cases else None
    results, done = [], set(INPUTS)

    def report(name, err, ok):
        results.append((name, err, ok))
        log(f"  {name:<24} {err if isinstance(err, str) else f'{err:.3e}'}  {'ok' if ok else 'FAIL'}")

    with torch.no_grad():
        raws = sorted((k for k in cases if k.startswith("raw_image_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        done.update(raws)
        px = pixel_settings(folder)
        if raws and px and "pixel_values" in cases:  # preprocessing: raw RGB images -> patch rows
            pv, grid = data.qwen_images([Image.fromarray(cases[k].numpy()) for k in raws], *px)
            same_grid = torch.equal(grid, cases["image_grid_thw"])
            err = rel_err(pv, cases["pixel_values"]) if same_grid else float("inf")
            report("pixel_values", err, same_grid and err <= TOL)
        if "logits" in cases:
            logits = m(cases["input_ids"], cases.get("attention_mask"), **vision_inputs(cases))
            err = rel_err(logits, cases["logits"], valid)
            report("logits", err, err <= TOL)
            done.add("logits")
        for name in ("image_features", "vit_embeds"):
            if name in cases:
                err = rel_err(m.image_features(**vision_inputs(cases)), cases[name])
                report(name, err, err <= TOL)
                done.add(name)
        if "visual_clues" in cases:  # MP-GUI: pixel-shuffled ViT features before mlp1, and each perceiver on them
            clues = m.visual_clues(cases["pixel_values"])
            report("visual_clues", rel_err(clues, cases["visual_clues"]), rel_err(clues, cases["visual_clues"]) <= TOL)
            done.add("visual_clues")
            for name in [k for k in cases if k.endswith("_perceiver_out")]:
                err = rel_err(getattr(m, name[:-len("_out")])(clues), cases[name])
                report(name, err, err <= TOL)
                done.add(name)
        if "tiles_per_sample" in cases:  # the model derives it from the ids; the fixture states it
            tiles = (cases["input_ids"] == m.cfg.image_token_id).sum(1) // m.cfg.num_image_token
            same = torch.equal(tiles, cases["tiles_per_sample"])
            report("tiles_per_sample", "equal" if same else f"{tiles.tolist()}", same)
            done.add("tiles_per_sample")
        for name in sorted(k for k in cases if k.startswith("logits_")):  # MP-GUI: one EXTRA source per case
            m.cfg.mpgui_mode = name[len("logits_"):]
            m.cfg.gate_mask = "official"  # the fixture's gate is the released one, answer keys included
            logits = m(cases["input_ids"], cases.get("attention_mask"), **vision_inputs(cases))
            err = rel_err(logits, cases[name], valid)
            report(name, err, err <= TOL)
            done.add(name)
        if "long_logits" in cases:  # text only, longer than max_position_embeddings
            err = rel_err(m(cases["long_input_ids"]), cases["long_logits"])
            report("long_logits", err, err <= TOL)
            done.add("long_logits")
        if "greedy_tokens" in cases:  # the reference is argmax of full forwards: no stopping at eos
            prompt, ref = cases["greedy_prompt"], cases["greedy_tokens"]
            toks = m.generate(prompt, None, **leading_images(m, cases, prompt), max_new_tokens=ref.shape[1],
                              eos_token_ids=[-1])
            same = torch.equal(toks, ref)
            report("greedy_tokens", "equal" if same else f"{toks.tolist()} != {ref.tolist()}", same)
            done.add("greedy_tokens")
    for name in sorted(set(cases) - done):
        report(name, "no check for this case", False)
    return results


def main(folders):
    failed = False
    for folder in folders:
        print(folder)
        for impl in ("sdpa", "math"):  # the fused kernels and the plain path must both match
            model.ATTN_IMPL = impl
            print(f" attention: {impl}")
            failed |= not all(ok for _, _, ok in run(folder))
    model.ATTN_IMPL = "sdpa"
    print("FAIL" if failed else "all cases within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="FOLDER")
    sys.exit(main(p.parse_args().folders))
