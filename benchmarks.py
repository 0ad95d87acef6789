"""Benchmarks read in the layout their authors distribute, for eval.py --bench NAME --data DIR (ScreenSpot so far).

ScreenSpot comes in two layouts, both read here:
    ShowUI   DIR/metadata/hf_test_full.json: a list of {img_url, task, bbox [x, y, w, h] px, img_size [w, h],
             split mobile|desktop|web, data_type text|icon}, images under DIR/images/
    SeeClick DIR/screenspot_{mobile,desktop,web}.json: lists of {img_filename, instruction, bbox [x, y, w, h] px,
             data_type, data_source}, images under DIR/screenspot_imgs/ (its screenspot_test.py arguments)
Every record is checked before the model loads: a malformed one (a missing field, a bad bbox, split or type) is an
error naming file, record index and reason (all of them at once: the benchmark itself is broken); a missing or
unreadable image is a counted skip, named and printed. Each family is asked as its own source asks it (FAMILIES);
an unparsable answer is a miss (ShowUI's rule; TongUI's vLLM script drops them, reported beside as
`skip_unparsable`). The outputs (predictions.jsonl, summary.json, results.md) are written atomically at the end.
"""
import json
import os
from types import SimpleNamespace

from tqdm import tqdm

import checkpoints
import formats
import scorers

SPLITS, TYPES = ("mobile", "desktop", "web"), ("text", "icon")
# showlab/ShowUI main/eval_screenspot.py: _SCREENSPOT_SYSTEM + ' ' + _SYSTEM_point, content [text, image, task];
# TongUI (scripts/evaluation) asks the same words
SHOWUI_PROMPT = ("Based on the screenshot of the page, I give a text description and you give its corresponding "
                 "location. The coordinate represents a clickable location [x, y] for an element, which is a relative "
                 "coordinate on the screenshot, scaled from 0 to 1.<image>{}")
# OpenGVLab/Vlaser evaluate_point_pixmo.py: the point prefix + ' Please provide the referring points of {expr}.'
VLASER_PROMPT = ("You are InternVL. Your task is to locate several points in the given image according to the task "
                 "descriptions. Your answer should be formatted as \"<point>[[x1, y1], [x2, y2],...]</point>\". The "
                 "point coordinates are normalized to integers between 0 and 1000. Return the answer in the point "
                 "format directly. Please provide the referring points of {}.")
# InternVL eval/refcoco/evaluate_grounding.py (MP-GUI ships no ScreenSpot prompt): a 0-1000 box, scored at its centre
BOX_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"


def showui_point(text):
    """ShowUI: ast.literal_eval of the answer must give [x, y] (0-1); anything else is a miss."""
    v = scorers._literal(text)
    return scorers._as_point(v) if isinstance(v, (list, tuple)) and len(v) == 2 else None


def tongui_point(text):
    """TongUI predict_point: a JSON (or Python) literal [x, y], or a 4-number box taken at its centre (0-1)."""
    return scorers._as_point(scorers._literal(text))


def box_centre(text):
    """InternVL's box answer (0-1000 grid), first box, taken at its centre (0-1)."""
    b = scorers.parse_box(text)
    return None if b is None else ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)


def vlaser_point(text):
    """Vlaser: the first point of '<point>[[x, y], ...]</point>' (0-1000 ints) / 1000."""
    pts = scorers.parse_points(text)
    return (pts[0][0] / 1000, pts[0][1] / 1000) if pts else None


# family -> (prompt, system: None = the template's default, "none" = no system turn, parse, needs InternVL)
FAMILIES = {"showui": (SHOWUI_PROMPT, "none", showui_point, False),  # trained and evaluated without a system turn
            "tongui": (SHOWUI_PROMPT, None, tongui_point, False),  # Qwen2.5-VL's chat template adds its default
            "vlaser": (VLASER_PROMPT, None, vlaser_point, True),
            "mpgui": (BOX_PROMPT, None, box_centre, True)}
# published ScreenSpot rows (docs/showui_tongui.md F, C.4; docs/mpgui.md 4.2), percent, in the table's cell order
PUBLISHED = {"showui": ("ShowUI-2B", (92.3, 75.5, 76.3, 61.1, 81.7, 63.6), 75.1),
             "tongui": ("TongUI-3B", (90.5, 76.0, 86.5, 68.5, 87.4, 68.4), 79.6),
             "mpgui": ("MP-GUI", (86.8, 65.9, 70.8, 56.4, 58.3, 46.6), 64.1)}
CELLS = [f"{s}/{t}" for s in SPLITS for t in TYPES]


def add_args(p):
    p.add_argument("--bench", choices=["screenspot", "aitw", "mind2web", "guiact"],
                   help="benchmark read from --data DIR in its upstream layout (navigation ones: navigation.py)")
    p.add_argument("--family", choices=FAMILIES, help="--bench: prompt and parse rules (default: by architecture: "
                   "qwen2_vl showui, qwen2_5_vl tongui, internvl vlaser, mpgui mpgui)")


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_record(r, seeclick):
    """Why a ScreenSpot record is malformed, or None."""
    if not isinstance(r, dict):
        return f"a {type(r).__name__}, not an object"
    fields = ("img_filename", "instruction") if seeclick else ("img_url", "task", "img_size", "split")
    if missing := [f for f in fields + ("bbox", "data_type") if f not in r]:
        return f"missing field(s) {', '.join(missing)}"
    b, text, image = r["bbox"], *((r["instruction"], r["img_filename"]) if seeclick else (r["task"], r["img_url"]))
    if not (isinstance(text, str) and text.strip() and isinstance(image, str) and image):
        return "empty or non-string instruction or image name"
    if not (isinstance(b, list) and len(b) == 4 and all(map(_num, b)) and b[2] > 0 and b[3] > 0):
        return f"bbox {b!r} is not [x, y, w, h] with w, h > 0"
    if r["data_type"] not in TYPES:
        return f"data_type {r['data_type']!r} not one of {', '.join(TYPES)}"
    if not seeclick and r["split"] not in SPLITS:
        return f"split {r['split']!r} not one of {', '.join(SPLITS)}"
    s = r.get("img_size")
    if not seeclick and not (isinstance(s, list) and len(s) == 2 and all(_num(v) and v > 0 for v in s)):
        return f"img_size {s!r} is not [w, h] > 0"


def read_screenspot(folder, limit=0):
    """ScreenSpot under folder in either layout -> (samples, skipped, layout); samples carry file, record, image,
    instruction, split, data_type and the gold box normalised to 0-1 xyxy. Malformed records raise (all listed)."""
    meta = os.path.join(folder, "metadata", "hf_test_full.json")
    if os.path.isfile(meta):
        layout, files, images = "showui", [(meta, None)], os.path.join(folder, "images")
    else:
        layout, images = "seeclick", os.path.join(folder, "screenspot_imgs")
        files = [(p, s) for s in SPLITS if os.path.isfile(p := os.path.join(folder, f"screenspot_{s}.json"))]
        if not files:
            raise FileNotFoundError(f"{folder}: neither metadata/hf_test_full.json (ShowUI) nor "
                                    "screenspot_{mobile,desktop,web}.json (SeeClick)")
    samples, skipped, bad = [], [], []
    for path, split in files:
        try:
            with open(path, encoding="utf-8") as f:
                recs = json.load(f)
        except ValueError as e:  # bad UTF-8 or JSON
            raise ValueError(f"{path}: not a JSON list of records: {e}") from None
        if not isinstance(recs, list):
            raise ValueError(f"{path}: a {type(recs).__name__}, not a list of records")
        for k, r in enumerate(recs):
            if why := check_record(r, split is not None):
                bad.append(f"{path}: record {k}: {why}")
                continue
            img = os.path.join(images, r["img_filename"] if split else r["img_url"])
            try:  # the header only; pixels are decoded batch by batch
                if not os.path.isfile(img):
                    raise ValueError(f"missing image {img}")
                size = formats.header_size(img)
            except ValueError as e:
                skipped.append(f"{path}: record {k}: {e}")
                continue
            w, h = size if split else r["img_size"]  # ShowUI normalises by img_size; SeeClick gives no size
            x, y, bw, bh = r["bbox"]
            samples.append(dict(file=path, record=k, image=img, instruction=r["instruction"] if split else r["task"],
                                split=split or r["split"], data_type=r["data_type"],
                                box=(x / w, y / h, (x + bw) / w, (y + bh) / h)))
    if bad:
        raise ValueError(f"{len(bad)} malformed ScreenSpot record(s):\n" + "\n".join(bad))
    return samples[:limit or None], skipped, layout


def plan(a):
    """What eval.py checks before the model loads: the benchmark read, the skips printed."""
    if not a.data:
        raise ValueError(f"--bench {a.bench}: give --data DIR, the benchmark's folder")
    samples, skipped, layout = read_screenspot(a.data, a.limit)
    for s in skipped:
        print(f"skip {s}")
    if not samples:
        raise ValueError(f"{a.data}: no usable ScreenSpot sample ({len(skipped)} skipped)")
    return samples, skipped, layout


def family(a, cfg):
    name = a.family or {"qwen2_vl": "showui", "qwen2_5_vl": "tongui", "mpgui": "mpgui"}.get(cfg.arch, "vlaser")
    if FAMILIES[name][3] != cfg.is_internvl:  # a Qwen prompt for an InternVL model, or the other way round
        raise ValueError(f"--family {name}: its prompt does not fit a {cfg.arch} model")
    return name


def table(scores, fam):
    """results.md: the papers' layout, one row of split x type cells, the macro Avg and the micro average."""
    head = "| model | " + " | ".join(c.replace("/", " ") for c in CELLS) + " | Avg (macro) | micro |"
    rows = [head, "|" + "---|" * (len(CELLS) + 3),
            "| ours | " + " | ".join(f"{100 * scores[c]:.1f}" if c in scores else "-" for c in CELLS)
            + f" | {100 * scores['avg']:.1f} | {100 * scores['micro']:.1f} |"]
    if fam in PUBLISHED:
        rows.append(f"| {PUBLISHED[fam][0]} (published) | " + " | ".join(map(str, PUBLISHED[fam][1]))
                    + f" | {PUBLISHED[fam][2]} | - |")
    return ("# ScreenSpot\n\n" + "\n".join(rows) + f"\n\n{scores['n']} samples. Avg is the papers' figure: the mean "
            "of the split x type success rates (macro); micro is all hits over all samples. An unparsable answer "
            "is a miss.\n")


def answer_all(m, tok, a, samples, skipped, answer_batch, ask):
    """[(sample, answer)] for every sample, batched; ask(sample) -> (question, image paths). A sample whose pixels do
    not decode (its header read) is a skip, appended to skipped and printed (navigation.py asks through it too)."""
    out = []
    for i in tqdm(range(0, len(samples), a.batch_size), desc=a.bench):
        batch, prompts = [], []
        for s in samples[i:i + a.batch_size]:
            try:
                question, paths = ask(s)
                prompts.append((question, [formats.load_rgb(p) for p in paths], None))
                batch.append(s)
            except ValueError as e:  # the header read but the pixels do not decode
                skipped.append(f"{s['file']}: record {s['record']}: {e}")
                print(f"skip {skipped[-1]}")
        out += zip(batch, answer_batch(m, tok, prompts, a)[0] if prompts else [])
    return out


def run(m, tok, a, bench, answer_batch):
    """Every sample through answer_batch, scored with scorers.screenspot_scores; the three files written at the end."""
    samples, skipped, layout = bench
    fam = family(a, m.cfg)
    prompt, system, parse, _ = FAMILIES[fam]
    a = SimpleNamespace(**{**vars(a), "system": system if a.system is None else a.system})  # --system wins
    skipped, rows = list(skipped), []
    for s, text in answer_all(m, tok, a, samples, skipped, answer_batch,
                              lambda s: (prompt.format(s["instruction"]), [s["image"]])):
        p = parse(text)
        rows.append(dict(s, answer=text, point=p, hit=scorers.point_in_box(p, s["box"])))
    if not rows:
        raise ValueError(f"{a.data}: every ScreenSpot sample was skipped")
    scores = scorers.screenspot_scores(rows)
    summary = dict(bench="screenspot", layout=layout, data=a.data, model=m.folder, arch=m.cfg.arch, family=fam,
                   prompt=prompt.replace("<image>", "<image: the screenshot>"), parse=parse.__doc__,
                   system="the template's default" if a.system is None else a.system,
                   images=f"max {a.max_tiles} tiles + thumbnail" if m.cfg.is_internvl
                   else f"{a.min_pixels}..{a.max_pixels} pixels", padding="left",
                   decoding=f"greedy, max_new_tokens {a.max_new_tokens}, stop at <|im_end|>", n=len(rows),
                   unparsable=sum(r["point"] is None for r in rows), scores=scores,
                   skip_unparsable=scorers.screenspot_scores([r for r in rows if r["point"] is not None]),
                   skipped=len(skipped), skipped_samples=skipped)
    os.makedirs(a.out, exist_ok=True)
    checkpoints.write_atomic(os.path.join(a.out, "predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    checkpoints.write_atomic(os.path.join(a.out, "summary.json"), json.dumps(summary, indent=1))
    checkpoints.write_atomic(os.path.join(a.out, "results.md"), table(scores, fam))
    print(table(scores, fam))
    return summary
