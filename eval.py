"""Evaluation: greedy generation from a checkpoint folder (or hub id), for one prompt or a whole benchmark, and the
scorers of the GUI benchmarks the seed systems report.

    python eval.py --model tests/fixtures/qwen2_vl_tiny --image examples/screen.png --prompt "Where is Save?"
    python eval.py --model merged/benchmark --data training_data/benchmark_eval.json --out eval/benchmark
"""
import argparse
import ast
import json
import math
import os
import re
import string
import time
from collections import Counter

import torch
from PIL import Image
from tqdm import tqdm

import data
import datasets
import model as M

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dataset name (meta key, lower case) -> scorer; --task NAME=SCORER overrides. MP-GUI's benchmark names, then the
# synthetic world's tasks.
TASKS = {"re": "box", "tp": "tap", "qa": "rouge", "qas": "squad", "cqa": "squad", "ws": "squad", "wc": "cider",
         "s2w": "cider", "refexp": "box", "text2bbox": "box", "icon_grounding": "box", "tappable": "tap",
         "relation": "match", "bbox2text": "match", "color_qa": "match"}


def encode(m, tok, question, images, a, max_tiles=None):
    """Prompt token ids (T,) and vision inputs for one question; images without an <image> placeholder go ahead of
    it. Qwen images at the --min/--max-pixels budget; InternVL / MP-GUI images as up to max_tiles tiles."""
    if m.cfg.arch in ("internvl", "mpgui"):
        tiles = [data.internvl_tiles(im, max_tiles or a.max_tiles, m.cfg.vit_image_size) for im in images]
        enc = data.encode_internvl(tok, [{"from": "human", "value": question}], m.cfg.template,
                                   [len(t) for t in tiles], m.cfg.num_image_token,
                                   "<EXTRA_IMG_CONTEXT>" if m.cfg.arch == "mpgui" else None, a.system)
        return enc["input_ids"], (dict(pixel_values=torch.cat(tiles)) if tiles else {})
    system = "You are a helpful assistant." if a.system is None else None if a.system.lower() == "none" else a.system
    question = question if "<image>" in question else "<image>" * len(images) + question
    enc = data.encode_qwen(tok, [{"role": "user", "content": question}], images, a.min_pixels, a.max_pixels, system)
    return enc["input_ids"], (dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
                              if images else {})


def answer_batch(m, tok, prompts, a):
    """Greedy answers for [(question, images, max_tiles)], batched with left padding, cut at the end-of-turn."""
    encs = [encode(m, tok, q, ims, a, tiles) for q, ims, tiles in prompts]
    T, device = max(len(ids) for ids, _ in encs), next(m.parameters()).device
    ids = torch.full((len(encs), T), m.cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(encs), T, dtype=torch.long)
    for i, (x, _) in enumerate(encs):
        ids[i, T - len(x):], mask[i, T - len(x):] = x, 1
    vision = {k: torch.cat([v[k] for _, v in encs if k in v]).to(device) for k in ("pixel_values", "image_grid_thw")
              if any(k in v for _, v in encs)}
    eos = tok.token_to_id("<|im_end|>")
    out = m.generate(ids.to(device), mask.to(device), max_new_tokens=a.max_new_tokens,
                     eos_token_ids=[eos] if eos is not None else None, **vision).tolist()
    return [tok.decode(o[:o.index(eos)] if eos in o else o, skip_special_tokens=True).strip() for o in out], T


def score(kind, preds, golds):
    if kind == "box":
        return refexp_scores([(parse_box(p), parse_box(g)) for p, g in zip(preds, golds)])
    if kind == "tap":
        return binary_f1([p.strip() for p in preds], [g.strip() for g in golds], positive="0")
    if kind == "squad":
        return dict(em=sum(squad_em(p, [g]) for p, g in zip(preds, golds)) / len(golds),
                    f1=sum(squad_f1(p, [g]) for p, g in zip(preds, golds)) / len(golds))
    if kind == "rouge":
        return dict(rouge_l=sum(rouge_l(p, g) for p, g in zip(preds, golds)) / len(golds))
    if kind == "cider":  # PTB-style: lower case, punctuation dropped
        tok = lambda s: " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())
        return dict(cider_d=cider_d({i: tok(p) for i, p in enumerate(preds)},
                                    {i: [tok(g)] for i, g in enumerate(golds)})[0])
    if kind == "match":
        return dict(accuracy=sum(normalize_answer(p) == normalize_answer(g) for p, g in zip(preds, golds)) / len(golds))
    raise ValueError(f"unknown scorer {kind!r}")


def evaluate(m, tok, a):
    """Every dataset of a meta json: predictions jsonl + summary json (scores beside the majority-answer baseline,
    i.e. the score of always giving the most common gold answer, and the settings that produced them)."""
    tasks = {**TASKS, **dict(t.split("=") for t in a.task)}
    os.makedirs(a.out, exist_ok=True)
    summary = dict(model=m.folder, arch=m.cfg.arch, template=m.cfg.template or "chatml", padding="left",
                   decoding=f"greedy, max_new_tokens {a.max_new_tokens}, stop at <|im_end|>", system=a.system,
                   images=f"max {a.max_tiles} tiles + thumbnail" if m.cfg.arch != "qwen2_vl" and m.cfg.arch !=
                   "qwen2_5_vl" else f"{a.min_pixels}..{a.max_pixels} pixels", datasets={})
    if m.cfg.arch == "mpgui":
        summary["mpgui_mode"] = m.cfg.mpgui_mode
    with open(os.path.join(a.out, "predictions.jsonl"), "w") as out:
        for spec in datasets.read_meta(a.data):
            kind = tasks.get(spec["name"].lower())
            if kind is None:
                raise ValueError(f"{a.data}: no scorer for dataset {spec['name']!r}; pass --task {spec['name']}=KIND")
            lines = [json.loads(l) for l in open(spec["annotation"]) if l.strip()][:a.limit or None]
            golds = [l["conversations"][1]["value"] for l in lines]
            paths = [[l["image"]] if isinstance(l.get("image"), str) else l.get("image", []) for l in lines]
            runs = {"prediction": paths}
            if a.shuffled_images:  # each question asked of the next distinct screen of its dataset (a rotation)
                screens = list(dict.fromkeys(p for ps in paths for p in ps))
                if len(screens) < 2:
                    raise ValueError(f"--shuffled-images: dataset {spec['name']!r} has {len(screens)} distinct "
                                     "image(s); the control needs two or more")
                nxt = dict(zip(screens, screens[1:] + screens[:1]))
                runs["prediction_shuffled_images"] = [[nxt[p] for p in ps] for ps in paths]
            preds = {k: [] for k in runs}
            for k, imgs in runs.items():
                for i in tqdm(range(0, len(lines), a.batch_size), desc=spec["name"] + k[10:]):
                    prompts = [(l["conversations"][0]["value"], [Image.open(os.path.join(spec["root"], p))
                                .convert("RGB") for p in ps], spec["max_dynamic_patch"])
                               for l, ps in zip(lines[i:i + a.batch_size], imgs[i:i + a.batch_size])]
                    preds[k] += answer_batch(m, tok, prompts, a)[0]
            for j, l in enumerate(lines):
                out.write(json.dumps(dict(dataset=spec["name"], id=l.get("id"), question=l["conversations"][0]
                                          ["value"], answer=golds[j], **{k: v[j] for k, v in preds.items()})) + "\n")
            majority = Counter(golds).most_common(1)[0][0]
            r = summary["datasets"][spec["name"]] = dict(scorer=kind, n=len(lines),
                                                         score=score(kind, preds["prediction"], golds))
            if a.shuffled_images:
                r["shuffled_images"] = score(kind, preds["prediction_shuffled_images"], golds)
            r["majority_baseline"] = score(kind, [majority] * len(golds), golds)
    json.dump(summary, open(os.path.join(a.out, "summary.json"), "w"), indent=1)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder or hub id (config.json + safetensors)")
    p.add_argument("--image", action="append", default=[], help="screenshot path; repeat for several")
    p.add_argument("--prompt", help="one question (with --image); or evaluate a benchmark with --data")
    p.add_argument("--data", help="meta json of jsonl benchmarks (InternVL format) to evaluate")
    p.add_argument("--out", default="eval_out", help="--data: folder for predictions.jsonl and summary.json")
    p.add_argument("--task", action="append", default=[], help="--data: NAME=SCORER (box tap squad rouge cider match)")
    p.add_argument("--limit", type=int, default=0, help="--data: first N lines of each dataset (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--system", default=None, help="system message (default: the family's); 'none' omits Qwen's")
    p.add_argument("--min-pixels", type=int, default=256 * 28 * 28, help="Qwen pixel budget (ShowUI/TongUI: 256)")
    p.add_argument("--max-pixels", type=int, default=1344 * 28 * 28, help="Qwen pixel budget (ShowUI/TongUI: 1344)")
    p.add_argument("--max-tiles", type=int, default=12, help="InternVL: max 448-px tiles per image (+ thumbnail)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shuffled-images", action="store_true", help="--data: also score every question asked of "
                   "another screen of its dataset, to show how much of a score comes from the image, not the text")
    p.add_argument("--mpgui-mode", choices=["textual", "graphical", "spatial", "fusion"],
                   help="MP-GUI: what fills the EXTRA tokens (default fusion, the released inference); a perceiver "
                        "scores a model after its own stage (1-3), before the fusion gate is trained")
    a = p.parse_args(argv)
    t0 = time.time()
    m = M.load_model(a.model, dtype=DTYPES[a.dtype], device=a.device)
    if a.mpgui_mode:
        if m.cfg.arch != "mpgui":
            p.error(f"--mpgui-mode: {a.model} is {m.cfg.arch}, not an MP-GUI checkpoint")
        m.cfg.mpgui_mode = a.mpgui_mode
    tok = data.load_tokenizer(m.folder)
    print(f"model {m.cfg.arch} from {m.folder} ({sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params, "
          f"{a.dtype}, {a.device})")
    if a.data:
        summary = evaluate(m, tok, a)
        for name, r in summary["datasets"].items():
            fmt = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items() if isinstance(v, float))
            shuffled = f"shuffled images: {fmt(r['shuffled_images'])}; " if "shuffled_images" in r else ""
            print(f"{name:<16} n={r['n']:<5} {fmt(r['score'])}   ({shuffled}majority answer: "
                  f"{fmt(r['majority_baseline'])})")
        return summary
    if not a.prompt:
        p.error("give --prompt (with --image) or --data")
    images = [Image.open(path) for path in a.image]
    (text,), n_prompt = answer_batch(m, tok, [(a.prompt, images, None)], a)
    print(f"prompt {n_prompt} tokens, {len(images)} image(s); {time.time() - t0:.1f}s")
    print(f"answer: {text}")
    return text


# scorers
# Pure scoring functions, no I/O. Points (x, y) and boxes (x1, y1, x2, y2) are normalised to 0-1 unless a docstring
# says 0-1000 (InternVL/Vlaser grid). An unparsable prediction is wrong, never skipped (ShowUI; TongUI's vLLM
# ScreenSpot script skips them instead).

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_POINTS_RE = re.compile(r"<point>\s*\[\s*(\[.*?\])\s*\]</point>")  # Vlaser's official regexes
_POINT_RE = re.compile(r"\[\s*(\d+)\s*,\s*(\d+)\s*\]")


def _literal(text):
    """A Python (ast.literal_eval) or JSON literal, or None."""
    for load in (ast.literal_eval, json.loads):
        try:
            return load(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass


def _as_point(v):
    """[x, y] -> (x, y); a 4-number box -> its centre (TongUI); anything else -> None."""
    if not isinstance(v, (list, tuple)) or len(v) not in (2, 4) or \
            not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in v):
        return None
    return (float(v[0]), float(v[1])) if len(v) == 2 else ((v[0] + v[2]) / 2, (v[1] + v[3]) / 2)


def parse_points(text):
    """Vlaser: every [x, y] of the '<point>[[x1, y1], [x2, y2]]</point>' tags, in order, as 0-1000 int pairs."""
    return [(int(x), int(y)) for m in _POINTS_RE.finditer(text) for x, y in _POINT_RE.findall(m.group(1))]


def parse_ref_box(text):
    """'<ref>phrase</ref><box>[[x1, y1, x2, y2], ...]</box>' -> [(phrase, (x1, y1, x2, y2)), ...], one entry per
    box, coordinates as written (the 0-1000 grid)."""
    return [(ref.strip(), tuple(float(c) if "." in c else int(c) for c in b))
            for ref, inner in re.findall(r"<ref>(.*?)</ref>\s*<box>(.*?)</box>", text, re.S)
            for b in _BOX_RE.findall(inner)]


def parse_point(text):
    """ScreenSpot answer -> normalised (x, y) or None: ShowUI's '[x, y]' (0-1; literal_eval / json), a 4-number box
    reduced to its centre (TongUI), or Vlaser's '<point>[[x, y]]</point>' (0-1000 ints / 1000, first point)."""
    pts = parse_points(text)
    return (pts[0][0] / 1000, pts[0][1] / 1000) if pts else _as_point(_literal(text))


def point_in_box(p, box):
    """Inclusive containment of point p in an xyxy box (same units); p None -> False."""
    return p is not None and box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def screenspot_scores(records):
    """records: dicts with split (mobile/desktop/web), data_type (text/icon), hit (bool; a parse failure is a
    miss). -> {'mobile/text': rate, ... for each present cell, 'avg': mean of the present cells (the reported
    'Avg', a macro average over split x type), 'micro': all hits / all records, 'n'}."""
    cells = {}
    for r in records:
        c = cells.setdefault(f"{r['split']}/{r['data_type']}", [0, 0])
        c[0], c[1] = c[0] + bool(r.get("hit")), c[1] + 1
    out = {k: h / n for k, (h, n) in cells.items()}
    n = sum(c[1] for c in cells.values())
    out.update(avg=sum(out.values()) / len(out) if out else 0.0, n=n,
               micro=sum(c[0] for c in cells.values()) / n if n else 0.0)
    return out


def parse_box(text):
    """First box of '<box>[[x1, y1, x2, y2]]</box>', '[[...]]' or '[x1, y1, x2, y2]' on InternVL's 0-1000 grid ->
    normalised 0-1 xyxy tuple, or None."""
    m = re.search(r"<box>(.*?)</box>", text, re.S)
    b = _BOX_RE.search(m.group(1) if m else text)
    return tuple(float(c) / 1000 for c in b.groups()) if b else None


def iou(a, b):
    """Intersection over union of xyxy boxes; a degenerate box has area 0; a zero union gives 0."""
    def area(x):
        return max(0.0, x[2] - x[0]) * max(0.0, x[3] - x[1])
    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def refexp_scores(pairs, thresholds=(0.1, 0.3, 0.5, 0.7)):
    """pairs: (pred_box or None, gt_box), xyxy, same units. -> {'acc@t': share with IoU >= t (InternVL's test),
    'center_acc': share whose predicted box centre lies in the gt box, 'n'}; a None prediction misses."""
    pairs = list(pairs)
    n = max(len(pairs), 1)
    ious = [iou(p, g) if p is not None else -1.0 for p, g in pairs]
    out = {f"acc@{t}": sum(v >= t for v in ious) / n for t in thresholds}
    out.update(center_acc=sum(p is not None and point_in_box(_as_point(p), g) for p, g in pairs) / n, n=len(pairs))
    return out


def binary_f1(preds, golds, positive="0"):
    """Precision / recall / F1 of the positive class, plus accuracy; labels compare as stripped strings. MP-GUI's
    tappability data labels "0" = clickable, hence positive="0" (clickable). An unparsable prediction (None or not
    a label) is wrong: never the positive class, never correct."""
    p, g = [None if x is None else str(x).strip() for x in preds], [str(x).strip() for x in golds]
    tp = sum(a == positive == b for a, b in zip(p, g))
    n_pred, n_gold = sum(a == positive for a in p), sum(b == positive for b in g)
    prec, rec = (tp / n_pred if n_pred else 0.0), (tp / n_gold if n_gold else 0.0)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "acc": sum(a == b for a, b in zip(p, g)) / max(len(g), 1)}


NO_ANSWER = "<no answer>"  # ScreenQA's unanswerable marker: matches only itself (case-insensitive, stripped)


def normalize_answer(s):
    """The official SQuAD v1.1 normalisation: lower, drop punctuation, drop articles a/an/the, fix whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _qa(f1, pred, golds):
    def one(gold):
        a, b = pred.strip().lower(), gold.strip().lower()
        if NO_ANSWER in (a, b):
            return float(a == b)
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        if not f1 or not p or not g:  # EM: equal normalised strings; F1 with an empty side: 1 iff both are empty
            return float(p == g)
        return 2 * sum((Counter(p) & Counter(g)).values()) / (len(p) + len(g))
    return max(map(one, [golds] if isinstance(golds, str) else golds), default=0.0)


def squad_em(pred, golds):
    """SQuAD exact match after normalize_answer; golds: one string or several (max)."""
    return _qa(False, pred, golds)


def squad_f1(pred, golds):
    """SQuAD token F1 (max over golds); if either side normalises to no tokens: 1 if both are empty, else 0."""
    return _qa(True, pred, golds)


def rouge_l(pred, ref):
    """ROUGE-L F-measure: LCS over rouge-score's default tokens (lowercase, non-alphanumerics -> spaces, split; no
    stemming); 0 when either side has no tokens. A corpus score is the mean over (pred, ref) pairs."""
    p, r = (re.sub(r"[^a-z0-9]+", " ", s.lower()).split() for s in (pred, ref))
    if not p or not r:
        return 0.0
    row = [0] * (len(r) + 1)
    for a in p:
        diag = 0
        for j, b in enumerate(r, 1):
            diag, row[j] = row[j], diag + 1 if a == b else max(row[j], row[j - 1])
    prec, rec = row[-1] / len(p), row[-1] / len(r)
    return 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0


def _ngrams(s, n):
    w = s.split()
    return Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))


def cider_d(candidates, references, n=4, sigma=6.0):
    """CIDEr-D exactly as pycocoevalcap's CiderScorer: tf-idf n-gram vectors (n = 1..4; idf = log(#ids) -
    log(max(1, df)), df counted over the reference sets), clipped cosine sum(min(h, r) * r) / (|h| |r|) per n,
    Gaussian length penalty (sigma 6; its 'length' is the bigram count, as there), mean over n and references, x10.
    candidates: id -> str; references: id -> non-empty list of str. Text is pre-tokenised and split on whitespace:
    callers should tokenise like PTBTokenizer (lowercase, punctuation removed). -> (corpus mean, {id: score})."""
    refs = {i: [_ngrams(r, n) for r in rs] for i, rs in references.items()}
    df = Counter(g for rs in refs.values() for g in set().union(*rs))
    log_n = math.log(len(refs))

    def vec(counts):
        v, norm = [{} for _ in range(n)], [0.0] * n
        for g, tf in counts.items():
            v[len(g) - 1][g] = w = tf * (log_n - math.log(max(1.0, df[g])))
            norm[len(g) - 1] += w * w
        return v, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = {}
    for i, rs in refs.items():
        vh, nh, lh = vec(_ngrams(candidates[i], n))
        total = 0.0
        for vr, nr, lr in map(vec, rs):
            penalty = math.exp(-(lh - lr) ** 2 / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                total += (val / (nh[k] * nr[k]) if nh[k] and nr[k] else val) * penalty
        scores[i] = total / n / len(rs) * 10.0
    return (sum(scores.values()) / len(scores) if scores else 0.0), scores


def parse_action(text):
    """A navigation answer -> dict with an 'action' key, or None: ShowUI's Python dict "{'action': 'CLICK', 'value':
    None, 'position': [0.49, 0.42]}" (ast.literal_eval) or TongUI's 'Thought: ...\\nAction: {json}'."""
    s = text.rsplit("Action:", 1)[-1].strip()
    d = _literal(s)
    if d is None and "{" in s:
        d = _literal(s[s.find("{"):s.rfind("}") + 1])
    return d if isinstance(d, dict) and "action" in d else None


def action_scores(pairs, click_radius=0.14):
    """pairs: (pred dict or None, gold dict with 'action' and optional 'value', 'position' (x, y), 'box' (xyxy)).
    A predicted point (a 4-number position reduces to its centre) matches if it lies in the gold box when one is
    given, else within click_radius (Euclidean, normalised: AITW's 14 % of the screen) of the gold point. Types
    compare upper-cased, values after normalize_answer. -> {'type_acc', 'click_acc' (gold CLICK/TAP steps with the
    right type and point), 'step_sr' (right type, point if the gold is located, value if the gold has one), 'n'}."""
    n = n_click = type_ok = click_ok = step_ok = 0
    for pred, gold in pairs:
        pred, n, act = pred or {}, n + 1, str(gold["action"]).upper()
        t = str(pred.get("action")).upper() == act
        box, p = gold.get("box"), _as_point(pred.get("position"))
        located = box is not None or gold.get("position") is not None
        pos = point_in_box(p, box) if box is not None else \
            located and p is not None and math.dist(p, _as_point(gold["position"])) <= click_radius
        v = gold.get("value") is None or \
            normalize_answer(str(pred.get("value"))) == normalize_answer(str(gold["value"]))
        n_click += act in ("CLICK", "TAP")
        type_ok, click_ok = type_ok + t, click_ok + (act in ("CLICK", "TAP") and t and pos)
        step_ok += t and (pos or not located) and v
    return {"type_acc": type_ok / max(n, 1), "click_acc": click_ok / max(n_click, 1),
            "step_sr": step_ok / max(n, 1), "n": n}


def mind2web_scores(steps):
    """steps: dicts with pred_action, pred_value, pred_point (None if unparsed), gold_op, gold_value, gold_box.
    Op F1 is Mind2Web's calculate_f1 (F1 of the sets of whitespace tokens) between 'OP value' strings, the value
    lower-cased and only for TYPE/SELECT (SeeClick/ShowUI). -> {'ele_acc' (predicted point inside the gold box),
    'op_f1' (mean over steps), 'op_f1_macro' (mean over gold-op categories: ShowUI's 'Operation F1'), 'step_sr'
    (element right and op F1 == 1), 'n'}."""
    def op(a, v):
        a = str(a).upper()
        return f"{a} {str(v).lower()}" if a in ("TYPE", "SELECT") and v is not None else a

    def set_f1(p, g):
        p, g = set(p.split()), set(g.split())
        return float(p == g) if not p or not g else 2 * len(p & g) / (len(p) + len(g))
    ele, ok, f1s, cats = 0, 0, [], {}
    for s in steps:
        e = point_in_box(s.get("pred_point"), s["gold_box"])
        f = 0.0 if s.get("pred_action") is None else \
            set_f1(op(s["pred_action"], s.get("pred_value")), op(s["gold_op"], s.get("gold_value")))
        ele, ok = ele + e, ok + (e and f == 1.0)
        f1s.append(f)
        cats.setdefault(str(s["gold_op"]).upper(), []).append(f)
    n = max(len(f1s), 1)
    return {"ele_acc": ele / n, "op_f1": sum(f1s) / n, "step_sr": ok / n, "n": len(f1s),
            "op_f1_macro": sum(sum(v) / len(v) for v in cats.values()) / max(len(cats), 1)}


if __name__ == "__main__":
    main()
