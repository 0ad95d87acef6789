"""AITW small-icon grounding data, part of MP-GUI stage 2 (graphical), from AITW episode records.

    python tools/aitw.py aitw/ training_data/aitw [--splits general install] [--image-prefix aitw_images/]

Expects aitw/<split>/<episode>/meta.json, by default every split folder of the root, as upstream reads them (the
MP-GUI README says it sampled "general" and "install": --splits general install for those two), each a JSON list of
screen records with `image_path`, `image/width`, `image/height`, `image/ui_annotations_positions` (normalised
[y, x, h, w] per element) and `image/ui_annotations_ui_types` (e.g. "ICON_HOME", "TEXT"). Writes
OUT/aitw_small_icon.jsonl and OUT/aitw_meta.json.

Rebuilt from the official data_tools/get_small_icon_grounding_data.py (BigTaige/MP-GUI, commit 232455c). An element
is kept when its type occurs exactly once on the screen, is not TEXT, is in the icon map below, and covers
0 < area < 0.3 % of the screen, all computed as upstream: the pixel box is int() of each normalised edge times the
screen size (float noise can lose a pixel: 0.29 * 100 -> 28), the rate area / (w * h) * 100 in floats. Question as
upstream (typo "reffering" included); the answer, which upstream leaves undefined, is the 0-1000 box as
"[[x1, y1, x2, y2]]". Upstream reads the folders in os.listdir order and shuffles; this reads them sorted, in order.
"""
import argparse
import json
import os
import sys

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.common import Skips, conv, write_jsonl, write_meta  # noqa: E402

# the official ICON_TYPE map's names (its second field, a description, is unused): 63 literal entries with
# ICON_HOME twice (same name both times), so 62 types
ICONS = {
    "ICON_SEND": "Send Icon", "ICON_CALL": "Call Icon", "ICON_STAR": "Star Icon", "ICON_PAUSE": "Pause Icon",
    "ICON_THREE_DOTS": "Three Dots Icon", "ICON_CALENDAR": "Calendar Icon", "ICON_MIC": "Microphone Icon",
    "ICON_PLUS": "Plus Icon", "ICON_PEOPLE": "People Icon", "ICON_SAD_FACE": "Sad Face Icon",
    "ICON_LAUNCH_APPS": "Launch Apps Icon", "ICON_FACEBOOK": "Facebook Icon", "ICON_VOLUME_STATE": "Volume State Icon",
    "ICON_HEART": "Heart Icon", "ICON_TIME": "Time Icon", "ICON_CLOUD": "Cloud Icon",
    "ICON_ARROW_BACKWARD": "Backward Arrow Icon", "ICON_SHARE": "Share Icon", "ICON_GOOGLE": "Google Icon",
    "ICON_SETTINGS": "Settings Icon", "ICON_NAV_BAR_CIRCLE": "Nav Bar Circle Icon", "ICON_V_UPWARD": "Upward Icon",
    "ICON_MIC_MUTE": "Muted Microphone Icon", "ICON_V_FORWARD": "Forward Icon", "ICON_PAPERCLIP": "Paperclip Icon",
    "ICON_ENVELOPE": "Envelope Icon", "ICON_GALLERY": "Gallery Icon", "ICON_VIDEOCAM": "Video Camera Icon",
    "ICON_CHAT": "Chat Icon", "ICON_ASSISTANT": "Assistant Icon", "ICON_LIST": "List Icon", "ICON_HOME": "Home Icon",
    "ICON_MAGNIFYING_GLASS": "Magnifying Glass Icon", "ICON_NOTIFICATIONS": "Notifications Icon",
    "ICON_PLAY": "Play Icon", "ICON_LOCATION": "Location Icon", "ICON_STOP": "Stop Icon", "ICON_INFO": "Info Icon",
    "ICON_V_BACKWARD": "Backward Icon", "ICON_NAV_BAR_RECT": "Nav Bar Rect Icon", "ICON_X": "Close Icon",
    "ICON_CHECK": "Checkmark Icon", "ICON_V_DOWNWARD": "Downward Icon", "ICON_SUN": "Sun Icon",
    "ICON_PERSON": "Person Icon", "ICON_THREE_BARS": "Three Bars Icon", "ICON_TAKE_PHOTO": "Take Photo Icon",
    "ICON_ARROW_FORWARD": "Forward Arrow Icon", "ICON_REFRESH": "Refresh Icon", "ICON_DOWNLOAD": "A downward arrow",
    "ICON_HISTORY": "A clock symbol representing past records", "ICON_ARROW_DOWNWARD": "Arrow Downward Icon",
    "ICON_QUESTION": "Question mark icon", "ICON_COMPASS": "Find direction or navigation",
    "ICON_EXPAND": "Expand Icon", "ICON_ARROW_UPWARD": "An upward-pointing arrow symbol",
    "ICON_SHOPPING_CART": "A cart filled with goods", "ICON_THUMBS_UP": "Thumbs Up Icon", "ICON_CAST": "Cast Icon",
    "ICON_END_CALL": "End Call Icon", "ICON_UPLOAD": "Upload Icon", "ICON_HAPPY_FACE": "Happy Face Icon",
}
QUESTION = 'Give the bounding box reffering to "{}".'


def pixel_box(yxhw, w, h):
    """Normalised [y, x, h, w] -> pixel [x1, y1, x2, y2], int() of each edge as upstream's process_bbox."""
    y, x, bh, bw = yxhw
    return [int(v * s) for v, s in ((x, w), (y, h), (x + bw, w), (y + bh, h))]


def select(record, max_rate=0.3):
    """[(type, pixel box, area %)] of one screen record: the small-icon grounding targets."""
    w, h = record["image/width"], record["image/height"]
    by_type = {}
    for t, b in zip(record["image/ui_annotations_ui_types"], record["image/ui_annotations_positions"]):
        by_type.setdefault(t, []).append(b)
    out = []
    for t, boxes in by_type.items():  # first-seen order, as upstream
        if len(boxes) != 1 or t == "TEXT" or t not in ICONS:
            continue
        box = pixel_box(boxes[0], w, h)
        rate = (box[2] - box[0]) * (box[3] - box[1]) / (w * h) * 100  # percent of the screen, as upstream
        if 0 < rate < max_rate:
            out.append((t, box, rate))
    return out


def check(record):
    """None if the record has every field upstream reads, else the first problem."""
    if not isinstance(record, dict):
        return "not an object"
    for key in ("image_path", "image/width", "image/height", "image/ui_annotations_positions",
                "image/ui_annotations_ui_types"):
        if key not in record:
            return f"missing field {key!r}"
    if not isinstance(record["image_path"], str) or not record["image_path"]:
        return f"field 'image_path' is {record['image_path']!r}"
    for key in ("image/width", "image/height"):
        if type(record[key]) is not int or record[key] <= 0:
            return f"field {key!r} is {record[key]!r}, expected a positive integer"
    boxes, types = record["image/ui_annotations_positions"], record["image/ui_annotations_ui_types"]
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        return "field 'image/ui_annotations_ui_types' is not a list of strings"
    if not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) == 4 and all(
            type(v) in (int, float) for v in b) for b in boxes):
        return "field 'image/ui_annotations_positions' is not a list of [y, x, h, w]"
    if len(boxes) != len(types):
        return f"{len(boxes)} positions but {len(types)} ui types"
    return None


def generate(root, splits=None, image_prefix="", max_rate=0.3, skips=None):
    """The samples of the split folders of root (None: every folder there, sorted)."""
    skips = skips if skips is not None else Skips()
    if splits is None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no AITW folder {root}")
        splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        for f in sorted(set(os.listdir(root)) - set(splits)):
            skips("not a split folder", os.path.join(root, f))
    files = []
    for split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(f"no split folder {os.path.join(root, split)}")
        for ep in sorted(os.listdir(os.path.join(root, split))):
            path = os.path.join(root, split, ep, "meta.json")
            if os.path.isfile(path):
                files.append(path)
            else:
                skips("episode without meta.json", path)
    out = []
    for path in tqdm(files, desc="aitw", file=sys.stderr):
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
            if not isinstance(records, list):
                raise ValueError("expected a JSON list of screen records")
        except (OSError, ValueError) as e:
            skips("unreadable file", f"{path}: {e}")
            continue
        for k, r in enumerate(records):
            why = check(r)
            if why:
                skips("bad record", f"{path} record {k}: {why}")
                continue
            for t, box, rate in select(r, max_rate):
                w, h = r["image/width"], r["image/height"]
                gt = [box[0] * 1000 // w, box[1] * 1000 // h, box[2] * 1000 // w, box[3] * 1000 // h]
                out.append(dict(id=len(out), image=image_prefix + r["image_path"], width=w, height=h, type=t,
                                rate=rate, conversations=conv(QUESTION.format(ICONS[t].lower()),
                                                              f"[[{gt[0]}, {gt[1]}, {gt[2]}, {gt[3]}]]")))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="AITW folder: ROOT/<split>/<episode>/meta.json")
    p.add_argument("out", help="output folder")
    p.add_argument("--splits", nargs="+", help="split folders to read (default: every folder of ROOT, as upstream)")
    p.add_argument("--image-prefix", default="", help="image field = PREFIX + the record's image_path")
    p.add_argument("--image-root", default="", help="meta 'root' that image paths are relative to")
    p.add_argument("--max-rate", type=float, default=0.3, help="keep elements under this %% of the screen")
    a = p.parse_args(argv)
    skips = Skips()
    out = generate(a.root, a.splits, a.image_prefix, a.max_rate, skips)
    jl = os.path.join(a.out, "aitw_small_icon.jsonl")
    write_jsonl(jl, out)
    write_meta(os.path.join(a.out, "aitw_meta.json"), {"AITW_small_icon": jl}, a.image_root)
    print(f"aitw: {len(out)} samples; skipped: {skips.summary()}")
    return out, skips


if __name__ == "__main__":
    main()
