"""
Input pipeline: images -> patch rows, chat messages -> prompt text -> token ids.
Only torch, numpy, PIL and tokenizers at run time; the numerics mirror the HF
image processors (PIL backend) so that pixel_values match them to float rounding.
"""
import math
import os

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

# -----------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IMAGE_PAD = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    # both sides a multiple of factor, area within [min_pixels, max_pixels], aspect ratio roughly kept
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio} for {height}x{width}")
    h = round(height / factor) * factor  # python round = banker's rounding, as upstream
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image):
    # transparent pixels are composited onto white (as HF does), not dropped to black
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def qwen_image(image, min_pixels, max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2):
    image = to_rgb(image)
    p, m, t = patch_size, merge_size, temporal_patch_size
    h, w = smart_resize(image.height, image.width, p * m, min_pixels, max_pixels)
    # resize the uint8 image in PIL, like HF; resizing floats gives different pixels
    x = np.asarray(image.resize((w, h), Image.BICUBIC))  # (h, w, 3) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # HF rescales in float64, then casts
    x = (x - CLIP_MEAN) / CLIP_STD  # float32 throughout
    gh, gw = h // p, w // p
    x = torch.from_numpy(x).view(gh // m, m, p, gw // m, m, p, 3)
    # rows in merge-block order so the merger can fold m*m neighbours with a plain view
    x = x.permute(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, p, p)
    # a still image is its own video of t identical frames
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)  # (gh/m, gw/m, m, m, C, t, p, p)
    pixel_values = x.reshape(gh * gw, 3 * t * p * p).contiguous()
    return pixel_values, torch.tensor([1, gh, gw], dtype=torch.long)


def qwen_images(images, min_pixels, max_pixels):
    if not images:
        return None, None
    out = [qwen_image(im, min_pixels, max_pixels) for im in images]
    return torch.cat([pv for pv, _ in out]), torch.stack([g for _, g in out])  # (sum N, 1176), (n, 3)


def load_tokenizer(path):
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json found in {os.path.dirname(file) or '.'} (looked for {file})")
    return Tokenizer.from_file(file)


def render_chatml(messages, system="You are a helpful assistant.", add_generation_prompt=True):
    # the official Qwen2-VL chat template; system=None drops the default system turn (ShowUI does)
    image = VISION_START + IMAGE_PAD + VISION_END
    out = []
    if system is not None and (not messages or messages[0]["role"] != "system"):
        out.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for msg in messages:
        out.append(f"<|im_start|>{msg['role']}\n{msg['content'].replace('<image>', image)}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def expand_image_pads(text, image_grid_thw, merge_size=2):
    # one placeholder per image -> one pad per merged patch, which the model fills with image features
    parts = text.split(IMAGE_PAD)
    n = 0 if image_grid_thw is None else len(image_grid_thw)
    if len(parts) - 1 != n:
        raise ValueError(f"text has {len(parts) - 1} {IMAGE_PAD} placeholders but {n} images were given")
    out = [parts[0]]
    for k in range(n):
        out.append(IMAGE_PAD * (int(image_grid_thw[k].prod()) // merge_size**2) + parts[k + 1])
    return "".join(out)


def encode_qwen(tokenizer, messages, images, min_pixels, max_pixels, system="You are a helpful assistant."):
    text = render_chatml(messages, system=system)
    pixel_values, image_grid_thw = qwen_images(images, min_pixels, max_pixels)
    text = expand_image_pads(text, image_grid_thw)
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)  # (T,)
    n_image_tokens = 0 if image_grid_thw is None else int(image_grid_thw.prod(-1).sum()) // 2**2  # merge_size 2
    n_pads = int((ids == tokenizer.token_to_id(IMAGE_PAD)).sum())
    if n_pads != n_image_tokens:  # a tokenizer that splits or merges pads would misplace image features
        raise ValueError(f"tokenized {n_pads} image pads, expected {n_image_tokens}")
    return dict(input_ids=ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw)
