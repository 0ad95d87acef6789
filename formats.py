"""On-disk training data formats -> samples for data.collate: InternVL / MP-GUI / Vlaser meta json + chat jsonl,
ShowUI grounding / navigation metadata, LLaMA-Factory sharegpt (TongUI); parsed and checked here, encoded by data.py."""
import codecs
import collections
import itertools
import json
import math
import os
import random
import re
import struct

import numpy as np
import torch
from PIL import Image

from data import (IM_END, IMAGE, QWEN_SYSTEM, encode_internvl, encode_pieces, internvl_grid, internvl_tiles,
                  render_chatml)

# -----------------------------------------------------------------------------
# Reading JSON and JSON Lines: a bad whole file is one error naming it; a bad jsonl line is a skip of that line only

def _utf8(path):
    """The file's bytes, checked to be UTF-8 text, without a leading UTF-8 BOM."""
    # editors write a BOM and json tools such as jq accept it; it carries no data
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raise ValueError(f"{path}: is gzip-compressed; decompress it (the readers take plain UTF-8 JSON / jsonl)")
    enc = json.detect_encoding(raw)  # RFC 8259's rule: a BOM, or the NUL bytes of UTF-16 / UTF-32 around ASCII
    if enc not in ("utf-8", "utf-8-sig"):
        raise ValueError(f"{path}: is {enc.upper()} text; expected UTF-8")
    return raw[len(codecs.BOM_UTF8):] if enc == "utf-8-sig" else raw


def _loads(raw):
    """(value, None) or (None, why) for one JSON text's bytes."""
    # json's RecursionError (deep nesting) and int-limit ValueError (a >4300-digit integer) become a why, as does
    # a UnicodeDecodeError
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: byte {raw[e.start]:#04x} at byte {e.start + 1}"
    except RecursionError:
        return None, "bad JSON: nested too deeply"
    except ValueError as e:  # JSONDecodeError says where; the int limit says which digits
        return None, f"bad JSON: {e}"


def read_json(path):
    """A whole-file JSON document, or a ValueError naming the file."""
    raw = _utf8(path)
    value, why = _loads(raw) if raw.strip() else (None, "the file is empty")
    if why:
        raise ValueError(f"{path}: {why}")
    return value


def read_jsonl(path):
    """[(line number from 1, value, None) or (line, None, why)] for the non-blank lines."""
    # lines end at "\n" only (JSON Lines; a CRLF's "\r" is JSON whitespace): a stray "\r" cannot shift the numbers
    return [(n, *_loads(line)) for n, line in enumerate(_utf8(path).split(b"\n"), 1) if line.strip()]


def text_error(value):
    """None, or why a parsed value's strings cannot be UTF-8 encoded (which would crash the tokenizer mid-run)."""
    # the cause: a lone surrogate from a "\ud800" escape
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"text holds a lone surrogate {e.object[e.start:e.end]!r} (an unpaired \\u escape)"


# What PIL raises on a corrupt image, found by fuzzing PNG / JPEG / GIF / BMP / WebP / TIFF files (Pillow 13):
# OSError (unidentified, truncated, decoder errors), SyntaxError ("broken PNG file"), ValueError, TypeError (TIFF),
# DecompressionBombError; EOFError and struct.error come from plugins' header parsing.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError, struct.error, Image.DecompressionBombError)


def header_size(path):
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except IMAGE_ERRORS as e:
        raise ValueError(f"unreadable image {path}: {type(e).__name__}: {e}") from None


def load_rgb(path):
    """The image decoded now (a broken file fails here, its handle closed) as RGB."""
    # 16-bit grey (I;16*, I), which PIL's RGB conversion clips at 255, is scaled to 8 bits first
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):
                im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
            return im.convert("RGB")
    except IMAGE_ERRORS as e:
        raise ValueError(f"unreadable image {path}: {type(e).__name__}: {e}") from None


# -----------------------------------------------------------------------------
# InternVL / MP-GUI meta json + chat jsonl, read as InternVL does except: a sample it would crash on or truncate is
# skipped and reported as (file, line, reason), and a text-only sample carries no pixels (InternVL feeds a blank tile).

META_KEYS = dict(root=str, annotation=str, data_augment=bool, repeat_time=(int, float))  # all required


def _meta_relative(path, base):
    """path relative to the meta file (folder base), unless absolute or found from the cwd (as InternVL reads it)."""
    return path if os.path.isabs(path) or os.path.exists(path or ".") else os.path.join(base, path)


# OpenGVLab/InternVL internvl_chat/internvl/train/internvl_chat_finetune.py: build_datasets (the meta file it reads)
def read_meta(meta_path):
    """The meta json {name: {root, annotation, data_augment, repeat_time[, max_dynamic_patch]}} -> checked dicts."""
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{meta_path}: expected a non-empty JSON object {{name: dataset}}, got {_kind(meta)}")
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
        if not math.isfinite(rt) or rt <= 0 or (rt > 1 and not isinstance(rt, int)):  # NaN passes both compares
            raise ValueError(f"{where}: key 'repeat_time' must be > 0, and an integer when > 1, got {rt!r}")
        if mdp is not None and (type(mdp) is not int or mdp < 1):
            raise ValueError(f"{where}: key 'max_dynamic_patch' must be a positive integer, got {mdp!r}")
        out.append(dict(name=name, root=_meta_relative(d["root"], base),
                        annotation=_meta_relative(d["annotation"], base),
                        repeat_time=rt, data_augment=d["data_augment"], max_dynamic_patch=mdp))
    return out


def _kind(value):
    """A short description of a JSON value for a reason: its type and a clipped repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def parse_line(item):
    """(item, image names) or (None, why) for a parsed line: each of these would crash InternVL mid-training."""
    if not isinstance(item, dict):
        return None, f"expected a JSON object, got {_kind(item)}"
    if not isinstance(item.get("conversations"), list):
        return None, f"'conversations' is not a list: {_kind(item.get('conversations'))}"
    why = text_error(item)
    if why:
        return None, why
    conv = item["conversations"]
    roles = [t.get("from") if isinstance(t, dict) and isinstance(t.get("value"), str) else None for t in conv]
    roles = roles[1:] if roles[:1] == ["system"] else roles
    if not roles or roles != ["human", "gpt"] * (len(roles) // 2):
        return None, f"turns must alternate human/gpt and end with gpt, got {roles}"
    images = item.get("image") or []  # absent or empty: text only, as InternVL
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        return None, f"'image' is not a path or a list of paths: {_kind(item.get('image'))}"
    n_ph = sum(t["value"].count("<image>") for t in conv)
    if n_ph != len(images) and (n_ph, len(images)) != (0, 1):  # a lone image without placeholder goes first
        return None, f"{n_ph} <image> placeholders for {len(images)} images"
    if type(item.get("length", 0)) is not int:
        return None, f"'length' is not an integer: {_kind(item['length'])}"
    return item, images


# Vlaser point grounding: OpenGVLab/Vlaser Vlaser_VLM/README.md, "add the following prefix to the question itself"
VLASER_POINT_PREFIX = (
    'You are InternVL. Your task is to locate several points in the given image according to the task descriptions. '
    'Your answer should be formatted as "<point>[[x1, y1], [x2, y2],...]</point>". The point coordinates are '
    'normalized to integers between 0 and 1000. Return the answer in the point format directly.')


def check_points(conversations):
    """None, or why a point answer is malformed: every <point> tag must hold [[x, y], ...] integers in 0..1000."""
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
    """A sample answering with <point> gets "prefix question" as its first question (after a leading <image>), once."""
    if not prefix or not any("<point>" in t["value"] for t in conversations if t["from"] == "gpt"):
        return conversations
    conv = [dict(t) for t in conversations]
    k = next(i for i, t in enumerate(conv) if t["from"] == "human")
    head = "<image>\n" if conv[k]["value"].startswith("<image>\n") else ""
    rest = conv[k]["value"][len(head):]
    conv[k]["value"] = head + (rest if rest.startswith(prefix) else prefix + " " + rest)
    return conv


# OpenGVLab/InternVL internvl_chat/internvl/train/internvl_chat_finetune.py: LazySupervisedDataset (+ build_datasets)
class InternVLDataset(torch.utils.data.Dataset):
    """The chat jsonl files a meta json names; max_tiles (InternVL's max_num), or a dataset's max_dynamic_patch."""

    def __init__(self, meta_path, tokenizer, template, num_image_token, image_size=448, max_tiles=6, max_length=4096,
                 extra_token=None, use_thumbnail=True, point_prefix=None):
        self.tokenizer, self.template, self.num_image_token, self.extra_token = (tokenizer, template, num_image_token,
                                                                                 extra_token)
        self.point_prefix = point_prefix  # Vlaser: put before the first question of every <point> sample
        self.image_size, self.max_length, self.use_thumbnail = image_size, max_length, use_thumbnail
        self.meta, self._tiles = read_meta(meta_path), {}
        self.samples, self.lengths, self.skipped = [], [], []  # samples: (dataset index, line number, item, paths)
        self.records = collections.Counter()  # annotation file -> lines checked, for the load-time skip totals
        for di, m in enumerate(self.meta):
            if m["data_augment"]:  # InternVL's train-time random JPEG re-encoding; no shipped meta turns it on
                raise ValueError(f"{meta_path}: dataset {m['name']!r}: data_augment=true is not implemented")
            m["max_tiles"] = m["max_dynamic_patch"] or max_tiles
            lines = read_jsonl(m["annotation"])  # (line number, item, why); InternVL reads no blank lines either
            # InternVL cuts (repeat_time < 1) or repeats the lines, then shuffles them seeded by the dataset's index;
            # shuffling line indices gives the same permutation, and bad lines simply drop out of it
            order, rt = list(range(len(lines))), m["repeat_time"]
            order = order[:int(len(order) * rt)] if rt < 1 else order * int(rt)  # rt may be 1.0
            np.random.default_rng(seed=di).shuffle(order)
            good = {}
            for k in sorted(set(order)):  # each line is checked (and reported) once, however often it repeats
                n, item, why = lines[k]
                ok, why = self._check(item, m) if why is None else (None, why)
                if ok:
                    good[k] = ok
                else:
                    self.skipped.append((m["annotation"], n, why))
            self.records[m["annotation"]] += len(set(order))
            # the group_by_length estimate: InternVL's "\n"-joined turn texts (BOS included) + the image tokens
            keys = [k for k in good if "length" not in good[k][0]]
            texts = ["\n".join(t["value"] for t in good[k][0]["conversations"]) for k in keys]
            n_text = {k: len(e.ids) for k, e in zip(keys, tokenizer.encode_batch(texts))}
            for k in order:
                if k in good:
                    item, paths, n_img = good[k]
                    self.samples.append((di, lines[k][0], item, paths))
                    self.lengths.append(item["length"] if "length" in item else n_text[k] + n_img)

    def _check(self, item, m):
        """((item, image paths, image tokens), None) or (None, why) for a parsed line."""
        item, images = parse_line(item)
        if item is None:
            return None, images
        if why := self.point_prefix and check_points(item["conversations"]):
            return None, why
        paths = tuple(os.path.join(m["root"], p) for p in images)
        if missing := [p for p in paths if not os.path.isfile(p)]:
            return None, f"missing image {missing[0]}"
        w, h = item.get("width"), item.get("height")
        try:  # the line's own size when it has one, else the file header (cheap: PIL reads no pixels here)
            sizes = [(w, h)] if len(paths) == 1 and all(type(v) is int and v > 0 for v in (w, h)) else \
                [header_size(p) for p in paths]
        except ValueError as e:
            return None, str(e)
        n_img = 0
        for w, h in sizes:
            key = (w, h, m["max_tiles"] // len(paths))  # InternVL splits the tile budget among a sample's images
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
            pix = [internvl_tiles(load_rgb(p), m["max_tiles"] // len(paths), self.image_size, self.use_thumbnail)
                   for p in paths]
        except ValueError as e:  # load_rgb's "unreadable image PATH: ...", or a tiling failure
            return dict(skip=source + (str(e),))
        tiles = [len(x) for x in pix]
        conv = with_point_prefix(item["conversations"], self.point_prefix)  # Vlaser's, where it has a prefix
        try:
            enc = encode_internvl(self.tokenizer, conv, self.template, tiles, self.num_image_token, self.extra_token)
        except ValueError as e:
            return dict(skip=source + (f"cannot encode: {e}",))
        n = len(enc["input_ids"])
        if n > self.max_length:  # never truncate: a cut could split an image span or silently drop answer tokens
            return dict(skip=source + (f"{n} tokens > max_length {self.max_length}",))
        return dict(enc, pixel_values=torch.cat(pix) if pix else None, tiles=tiles, source=source)


def load_report(ds):
    """Log lines at load, per file: the records skipped of those read, and those kept by keep_untagged_system."""
    n, kept = collections.Counter(f for f, _, _ in ds.skipped), getattr(ds, "untagged_system", [])
    out = [f"skipped {n[f]} of {total} records in {f} at load" for f, total in ds.records.items()]
    for f in dict.fromkeys(f for f, _ in kept):
        where = [i for g, i in kept if g == f]
        out.append(f"kept {len(where)} records in {f} whose first message has the role 'system' that its tags do not "
                   f"name, as the system turn (keep_untagged_system): at {where[:10]}" + " ..." * (len(where) > 10))
    return out


# -----------------------------------------------------------------------------
# Qwen training data: ShowUI grounding / navigation metadata, LLaMA-Factory sharegpt (TongUI)

def _unit(v, n):
    """v is n numbers in 0..1 (NaN and inf fail the compare; bools are not numbers)."""
    return isinstance(v, list) and len(v) == n and all(type(x) in (int, float) and 0 <= x <= 1 for x in v)


def read_records(path):
    """[(where, record, why)]: a jsonl file's lines (where: from 1), else a JSON list's records (where: from 0)."""
    if path.endswith(".jsonl"):
        return read_jsonl(path)
    records = read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {_kind(records)}")
    return [(i, r, None) for i, r in enumerate(records)]


class QwenDataset(torch.utils.data.Dataset):
    """Records checked once at start (check -> None or why), built into (pieces, images) and encoded at each fetch."""
    # a record ShowUI or LLaMA-Factory would crash on is skipped, as (file, where, reason), at either

    def __init__(self, tokenizer, min_pixels, max_pixels, max_length):
        self.tokenizer, self.min_pixels, self.max_pixels = tokenizer, min_pixels, max_pixels
        self.max_length = max_length
        self.samples, self.lengths, self.skipped = [], [], []  # samples: (file, where, record, context)
        self.records = collections.Counter()  # file -> records read, for the load-time skip totals

    def add(self, file, entries, ctx):
        """entries: read_records' (where, record, why)."""
        self.records[file] += len(entries)
        for i, rec, why in entries:
            try:
                why = why or (f"expected a JSON object, got {_kind(rec)}" if not isinstance(rec, dict) else
                              text_error(rec) or self.check(rec, ctx))
            except (LookupError, TypeError, AttributeError) as e:  # a shape check() missed: still a skip, not a crash
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
        except ValueError as e:  # our own checks and load_rgb's "unreadable image PATH: ..." say what is wrong
            return dict(skip=(file, index, str(e) if str(e).startswith("unreadable") else f"cannot encode: {e}"))
        except (LookupError, TypeError, AttributeError) as e:  # a shape check() missed: still a skip, not a crash
            return dict(skip=(file, index, f"cannot encode: {type(e).__name__}: {e}"))
        if len(enc["input_ids"]) > self.max_length:  # never truncate: ShowUI asserts, LLaMA-Factory cuts answers
            return dict(skip=(file, index, f"{len(enc['input_ids'])} tokens > max_length {self.max_length}"))
        return dict(enc, source=(file, index))


# showlab/ShowUI data/dset_shared_grounding.py, data/dset_shared_navigation.py: dataset_mapping
def showui_split(data_dir, entry):
    """"name:json" (ShowUI's --train_dataset / --train_json pairs) -> (metadata file, image folder, json name)."""
    name, _, split = entry.partition(":")
    if not split:
        raise ValueError(f"dataset {entry!r}: expected 'name:json', e.g. 'showui-desktop:hf_train'")
    folder = {"showui-desktop": "ShowUI-desktop", "showui-web": "ShowUI-web", "amex": "AMEX",
              "guiact": "GUI_Course/GUIAct"}.get(name, name)  # ShowUI's dataset_mapping; else the name is the folder
    return os.path.join(data_dir, folder, "metadata", split + ".json"), os.path.join(data_dir, folder, "images"), split


# showlab/ShowUI data/dset_shared_grounding.py: GroundingDataset; data/template/shared_grounding.py: grounding_to_qwen
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
            self.add(meta, read_records(meta), root)

    def check(self, rec, root):
        url, size, els = rec.get("img_url"), rec.get("img_size"), rec.get("element")
        if not isinstance(url, str) or not os.path.isfile(os.path.join(root, url)):
            return f"missing image {os.path.join(root, str(url))} ('img_url' {_kind(url)})"
        # the crop works in img_size pixels: whole numbers, and a side of at least one pixel at the smallest crop
        if not (isinstance(size, list) and len(size) == 2 and all(
                type(v) in (int, float) and math.isfinite(v) and v == int(v) and v * self.crop[0] >= 1 for v in size)):
            return f"'img_size' {_kind(size)} is not [width, height] in whole pixels >= {1 / self.crop[0]:g}"
        if not isinstance(els, list) or not els:
            return f"'element' is not a non-empty list: {_kind(els)}"
        for j, e in enumerate(els):
            if not isinstance(e, dict) or not isinstance(e.get("instruction"), str):
                return f"element {j}: no 'instruction' string in {_kind(e)}"
            for key, n in (("point", 2),) + ((("bbox", 4),) if self.crop != (1, 1) else ()):
                if not _unit(e.get(key), n):
                    return f"element {j}: {key} {e.get(key)!r} is not {n} numbers in 0..1"

    def build(self, rec, root):
        path, elements = os.path.join(root, rec["img_url"]), rec["element"]
        image, size = load_rgb(path), [int(v) for v in rec["img_size"]]
        if self.crop != (1, 1):
            if image.size != tuple(size):  # else the crop lands off its elements (and a huge size is a huge canvas)
                raise ValueError(f"'img_size' {size} is not the size of {path}, {image.width}x{image.height}")
            image, elements = showui_crop(image, size, elements, *self.crop)
        pieces = []
        for j, e in enumerate(random.choices(elements, k=min(self.num_turn, len(elements)))):
            xy = [int(v * 1000) for v in e["point"]] if self.xy_int else [round(v, 2) for v in e["point"]]
            prompt = (self.PROMPT.format(1000 if self.xy_int else 1) + IMAGE) if j == 0 else ""
            pieces += [(("\n" if j else "") + render_chatml([dict(role="user", content=prompt + e["instruction"])],
                                                            system=None), False), (f"{xy}{IM_END}", True)]
        return pieces, [image]


# showlab/ShowUI data/dset_shared_grounding.py: GroundingDataset.random_crop_metadata
def showui_crop(image, size, elements, lo, hi):
    """ShowUI's random_crop_metadata: a U(lo, hi) x metadata-size crop per side -> (image, surviving elements)."""
    # a side larger than the image pastes it centred on a white crop-size canvas (whose other side may cut it).
    # Elements whose int-truncated pixel bbox lies inside survive, renormalised (none: the original image and
    # elements); unlike ShowUI, the record is not rewritten.
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


# showlab/ShowUI data/template/shared_navigation.py: action_map
_WEB_ACTIONS = [  # as ShowUI's prompt words them (trailing spaces included)
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


# showlab/ShowUI data/template/shared_navigation.py: _NAV_SYSTEM and _NAV_FORMAT, as navigation_to_qwen joins them
def nav_system(split):
    """The system text for a GUIAct split: the navigator's role, the split's action space, the answer format."""
    space = "".join(f"{i}. `{a}`: {d}\n" for i, (a, d) in enumerate(NAV_ACTIONS[split], 1))
    return (f"You are an assistant trained to navigate the {'smartphone' if split == 'smartphone' else 'website'} "
            "screen. \nGiven a task instruction, a screen observation, and an action history sequence, \noutput the "
            f"next action and wait for the next observation. \nHere is the action space:\n\n{space}\n\nFormat the "
            "action as a dictionary with the following keys:\n{'action': 'ACTION_TYPE', 'value': 'element', "
            "'position': [x,y]}\n\nIf value or position is not applicable, set it as `None`.\nPosition might be "
            "[[x1,y1], [x2,y2]] if the action requires a start and end position.\nPosition represents the relative "
            "coordinates on the screenshot and should be scaled to a range of 0-1.\n")


def nav_step_error(step, split):
    """None, or why a step (or a list of steps) is not one nav_answer can render in the split's action space."""
    # points are checked as grounding checks them (numbers in 0..1: ShowUI's are relative); a required one must be there
    space = dict(NAV_ACTIONS[split])
    for s in step if isinstance(step, list) and step else [step]:
        a = s.get("action_type") if isinstance(s, dict) else None
        if not isinstance(a, str) or a.upper() not in space:
            return f"action_type {a!r} is not in the {split} action space {sorted(space)}"
        a, p = a.upper(), s.get("point")
        if a in ("SELECT_TEXT", "SWIPE") and not (isinstance(p, list) and len(p) >= 2 and all(_unit(q, 2)
                                                                                           for q in p[:2])):
            return f"{a} point {_kind(p)} is not [[x1, y1], [x2, y2]] with numbers in 0..1"
        if a in ("CLICK", "INPUT", "SELECT", "HOVER", "TAP") and not (
                _unit(p, 2) or (p is None and "is required" not in space[a])):
            return f"{a} point {_kind(p)} is not [x, y] with numbers in 0..1" + (" (required)" if p is None else "")
        if a in ("INPUT", "SELECT", "ANSWER", "COPY", "SCROLL") and "action_value" not in s:
            return f"{a} has no 'action_value'"


# showlab/ShowUI data/dset_shared_navigation.py: get_answer
def nav_answer(step):
    """str(dict) with 2-decimal positions for point actions, [[x1,y1],[x2,y2]] for drags; a list is joined by ","."""
    if isinstance(step, list):
        return ",".join(nav_answer(s) for s in step)
    a, pos = step["action_type"].upper(), None
    if a in ("CLICK", "INPUT", "SELECT", "HOVER", "TAP") and step.get("point") is not None:
        pos = [round(v, 2) for v in step["point"]]
    elif a in ("SELECT_TEXT", "SWIPE"):
        pos = [[round(v, 2) for v in p] for p in step["point"][:2]]
    value = step["action_value"] if a in ("INPUT", "SELECT", "ANSWER", "COPY", "SCROLL") else None
    return str({"action": a, "value": value, "position": pos})


# showlab/ShowUI data/dset_aitw.py, dset_mind2web.py, dset_shared_navigation.py: get_history_qwen
def nav_turn(head, actions, history):
    """A navigation user turn as ShowUI builds it, [(text, is a past action after its screenshot)]."""
    # head (system text, task), the past actions as text (tttt) or each after its screenshot (vtvt), then the current
    # screenshot (IMAGE)
    parts = [(head, False)]
    for act in actions:
        parts += [(IMAGE, False), (act, True)] if history == "vtvt" else [(act, False)]
    return parts + [(IMAGE, False)]


# showlab/ShowUI data/dset_shared_navigation.py: NavigationDataset
class ShowUINavigation(QwenDataset):
    """GUIAct web-single / web-multi / smartphone: system text, task, the last num_history actions as text (tttt) or
    [screenshot, action] pairs (vtvt; targets too if num_turn > 1), the screenshot; the answer is str(dict)."""
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
            self.add(meta, read_records(meta), (root, split))

    def check(self, rec, ctx):
        (root, split), hist = ctx, rec.get("step_history")
        if not isinstance(rec.get("task"), str):
            return f"'task' is not a string: {_kind(rec.get('task'))}"
        if not isinstance(hist, list) or not all(isinstance(h, dict) for h in hist):
            return f"'step_history' is not a list of objects: {_kind(hist)}"
        used = hist[-self.num_history:] if self.num_history else []
        steps = [("step", rec.get("step"))] + [(f"step_history[{k}]", h.get("step", h))
                                               for k, h in enumerate(used, len(hist) - len(used))]
        for where, s in steps:
            if why := nav_step_error(s, split):
                return f"{where}: {why}"
        urls = [rec.get("img_url")] + [h.get("img_url") for h in used] * (self.history == "vtvt")
        missing = [u for u in urls if not isinstance(u, str) or not os.path.isfile(os.path.join(root, f"{u}.png"))]
        return f"missing image {os.path.join(root, f'{missing[0]}.png')}" if missing else None

    def build(self, rec, root_split):
        (root, split), hist = root_split, rec["step_history"][-self.num_history:] if self.num_history else []
        head = "<|im_start|>user\n" + nav_system(split) + f"Task: {rec['task']}\n"
        acts = [nav_answer(h["step"] if "step" in h else h) for h in hist]
        parts = [(text, past and self.num_turn > 1) for text, past in nav_turn(head, acts, self.history)]
        parts += [(f"{IM_END}\n<|im_start|>assistant\n", False), (nav_answer(rec["step"]) + IM_END, True)]
        # neighbouring prompt parts are one piece: ShowUI tokenizes the whole prompt in one go (no two answers touch)
        pieces = [("".join(t for t, _ in run), s) for s, run in itertools.groupby(parts, key=lambda p: p[1])]
        urls = [h["img_url"] for h in hist] * (self.history == "vtvt") + [rec["img_url"]]
        return pieces, [load_rgb(os.path.join(root, f"{u}.png")) for u in urls]


# hiyouga/LLaMA-Factory src/llamafactory/data/mm_plugin.py: MMPluginMixin and Qwen2VLPlugin._preprocess_image
def llamafactory_image(image, max_pixels, min_pixels=32 * 32):
    """LLaMA-Factory's image preprocessing before smart_resize: area cap (0: none) and floor, side limits."""
    # side limits: the Qwen2-VL 28-pixel floor, and a side over 200 x the other shrunk to 180 x (where smart_resize
    # would refuse it). At TongUI's cap 1344 x 28 x 28, 1920x1080 trains at 1368x769 -> 1372x756 = 1323 tokens, not
    # smart_resize's 1296.
    if max_pixels and image.width * image.height > max_pixels:
        f = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * f), int(image.height * f)))  # PIL's default filter, as LLaMA-Factory
    if image.width * image.height < min_pixels:
        f = math.sqrt(min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * f), int(image.height * f)))
    if min(image.size) < 28:
        image = image.resize((max(image.width, 28), max(image.height, 28)))
    if image.width / image.height > 200:
        image = image.resize((image.height * 180, image.height))
    if image.height / image.width > 200:
        image = image.resize((image.width, image.width * 180))
    return image


def _strings(d):
    return isinstance(d, dict) and all(isinstance(v, str) for v in d.values())


# hiyouga/LLaMA-Factory src/llamafactory/data/: parser.py, converter.py (SharegptDatasetConverter), template.py
class LlamaFactoryDataset(QwenDataset):
    """LLaMA-Factory sharegpt data (TongUI) that dataset_info.json names, in the qwen2_vl template."""
    # dataset_info.json names local json / jsonl files and their column and tag mapping; each message is tokenized
    # on its own, loss on every answer + its "<|im_end|>\n". image_max_pixels: LLaMA-Factory's default 768 x 768.
    # keep_untagged_system: tags that omit system_tag leave it unset in LLaMA-Factory (parser.py), which then drops a
    # record whose first message has the role "system"; so do we (a skip naming it), unless this is True: then that
    # message is the system turn, and the records are counted.
    TAGS = dict(role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt", system_tag="system")

    def __init__(self, dataset_dir, names, tokenizer, min_pixels, max_pixels, max_length, image_max_pixels=768 * 768,
                 media_dir="", max_samples=0, keep_untagged_system=False):
        super().__init__(tokenizer, min_pixels, max_pixels, max_length)
        self.image_max_pixels, info_file = image_max_pixels, os.path.join(dataset_dir, "dataset_info.json")
        self.keep_untagged_system, self.untagged_system = keep_untagged_system, []  # (file, where) kept that way
        info = read_json(info_file)
        if not isinstance(info, dict):
            raise ValueError(f"{info_file}: expected a JSON object {{name: dataset}}, got {_kind(info)}")
        for name in names:
            attr, cols = info.get(name) or {}, dict(messages="conversations", images=None, system=None)
            attr = attr if isinstance(attr, dict) else {"not an object": attr}
            bad = sorted(set(attr) - {"file_name", "formatting", "columns", "tags"}) + sorted(
                set(attr.get("columns", {})) - set(cols)) + sorted(set(attr.get("tags", {})) - set(self.TAGS))
            if bad or attr.get("formatting") != "sharegpt" or not isinstance(attr.get("file_name"), str) or not (
                    _strings(attr.get("columns", {})) and _strings(attr.get("tags", {}))):
                raise ValueError(f"{info_file}: dataset {name!r}: only local sharegpt files with messages / images / "
                                 f"system columns are supported, names as strings (got {attr or 'nothing'}; "
                                 f"unsupported keys {bad})")
            tags = self.TAGS | ({"system_tag": None} if "tags" in attr else {}) | attr.get("tags", {})
            file = os.path.join(dataset_dir, attr["file_name"])
            entries = read_records(file)  # LLaMA-Factory's max_samples keeps the first records of each dataset
            ctx, n = (media_dir or dataset_dir, cols | attr.get("columns", {}), tags), len(self.samples)
            self.add(file, entries[:max_samples] if max_samples else entries, ctx)
            if keep_untagged_system and tags["system_tag"] is None:  # count and name the records kept this way
                self.untagged_system += [(f, i) for f, i, rec, _ in self.samples[n:]
                                         if rec[ctx[1]["messages"]][0].get(tags["role_tag"]) == "system"]

    def parse(self, rec, ctx):
        """((system, message texts, image paths), None) or (None, why): LLaMA-Factory's sharegpt converter + checks."""
        media, c, t = ctx
        msgs, system = rec.get(c["messages"]), (rec.get(c["system"]) or "") if c["system"] else ""
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get(t["content_tag"]), str)
                                                 for m in msgs):
            return None, f"{c['messages']!r} is not a list of messages with a {t['content_tag']!r} string: " \
                         f"{_kind(msgs)}"
        if not isinstance(system, str):
            return None, f"system column {c['system']!r} is not a string: {_kind(system)}"
        system_tag = t["system_tag"] or ("system" if self.keep_untagged_system else None)
        if msgs and msgs[0].get(t["role_tag"]) == system_tag:
            system, msgs = msgs[0][t["content_tag"]], msgs[1:]
        elif msgs and t["system_tag"] is None and msgs[0].get(t["role_tag"]) == "system":
            return None, ("first message has the role 'system', which dataset_info's tags do not name (no system_tag): "
                          "LLaMA-Factory drops the record (keep_untagged_system=True keeps it)")
        roles, texts = [m.get(t["role_tag"]) for m in msgs], [m[t["content_tag"]] for m in msgs]
        if not roles or roles != [t["user_tag"], t["assistant_tag"]] * (len(roles) // 2):
            return None, f"roles must alternate {t['user_tag']}/{t['assistant_tag']}, answer last; got {roles}"
        images = (rec.get(c["images"]) if c["images"] else None) or []
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            return None, f"images column {c['images']!r} is not a path or a list of paths: {_kind(images)}"
        if sum(x.count("<image>") for x in texts) != len(images):
            return None, f"{sum(x.count('<image>') for x in texts)} <image> tags for {len(images)} images {images!r}"
        paths = [os.path.join(media, p) if os.path.isfile(os.path.join(media, p)) else p for p in images]
        missing = [p for p in paths if not os.path.isfile(p)]
        return (None, f"missing image {missing[0]}") if missing else ((system or QWEN_SYSTEM, texts, paths), None)

    def check(self, rec, ctx):
        return self.parse(rec, ctx)[1]

    def build(self, rec, ctx):
        (system, texts, paths), _ = self.parse(rec, ctx)
        images = [llamafactory_image(load_rgb(p), self.image_max_pixels) for p in paths]
        pieces = [(render_chatml([dict(role="user", content=x)], system=None if k else system), False) if k % 2 == 0
                  else (x.replace("<image>", IMAGE) + IM_END + "\n", True) for k, x in enumerate(texts)]
        return pieces, images
