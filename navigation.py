"""Navigation benchmarks for eval.py --bench aitw|mind2web|guiact --data DIR. Scoring: AITW as main/eval_aitw.py
(Google's action matching; step SR per category, Overall their mean); Mind2Web as main/eval_mind2web.py through
scorers.mind2web_scores; GUIAct (no upstream scorer) through scorers.action_scores, element box if given, else
0.14, a step of several actions right when each is. An unparsable answer is a miss."""
# ShowUI's metadata layout (fields as showlab/ShowUI prepare/hf_aitw.py, hf_mind2web.py, hf_guiact.ipynb write them;
# each reader names what it reads): AITW DIR/metadata/hf_test.json (split: the domain field), Mind2Web
# hf_test_{task,website,domain}.json, GUIAct hf_test_{web-single,web-multi,smartphone}.json (checked as
# formats.ShowUINavigation checks training), DIR/images/. Each step is asked as ShowUI trains on it (formats.nav_turn;
# no system turn on Qwen). Assumed, not verifiable: the released files' values beyond the prepare scripts; InternVL /
# MP-GUI models are asked ShowUI's words (MP-GUI ships no navigation prompt).
import math
import os
import re
from types import SimpleNamespace

import benchmarks
import formats
import scorers

BENCHES = ("aitw", "mind2web", "guiact")
FILES = {"aitw": [("hf_test", None)],
         "mind2web": [(f"hf_test_{s}", f"cross-{s}") for s in ("task", "website", "domain")],
         "guiact": [(f"hf_test_{s}", s) for s in ("web-single", "web-multi", "smartphone")]}
DOMAINS = {d.lower(): d for d in ("General", "Install", "GoogleApps", "Single", "WebShopping")}
METRICS = {"aitw": ("type_acc", "click_acc", "scroll_acc", "text_acc", "step_sr"),
           "mind2web": ("ele_acc", "op_f1", "op_f1_macro", "step_sr"),
           "guiact": ("type_acc", "click_acc", "action_sr", "step_sr")}


def _system(where, space, none=""):
    """ShowUI's navigation system text: the role, the numbered action space [(action, words)], the answer format."""
    return (f"You are an assistant trained to navigate the {where}. \nGiven a task instruction, a screen observation, "
            "and an action history sequence, \noutput the next action and wait for the next observation. \nHere is "
            "the action space:\n" + "".join(f"{i}. `{a}`: {d}\n" for i, (a, d) in enumerate(space, 1)) + "\nFormat "
            "the action as a dictionary with the following keys:\n{'action': 'ACTION_TYPE', 'value': 'element', "
            f"'position': [x,y]}}\n\n{none}Position represents the relative coordinates on the screenshot and should "
            "be scaled to a range of 0-1.\n")


# showlab/ShowUI data/template/aitw.py: _AITW_SYSTEM + _AITW_SYSTEM_json, as aitw_to_qwen joins them (spaces verbatim)
AITW_SYSTEM = _system("mobile phone", [
    ("CLICK", "Click on an element, value is not applicable and the position [x,y] is required. "),
    ("TYPE", "Type a string into an element, value is a string to type and the position is not applicable."),
    ("SELECT", "Select a value for an element, value is the value to select and the position is not applicable."),
    *[(f"SCROLL {d.upper()}", f"Scroll {d} for the screen.") for d in ("up", "down", "left", "right")],
    *[(a, d + ", value and position are not applicable.") for a, d in {
        "PRESS BACK": "Press for returning to the previous step",
        "PRESS HOME": "Press for returning to the home screen", "PRESS ENTER": "Press for submitting the input content",
        "STATUS TASK COMPLETE": "Indicate the task is completed",
        "STATUS TASK IMPOSSIBLE ": "Indicate the task is impossible to complete"}.items()]],
    "If value or position is not applicable, set it as `None`.\n")
# data/template/mind2web.py: _MIND2WEB_SYSTEM (mind2web_to_qwen adds no format text)
MIND2WEB_SYSTEM = _system("web", [
    ("CLICK", "Click on an element, value is the element to click and the position [x,y] is required."),
    ("TYPE", "Type a string into an element, value is the string to type and the position [x,y] is required."),
    ("SELECT", "Select a value for an element, value is the value to select and the position [x,y] is required.")])
# published, percent (docs/mpgui.md 4.2; docs/showui_tongui.md B.7, C), in the paper table's column order
M2W = [(f"{s} {m}", s, k) for s in ("cross-task", "cross-website", "cross-domain")
       for m, k in (("Ele.Acc", "ele_acc"), ("Op.F1", "op_f1_macro"), ("Step SR", "step_sr"))]
PAPER = {"aitw": ([(n, d, "step_sr") for d, n in DOMAINS.items()] + [("Overall", "overall", "step_sr_macro")],
                  [("MP-GUI", (63.7, 74.3, 65.3, 75.4, 67.2, 69.2)), ("ShowUI, in MP-GUI's", (None,) * 5 + (68.3,))]),
         "mind2web": (M2W, [("ShowUI-2B", (39.9, 88.6, 37.2, 41.6, 83.5, 35.1, 39.4, 86.8, 35.2)),
                            ("TongUI-3B", (48.0, 88.4, 44.2, 48.9, 85.4, 42.6, 50.0, 87.7, 46.0)),
                            ("MP-GUI", (42.1, 89.0, 38.1, 39.4, 87.1, 32.9, 37.6, 87.4, 33.7))])}


def add_args(p):
    p.add_argument("--num-history", type=int, default=4, help="navigation benches: past actions shown (ShowUI: 4)")
    p.add_argument("--history", choices=["tttt", "vtvt"], default="tttt",
                   help="navigation benches: past actions as text (tttt) or each after its screenshot (vtvt)")


def _xy(v):
    return scorers._as_point(v) if isinstance(v, (list, tuple)) and len(v) == 2 else None


# showlab/ShowUI main/utils_aitw.py: action2json / pred2json_post, kept (x, y) (upstream swaps both sides to (y, x))
SCROLLS = {"SCROLL DOWN": ((0.5, 0.8), (0.5, 0.2)), "SCROLL UP": ((0.5, 0.2), (0.5, 0.8)),
           "SCROLL LEFT": ((0.2, 0.5), (0.8, 0.5)), "SCROLL RIGHT": ((0.8, 0.5), (0.2, 0.5))}
AITW_IDS = {"CLICK": 4, "TYPE": 3, "SELECT": 2, "PRESS BACK": 5, "PRESS HOME": 6, "PRESS ENTER": 7,
            "STATUS TASK COMPLETE": 10, "STATUS TASK IMPOSSIBLE": 11, **dict.fromkeys(SCROLLS, 4)}


def aitw_action(name, touch=None, lift=None, text=""):
    """(type id, touch, lift, typed text): scrolls as fixed drags, a click as given, other actions off-screen."""
    touch, lift = SCROLLS.get(name, ((touch, lift) if name == "CLICK" else ((-1, -1), (-1, -1))))
    return AITW_IDS[name], touch, lift, (text.lower() if isinstance(text, str) else None) if name == "TYPE" else ""


# main/utils_aitw.py check_actions_match (Google's android_in_the_wild action_matching.py)
# Taps: within 0.14, or both in one annotation box grown as _resize_annotation_bounding_boxes grows it (lopsided, as
# there). Swipes: same main axis (a tie is y).
def aitw_match(p, g, annot):
    """Google's action match: either side not dual-point, the same type; else the tap or swipe rule."""
    tap = [math.dist(a[1], a[2]) <= 0.04 for a in (p, g)]
    if p[0] != 4 or g[0] != 4 or tap[0] != tap[1]:
        return p[0] == g[0] != 4
    boxes = [(max(0, x - 0.7 * w), max(0, y - 0.7 * h), min(1, 2.4 * w), min(1, 2.4 * h))
             for y, x, h, w in zip(*[iter(annot)] * 4)]
    if tap[0]:
        in_box = [all(scorers.point_in_box(q, (x, y, x + w, y + h)) for q in (p[1], g[1])) for x, y, w, h in boxes]
        return math.dist(p[1], g[1]) <= 0.14 or any(in_box)
    return len({abs(a[2][0] - a[1][0]) > abs(a[2][1] - a[1][1]) for a in (p, g)}) == 1


def aitw_answer(s):
    """data/dset_aitw.py get_answer: the step as ShowUI's answer dict (a click at the touch/lift midpoint)."""
    name = s["action_type_text"].upper()
    if AITW_IDS.get(name) != s["action_type_id"] or not (name != "CLICK" or _xy(s["touch"]) and _xy(s["lift"])):
        raise ValueError(f"action_type_id {s['action_type_id']!r} / text {s['action_type_text']!r} / touch "
                         f"{s['touch']!r} / lift {s['lift']!r}: no AITW action")
    pos = [round((a + b) / 2, 2) for a, b in zip(s["touch"], s["lift"])] if name == "CLICK" else None
    return {"action": name, "value": str(s["type_text"]) if name == "TYPE" else None, "position": pos}


def _aitw(rec, hist, split, o):
    """A step of hf_test.json -> the reader's sample fields."""
    # reads domain, task, img_url, action_type_id/_text, touch, lift ([x, y]), type_text, annot_position
    # ([y, x, h, w] * n), step_history (SeeClick steps: img_filename for vtvt)
    annot = rec["annot_position"]
    if rec["domain"] not in DOMAINS or len(annot) % 4 or not all(map(benchmarks._num, annot)):
        raise ValueError(f"domain {rec['domain']!r} not one of {', '.join(DOMAINS)}, or annot_position not 4n numbers")
    gold, acts = aitw_answer(rec), [str(aitw_answer(h)) for h in hist]
    return dict(split=rec["domain"], head=AITW_SYSTEM + f"Task: {rec['task']}", acts=acts,
                urls=[h["img_filename"] + ".png" for h in hist if o.vtvt] + [rec["img_url"] + ".png"], gold=str(gold),
                box=None, target=[aitw_action(gold["action"], rec["touch"], rec["lift"], gold["value"]), annot])


# data/dset_mind2web.py get_answer; main/eval_mind2web.py get_bbox (the gold box, 3 decimals)
def m2w_answer(step, rep, size):
    """-> (ShowUI's answer: op, the element text of step_repr (TYPE: the typed value), the box centre; the box)."""
    op, b, (w, h) = step["operation"]["op"], step["bbox"], size
    if op not in ("CLICK", "TYPE", "SELECT") or not all(benchmarks._num(v) and v > 0 for v in (w, h)):
        raise ValueError(f"operation {op!r} is not CLICK, TYPE or SELECT, or img_size {size!r} not > 0")
    x, y, bw, bh = (b[k] / d for k, d in (("x", w), ("y", h), ("width", w), ("height", h)))
    m = re.search(r"\]\s+(.*?)\s+->", rep)
    value = step["operation"]["value"] if op == "TYPE" else m and m.group(1)
    return {"action": op, "value": value, "position": [round(x + bw / 2, 2), round(y + bh / 2, 2)]}, \
        [round(v, 3) for v in (x, y, x + bw, y + bh)]


def _mind2web(rec, hist, split, o):
    """A Mind2Web step -> the reader's sample fields."""
    # reads task, img_url, img_size, step {operation, bbox px}, step_repr, step_history: samples as dset_mind2web.py
    # reads them, or raw steps as prepare/hf_mind2web.py writes them (then repr_history and the record's img_size)
    (gold, box), reprs = m2w_answer(rec["step"], rec["step_repr"], rec["img_size"]), rec.get("repr_history", [])
    reprs = reprs[len(reprs) - len(hist):]  # a raw history step's step_repr
    acts = [str((m2w_answer(h["step"], h["step_repr"], h["img_size"]) if "step" in h else
                 m2w_answer(h, reprs[k], rec["img_size"]))[0]) for k, h in enumerate(hist)]
    return dict(split=split, head=MIND2WEB_SYSTEM + f"Task: {rec['task']}", acts=acts, gold=str(gold), box=box,
                urls=[h["img_url"] for h in hist if o.vtvt] + [rec["img_url"]], target=[gold, box])


def _guiact(rec, hist, split, o):
    why = formats.ShowUINavigation.check(o, rec, (o.images, split))
    if why and not why.startswith("missing image"):  # a missing image is a skip, counted by read
        raise ValueError(why)
    box = rec.get("bbox") if isinstance(rec["step"], dict) and formats._unit(rec.get("bbox"), 4) else None
    golds = scorers._literal(formats.nav_answer(rec["step"]))  # the training answer; several actions: a tuple
    return dict(split=split, head=formats.nav_system(split) + f"Task: {rec['task']}\n", box=box,
                acts=[formats.nav_answer(h.get("step", h)) for h in hist], gold=formats.nav_answer(rec["step"]),
                urls=[h["img_url"] + ".png" for h in hist if o.vtvt] + [rec["img_url"] + ".png"],
                target=[dict(g, position=_xy(g["position"]), box=box) for g in
                        ([golds] if isinstance(golds, dict) else golds)])


def read(bench, folder, num_history=4, history="tttt", limit=0):
    """The benchmark under folder -> (samples, skipped); malformed records raise (all listed), a missing image skips."""
    # a sample: file, record, split, instruction, image (the screenshot), images (all, in prompt order), question,
    # gold (ShowUI's answer), box, target (what score reads)
    files = [(p, s) for f, s in FILES[bench] if os.path.isfile(p := os.path.join(folder, "metadata", f + ".json"))]
    if not files:
        raise FileNotFoundError(f"{folder}: none of metadata/{{{','.join(f for f, _ in FILES[bench])}}}.json")
    o = SimpleNamespace(num_history=num_history, history=history, vtvt=history == "vtvt",
                        images=os.path.join(folder, "images"))
    samples, skipped, bad = [], [], []
    for path, split in files:
        for k, rec, _ in formats.read_records(path):
            try:
                if not (isinstance(rec["task"], str) and isinstance(rec["step_history"], list)):
                    raise ValueError("task is no string or step_history no list")
                s = globals()["_" + bench](rec, rec["step_history"][-num_history:] if num_history else [], split, o)
            except (ValueError, LookupError, TypeError, AttributeError) as e:  # the shape errors name the field
                bad.append(f"{path}: record {k}: " + (str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"))
                continue
            paths = [os.path.join(o.images, u) for u in s.pop("urls")]
            if missing := [p for p in paths if not os.path.isfile(p)]:  # an unreadable one: a skip when run decodes it
                skipped.append(f"{path}: record {k}: missing image {missing[0]}")
                continue
            question = "".join(t for t, _ in formats.nav_turn(s.pop("head"), s["acts"], history))
            samples.append(dict(s, file=path, record=k, instruction=rec["task"], image=paths[-1], images=paths,
                                question=question.replace(formats.IMAGE, "<image>")))
    if bad:
        raise ValueError(f"{len(bad)} malformed {bench} record(s):\n" + "\n".join(bad))
    return samples[:limit or None], skipped


def score(bench, s, text):
    """One answer -> its predictions row: answer, parsed ([dict] or None: scorers.parse_action, or several dicts
    joined by ','), point, hit and scored (what aggregate reads)."""
    acts = [d] if (d := scorers.parse_action(text)) else scorers._literal(text)
    acts = list(acts) if isinstance(acts, (list, tuple)) and acts and all(isinstance(d, dict) and "action" in d
                                                                          for d in acts) else None
    one, point = acts[0] if acts and len(acts) == 1 else None, _xy(acts[0].get("position")) if acts else None
    if bench == "aitw":  # main/eval_aitw.py validate_aitw
        (g, annot), name = s["target"], str(one and one["action"]).upper()
        ok = name in AITW_IDS and (point or name != "CLICK")  # else upstream's parse fails: a wrong format
        p = aitw_action(name, point, point, one.get("value")) if ok else None
        hit, tap = p is not None and aitw_match(p, g, annot), g[0] == 4 and math.dist(g[1], g[2]) <= 0.04
        # the text rule: equal or either inside the other; a non-TYPE prediction types '', inside every text
        text_ok = p is not None and p[3] is not None and (p[3] in g[3] or g[3] in p[3])
        scored = dict(type_acc=p is not None and p[0] == g[0], click_acc=hit if tap else None, step_sr=hit,
                      scroll_acc=hit if g[0] == 4 and not tap else None, text_acc=text_ok if g[0] == 3 else None)
    elif bench == "mind2web":
        scored = dict(pred_action=one and one["action"], pred_value=one and one.get("value"), pred_point=one and point,
                      gold_op=s["target"][0]["action"], gold_value=s["target"][0]["value"], gold_box=s["target"][1])
        hit = scorers.mind2web_scores([scored])["step_sr"] == 1
    else:
        scored = [((acts[k] if acts and k < len(acts) else None), g) for k, g in enumerate(s["target"])]
        hit = len(acts or []) == len(scored) and all(scorers.action_scores([x])["step_sr"] == 1 for x in scored)
    row = {k: v for k, v in s.items() if k not in ("question", "target")}
    return dict(row, answer=text, parsed=acts, point=point, hit=hit, scored=scored)


def aggregate(bench, rows):
    """A split's scores from its rows' `scored` (the same from predictions.jsonl)."""
    if bench == "mind2web":
        out = scorers.mind2web_scores([r["scored"] for r in rows])
    elif bench == "guiact":
        out = scorers.action_scores([x for r in rows for x in r["scored"]])
        out.update(action_sr=out.pop("step_sr"), actions=out.pop("n"), step_sr=sum(r["hit"] for r in rows) / len(rows))
    else:
        vals = {k: [r["scored"][k] for r in rows if r["scored"][k] is not None] for k in METRICS["aitw"]}
        out = {k: sum(v) / len(v) if v else None for k, v in vals.items()}
    return dict(out, n=len(rows), unparsable=sum(r["parsed"] is None for r in rows))


def scores(bench, rows):
    """{split: aggregate} in the paper's order; overall: all rows, and step_sr_macro, the splits' mean (AITW's)."""
    order = list(DOMAINS) if bench == "aitw" else [s for _, s in FILES[bench]]
    out = {s: aggregate(bench, got) for s in order if (got := [r for r in rows if r["split"] == s])}
    macro = sum(v["step_sr"] for v in out.values()) / len(out)
    return dict(out, overall=dict(aggregate(bench, rows), step_sr_macro=macro))


def table(bench, sc):
    """results.md: the paper's table, ours beside the published rows (where the docs give them); then ours in full."""
    pct, out = lambda v: "-" if v is None else f"{100 * v:.1f}", [f"# {bench}", ""]
    cols, published = PAPER.get(bench, ([], []))
    if cols:
        out += ["| model | " + " | ".join(c for c, _, _ in cols) + " |", "|" + "---|" * (len(cols) + 1),
                "| ours | " + " | ".join(pct(sc.get(s, {}).get(k)) for _, s, k in cols) + " |"]
        out += [f"| {name} (published) | " + " | ".join(str(v or "-") for v in vals) + " |" for name, vals in published]
    out += ["", "| split | n | unparsable | " + " | ".join(METRICS[bench]) + " |", "|---" * (3 + len(METRICS[bench]))
            + "|"]
    out += [f"| {DOMAINS.get(s, s)} | {v['n']} | {v['unparsable']} | " + " | ".join(pct(v[k]) for k in METRICS[bench])
            + " |" for s, v in sc.items()]
    return "\n".join(out) + "\n\nPercent; an unparsable answer is a miss. The published models are fine-tuned.\n"


def plan(a):
    """What eval.py checks before the model loads: the benchmark read, the skips printed."""
    if not a.data or a.family:
        raise ValueError(f"--bench {a.bench}: give --data DIR (and no --family: ShowUI's prompt is asked)")
    return benchmarks.usable(a, *read(a.bench, a.data, a.num_history, a.history, a.limit))


def run(m, tok, a, bench, answer_batch, length_batches):
    """Every sample answered and scored; predictions.jsonl, summary.json (every setting) and results.md at the end."""
    samples, skipped = bench[0], list(bench[1])
    a = SimpleNamespace(**{**vars(a), "system": "none" if a.system is None and not m.cfg.is_internvl else a.system})
    rows = [score(a.bench, s, t) for s, t in benchmarks.answer_all(
        m, tok, a, samples, skipped, answer_batch, length_batches, lambda s: (s["question"], s["images"], None))]
    sc = scores(a.bench, rows)
    summary = dict(bench=a.bench, data=a.data, model=m.folder, arch=m.cfg.arch, history=a.history,
                   num_history=a.num_history, first_prompt=samples[0]["question"].replace("<image>", "<image: screen>"),
                   template="chatml, " + ("no system turn" if a.system == "none" else f"system {a.system!r}"),
                   images=f"max {a.max_tiles} tiles + thumbnail" if m.cfg.is_internvl
                   else f"{a.min_pixels}..{a.max_pixels} pixels", padding="left", parse=score.__doc__,
                   decoding=f"greedy, max_new_tokens {a.max_new_tokens}, stop at <|im_end|>",
                   scoring=__doc__.split("Scoring: ")[1].split(" An unparsable")[0], n=len(rows), scores=sc,
                   skipped=len(skipped), skipped_samples=skipped)
    benchmarks.write_outputs(a.out, rows, summary, table(a.bench, sc))
    if a.visualize:  # the gold box where the step has one (Mind2Web, GUIAct), the predicted point
        benchmarks.visualize(rows, os.path.join(a.out, "pictures"), a.visualize)
    return summary
