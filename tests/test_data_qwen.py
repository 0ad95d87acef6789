"""Qwen input pipeline vs transformers (the oracle) and vs hand-written chat strings."""
import os
import shutil
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import load  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TINY_TOKENIZER = os.path.join(FIXTURES, "qwen2_vl_tiny", "tokenizer.json")
MIN_PIX, MAX_PIX = 6272, 75264  # what the fixtures were made with


def hf_qwen():
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf
    return hf


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("fixture", ["qwen2_vl_tiny", "qwen2_5_vl_tiny"])
def test_fixture_pixels(fixture):
    cases = load_file(os.path.join(FIXTURES, fixture, "cases.safetensors"))
    images = [Image.fromarray(cases[f"raw_image_{i}"].numpy()) for i in range(3)]
    pv, grid = data.qwen_images(images, MIN_PIX, MAX_PIX)
    assert torch.equal(grid, cases["image_grid_thw"]), (grid, cases["image_grid_thw"])
    assert pv.dtype == torch.float32 and pv.shape == cases["pixel_values"].shape == (512, 1176)
    diff = (pv - cases["pixel_values"]).abs().max().item()
    assert diff <= 1e-5, f"{fixture}: pixel_values max abs diff {diff}"


def test_smart_resize_examples():
    lo, hi = 256 * 28 * 28, 1344 * 28 * 28
    assert data.smart_resize(1080, 1920, 28, lo, hi) == (756, 1344)
    assert (756 // 28) * (1344 // 28) == 1296
    assert data.smart_resize(2340, 1080, 28, lo, hi) == (1484, 672)  # phone screenshot
    assert data.smart_resize(1080, 1920, 28, 3136, 12845056) == (1092, 1932)  # hub defaults
    with pytest.raises(ValueError, match="aspect ratio"):
        data.smart_resize(10, 2500)


def test_smart_resize_vs_transformers():
    hf = hf_qwen()
    rng = random.Random(0)
    settings = [(56 * 56, 28 * 28 * 1280), (MIN_PIX, MAX_PIX), (256 * 28 * 28, 1344 * 28 * 28)]
    sizes = [(rng.randint(1, 40), rng.randint(1, 40)) for _ in range(50)]  # tiny
    sizes += [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(120)]
    sizes += [(28 * rng.randint(1, 100), 28 * rng.randint(1, 100)) for _ in range(30)]  # exact multiples
    n = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = settings[n % len(settings)]
        n += 1
        assert data.smart_resize(h, w, 28, lo, hi) == hf.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
    assert n > 150


@pytest.mark.parametrize("hw", [(37, 200), (300, 301), (1000, 63), (28, 28)])
@pytest.mark.parametrize("pixels", [(MIN_PIX, MAX_PIX), (56 * 56, 128 * 28 * 28)])
def test_qwen_image_vs_transformers(hw, pixels):
    hf = hf_qwen()
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    image = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    ref = hf.Qwen2VLImageProcessorPil(min_pixels=pixels[0], max_pixels=pixels[1])(images=[image], return_tensors="pt")
    pv, grid = data.qwen_image(image, *pixels)
    assert torch.equal(grid[None], ref["image_grid_thw"])
    diff = (pv - ref["pixel_values"]).abs().max().item()
    assert diff <= 1e-5, f"{hw} {pixels}: max abs diff {diff}"


def test_qwen_image_rgba_and_gray():
    hf = hf_qwen()
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (90, 130, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (90, 130), dtype=np.uint8), "L")
    proc = hf.Qwen2VLImageProcessorPil(min_pixels=MIN_PIX, max_pixels=MAX_PIX)
    for image in (rgba, gray):
        ref = proc(images=[image], return_tensors="pt")
        pv, _ = data.qwen_image(image, MIN_PIX, MAX_PIX)
        assert (pv - ref["pixel_values"]).abs().max().item() <= 1e-5, image.mode


def test_qwen_images_empty():
    assert data.qwen_images([], MIN_PIX, MAX_PIX) == (None, None)


# ----------------------------------------------------------------------------- text

IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def test_render_chatml():
    msgs = [{"role": "user", "content": "<image>Describe."}]
    assert data.render_chatml(msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{IMG}Describe.<|im_end|>\n<|im_start|>assistant\n")
    # ShowUI: no system turn at all
    assert data.render_chatml(msgs, system=None) == f"<|im_start|>user\n{IMG}Describe.<|im_end|>\n<|im_start|>assistant\n"
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>Where is OK?"},
            {"role": "assistant", "content": "[0.5, 0.9]"},
            {"role": "user", "content": "And <image> Cancel?"}]
    assert data.render_chatml(chat, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{IMG}Where is OK?<|im_end|>\n"
        "<|im_start|>assistant\n[0.5, 0.9]<|im_end|>\n"
        f"<|im_start|>user\nAnd {IMG} Cancel?<|im_end|>\n")


def test_expand_image_pads():
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    out = data.expand_image_pads(f"a{IMG}b{IMG}c", grid)
    assert out == f"a<|vision_start|>{'<|image_pad|>' * 6}<|vision_end|>b<|vision_start|><|image_pad|><|vision_end|>c"
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b2\b)(?=.*\b1\b)"):
        data.expand_image_pads(f"a{IMG}", grid)
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b0\b)(?=.*\b2\b)"):
        data.expand_image_pads("no images", grid)


def test_encode_qwen_tiny():
    tok = load.load_tokenizer(os.path.dirname(TINY_TOKENIZER))
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, hw + (3,), dtype=np.uint8)) for hw in [(200, 317), (96, 150)]]
    msgs = [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "And this one? <image>"}]
    enc = data.encode_qwen(tok, msgs, images, MIN_PIX, MAX_PIX)
    grid = enc["image_grid_thw"]
    assert grid.tolist() == [[1, 14, 22], [1, 6, 10]]
    assert enc["pixel_values"].shape == (14 * 22 + 6 * 10, 1176)
    ids = enc["input_ids"]
    assert ids.dtype == torch.long and ids.dim() == 1
    assert int((ids == 151).sum()) == 77 + 15
    text = data.expand_image_pads(data.render_chatml(msgs), grid)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == text


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("fx", ["qwen2_vl_tiny", "qwen2_5_vl_tiny", "internvl2_tiny", "internvl3_tiny", "mpgui_tiny"])
def test_fixture_tokenizer_is_what_the_tool_writes(fx, tmp_path):
    shutil.copy(os.path.join(FIXTURES, fx, "config.json"), tmp_path / "config.json")  # the tool reads the family
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "tiny_tokenizer.py"), str(tmp_path)], check=True)
    with open(os.path.join(FIXTURES, fx, "tokenizer.json")) as f:
        assert f.read() == (tmp_path / "tokenizer.json").read_text(), fx


def test_tiny_tokenizer():
    tok = load.load_tokenizer(TINY_TOKENIZER)
    for s in ["hello world", "a\nb\n\nc  d", "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./", " leading and trailing ", "x = 1\n"]:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert len(ids) == len(s) and max(ids) < 160, s
        assert tok.decode(ids) == s, s
    special = {"<|endoftext|>": 0, "<s>": 1, "<|im_end|>": 2, "<|im_start|>": 3, "<|image_pad|>": 151,
               "<|video_pad|>": 152, "<|vision_start|>": 153, "<|vision_end|>": 154}
    for t, i in special.items():
        assert tok.token_to_id(t) == i
        assert tok.encode(f"a{t}b", add_special_tokens=False).ids == [tok.token_to_id("a"), i, tok.token_to_id("b")]
    assert tok.get_vocab_size(with_added_tokens=True) == 160
