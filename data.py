"""
Input pipeline: images -> patch rows, chat messages -> prompt text -> token ids.
Only torch, numpy, PIL and tokenizers at run time; the numerics mirror the HF
image processors (PIL backend) so that pixel_values match them to float rounding.
"""
import json
import math
import os
import random
import re

import numpy as np
import torch
from PIL import Image

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


# -----------------------------------------------------------------------------
# InternVL2 / InternVL3: tiles, templates, labels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
EXTRA_CONTEXT = "<EXTRA_IMG_CONTEXT>"  # MP-GUI: one per context token, filled by a perceiver or the fusion gate
IM_END = "<|im_end|>"
IGNORE_INDEX = -100
TEMPLATES = {
    # InternVL2-8B, MP-GUI: the whole prompt is tokenized once, BOS added; turn values are stripped
    "internlm2-chat": dict(
        system_template="<|im_start|>system\n{system_message}",
        system_message="你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>", bos="<s>", strip=True),
    # InternVL2.5 / 3, Vlaser: each turn is tokenized on its own, no BOS; upstream keeps values as given
    "internvl2_5": dict(
        system_template="<|im_start|>system\n{system_message}",
        system_message="你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>\n", bos=None, strip=False),
}


def internvl_grid(width, height, min_num=1, max_num=12, image_size=448):
    # (cols, rows) of the tile grid whose aspect ratio is closest to the image's
    # the candidates are built and sorted exactly as upstream: ties in area keep CPython's set order
    ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if min_num <= i * j <= max_num)
    best, best_diff = (1, 1), float("inf")
    for i, j in sorted(ratios, key=lambda r: r[0] * r[1]):
        diff = abs(width / height - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * i * j:
            best = (i, j)  # equally close: a bigger grid wins only if the image has the pixels for it
    return best


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    cols, rows = internvl_grid(image.width, image.height, min_num, max_num, image_size)
    s = image_size
    resized = image.resize((s * cols, s * rows))  # PIL's default filter, as upstream (BICUBIC for RGB)
    tiles = [resized.crop(((k % cols) * s, (k // cols) * s, (k % cols + 1) * s, (k // cols + 1) * s))
             for k in range(cols * rows)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((s, s)))  # the global view, last
    return tiles


def internvl_tiles(image, max_num=12, image_size=448, use_thumbnail=True):
    tiles = dynamic_preprocess(image.convert("RGB"), 1, max_num, image_size, use_thumbnail)
    # upstream's per-tile Resize((S, S), BICUBIC) is a copy here: every tile is already S x S
    x = np.stack([np.asarray(t.resize((image_size, image_size), Image.BICUBIC)) for t in tiles])  # (n, S, S, 3)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)  # ToTensor, float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std  # Normalize, in float32 like torchvision


def _internvl_segments(conversations, template, system=None, num_images=0):
    # the prompt as (text, is_answer) pieces that concatenate to it; the pieces are upstream's per-turn strings
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
            value = "<image>\n" + value  # upstream puts the image before the first question
        value = value.strip() if t["strip"] else value
        segs.append((t["roles"][k % 2] + value + t["sep"], k % 2 == 1))
    if len(turns) % 2 == 1:
        segs.append((t["roles"][1], False))  # generation prompt: the assistant header, nothing after it
    return segs


def render_internvl(conversations, template, system=None, num_images=0):
    return "".join(text for text, _ in _internvl_segments(conversations, template, system, num_images))


def expand_internvl_images(text, tiles_per_image, num_image_token, extra_token=None):
    # each placeholder -> <img> + one context token per image feature of each tile (+ MP-GUI's extra run) + </img>
    parts = text.split("<image>")
    if len(parts) - 1 != len(tiles_per_image):
        raise ValueError(f"text has {len(parts) - 1} <image> placeholders but {len(tiles_per_image)} images were given")
    out = [parts[0]]
    for n, part in zip(tiles_per_image, parts[1:]):
        k = num_image_token * n
        out.append(IMG_START + IMG_CONTEXT * k + (extra_token * k if extra_token else "") + IMG_END + part)
    return "".join(out)


def encode_internvl(tokenizer, conversations, template, tiles_per_image, num_image_token, extra_token=None,
                    system=None):
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
    if t["bos"]:  # internlm2-chat: upstream tokenizes the whole prompt in one go
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
# InternVL / MP-GUI training data: meta json, jsonl, collate, length-grouped sampling
# Mirrors upstream's build_datasets, LazySupervisedDataset, concat_pad_data_collator and LengthGroupedSampler, except:
# a sample upstream would crash on or truncate (bad line, missing/unreadable image, too long) is skipped and reported
# as (file, line, reason), and a text-only sample carries no pixels (upstream feeds a blank tile with image_flags 0).

META_KEYS = dict(root=str, annotation=str, data_augment=bool, repeat_time=(int, float))  # all required


def _resolve(path, base):
    # a relative path is taken from the cwd (as upstream does) if it exists there, else from the meta file's folder
    return path if os.path.isabs(path) or os.path.exists(path or ".") else os.path.join(base, path)


def read_meta(meta_path):
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{meta_path}: expected a non-empty JSON object {{name: dataset}}")
    base, out = os.path.dirname(os.path.abspath(meta_path)), []
    for name, d in meta.items():
        where = f"{meta_path}: dataset {name!r}"
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {d!r}")
        unknown = sorted(set(d) - set(META_KEYS) - {"max_dynamic_patch", "length"})  # "length" is documentation only
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}")
        for key, typ in META_KEYS.items():
            if key not in d:
                raise ValueError(f"{where}: missing key {key!r}")
            if not isinstance(d[key], typ) or (typ is not bool and isinstance(d[key], bool)):
                raise ValueError(f"{where}: key {key!r} has the wrong type: {d[key]!r}")
        rt, mdp = d["repeat_time"], d.get("max_dynamic_patch")
        if rt <= 0 or (rt > 1 and not isinstance(rt, int)):
            raise ValueError(f"{where}: key 'repeat_time' must be > 0, and an integer when > 1, got {rt!r}")
        if mdp is not None and (type(mdp) is not int or mdp < 1):
            raise ValueError(f"{where}: key 'max_dynamic_patch' must be a positive integer, got {mdp!r}")
        out.append(dict(name=name, root=_resolve(d["root"], base), annotation=_resolve(d["annotation"], base),
                        repeat_time=rt, data_augment=d["data_augment"], max_dynamic_patch=mdp))
    return out


def _parse_line(line):
    # (item, image names) or (None, why): each of these would crash upstream in the middle of training
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"bad JSON: {e}"
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        return None, "no 'conversations' list"
    conv = item["conversations"]
    roles = [t.get("from") if isinstance(t, dict) and isinstance(t.get("value"), str) else None for t in conv]
    roles = roles[1:] if roles[:1] == ["system"] else roles
    if not roles or roles != ["human", "gpt"] * (len(roles) // 2):
        return None, f"turns must alternate human/gpt and end with gpt, got {roles}"
    images = item.get("image") or []  # absent or empty: text only, as upstream
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        return None, f"bad 'image' field {item.get('image')!r}"
    n_ph = sum(t["value"].count("<image>") for t in conv)
    if n_ph != len(images) and (n_ph, len(images)) != (0, 1):  # a lone image without placeholder goes first
        return None, f"{n_ph} <image> placeholders for {len(images)} images"
    if type(item.get("length", 0)) is not int:
        return None, f"'length' is not an integer: {item['length']!r}"
    return item, images


def _image_size(path):
    with Image.open(path) as im:  # reads the header only
        return im.size


def _load_rgb(path):
    with Image.open(path) as im:
        return im.convert("RGB")  # decodes now, so a broken file fails here and the handle is closed


class InternVLDataset(torch.utils.data.Dataset):
    def __init__(self, meta_path, tokenizer, template, num_image_token, image_size=448, max_tiles=6, max_length=4096,
                 extra_token=None, use_thumbnail=True, point_prefix=None):
        self.tokenizer, self.template, self.num_image_token, self.extra_token = (tokenizer, template, num_image_token,
                                                                                 extra_token)
        self.point_prefix = point_prefix  # Vlaser: put before the first question of every <point> sample
        self.image_size, self.max_length, self.use_thumbnail = image_size, max_length, use_thumbnail
        self.meta, self._tiles = read_meta(meta_path), {}
        self.samples, self.lengths, self.skipped = [], [], []  # samples: (dataset index, line number, item, paths)
        for di, m in enumerate(self.meta):
            if m["data_augment"]:  # upstream's train-time random JPEG re-encoding; no shipped meta turns it on
                raise ValueError(f"{meta_path}: dataset {m['name']!r}: data_augment=true is not implemented")
            m["max_num"] = m["max_dynamic_patch"] or max_tiles
            with open(m["annotation"], encoding="utf-8") as f:
                lines = f.readlines()
            # upstream cuts (repeat_time < 1) or repeats the lines, then shuffles them seeded by the dataset's index;
            # shuffling line numbers gives the same permutation, and bad lines simply drop out of it
            order, rt = list(range(len(lines))), m["repeat_time"]
            order = order[:int(len(order) * rt)] if rt < 1 else order * int(rt)  # rt may be 1.0
            np.random.default_rng(seed=di).shuffle(order)
            good = {}
            for k in sorted(set(order)):  # each line is checked (and reported) once, however often it repeats
                ok, why = self._check(lines[k], m)
                if ok:
                    good[k] = ok
                else:
                    self.skipped.append((m["annotation"], k + 1, why))
            # the group_by_length estimate: upstream's "\n"-joined turn texts (BOS included) + the image tokens
            keys = [k for k in good if "length" not in good[k][0]]
            texts = ["\n".join(t["value"] for t in good[k][0]["conversations"]) for k in keys]
            n_text = {k: len(e.ids) for k, e in zip(keys, tokenizer.encode_batch(texts))}
            for k in order:
                if k in good:
                    item, paths, n_img = good[k]
                    self.samples.append((di, k + 1, item, paths))
                    self.lengths.append(item["length"] if "length" in item else n_text[k] + n_img)

    def _check(self, line, m):
        # ((item, image paths, image tokens), None) or (None, why)
        item, images = _parse_line(line)
        if item is None:
            return None, images
        why = self.point_prefix and check_points(item["conversations"])
        if why:
            return None, why
        paths = tuple(os.path.join(m["root"], p) for p in images)
        for p in paths:
            if not os.path.isfile(p):
                return None, f"missing image {p}"
        w, h = item.get("width"), item.get("height")
        try:  # the line's own size when it has one, else the file header (cheap: PIL reads no pixels here)
            sizes = [(w, h)] if len(paths) == 1 and all(type(v) is int and v > 0 for v in (w, h)) else \
                [_image_size(p) for p in paths]
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return None, f"unreadable image: {e}"
        n_img = 0
        for w, h in sizes:
            key = (w, h, m["max_num"] // len(paths))  # upstream splits the tile budget among a sample's images
            if key not in self._tiles:
                cols, rows = internvl_grid(w, h, 1, key[2], self.image_size)
                self._tiles[key] = cols * rows + (self.use_thumbnail and cols * rows > 1)
            n_img += self._tiles[key]
        return (item, paths, n_img * self.num_image_token * (2 if self.extra_token else 1)), None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        di, line, item, paths = self.samples[i]
        m = self.meta[di]
        source = (m["annotation"], line)
        try:
            pix = [internvl_tiles(_load_rgb(p), m["max_num"] // len(paths), self.image_size, self.use_thumbnail)
                   for p in paths]
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return dict(skip=source + (f"unreadable image: {e}",))
        tiles = [len(x) for x in pix]
        conv = item["conversations"]
        conv = with_point_prefix(conv, self.point_prefix) if self.point_prefix else conv
        try:
            enc = encode_internvl(self.tokenizer, conv, self.template, tiles, self.num_image_token, self.extra_token)
        except ValueError as e:
            return dict(skip=source + (f"cannot encode: {e}",))
        n = len(enc["input_ids"])
        if n > self.max_length:  # never truncate: a cut could split an image span or silently drop answer tokens
            return dict(skip=source + (f"{n} tokens > max_length {self.max_length}",))
        return dict(enc, pixel_values=torch.cat(pix) if pix else None, tiles=tiles, source=source)


def collate(samples, pad_id):
    # upstream's concat_pad_data_collator: right padding, every sample's tiles stacked in sample order.
    # Qwen samples (ShowUI's and LLaMA-Factory's collators): patch rows concatenated, grid rows stacked, in order
    skipped = [s["skip"] for s in samples if "skip" in s]
    samples = [s for s in samples if "skip" not in s]
    if not samples:  # every sample was skipped: the trainer logs and moves on
        return dict(input_ids=None, labels=None, attention_mask=None, pixel_values=None, tiles_per_sample=None,
                    image_grid_thw=None, skipped=skipped)
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)  # real tokens, not input_ids != pad_id as upstream does
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], 1
    pix = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    grids = [s["image_grid_thw"] for s in samples if s.get("image_grid_thw") is not None]
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                pixel_values=torch.cat(pix) if pix else None, image_grid_thw=torch.cat(grids) if grids else None,
                tiles_per_sample=torch.tensor([sum(s.get("tiles", ())) for s in samples], dtype=torch.long),
                skipped=skipped)


def length_grouped_indices(lengths, megabatch, seed):
    # LLaVA / InternVL group_by_length: random megabatches of world_size * grad_accum * micro_batch samples, each
    # sorted longest first, so a micro-batch (a consecutive slice, dealt to the ranks) holds similar lengths and
    # pads little. Upstream also balances the slices' token sums (split_to_even_chunks); we keep the plain sort.
    idx = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    return [i for s in range(0, len(idx), megabatch) for i in sorted(idx[s:s + megabatch], key=lambda i: -lengths[i])]


# -----------------------------------------------------------------------------
# Vlaser point grounding (InternVL chat jsonl) and Qwen training data: ShowUI grounding / navigation metadata,
# LLaMA-Factory sharegpt (TongUI). The Qwen datasets yield input_ids, labels (-100 off the answers), pixel_values and
# image_grid_thw for collate. A record upstream would crash on is skipped and reported as (file, record index from 0,
# reason): at start when its fields or images are wrong, at fetch when it cannot be encoded or is too long.

VLASER_POINT_PREFIX = (  # Vlaser README: "add the following prefix to the question itself"
    'You are InternVL. Your task is to locate several points in the given image according to the task descriptions. '
    'Your answer should be formatted as "<point>[[x1, y1], [x2, y2],...]</point>". The point coordinates are '
    'normalized to integers between 0 and 1000. Return the answer in the point format directly.')


def check_points(conversations):
    # None, or why a point answer is malformed: every <point> tag must hold [[x, y], ...] integers in 0..1000
    answers = "".join(t["value"] for t in conversations if t["from"] == "gpt")
    for inner in re.findall(r"<point>(.*?)</point>", answers, re.S):
        try:
            pts = json.loads(inner)
        except json.JSONDecodeError:
            pts = None
        if not (isinstance(pts, list) and pts and all(isinstance(p, list) and len(p) == 2 and all(
                type(v) is int and 0 <= v <= 1000 for v in p) for p in pts)):
            return f"<point> tag is not [[x, y], ...] with integers in 0..1000: {inner[:60]!r}"


def with_point_prefix(conversations, prefix):
    # a sample answering with <point> gets "prefix question" as its first question (after a leading <image>), once
    if not any("<point>" in t["value"] for t in conversations if t["from"] == "gpt"):
        return conversations
    conv = [dict(t) for t in conversations]
    k = next(i for i, t in enumerate(conv) if t["from"] == "human")
    head = "<image>\n" if conv[k]["value"].startswith("<image>\n") else ""
    rest = conv[k]["value"][len(head):]
    conv[k]["value"] = head + (rest if rest.startswith(prefix) else prefix + " " + rest)
    return conv


def encode_pieces(tokenizer, pieces, images, min_pixels, max_pixels):
    """pieces [(text, supervised)], each tokenized on its own as ShowUI and LLaMA-Factory do (a piece's labels are
    its ids or -100); each <|image_pad|> placeholder takes the next image."""
    if sum(text.count(IMAGE_PAD) for text, _ in pieces) != len(images):
        raise ValueError(f"{sum(t.count(IMAGE_PAD) for t, _ in pieces)} image placeholders for {len(images)} images")
    pixel_values, grid = qwen_images(images, min_pixels, max_pixels)
    ids, labels, k = [], [], 0
    for text, supervised in pieces:
        n = text.count(IMAGE_PAD)
        piece = tokenizer.encode(expand_image_pads(text, grid[k:k + n] if n else None), add_special_tokens=False).ids
        ids, labels, k = ids + piece, labels + (piece if supervised else [IGNORE_INDEX] * len(piece)), k + n
    want, got = 0 if grid is None else int(grid.prod(-1).sum()) // 4, ids.count(tokenizer.token_to_id(IMAGE_PAD))
    if got != want:  # a tokenizer that splits or merges pads would misplace image features
        raise ValueError(f"tokenized {got} image pads, expected {want}")
    return dict(input_ids=torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
                pixel_values=pixel_values, image_grid_thw=grid)


IMAGE = VISION_START + IMAGE_PAD + VISION_END


def _numbers(v, n):
    return isinstance(v, list) and len(v) == n and all(type(x) in (int, float) for x in v)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()] if path.endswith(".jsonl") else json.load(f)


class QwenDataset(torch.utils.data.Dataset):
    """Records checked once at start (check -> None or why), turned into (pieces, images) by build at each fetch."""

    def __init__(self, tokenizer, min_pixels, max_pixels, max_length):
        self.tokenizer, self.min_pixels, self.max_pixels = tokenizer, min_pixels, max_pixels
        self.max_length = max_length
        self.samples, self.lengths, self.skipped = [], [], []  # samples: (file, record index, record, context)

    def add(self, file, records, ctx):
        if not isinstance(records, list):
            raise ValueError(f"{file}: expected a JSON list of records")
        for i, rec in enumerate(records):
            try:
                why = self.check(rec, ctx) if isinstance(rec, dict) else "not a JSON object"
            except (LookupError, TypeError, AttributeError) as e:  # a field of the wrong kind
                why = f"bad record: {type(e).__name__}: {e}"
            if why:
                self.skipped.append((file, i, why))
            else:
                self.samples.append((file, i, rec, ctx))
                self.lengths.append(len(json.dumps(rec)))  # group_by_length proxy: the record's text size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        file, index, rec, ctx = self.samples[i]
        try:
            enc = encode_pieces(self.tokenizer, *self.build(rec, ctx), self.min_pixels, self.max_pixels)
        except (OSError, ValueError, LookupError, TypeError, AttributeError, Image.DecompressionBombError) as e:
            return dict(skip=(file, index, f"cannot encode: {type(e).__name__}: {e}"))
        if len(enc["input_ids"]) > self.max_length:  # never truncate: ShowUI asserts, LLaMA-Factory cuts answers
            return dict(skip=(file, index, f"{len(enc['input_ids'])} tokens > max_length {self.max_length}"))
        return dict(enc, source=(file, index))


def showui_split(data_dir, entry):
    # "name:json" (TRAIN.md's train_dataset / train_json pairs) -> (metadata file, image folder, json name)
    name, _, split = entry.partition(":")
    if not split:
        raise ValueError(f"dataset {entry!r}: expected 'name:json', e.g. 'showui-desktop:hf_train'")
    folder = {"showui-desktop": "ShowUI-desktop", "showui-web": "ShowUI-web", "amex": "AMEX",
              "guiact": "GUI_Course/GUIAct"}.get(name, name)  # upstream's dataset_mapping; else the name is the folder
    return os.path.join(data_dir, folder, "metadata", split + ".json"), os.path.join(data_dir, folder, "images"), split


class ShowUIGrounding(QwenDataset):
    """ShowUI's GroundingDataset with --uniform_prompt, text2point: one screenshot, k = min(num_turn, elements)
    elements drawn with replacement, each a user turn answered by its point; no system turn."""
    PROMPT = ("Based on the screenshot of the page, I give a text description and you give its corresponding location."
              " The coordinate represents a clickable location [x, y] for an element, which is a relative coordinate "
              "on the screenshot, scaled from 0 to {}.")  # 1, or 1000 with xy_int

    def __init__(self, data_dir, datasets, tokenizer, min_pixels, max_pixels, max_length, num_turn=1, crop_min=1.0,
                 crop_max=1.0, xy_int=False):
        super().__init__(tokenizer, min_pixels, max_pixels, max_length)
        self.num_turn, self.crop, self.xy_int = num_turn, (crop_min, crop_max), xy_int
        for entry in datasets:
            meta, root, _ = showui_split(data_dir, entry)
            self.add(meta, _read_json(meta), root)

    def check(self, rec, root):
        if not isinstance(rec.get("img_url"), str) or not os.path.isfile(os.path.join(root, rec["img_url"])):
            return f"missing image {os.path.join(root, str(rec.get('img_url')))}"
        if not (_numbers(rec.get("img_size"), 2) and min(rec["img_size"]) > 0 and rec.get("element")):
            return f"bad img_size {rec.get('img_size')!r} or no 'element' list"
        for j, e in enumerate(rec["element"]):
            for key, n in (("point", 2),) + ((("bbox", 4),) if self.crop != (1, 1) else ()):
                if not (isinstance(e, dict) and isinstance(e.get("instruction"), str) and _numbers(e.get(key), n)
                        and all(0 <= x <= 1 for x in e[key])):
                    return f"element {j}: no 'instruction' or {key} {e.get(key)!r} is not {n} numbers in 0..1"

    def build(self, rec, root):
        image, elements = _load_rgb(os.path.join(root, rec["img_url"])), rec["element"]
        if self.crop != (1, 1):
            image, elements = showui_crop(image, rec["img_size"], elements, *self.crop)
        pieces = []
        for j, e in enumerate(random.choices(elements, k=min(self.num_turn, len(elements)))):
            xy = [int(v * 1000) for v in e["point"]] if self.xy_int else [round(v, 2) for v in e["point"]]
            prompt = (self.PROMPT.format(1000 if self.xy_int else 1) + IMAGE) if j == 0 else ""
            pieces += [(("\n" if j else "") + render_chatml([dict(role="user", content=prompt + e["instruction"])],
                                                            system=None), False), (f"{xy}{IM_END}", True)]
        return pieces, [image]


def showui_crop(image, size, elements, lo, hi):
    """ShowUI's random_crop_metadata: a crop of U(lo, hi) x the metadata size per side. A side larger than the image
    pastes it centred on a white canvas of the crop size (the other side of that canvas may cut the image). Elements
    whose int-truncated pixel bbox lies inside survive, renormalised; none left -> the original image and elements.
    Unlike upstream, which writes the crop back into its cached metadata, the record is left untouched."""
    (W, H), canvas, px, py, x0, y0 = size, image, 0, 0, 0, 0
    cw, ch = int(W * random.uniform(lo, hi)), int(H * random.uniform(lo, hi))
    if cw > W or ch > H:  # the canvas is the crop: nothing left to choose
        px, py, canvas = max(0, (cw - W) // 2), max(0, (ch - H) // 2), Image.new("RGB", (cw, ch), (255, 255, 255))
        canvas.paste(image, (px, py))
    else:
        x0, y0 = random.randint(0, W - cw), random.randint(0, H - ch)
    kept = []
    for e in elements:
        b = [int(v * size[k % 2]) + (px, py)[k % 2] - (x0, y0)[k % 2] for k, v in enumerate(e["bbox"])]
        p = [int(v * size[k]) + (px, py)[k] - (x0, y0)[k] for k, v in enumerate(e["point"])]
        if b[0] >= 0 and b[2] <= cw and b[1] >= 0 and b[3] <= ch:
            kept.append(dict(e, bbox=[v / (cw, ch)[k % 2] for k, v in enumerate(b)], point=[p[0] / cw, p[1] / ch]))
    return (canvas.crop((x0, y0, x0 + cw, y0 + ch)), kept) if kept else (image, elements)


_WEB_ACTIONS = [  # ShowUI's shared_navigation action spaces, as its prompt words them (trailing spaces included)
    ("CLICK", "Click on an element, value is not applicable and the position [x,y] is required. "),
    ("INPUT", "Type a string into an element, value is a string to type and the position [x,y] is required. "),
    ("SELECT", "Select a value for an element, value is not applicable and the position [x,y] is required. "),
    ("HOVER", "Hover on an element, value is not applicable and the position [x,y] is required."),
    ("ANSWER", "Answer the question, value is the answer and the position is not applicable."),
    ("ENTER", "Enter operation, value and position are not applicable."),
    ("SCROLL", "Scroll the screen, value is the direction to scroll and the position is not applicable."),
    ("SELECT_TEXT", "Select some text content, value is not applicable and position [[x1,y1], [x2,y2]] is the start "
                    "and end position of the select operation."),
    ("COPY", "Copy the text, value is the text to copy and the position is not applicable.")]
NAV_ACTIONS = {"web-single": _WEB_ACTIONS, "web-multi": _WEB_ACTIONS, "smartphone": [
    ("INPUT", "Type a string into an element, value is a string to type and the position [x,y] is not applicable."),
    ("SWIPE", "Swipe the screen, value is not applicable and the position [[x1,y1], [x2,y2]] is the start and end "
              "position of the swipe operation."),
    ("TAP", "Tap on an element, value is not applicable and the position [x,y] is required."),
    ("ANSWER", "Answer the question, value is the status (e.g., 'task complete') and the position is not applicable."),
    ("ENTER", "Enter operation, value and position are not applicable.")]}


def nav_system(split):
    space = "".join(f"{i}. `{a}`: {d}\n" for i, (a, d) in enumerate(NAV_ACTIONS[split], 1))
    return (f"You are an assistant trained to navigate the {'smartphone' if split == 'smartphone' else 'website'} "
            "screen. \nGiven a task instruction, a screen observation, and an action history sequence, \noutput the "
            f"next action and wait for the next observation. \nHere is the action space:\n\n{space}\n\nFormat the "
            "action as a dictionary with the following keys:\n{'action': 'ACTION_TYPE', 'value': 'element', "
            "'position': [x,y]}\n\nIf value or position is not applicable, set it as `None`.\nPosition might be "
            "[[x1,y1], [x2,y2]] if the action requires a start and end position.\nPosition represents the relative "
            "coordinates on the screenshot and should be scaled to a range of 0-1.\n")


def nav_answer(step):
    # ShowUI's get_answer: str(dict) with 2-decimal positions for point actions, [[x1,y1],[x2,y2]] for drags, values
    # where they apply; simultaneous steps (a list) are joined by ","
    if isinstance(step, list):
        return ",".join(nav_answer(s) for s in step)
    a, pos = step["action_type"].upper(), None
    if a in ("CLICK", "INPUT", "SELECT", "HOVER", "TAP") and step["point"] is not None:
        pos = [round(v, 2) for v in step["point"]]
    elif a in ("SELECT_TEXT", "SWIPE"):
        pos = [[round(v, 2) for v in p] for p in step["point"][:2]]
    value = step["action_value"] if a in ("INPUT", "SELECT", "ANSWER", "COPY", "SCROLL") else None
    return str({"action": a, "value": value, "position": pos})


class ShowUINavigation(QwenDataset):
    """ShowUI's shared NavigationDataset (GUIAct splits web-single / web-multi / smartphone): system text, task, the
    last num_history actions as text (tttt) or [screenshot, action] pairs (vtvt), then the current screenshot; the
    answer is str(dict). With num_turn > 1 the past actions between screenshots are targets too (vtvt)."""

    def __init__(self, data_dir, datasets, tokenizer, min_pixels, max_pixels, max_length, num_history=4,
                 history="tttt", num_turn=1):
        super().__init__(tokenizer, min_pixels, max_pixels, max_length)
        if history not in ("tttt", "vtvt"):
            raise ValueError(f"interleaved_history {history!r}: only 'tttt' and 'vtvt' are supported")
        self.num_history, self.history, self.num_turn = num_history, history, num_turn
        for entry in datasets:
            meta, root, split = showui_split(data_dir, entry)
            split = re.sub(r"^hf_(train|test)_", "", split.replace("_v2", ""))
            if split not in NAV_ACTIONS:
                raise ValueError(f"dataset {entry!r}: unknown split {split!r}, expected one of {sorted(NAV_ACTIONS)}")
            self.add(meta, _read_json(meta), (root, split))

    def check(self, rec, ctx):
        (root, split), hist = ctx, rec.get("step_history")
        if not (isinstance(rec.get("task"), str) and isinstance(hist, list) and rec.get("step")):
            return "no 'task' string, 'step' or 'step_history' list"
        hist = hist[-self.num_history:] if self.num_history else []
        steps = [rec["step"]] + [h.get("step", h) for h in hist if isinstance(h, dict)]
        acts = [s.get("action_type") for x in steps for s in (x if isinstance(x, list) else [x]) if isinstance(s, dict)]
        bad = [a for a in acts if not isinstance(a, str) or a.upper() not in {b for b, _ in NAV_ACTIONS[split]}]
        if bad or not acts:
            return f"action {bad[:1] or None} is not in the {split} action space"
        urls = [rec.get("img_url")] + [h.get("img_url") for h in hist] * (self.history == "vtvt")
        missing = [u for u in urls if not os.path.isfile(os.path.join(root, f"{u}.png"))]
        return f"missing image {os.path.join(root, f'{missing[0]}.png')}" if missing else None

    def build(self, rec, root_split):
        (root, split), hist = root_split, rec["step_history"][-self.num_history:] if self.num_history else []
        parts = [("<|im_start|>user\n" + nav_system(split) + f"Task: {rec['task']}\n", False)]
        for h in hist:
            act = nav_answer(h["step"] if "step" in h else h)
            parts += [(IMAGE, False), (act, self.num_turn > 1)] if self.history == "vtvt" else [(act, False)]
        parts += [(IMAGE + f"{IM_END}\n<|im_start|>assistant\n", False), (nav_answer(rec["step"]) + IM_END, True)]
        pieces = []  # neighbouring prompt parts are one piece: upstream tokenizes the whole prompt in one go
        for text, supervised in parts:
            pieces += [(pieces.pop()[0] + text, False)] if pieces and not supervised and not pieces[-1][1] else \
                [(text, supervised)]
        urls = [h["img_url"] for h in hist] * (self.history == "vtvt") + [rec["img_url"]]
        return pieces, [_load_rgb(os.path.join(root, f"{u}.png")) for u in urls]


def llamafactory_image(image, max_pixels):
    # LLaMA-Factory's _preprocess_image area cap (+ its Qwen2-VL plugin's 28-pixel floor) before the processor's
    # smart_resize: TongUI trains 1920x1080 at 1368x769 -> 1372x756 = 1323 tokens, not 1296 (showui_tongui.md C.2).
    # Its image_min_pixels (32 x 32) upscale never applies to a screenshot and is left out.
    if image.width * image.height > max_pixels:
        f = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * f), int(image.height * f)))  # PIL's default filter, as upstream
    return image.resize((max(image.width, 28), max(image.height, 28))) if min(image.size) < 28 else image


class LlamaFactoryDataset(QwenDataset):
    """LLaMA-Factory sharegpt data (TongUI): dataset_info.json names local json / jsonl files and their column and tag
    mapping; the qwen2_vl template (default system turn); each message tokenized on its own; loss on every assistant
    message + its "<|im_end|>\\n", as LLaMA-Factory does."""
    TAGS = dict(role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt", system_tag="system")

    def __init__(self, dataset_dir, names, tokenizer, min_pixels, max_pixels, max_length, image_max_pixels=0,
                 media_dir="", max_samples=0):
        super().__init__(tokenizer, min_pixels, max_pixels, max_length)
        self.image_max_pixels, info_file = image_max_pixels, os.path.join(dataset_dir, "dataset_info.json")
        info = _read_json(info_file)
        for name in names:
            attr, cols = info.get(name) or {}, dict(messages="conversations", images=None, system=None)
            bad = sorted(set(attr) - {"file_name", "formatting", "columns", "tags"}) + sorted(
                set(attr.get("columns", {})) - set(cols)) + sorted(set(attr.get("tags", {})) - set(self.TAGS))
            if bad or attr.get("formatting") != "sharegpt" or "file_name" not in attr:
                raise ValueError(f"{info_file}: dataset {name!r}: only local sharegpt files with messages / images / "
                                 f"system columns are supported (got {attr or 'nothing'}; unsupported keys {bad})")
            file = os.path.join(dataset_dir, attr["file_name"])
            records = _read_json(file)  # LLaMA-Factory's max_samples keeps the first records of each dataset
            self.add(file, records[:max_samples] if max_samples and isinstance(records, list) else records,
                     (media_dir or dataset_dir, cols | attr.get("columns", {}), self.TAGS | attr.get("tags", {})))

    def parse(self, rec, ctx):
        # ((system, message texts, image paths), None) or (None, why): LLaMA-Factory's sharegpt converter + checks
        media, c, t = ctx
        msgs = rec.get(c["messages"])
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get(t["content_tag"]), str)
                                                 for m in msgs):
            return None, f"no {c['messages']!r} list of messages with a {t['content_tag']!r} string"
        system = (rec.get(c["system"]) or "") if c["system"] else ""
        if msgs and msgs[0].get(t["role_tag"]) == t["system_tag"]:
            system, msgs = msgs[0][t["content_tag"]], msgs[1:]
        roles, texts = [m.get(t["role_tag"]) for m in msgs], [m[t["content_tag"]] for m in msgs]
        if not roles or roles != [t["user_tag"], t["assistant_tag"]] * (len(roles) // 2):
            return None, f"roles must alternate {t['user_tag']}/{t['assistant_tag']}, answer last; got {roles}"
        images = (rec.get(c["images"]) if c["images"] else None) or []
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or sum(x.count("<image>") for x in texts) != len(images):
            return None, f"{sum(x.count('<image>') for x in texts)} <image> tags for images {images!r}"
        paths = [os.path.join(media, p) if os.path.isfile(os.path.join(media, str(p))) else str(p) for p in images]
        missing = [p for p in paths if not os.path.isfile(p)]
        return (None, f"missing image {missing[0]}") if missing else ((system or "You are a helpful assistant.", texts,
                                                                       paths), None)

    def check(self, rec, ctx):
        return self.parse(rec, ctx)[1]

    def build(self, rec, ctx):
        (system, texts, paths), _ = self.parse(rec, ctx)
        images = [_load_rgb(p) for p in paths]
        images = [llamafactory_image(im, self.image_max_pixels) for im in images] if self.image_max_pixels else images
        pieces = [(render_chatml([dict(role="user", content=x)], system=None if k else system), False) if k % 2 == 0
                  else (x.replace("<image>", IMAGE) + IM_END + "\n", True) for k, x in enumerate(texts)]
        return pieces, images
