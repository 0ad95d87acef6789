"""Benchmarks read in the layout their authors distribute, for eval.py --bench NAME --data DIR (see README.md)."""
# Every record is checked before the model loads: the malformed ones are one error naming file, record index and
# reason; a missing or unreadable image is a counted skip, printed. Each family is asked as its own source asks it.
import json
import math
import os
import re
import shutil
import textwrap
from types import SimpleNamespace

from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

import checkpoints
import formats
import scorers

SPLITS, TYPES = ("mobile", "desktop", "web"), ("text", "icon")
# showlab/ShowUI main/eval_screenspot.py: _SCREENSPOT_SYSTEM + ' ' + _SYSTEM_point, content [text, image, task];
# TongUI (scripts/evaluation) asks the same words; they are the words of ShowUI's grounding training, scaled 0 to 1
SHOWUI_PROMPT = formats.ShowUIGrounding.PROMPT.format(1) + "<image>{}"
# OpenGVLab/Vlaser evaluate_point_pixmo.py: the point prefix + ' Please provide the referring points of {expr}.'
VLASER_PROMPT = formats.VLASER_POINT_PREFIX + " Please provide the referring points of {}."
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
    return scorers._as_point(scorers.parse_box(text))


def vlaser_point(text):
    """Vlaser: the first point of '<point>[[x, y], ...]</point>' (0-1000 ints) / 1000."""
    return next(((x / 1000, y / 1000) for x, y in scorers.parse_points(text)), None)


# family -> (prompt, system: None = the template's default, "none" = no system turn, parse, needs InternVL). ShowUI
# is trained and evaluated without a system turn; for TongUI Qwen2.5-VL's chat template adds its default
FAMILIES = dict(showui=(SHOWUI_PROMPT, "none", showui_point, False), tongui=(SHOWUI_PROMPT, None, tongui_point, False),
                vlaser=(VLASER_PROMPT, None, vlaser_point, True), mpgui=(BOX_PROMPT, None, box_centre, True))
# published ScreenSpot rows (docs/showui_tongui.md F, C.4; docs/mpgui.md 4.2), percent, in the table's cell order
PUBLISHED = {"showui": ("ShowUI-2B", (92.3, 75.5, 76.3, 61.1, 81.7, 63.6), 75.1),
             "tongui": ("TongUI-3B", (90.5, 76.0, 86.5, 68.5, 87.4, 68.4), 79.6),
             "mpgui": ("MP-GUI", (86.8, 65.9, 70.8, 56.4, 58.3, 46.6), 64.1)}
CELLS = [f"{s}/{t}" for s in SPLITS for t in TYPES]


# OpenGVLab/Vlaser evaluate_point_{pixmo,paco}.py: PATTERN, any [x, y] of the answer (the gold: scorers._POINT_RE);
# --max-num 6 tiles; --radius 25, on the 0-1000 grid (the script compares the raw numbers)
_ANY_POINT, _REF = re.compile(r"\[\s*(\d+\.?\d*)\s*,\s*(\d+\.?\d*)\s*\]"), re.compile(r"<ref>(.*?)</ref>")
VLASER_TILES, VLASER_RADIUS = 6, 25.0
# docs/mpgui.md 4.2: MP-GUI's published multi-task row; 4.1: the metric each task reports (scorer kind -> key)
MPGUI = {"WC": ("CIDEr", 151.0), "S2W": ("CIDEr", 118.4), "RE": ("Acc@IoU0.1", 83.0), "TP": ("F1", 88.2),
         "WS": ("SQuAD F1", 89.2), "QA": ("ROUGE-L", 88.6), "QAS": ("SQuAD F1", 90.5), "CQA": ("SQuAD F1", 84.3)}
PAPER_METRIC = {"cider": "cider_d", "box": "acc@0.1", "tap": "f1", "squad": "f1", "rouge": "rouge_l"}


def add_args(p):
    p.add_argument("--bench", choices=["screenspot", "vlaser_points", "mpgui", "aitw", "mind2web", "guiact"],
                   help="benchmark read from --data DIR in its upstream layout (mpgui: or a meta json; navigation "
                   "ones: navigation.py)")
    p.add_argument("--family", choices=FAMILIES, help="--bench: prompt and parse rules (default: by architecture: "
                   "qwen2_vl showui, qwen2_5_vl tongui, internvl vlaser, mpgui mpgui)")
    p.add_argument("--visualize", type=int, default=0, metavar="N", help="--bench: draw the first N samples and a "
                   "grid of each split's first misses into OUT/pictures/ (gold box, prediction, hit or miss)")


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# why a ScreenSpot record is malformed, or None
def check_record(r, seeclick):
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
    for key, allowed in (("data_type", TYPES), ("split", SPLITS))[:1 if seeclick else 2]:  # SeeClick: no split
        if r[key] not in allowed:
            return f"{key} {r[key]!r} not one of {', '.join(allowed)}"
    if not (seeclick or isinstance(s := r["img_size"], list) and len(s) == 2 and all(_num(v) and v > 0 for v in s)):
        return f"img_size {s!r} is not [w, h] > 0"


# ScreenSpot comes in three layouts (v2: OS-Copilot/ScreenSpot-v2, SeeClick's records renamed):
#   ShowUI   DIR/metadata/hf_test_full.json: a list of {img_url, task, bbox [x, y, w, h] px, img_size [w, h],
#            split mobile|desktop|web, data_type text|icon}, images under DIR/images/
#   SeeClick DIR/screenspot_{mobile,desktop,web}.json: lists of {img_filename, instruction, bbox [x, y, w, h] px,
#            data_type, data_source}, images under DIR/screenspot_imgs/ (its screenspot_test.py arguments)
#   v2       DIR/screenspot_{mobile,desktop,web}_v2.json, images under DIR/screenspotv2_image/
# v2 is read where any of its files is there. The names are the HF tree's of OS-Copilot/ScreenSpot-v2 (main 5efbb1f;
# screenspotv2_image.zip unzips to screenspotv2_image/); the record fields and text|icon types are SeeClick's as the
# OS-Atlas-derived screenspot_test scripts read them (the JSON itself was not opened)
# A sample: file, record, image, instruction, split, data_type and the gold box normalised to 0-1 xyxy
def read_screenspot(folder, limit=0):
    """ScreenSpot under folder, any layout -> (samples, skipped, layout); malformed records raise, all listed."""
    if os.path.isfile(meta := os.path.join(folder, "metadata", "hf_test_full.json")):
        layout, files, images = "showui", [(meta, None)], "images"
    else:
        v2 = any(os.path.isfile(os.path.join(folder, f"screenspot_{s}_v2.json")) for s in SPLITS)
        layout, images, tail = ("v2", "screenspotv2_image", "_v2") if v2 else ("seeclick", "screenspot_imgs", "")
        files = [(p, s) for s in SPLITS if os.path.isfile(p := os.path.join(folder, f"screenspot_{s}{tail}.json"))]
        if not files:
            raise FileNotFoundError(f"{folder}: neither metadata/hf_test_full.json (ShowUI) nor "
                                    "screenspot_{mobile,desktop,web}[_v2].json (SeeClick, v2)")
    samples, skipped, bad = [], [], []
    for path, split in files:
        recs = formats.read_json(path)  # bad UTF-8 or JSON: a ValueError naming the file
        if not isinstance(recs, list):
            raise ValueError(f"{path}: a {type(recs).__name__}, not a list of records")
        for k, r in enumerate(recs):
            if why := check_record(r, split is not None):
                bad.append(f"{path}: record {k}: {why}")
                continue
            img = os.path.join(folder, images, r["img_filename"] if split else r["img_url"])
            if why := image_problem(img):
                skipped.append(f"{path}: record {k}: {why}")
                continue
            # ShowUI normalises by img_size
            (w, h), (x, y, bw, bh) = formats.header_size(img) if split else r["img_size"], r["bbox"]
            samples.append(dict(file=path, record=k, image=img, instruction=r["instruction"] if split else r["task"],
                                split=split or r["split"], data_type=r["data_type"],
                                box=(x / w, y / h, (x + bw) / w, (y + bh) / h)))
    if bad:
        raise ValueError(f"{len(bad)} malformed ScreenSpot record(s):\n" + "\n".join(bad))
    return samples[:limit or None], skipped, layout


def image_problem(img):
    """None, or why the image cannot be used (its header only: pixels are decoded batch by batch)."""
    try:
        formats.header_size(img)
    except ValueError as e:  # a missing file too
        return str(e) if os.path.isfile(img) else f"missing image {img}"


# why a point record is malformed (InternVL's line checks, formats.parse_line, first), or None
def point_problem(r):
    if (why := formats.parse_line(r))[0] is None:
        return why[1]
    seg = r.get("segmentation", [])  # PACO: objects, each a list of flat [x1, y1, x2, y2, ...] polygons, px
    polygon = lambda p: isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_num, p))
    if not (isinstance(r.get("image"), str) and all(_num(r.get(k)) and r[k] >= 1 for k in ("width", "height"))):
        return "not one image, or width / height not >= 1"
    if not any(t["from"] == "human" and _REF.search(t["value"]) for t in r["conversations"]):
        return "no human turn with <ref>expression</ref>"
    if not (isinstance(seg, list) and all(isinstance(o, list) and all(map(polygon, o)) for o in seg)):
        return "segmentation is not a list of lists of polygons [x1, y1, x2, y2, x3, y3, ...]"


# Vlaser's evaluate_point_{pixmo,paco}.py read one --data-path jsonl of InternVL lines {image, width, height,
# conversations[, segmentation (PACO)]}, a sample per human turn with <ref>expr</ref>, the PixMo gold the [x, y]
# (0-1000) of the gpt turn with that <ref> (a sample without any is dropped there: a listed skip here); the images
# sit under a fixed cluster path there, under --data here. Unverified: the eval files themselves are not published,
# so that their gold [x, y] are on the prompt's 0-1000 grid is assumed (the radius compares them with the answers').
# Every folder/*.jsonl is one set -> (samples with set, size and polygons or gold, skipped, "vlaser")
def read_points(folder, limit=0):
    samples, skipped, bad = [], [], []
    for path in [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".jsonl")]:
        for k, r, why in formats.read_jsonl(path):
            if why := why or point_problem(r):
                bad.append(f"{path}: record {k}: {why}")
                continue
            refs = [(t["from"], m.group(1), t["value"]) for t in r["conversations"] if (m := _REF.search(t["value"]))]
            gold = {e: [tuple(map(int, p)) for p in scorers._POINT_RE.findall(v)] for f, e, v in refs if f == "gpt"}
            for expr, img in [(e, os.path.join(folder, r["image"])) for f, e, _ in refs if f == "human"]:
                if why := image_problem(img) or ("segmentation" not in r and not gold.get(expr) and "no gold points"):
                    skipped.append(f"{path}: record {k}: {expr!r}: {why}")
                    continue
                samples.append(dict(file=path, record=k, set=os.path.basename(path)[:-6], image=img, instruction=expr,
                                    size=(int(r["width"]), int(r["height"])), polygons=r.get("segmentation"),
                                    gold=gold.get(expr)))
    if bad:
        raise ValueError(f"{len(bad)} malformed point record(s):\n" + "\n".join(bad))
    return samples[:limit or None], skipped, "vlaser"


# evaluate_point_paco.py: pixel (int(x / 1000 * W), int(y / 1000 * H)) inside the polygons (its mask, drawn filled);
# evaluate_point_pixmo.py: within the radius of a gold point; both: an answer without a point counts one miss
def point_hits(text, s):
    """Vlaser's count for one answer: each [x, y] in it (0-1000) a prediction, hit or not (PACO mask, PixMo radius)."""
    pts, (w, h) = [(float(x), float(y)) for x, y in _ANY_POINT.findall(text)], s["size"]
    if s["polygons"] is None:
        inside = sum(any(math.dist(p, g) <= VLASER_RADIUS for g in s["gold"]) for p in pts)
    else:
        mask, px = Image.new("L", (w, h), 0), [(int(x / 1000 * w), int(y / 1000 * h)) for x, y in pts]
        for p in (p for o in s["polygons"] for p in o):
            ImageDraw.Draw(mask).polygon(list(zip(p[::2], p[1::2])), outline=1, fill=1)
        inside = sum(x < w and y < h and mask.getpixel((x, y)) for x, y in px)
    return dict(point=pts[0] if pts else None, points=pts, inside=inside, counted=max(len(pts), 1))


# per set and over 'all': precision = answer points inside / points counted (the scripts' acc), the counts, n
def point_scores(rows):
    sets = {k: [r for r in rows if k in ("all", r["set"])] for k in sorted({r["set"] for r in rows}) + ["all"]}
    return {k: dict(precision=sum(r["inside"] for r in v) / max(sum(r["counted"] for r in v), 1), n=len(v),
                    inside=sum(r["inside"] for r in v), counted=sum(r["counted"] for r in v)) for k, v in sets.items()}


# eval.py's dataset specs of a meta json, or of DIR's {TASK}.jsonl (any case; images under DIR; no other jsonl). A
# file of DIR that is not a task's is no silent skip but an error: a misnamed task would vanish from the table
def mpgui_specs(path):
    specs = formats.read_meta(path) if os.path.isfile(path) else [
        dict(name=f[:-6], root=path, annotation=os.path.join(path, f), max_dynamic_patch=None)
        for f in sorted(os.listdir(path)) if f.endswith(".jsonl")]
    names = [s["name"].upper() for s in specs]
    if not specs or (bad := [n for n in names if n not in MPGUI or names.count(n) > 1]):
        raise ValueError(f"{path}: {bad if specs else 'no task file'}: MP-GUI's tasks are {', '.join(MPGUI)}, once")
    return specs


# results.md: our row of the eight paper metrics (x100) beside MP-GUI's published row -> {task: ours or None};
# '-': a task not in --data, or one --task scores with a kind the paper does not report
def mpgui_table(summary, out):
    got = {n.upper(): r for n, r in summary["datasets"].items()}
    row = {t: 100 * got[t]["score"][PAPER_METRIC[got[t]["scorer"]]] if got.get(t, {}).get("scorer") in PAPER_METRIC
           else None for t in MPGUI}
    text = markdown("MP-GUI benchmark", ["model"] + [f"{t} {name}" for t, (name, _) in MPGUI.items()],
                    [["ours"] + ["-" if v is None else f"{v:.1f}" for v in row.values()],
                     ["MP-GUI (published)"] + [v for _, v in MPGUI.values()]],
                    ", ".join(f"{t} n={r['n']}" for t, r in got.items()) + ".")
    checkpoints.write_atomic(os.path.join(out, "results.md"), text)
    return row


# what eval.py checks before the model loads: the benchmark read, the skips printed (mpgui: its specs)
def plan(a):
    if not a.data:
        raise ValueError(f"--bench {a.bench}: give --data DIR, the benchmark's folder")
    if a.bench == "mpgui":
        return mpgui_specs(a.data)
    return usable(a, *(read_points if a.bench == "vlaser_points" else read_screenspot)(a.data, a.limit))


def usable(a, samples, skipped, *rest):
    """A benchmark as read, its skips printed; one without a usable sample is an error."""
    print("".join(f"skip {s}\n" for s in skipped), end="")
    if not samples:
        raise ValueError(f"{a.data}: no usable {a.bench} sample ({len(skipped)} skipped)")
    return samples, skipped, *rest


def family(a, cfg, name=None):
    name = name or a.family or {"qwen2_vl": "showui", "qwen2_5_vl": "tongui", "mpgui": "mpgui"}.get(cfg.arch, "vlaser")
    if FAMILIES[name][3] != cfg.is_internvl:  # a Qwen prompt for an InternVL model, or the other way round
        raise ValueError(f"--family {name}: its prompt does not fit a {cfg.arch} model")
    return name


def markdown(title, head, rows, note):
    return (f"# {title}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
            + "".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows) + f"\n{note}\n")


# results.md: the papers' layout, one row of split x type cells, the macro Avg and the micro average
def table(scores, fam):
    rows = [["ours"] + [f"{100 * scores[c]:.1f}" if c in scores else "-" for c in CELLS + ["avg", "micro"]]]
    if fam in PUBLISHED:
        rows.append([f"{PUBLISHED[fam][0]} (published)", *PUBLISHED[fam][1], PUBLISHED[fam][2], "-"])
    return markdown("ScreenSpot", ["model"] + [c.replace("/", " ") for c in CELLS] + ["Avg (macro)", "micro"], rows,
                    f"{scores['n']} samples. Avg is the papers' figure: the mean of the split x type success rates "
                    "(macro); micro is all hits over all samples. An unparsable answer is a miss.")


def point_table(scores):
    return markdown("Vlaser point sets", ["set", "n", "points inside / counted", "precision"],
                    [[k, v["n"], f"{v['inside']} / {v['counted']}", f"{100 * v['precision']:.1f}"]
                     for k, v in scores.items()],
                    "Precision as Vlaser's scripts print it: answer points inside the gold region (PACO mask, PixMo "
                    "radius) over all answer points, an answer without one counting one miss.")


def write_outputs(out, rows, summary, md=None):
    """OUT/predictions.jsonl (one line per row), summary.json and results.md (printed too), each atomically."""
    os.makedirs(out, exist_ok=True)
    checkpoints.write_atomic(os.path.join(out, "predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    checkpoints.write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    if md is not None:
        checkpoints.write_atomic(os.path.join(out, "results.md"), md)
        print(md)


def answer_each(m, tok, a, asks, where, answer_batch, length_batches, desc, skip=()):
    """({i: answer}, {i: why}) for asks [(question, image paths, max tiles)], asked longest first, those in skip not."""
    # an ask whose pixels do not decode (its header read) is a why, "where(i): error", printed as a skip
    answers, failed = {}, {}
    for batch in tqdm(length_batches(m, tok, a, asks), desc=desc):
        prompts = {}  # index -> prompt
        for i in (i for i in batch if i not in skip):
            try:
                prompts[i] = (asks[i][0], [formats.load_rgb(p) for p in asks[i][1]], asks[i][2])
            except ValueError as e:  # the header read but the pixels do not decode
                failed[i] = f"{where(i)}: {e}"
                print(f"skip {failed[i]}")
        answers.update(zip(prompts, answer_batch(m, tok, list(prompts.values()), a)[0] if prompts else []))
    return answers, failed


def answer_all(m, tok, a, samples, skipped, answer_batch, length_batches, ask):
    """[(sample, answer)] in file order; ask(sample) -> (question, image paths, max tiles). A sample whose pixels do
    not decode is appended to skipped (in file order); none answered is an error."""
    where = lambda i: f"{samples[i]['file']}: record {samples[i]['record']}"
    answers, failed = answer_each(m, tok, a, [ask(s) for s in samples], where, answer_batch, length_batches, a.bench)
    skipped += [failed[i] for i in sorted(failed)]
    if not answers:
        raise ValueError(f"{a.data}: every {a.bench} sample was skipped")
    return [(samples[i], answers[i]) for i in sorted(answers)]


# every sample answered and scored; predictions.jsonl, summary.json and results.md written, then any pictures;
# scored by scorers.screenspot_scores, or (vlaser_points) point_hits; an unparsable answer is a miss (ShowUI's
# rule; TongUI's vLLM script drops them: skip_unparsable beside)
def run(m, tok, a, bench, answer_batch, length_batches):
    samples, skipped, layout = bench[0], list(bench[1]), bench[2]  # a copy: answer_all appends to skipped
    points = a.bench == "vlaser_points"
    fam = family(a, m.cfg, "vlaser" if points else None)
    prompt, system, parse, _ = FAMILIES[fam]
    # Vlaser's question is ' You are InternVL...' and model.chat puts '<image>\n' before it
    prompt, tiles = (" " + prompt, VLASER_TILES) if points else (prompt, None)
    score = point_scores if points else scorers.screenspot_scores
    hits = point_hits if points else lambda t, s: dict(point=parse(t), hit=scorers.point_in_box(parse(t), s["box"]))
    a = SimpleNamespace(**{**vars(a), "system": system if a.system is None else a.system})  # --system wins
    rows = [dict(s, answer=t, **hits(t, s)) for s, t in answer_all(
        m, tok, a, samples, skipped, answer_batch, length_batches,
        lambda s: (prompt.format(s["instruction"]), [s["image"]], tiles))]
    for r in rows if fam == "mpgui" else []:  # the box it answered, for the pictures
        r["pred_box"] = scorers.parse_box(r["answer"])
    scores = score(rows)
    summary = dict(bench=a.bench, layout=layout, data=a.data, model=m.folder, arch=m.cfg.arch, family=fam,
                   prompt=prompt.replace("<image>", "<image: the screenshot>"),
                   parse=(point_hits if points else parse).__doc__,
                   system="the template's default" if a.system is None else a.system,
                   images=f"max {tiles or a.max_tiles} tiles + thumbnail" if m.cfg.is_internvl
                   else f"{a.min_pixels}..{a.max_pixels} pixels", padding="left",
                   decoding=f"greedy, max_new_tokens {a.max_new_tokens}, stop at <|im_end|>", n=len(rows),
                   unparsable=sum(r["point"] is None for r in rows), scores=scores,
                   skip_unparsable=score([r for r in rows if r["point"] is not None]),
                   skipped=len(skipped), skipped_samples=skipped)
    md = point_table(scores) if points else table(scores, fam)
    write_outputs(a.out, rows, summary, md)
    if a.visualize and not points:  # after the scores and their files: a picture that fails to draw costs no result
        visualize(rows, os.path.join(a.out, "pictures"), a.visualize)
    return summary


GOLD, HIT, MISS = (0, 170, 0), (0, 90, 255), (230, 0, 0)  # the gold box green; a prediction blue (hit) or red


# one row drawn, longer side <= size px: gold box, predicted dot and box in the hit or miss colour, caption
def picture(r, size=800):
    im = formats.load_rgb(r["image"])
    W, H = (round(v * min(1, size / max(im.size))) for v in im.size)
    colour, word = (HIT, "HIT") if r["hit"] else (MISS, "MISS")
    text = f"{word} [{r['split']}] {r['instruction']}" + (f" -> {r['answer']}" if "answer" in r else "")
    lines = textwrap.wrap(text, max(10, W // 8), max_lines=6)  # PIL's default font: 10 px, <= 8 px a character
    out = ImageOps.expand(im.resize((W, H)), (0, 0, 0, 4 + 12 * len(lines)), "white")
    d = ImageDraw.Draw(out)
    for b, c in ((r["box"], GOLD), (r.get("pred_box"), colour)):
        if b:  # drawn through its corners: a model's box may come reversed (x2 < x1), which PIL's rectangle refuses
            d.polygon([(b[i] * W, b[j] * H) for i, j in ((0, 1), (2, 1), (2, 3), (0, 3))], outline=c, width=2)
    if (p := r["point"]) is not None:
        d.ellipse([p[0] * W - 5, p[1] * H - 5, p[0] * W + 5, p[1] * H + 5], fill=colour, outline="white", width=2)
    d.multiline_text((3, H + 2), "\n".join(lines), fill=colour, spacing=2)  # 12-px lines
    return out


# Any benchmark's rows drawn -> folder: NNN_hit|miss.png (NNN: the row index) for the first n rows, misses_SPLIT.png
# grids. rows: dicts of image (path), instruction, split (a word: it names a file), box (gold, 0-1 xyxy), point (0-1
# or None), hit, optional pred_box (0-1 xyxy), answer. Drawn in folder.tmp, then renamed
def visualize(rows, folder, n, misses=9, cell=320):
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for i, r in enumerate(rows[:n]):
        picture(r).save(os.path.join(tmp, f"{i:03d}_{'hit' if r['hit'] else 'miss'}.png"))
    for split in dict.fromkeys(r["split"] for r in rows):
        if wrong := [r for r in rows if r["split"] == split and not r["hit"]][:misses]:
            thumbs = [picture(r, cell) for r in wrong]
            w, h = (max(t.size[i] for t in thumbs) + 4 for i in (0, 1))  # cells of w x h, three a row
            grid = Image.new("RGB", (w * min(3, len(thumbs)), h * -(-len(thumbs) // 3)), "white")
            for k, t in enumerate(thumbs):
                grid.paste(t, (w * (k % 3), h * (k // 3)))
            grid.save(os.path.join(tmp, f"misses_{split}.png"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
