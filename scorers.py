"""Scorers of the GUI benchmarks the seed systems report: pure functions, no I/O, no torch.

Owns the parsers of model answers (boxes, points, actions), each benchmark's metric, and score(kind, preds, golds),
which eval.py --data calls per dataset with the kind TASKS names (--task NAME=KIND overrides). Each kind scores the
predictions against each conversation's reference answer string:

    box     the answer's box vs the gold box: IoU >= t, centre inside     tap     F1 of the clickable label "0"
    squad   SQuAD exact match and token F1                                rouge   ROUGE-L F-measure
    cider   CIDEr-D                                                       match   equal after SQuAD normalisation
    point   the answer's point(s) inside the gold box (0-1000 grid, as parse_box reads it): ScreenSpot, Vlaser
    action  ShowUI's action dict on both sides: AITW-style type / click / step success

screenspot_scores and mind2web_scores take per-record metadata (split and data type; an element box per step):
benchmarks.py and navigation.py call them. Points (x, y) and boxes (x1, y1, x2, y2) are 0-1 unless a docstring says
0-1000 (InternVL/Vlaser grid). An unparsable prediction is wrong, never skipped (ShowUI; TongUI's vLLM ScreenSpot
script skips it). A gold answer a scorer cannot read is an error.
"""
import ast
import json
import math
import re
import string
from collections import Counter

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
# Vlaser's text2pts regexes, here over every <point> tag
_POINTS_RE = re.compile(r"<point>\s*\[\s*(\[.*?\])\s*\]</point>")
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


# ShowUI main/eval_screenspot.py reads the answer with ast.literal_eval; TongUI's
# scripts/evaluation/run_screenspot_2_vllm.py (predict_point) with json.loads, a 4-number box taken at its centre
def parse_point(text):
    """ScreenSpot answer -> normalised (x, y) or None: ShowUI's '[x, y]' (0-1; literal_eval / json), a 4-number box
    reduced to its centre (TongUI), or Vlaser's '<point>[[x, y]]</point>' (0-1000 ints / 1000, first point)."""
    pts = parse_points(text)
    return (pts[0][0] / 1000, pts[0][1] / 1000) if pts else _as_point(_literal(text))


# ShowUI main/eval_screenspot.py: pointinbbox (edges included)
def point_in_box(p, box):
    """Inclusive containment of point p in an xyxy box (same units); p None -> False."""
    return p is not None and box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


# ShowUI main/eval_screenspot.py: calculate_screenspot_metrics per split x type cell, 'Avg Success Rate' their mean
def screenspot_scores(records):
    """records: dicts with split, data_type, hit (a parse failure is a miss). -> {'mobile/text': rate, ... per
    present cell, 'avg': their mean (the reported 'Avg'), 'micro': all hits / all records, 'n'}."""
    cells = {}  # cell -> its records' hits
    for r in records:
        cells.setdefault(f"{r['split']}/{r['data_type']}", []).append(bool(r.get("hit")))
    out, hits = {k: sum(v) / len(v) for k, v in cells.items()}, [h for v in cells.values() for h in v]
    out.update(avg=sum(out.values()) / len(out) if out else 0.0, n=len(hits), micro=sum(hits) / max(len(hits), 1))
    return out


# after InternVL internvl_chat/eval/refcoco/evaluate_grounding.py (its PATTERN): the first box, 0-1000 grid
def parse_box(text):
    """First box of '<box>[[x1, y1, x2, y2]]</box>', '[[...]]' or '[x1, y1, x2, y2]' (0-1000) -> 0-1 xyxy or None."""
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


# InternVL's evaluate_grounding.py counts IoU >= 0.5 ('Precision @ 1'); other thresholds and the centre are ours
def refexp_scores(pairs, thresholds=(0.1, 0.3, 0.5, 0.7)):
    """pairs: (pred_box or None, gt_box), xyxy. -> {'acc@t': share with IoU >= t, 'center_acc': share whose
    predicted centre lies in the gt box, 'n'}; a None prediction misses."""
    pairs = list(pairs)
    n = max(len(pairs), 1)
    ious = [iou(p, g) if p is not None else -1.0 for p, g in pairs]
    out = {f"acc@{t}": sum(v >= t for v in ious) / n for t in thresholds}
    out.update(center_acc=sum(p is not None and point_in_box(_as_point(p), g) for p, g in pairs) / n, n=len(pairs))
    return out


# MP-GUI reports tappability F1; its repository has no scorer to follow, so this is the plain positive-class F1
def binary_f1(preds, golds, positive="0"):
    """Precision / recall / F1 of the positive class, plus accuracy, over stripped-string labels (MP-GUI: "0" =
    clickable). An unparsable prediction (None or not a label) is never the positive class, never correct."""
    p, g = [None if x is None else str(x).strip() for x in preds], [str(x).strip() for x in golds]
    tp = sum(a == positive == b for a, b in zip(p, g))
    n_pred, n_gold = sum(a == positive for a in p), sum(b == positive for b in g)
    prec, rec = (tp / n_pred if n_pred else 0.0), (tp / n_gold if n_gold else 0.0)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "acc": sum(a == b for a, b in zip(p, g)) / max(len(g), 1)}


NO_ANSWER = "<no answer>"  # ScreenQA's unanswerable marker: matches only itself (case-insensitive, stripped)


# the official SQuAD v1.1 evaluate script: normalize_answer
def normalize_answer(s):
    """The official SQuAD v1.1 normalisation: lower, drop punctuation, drop articles a/an/the, fix whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


# SQuAD v1.1 evaluate script: exact_match_score, f1_score, metric_max_over_ground_truths; the empty-side rule is
# the SQuAD v2.0 evaluate script's compute_f1 (v1.1 gives 0 there)
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


# rouge-score (google-research rouge/rouge_scorer.py): RougeScorer(["rougeL"]), default tokenize, no stemmer
def rouge_l(pred, ref):
    """ROUGE-L F-measure: LCS over rouge-score's default tokens (lowercase, non-alphanumerics -> spaces, split);
    0 when either side has no tokens."""
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


# pycocoevalcap cider/cider_scorer.py: CiderScorer.compute_cider (CIDEr-D)
def cider_d(candidates, references, n=4, sigma=6.0):
    """CIDEr-D exactly as pycocoevalcap's CiderScorer: candidates id -> str, references id -> non-empty [str],
    pre-tokenised like PTBTokenizer (split on whitespace). -> (corpus mean, {id: score})."""
    # tf-idf n-gram vectors (n = 1..4; idf = log(#ids) - log(max(1, df)), df over the reference sets), clipped cosine
    # sum(min(h, r) * r) / (|h| |r|) per n, Gaussian length penalty (sigma 6; 'length' is the bigram count, as
    # there), mean over n and references, x10
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


# ShowUI main/eval_aitw.py reads its answer with ast.literal_eval; TongUI answers 'Thought: ... Action: {json}'
def parse_action(text):
    """ShowUI's Python dict or TongUI's 'Thought: ...\\nAction: {json}' -> a dict with an 'action' key, or None."""
    s = text.rsplit("Action:", 1)[-1].strip()
    d = _literal(s)
    if d is None and "{" in s:
        d = _literal(s[s.find("{"):s.rfind("}") + 1])
    return d if isinstance(d, dict) and "action" in d else None


# 0.14 is _TAP_DISTANCE_THRESHOLD of Google's android_in_the_wild/action_matching.py (check_actions_match); its
# 1.4x box enlargement and drag-direction rule are not reproduced
def action_scores(pairs, click_radius=0.14):
    """pairs: (pred dict or None, gold dict: 'action', optional 'value', 'position' (x, y), 'box' (xyxy)). ->
    {'type_acc', 'click_acc' (gold CLICK/TAP steps), 'step_sr' (type, point if located, value if given), 'n'}."""
    # a predicted point (a 4-number position: its centre) matches inside the gold box if given, else within
    # click_radius (Euclidean, 0-1) of the gold point; a gold drag never matches. Types upper-cased, values
    # normalize_answer'ed
    n = n_click = type_ok = click_ok = step_ok = 0
    for pred, gold in pairs:
        pred, n, act = pred or {}, n + 1, str(gold["action"]).upper()
        t = str(pred.get("action")).upper() == act
        box, p, g = gold.get("box"), _as_point(pred.get("position")), _as_point(gold.get("position"))
        located = box is not None or gold.get("position") is not None
        pos = point_in_box(p, box) if box is not None else \
            located and p is not None and g is not None and math.dist(p, g) <= click_radius
        v = gold.get("value") is None or \
            normalize_answer(str(pred.get("value"))) == normalize_answer(str(gold["value"]))
        n_click += act in ("CLICK", "TAP")
        type_ok, click_ok = type_ok + t, click_ok + (act in ("CLICK", "TAP") and t and pos)
        step_ok += t and (pos or not located) and v
    return {"type_acc": type_ok / max(n, 1), "click_acc": click_ok / max(n_click, 1),
            "step_sr": step_ok / max(n, 1), "n": n}


# Mind2Web src/action_prediction/metric.py: calculate_f1, step success = element right and op F1 == 1; ShowUI
# main/eval_mind2web.py: element = point in the gold bbox, TYPE/SELECT value lower-cased, 'Operation F1' by op
def mind2web_scores(steps):
    """steps: dicts with pred_action, pred_value, pred_point (None if unparsed), gold_op, gold_value, gold_box. ->
    {'ele_acc', 'op_f1' (mean over steps), 'op_f1_macro' (over gold-op categories: ShowUI's), 'step_sr', 'n'}."""
    # op F1: calculate_f1 (F1 of whitespace-token sets) of 'OP value' strings, value lower-cased, TYPE/SELECT only
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


def _ptb_words(s):
    # close to pycocoevalcap's PTBTokenizer, which cider_d expects: lower case, punctuation dropped
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def _gold(parse, kind, g):
    # a gold answer the scorer cannot read would score every prediction as wrong: an error instead
    v = parse(g)
    if v is None:
        raise ValueError(f"{kind} scorer: cannot read the gold answer {g!r}")
    return v


def _point_scores(preds, golds):
    # accuracy: ShowUI's validate_screenspot (the answer's point inside the gold box). point_precision: Vlaser's
    # internvl_chat/eval/evaluate_point_paco.py (predicted points inside the gold region over all predicted points;
    # an answer without one counts one miss), the gold box as the region. A 0-1000 box is no 0-1 point answer, so
    # the majority baseline (a gold box as the answer) scores about 0 here.
    hits = inside = total = 0
    for p, g in zip(preds, golds):
        box, first = _gold(parse_box, "point", g), parse_point(p)
        hits += point_in_box(first, box)
        pts = [(x / 1000, y / 1000) for x, y in parse_points(p)]
        if not pts and first is not None:  # a ShowUI / TongUI answer: its one point
            pts = [first]
        inside += sum(point_in_box(q, box) for q in pts)
        total += max(len(pts), 1)
    return dict(accuracy=hits / len(golds), point_precision=inside / total)


KINDS = ("box", "tap", "squad", "rouge", "cider", "match", "point", "action")
# dataset name (meta key, lower case) -> kind: MP-GUI's benchmark names, then the synthetic world's tasks
TASKS = {"re": "box", "tp": "tap", "qa": "rouge", "qas": "squad", "cqa": "squad", "ws": "squad", "wc": "cider",
         "s2w": "cider", "refexp": "box", "text2bbox": "box", "icon_grounding": "box", "tappable": "tap",
         "relation": "match", "bbox2text": "match", "color_qa": "match"}


def score(kind, preds, golds):
    """Scores of predictions against gold answer strings (same order) with one of KINDS: metric name -> value
    (floats; 'n' where the scorer counts). An unknown kind or a gold answer it cannot read is a ValueError."""
    if kind == "box":
        return refexp_scores([(parse_box(p), parse_box(g)) for p, g in zip(preds, golds)])
    if kind == "tap":
        return binary_f1([p.strip() for p in preds], [g.strip() for g in golds], positive="0")
    if kind == "squad":
        return dict(em=sum(squad_em(p, [g]) for p, g in zip(preds, golds)) / len(golds),
                    f1=sum(squad_f1(p, [g]) for p, g in zip(preds, golds)) / len(golds))
    if kind == "rouge":
        return dict(rouge_l=sum(rouge_l(p, g) for p, g in zip(preds, golds)) / len(golds))
    if kind == "cider":
        return dict(cider_d=cider_d({i: _ptb_words(p) for i, p in enumerate(preds)},
                                    {i: [_ptb_words(g)] for i, g in enumerate(golds)})[0])
    if kind == "match":
        return dict(accuracy=sum(normalize_answer(p) == normalize_answer(g) for p, g in zip(preds, golds)) / len(golds))
    if kind == "point":
        return _point_scores(preds, golds)
    if kind == "action":
        return action_scores([(parse_action(p), _gold(parse_action, "action", g)) for p, g in zip(preds, golds)])
    raise ValueError(f"unknown scorer {kind!r}; one of {', '.join(KINDS)}")
