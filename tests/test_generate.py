"""Batched greedy decoding with the KV cache (left padding) gives the tokens of one-by-one full-forward decoding,
for every family's golden fixture."""
import os

import pytest
import torch
from safetensors.torch import load_file

import load
import model
import parity

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = ["qwen2_vl_tiny", "qwen2_5_vl_tiny", "internvl2_tiny", "internvl3_tiny", "mpgui_tiny"]
NEW = 6


def fixture_model(name):
    folder = os.path.join(HERE, "fixtures", name)
    ids = {k: parity.stand_in_id(folder, t) for k, t in
           (("image_token_id", "<IMG_CONTEXT>"), ("extra_token_id", "<EXTRA_IMG_CONTEXT>"))}
    m = load.load_model(folder, dtype=torch.float32, **ids)
    if m.cfg.arch == "mpgui":
        m.cfg.gate_mask = "official"  # the fixture's prompts have no chat turns to cut at
    return m, load_file(os.path.join(folder, "cases.safetensors"))


def samples(m, cases):
    """Each fixture sample unpadded, with its own vision inputs (images or tiles in batch order)."""
    out, img, row, tile = [], m.cfg.image_token_id, 0, 0
    for ids, mask in zip(cases["input_ids"], cases["attention_mask"]):
        ids = ids[mask.bool()]
        n = int((ids == img).sum())
        if "image_grid_thw" in cases:  # Qwen: whole images
            grid = cases["image_grid_thw"]
            k, tok = 0, 0
            while tok < n:
                tok += int(grid[row + k].prod()) // 4
                k += 1
            rows = int(grid[:row].prod(-1).sum()), int(grid[:row + k].prod(-1).sum())
            vision = dict(pixel_values=cases["pixel_values"][rows[0]:rows[1]], image_grid_thw=grid[row:row + k])
            row += k
        else:  # InternVL: tiles
            t = n // m.cfg.num_image_token
            vision = dict(pixel_values=cases["pixel_values"][tile:tile + t])
            tile += t
        out.append((ids, vision))
    return out


def full_forward_greedy(m, ids, vision):
    toks = []
    for _ in range(NEW):
        nxt = m(torch.cat([ids, torch.tensor(toks, dtype=torch.long)])[None], **vision)[0, -1].argmax()
        toks.append(int(nxt))
    return toks


@pytest.mark.parametrize("name", FIXTURES)
def test_batched_cached_decoding_equals_full_forwards(name):
    m, cases = fixture_model(name)
    items = samples(m, cases)
    T = max(len(ids) for ids, _ in items)
    ids = torch.zeros(len(items), T, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for i, (x, _) in enumerate(items):
        ids[i, T - len(x):], mask[i, T - len(x):] = x, 1  # left padding
    vision = {k: torch.cat([v[k] for _, v in items]) for k in items[0][1]}
    with torch.no_grad():
        batched = m.generate(ids, mask, max_new_tokens=NEW, eos_token_ids=[-1], **vision).tolist()
        one_by_one = [full_forward_greedy(m, x, v) for x, v in items]
    assert batched == one_by_one
