"""Preprocessing a reader checks against the official processors: Qwen2-VL / Qwen2.5-VL smart_resize, patchify and
ChatML; InternVL2 / InternVL3 dynamic tiling and the internlm2-chat / internvl2_5 templates with labels; the Qwen
training pieces, collate, length-grouped order and the special tokens (dataset formats: formats.py). The numerics
mirror the HF image processors (PIL backend) so that pixel_values match them to float rounding."""
import math

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# Special tokens and constants; Qwen2-VL / Qwen2.5-VL

IMAGE_PAD = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE = VISION_START + IMAGE_PAD + VISION_END  # a Qwen image in prompt text: expand_image_pads fills in the pads
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
EXTRA_CONTEXT = "<EXTRA_IMG_CONTEXT>"  # MP-GUI's second run of context tokens per image
QWEN_SYSTEM = "You are a helpful assistant."  # the Qwen2-VL chat template's default system turn
IM_END = "<|im_end|>"
IGNORE_INDEX = -100
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


# transformers models/qwen2_vl/image_processing_pil_qwen2_vl.py: smart_resize
def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """(h, w): both sides a multiple of factor, area within [min_pixels, max_pixels], aspect ratio roughly kept."""
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio} for {height}x{width}")
    h = round(height / factor) * factor  # python round = banker's rounding, as transformers
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


# transformers image_transforms.py: convert_to_rgb
def to_rgb(image):
    """image as RGB: transparent pixels are composited onto white (as transformers does), not dropped to black."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


# transformers models/qwen2_vl/image_processing_pil_qwen2_vl.py: Qwen2VLImageProcessorPil._preprocess
def qwen_image(image, min_pixels, max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2):
    """One image -> (pixel_values (gh * gw, 3 * t * p * p), image_grid_thw [1, gh, gw]), rows in merge-block order."""
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
    return x.reshape(gh * gw, 3 * t * p * p).contiguous(), torch.tensor([1, gh, gw], dtype=torch.long)


def qwen_images(images, min_pixels, max_pixels):
    """Images -> their patch rows concatenated (sum N, 1176) and grids stacked (n, 3); (None, None) for none."""
    if not images:
        return None, None
    out = [qwen_image(im, min_pixels, max_pixels) for im in images]
    return torch.cat([pv for pv, _ in out]), torch.stack([g for _, g in out])  # (sum N, 1176), (n, 3)


# Qwen2-VL's chat template
def render_chatml(messages, system=QWEN_SYSTEM, add_generation_prompt=True):
    """The official Qwen2-VL chat template; system=None drops the default system turn (ShowUI does)."""
    out = []
    if system is not None and (not messages or messages[0]["role"] != "system"):
        out.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    out += [f"<|im_start|>{msg['role']}\n{msg['content'].replace('<image>', IMAGE)}<|im_end|>\n" for msg in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# transformers models/qwen2_vl/processing_qwen2_vl.py: Qwen2VLProcessor.replace_image_token
def expand_image_pads(text, image_grid_thw, merge_size=2):
    """One placeholder per image -> one pad per merged patch, which the model fills with image features."""
    parts = text.split(IMAGE_PAD)
    pads = [IMAGE_PAD * (int(g.prod()) // merge_size**2) for g in ([] if image_grid_thw is None else image_grid_thw)]
    if len(parts) - 1 != len(pads):
        raise ValueError(f"text has {len(parts) - 1} {IMAGE_PAD} placeholders but {len(pads)} images were given")
    return parts[0] + "".join(pad + part for pad, part in zip(pads, parts[1:]))


def check_image_pads(ids, pad_id, image_grid_thw, merge_size=2):
    """Raise unless ids hold one pad_id per merged patch of image_grid_thw (n, 3), so image features land on pads."""
    want = 0 if image_grid_thw is None else int(image_grid_thw.prod(-1).sum()) // merge_size**2
    got = ids.count(pad_id)
    if got != want:
        raise ValueError(f"tokenized {got} image pads, expected {want}")


# the Qwen2-VL chat template, then transformers models/qwen2_vl/processing_qwen2_vl.py: Qwen2VLProcessor
def encode_qwen(tokenizer, messages, images, min_pixels, max_pixels, system=QWEN_SYSTEM):
    """Prompt token ids (T,) and vision inputs for chat messages, each <image> taking the next image."""
    pixel_values, image_grid_thw = qwen_images(images, min_pixels, max_pixels)
    text = expand_image_pads(render_chatml(messages, system=system), image_grid_thw)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    check_image_pads(ids, tokenizer.token_to_id(IMAGE_PAD), image_grid_thw)
    return dict(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=pixel_values, image_grid_thw=image_grid_thw)


# -----------------------------------------------------------------------------
# InternVL2 / InternVL3: tiles, templates, labels
# The tile budget is called max_tiles here; the official code names it max_num (max_dynamic_patch in a meta file).

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# OpenGVLab/InternVL internvl_chat/internvl/conversation.py: the internlm2-chat and internvl2_5 conversation templates
TEMPLATES = {
    # InternVL2-8B, MP-GUI: the whole prompt is tokenized once, BOS added; turn values are stripped
    "internlm2-chat": dict(
        system_template="<|im_start|>system\n{system_message}",
        system_message="你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
                       "英文名叫InternVL, 是一个有用无害的人工智能助手。",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>", bos="<s>", strip=True),
    # InternVL2.5 / 3, Vlaser: each turn is tokenized on its own, no BOS; InternVL keeps values as given
    "internvl2_5": dict(
        system_template="<|im_start|>system\n{system_message}",
        system_message="你是书生·万象，英文名是InternVL，"
                       "是由上海人工智能实验室、清华大学及多家合作单位"
                       "联合开发的多模态大语言模型。",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>\n", bos=None, strip=False),
}


# OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py: find_closest_aspect_ratio (+ dynamic_preprocess's grids)
def internvl_grid(width, height, min_num=1, max_tiles=12, image_size=448):
    """(cols, rows) of the tile grid whose aspect ratio is closest to the image's."""
    # the candidates are built and sorted exactly as InternVL does: ties in area keep CPython's set order
    ratios = set((i, j) for n in range(min_num, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if min_num <= i * j <= max_tiles)
    best, best_diff = (1, 1), float("inf")
    for i, j in sorted(ratios, key=lambda r: r[0] * r[1]):
        diff = abs(width / height - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * i * j:
            best = (i, j)  # equally close: a bigger grid wins only if the image has the pixels for it
    return best


# OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py: dynamic_preprocess
def dynamic_preprocess(image, min_num=1, max_tiles=12, image_size=448, use_thumbnail=False):
    """The image resized to its tile grid and cut into image_size squares, row by row (+ a thumbnail, last)."""
    cols, rows = internvl_grid(image.width, image.height, min_num, max_tiles, image_size)
    s = image_size
    resized = image.resize((s * cols, s * rows))  # PIL's default filter, as InternVL (BICUBIC for RGB)
    tiles = [resized.crop(((k % cols) * s, (k // cols) * s, (k % cols + 1) * s, (k // cols + 1) * s))
             for k in range(cols * rows)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((s, s)))  # the global view, last
    return tiles


# OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py: dynamic_preprocess, then build_transform on each tile
def internvl_tiles(image, max_tiles=12, image_size=448, use_thumbnail=True):
    """One image -> its normalised tiles (n, 3, S, S), float32."""
    tiles = dynamic_preprocess(image.convert("RGB"), 1, max_tiles, image_size, use_thumbnail)
    # InternVL's per-tile Resize((S, S), BICUBIC) is a copy here: every tile is already S x S
    x = np.stack([np.asarray(t.resize((image_size, image_size), Image.BICUBIC)) for t in tiles])  # (n, S, S, 3)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)  # ToTensor, float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std  # Normalize, in float32 like torchvision


# OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py: preprocess_internlm / preprocess_internvl2_5 (the prompt)
def _internvl_segments(conversations, template, system=None, num_images=0):
    """The prompt as (text, is_answer) pieces that concatenate to it; the pieces are InternVL's per-turn strings."""
    t = TEMPLATES[template]
    turns = list(conversations)
    if turns and turns[0]["from"] == "system":
        system, turns = turns[0]["value"], turns[1:]
    system = t["system_message"] if system is None else system
    segs = [(t["system_template"].format(system_message=system) + t["sep"], False)]
    for k, turn in enumerate(turns):
        if turn["from"] != ("human", "gpt")[k % 2]:
            raise ValueError(f"turn {k} is from {turn['from']!r}: expected human/gpt turns, human first")
        value = turn["value"]
        if k == 0 and num_images and "<image>" not in value:
            value = "<image>\n" + value  # InternVL puts the image before the first question
        value = value.strip() if t["strip"] else value
        segs.append((t["roles"][k % 2] + value + t["sep"], k % 2 == 1))
    if len(turns) % 2 == 1:
        segs.append((t["roles"][1], False))  # generation prompt: the assistant header, nothing after it
    return segs


# OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py: preprocess_internlm / preprocess_internvl2_5 (images)
def expand_internvl_images(text, tiles_per_image, num_image_token, extra_token=None):
    """Each <image> -> <img> + one context token per image feature of each tile (+ MP-GUI's extra run) + </img>."""
    parts = text.split("<image>")
    if len(parts) - 1 != len(tiles_per_image):
        raise ValueError(f"text has {len(parts) - 1} <image> placeholders but {len(tiles_per_image)} images were given")
    out = [parts[0]]
    for n, part in zip(tiles_per_image, parts[1:]):
        k = num_image_token * n
        out.append(IMG_START + IMG_CONTEXT * k + (extra_token * k if extra_token else "") + IMG_END + part)
    return "".join(out)


# OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py: preprocess_internlm, preprocess_internvl2_5
def encode_internvl(tokenizer, conversations, template, tiles_per_image, num_image_token, extra_token=None,
                    system=None):
    """input_ids and labels (-100 off the answers) of an InternVL chat: each answer and its <|im_end|> supervised."""
    t = TEMPLATES[template]
    segs = _internvl_segments(conversations, template, system, len(tiles_per_image))
    n_ph, n_im = sum(text.count("<image>") for text, _ in segs), len(tiles_per_image)
    if n_ph != n_im:
        raise ValueError(f"conversation has {n_ph} <image> placeholders but {n_im} images were given")
    # expand per piece, handing each piece its own images, then mark each answer + its <|im_end|> as a char span
    units, i = [], 0
    for text, is_answer in segs:
        n = text.count("<image>")
        text, i = expand_internvl_images(text, tiles_per_image[i:i + n], num_image_token, extra_token), i + n
        span = (len(t["roles"][1]), len(text) - len(t["sep"]) + len(IM_END)) if is_answer else None
        units.append((text, [span] if span else []))
    if t["bos"]:  # internlm2-chat: InternVL tokenizes the whole prompt in one go
        full, spans = "", []
        for text, sp in units:
            spans += [(a + len(full), b + len(full)) for a, b in sp]
            full += text
        units = [(full, spans)]
    ids, labels = [], []
    for text, spans in units:
        enc = tokenizer.encode(text, add_special_tokens=t["bos"] is not None)
        # supervise tokens by the characters they cover, so no re-tokenized prefix has to line up
        for tok, (s, e) in zip(enc.ids, enc.offsets):
            if any(s < a < e or s < b < e for a, b in spans):
                raise ValueError(f"token {tok} (chars {s}:{e}) straddles an answer boundary, cannot locate the answer")
            ids.append(tok)
            labels.append(tok if s < e and any(a <= s and e <= b for a, b in spans) else IGNORE_INDEX)
    if t["bos"] and ids[0] != tokenizer.token_to_id(t["bos"]):
        raise ValueError(f"tokenizer did not add {t['bos']} (it needs a post-processor that adds BOS)")
    n_ends, n_answers = labels.count(tokenizer.token_to_id(IM_END)), sum(is_answer for _, is_answer in segs)
    if n_ends != n_answers:  # each answer must end in a supervised <|im_end|>, one token
        raise ValueError(f"found {n_ends} supervised {IM_END}, expected {n_answers}")
    for name in [IMG_CONTEXT] + ([extra_token] if extra_token else []):
        got, want = ids.count(tokenizer.token_to_id(name)), num_image_token * sum(tiles_per_image)
        if got != want:  # a tokenizer that splits or merges these would misplace image features
            raise ValueError(f"tokenized {got} {name}, expected {want}")
    return dict(input_ids=torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long))


# -----------------------------------------------------------------------------
# Batches: collate, length-grouped order, Qwen training pieces

# OpenGVLab/InternVL internvl_chat/internvl/patch/pad_data_collator.py: concat_pad_data_collator; Qwen samples:
# showlab/ShowUI data/dataset.py: collate_fn, hiyouga/LLaMA-Factory src/llamafactory/data/collator.py (its classes)
def collate(samples, pad_id):
    """Samples -> one right-padded batch; a skipped sample's (file, line, reason) goes to "skipped"."""
    # InternVL tiles are stacked in sample order; Qwen patch rows concatenated and grid rows stacked, in order
    skipped = [s["skip"] for s in samples if "skip" in s]
    samples = [s for s in samples if "skip" not in s]
    if not samples:  # every sample was skipped: the trainer logs and moves on
        return dict(input_ids=None, labels=None, attention_mask=None, pixel_values=None, tiles_per_sample=None,
                    image_grid_thw=None, skipped=skipped)
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)  # real tokens, not input_ids != pad_id as InternVL does
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], 1
    pix = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    grids = [s["image_grid_thw"] for s in samples if s.get("image_grid_thw") is not None]
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                pixel_values=torch.cat(pix) if pix else None, image_grid_thw=torch.cat(grids) if grids else None,
                tiles_per_sample=torch.tensor([sum(s.get("tiles", ())) for s in samples], dtype=torch.long),
                skipped=skipped)


# OpenGVLab/InternVL internvl_chat/internvl/patch/train_sampler_patch.py: get_length_grouped_indices (from LLaVA)
def length_grouped_indices(lengths, megabatch, seed):
    """LLaVA / InternVL group_by_length: random megabatches (world_size * grad_accum * micro_batch), each sorted
    longest first, so a micro-batch (a consecutive slice) holds similar lengths and pads little."""
    # InternVL also balances the slices' token sums (split_to_even_chunks); we keep the plain sort
    idx = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    return [i for s in range(0, len(idx), megabatch) for i in sorted(idx[s:s + megabatch], key=lambda i: -lengths[i])]


# showlab/ShowUI data/template/utils.py: batch_add_answer; hiyouga/LLaMA-Factory src/llamafactory/data/template.py:
# Template.encode_multiturn
def encode_pieces(tokenizer, pieces, images, min_pixels, max_pixels):
    """pieces [(text, supervised)], each tokenized on its own (labels: its ids or -100) as ShowUI, LLaMA-Factory."""
    # each <|image_pad|> placeholder takes the next image
    if sum(text.count(IMAGE_PAD) for text, _ in pieces) != len(images):
        raise ValueError(f"{sum(t.count(IMAGE_PAD) for t, _ in pieces)} image placeholders for {len(images)} images")
    pixel_values, grid = qwen_images(images, min_pixels, max_pixels)
    ids, labels, k = [], [], 0
    for text, supervised in pieces:
        n = text.count(IMAGE_PAD)
        piece = tokenizer.encode(expand_image_pads(text, grid[k:k + n] if n else None), add_special_tokens=False).ids
        ids, labels, k = ids + piece, labels + (piece if supervised else [IGNORE_INDEX] * len(piece)), k + n
    check_image_pads(ids, tokenizer.token_to_id(IMAGE_PAD), grid)
    return dict(input_ids=torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
                pixel_values=pixel_values, image_grid_thw=grid)


