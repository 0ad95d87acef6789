"""Navigation benchmarks for eval.py --bench aitw|mind2web|guiact --data DIR, in ShowUI's metadata layout.

    aitw      DIR/metadata/hf_test.json (showlab/ShowUI prepare/hf_aitw.py): steps {domain (the AITW category, one of
              SeeClick's aitw_data_test.json keys general|install|googleapps|single|webshopping), task, img_url
              (DIR/images/{img_url}.png), action_type_id, action_type_text, touch, lift ([x, y], 0-1), type_text,
              annot_position ([y, x, h, w] * n, 0-1), step_history (SeeClick steps, img_filename for vtvt)}
    mind2web  DIR/metadata/hf_test_{task,website,domain}.json (prepare/hf_mind2web.py): {task, img_url (DIR/images/),
              img_size [w, h], step {operation {op, value}, bbox {x, y, width, height} px}, step_repr, step_history,
              repr_history}; a history entry is a sample ({step, step_repr, img_size, img_url}: what dset_mind2web.py
              reads) or a raw step (what prepare writes; then repr_history and the record's img_size are used)
    guiact    DIR/metadata/hf_test_{web-single,web-multi,smartphone}.json (prepare/hf_guiact.ipynb), read and checked
              as formats.ShowUINavigation reads training data; DIR/images/{img_url}.png
Each step is asked as ShowUI trains on it (formats.nav_turn: system text, task, the last --num-history actions as
text or after their screenshots, --history tttt|vtvt, the screenshot; no system turn on Qwen). Scoring: AITW as
ShowUI main/eval_aitw.py + utils_aitw.py (SeeClick's aitw_test.py): Google's action matching, step SR per category
and their mean; Mind2Web as main/eval_mind2web.py through scorers.mind2web_scores; GUIAct (no upstream scorer)
through scorers.action_scores, the element box when the step has one, else AITW's 0.14 radius; a step of several
actions succeeds when each does. Answers are read with scorers.parse_action (ShowUI's dict, TongUI's 'Action:');
an unparsable answer is a miss. Malformed records are errors before the model loads (file, record, reason); a
missing image is a counted skip. Not verifiable from upstream code (assumed): the released files' field values
beyond the prepare scripts, and that MP-GUI / InternVL models are asked with ShowUI's words (MP-GUI ships none).
"""
import json
import math
import os
import re
from types import SimpleNamespace

from tqdm import tqdm

import benchmarks
import checkpoints
import formats
import scorers

BENCHES = ("aitw", "mind2web", "guiact")
FILES = {"aitw": [("hf_test", None)], "mind2web": [(f"hf_test_{s}", f"cross-{s}") for s in ("task", "website", "domain")],
         "guiact": [(f"hf_test_{s}", s) for s in ("web-single", "web-multi", "smartphone")]}
DOMAINS = {"general": "General", "install": "Install", "googleapps": "GoogleApps", "single": "Single",
           "webshopping": "WebShopping"}
METRICS = {"aitw": ("type_acc", "click_acc", "scroll_acc", "text_acc", "step_sr"),
           "mind2web": ("ele_acc", "op_f1", "op_f1_macro", "step_sr"),
           "guiact": ("type_acc", "click_acc", "action_sr", "step_sr")}

# showlab/ShowUI data/template/aitw.py: _AITW_SYSTEM + _AITW_SYSTEM_json, as aitw_to_qwen joins them
AITW_SYSTEM = ("You are an assistant trained to navigate the mobile phone. \nGiven a task instruction, a screen "
               "observation, and an action history sequence, \noutput the next action and wait for the next "
               "observation. \nHere is the action space:\n1. `CLICK`: Click on an element, value is not applicable "
               "and the position [x,y] is required. \n2. `TYPE`: Type a string into an element, value is a string to "
               "type and the position is not applicable.\n3. `SELECT`: Select a value for an element, value is the "
               "value to select and the position is not applicable.\n4. `SCROLL UP`: Scroll up for the screen.\n5. "
               "`SCROLL DOWN`: Scroll down for the screen.\n6. `SCROLL LEFT`: Scroll left for the screen.\n7. "
               "`SCROLL RIGHT`: Scroll right for the screen.\n8. `PRESS BACK`: Press for returning to the previous "
               "step, value and position are not applicable.\n9. `PRESS HOME`: Press for returning to the home "
               "screen, value and position are not applicable.\n10. `PRESS ENTER`: Press for submitting the input "
               "content, value and position are not applicable.\n11. `STATUS TASK COMPLETE`: Indicate the task is "
               "completed, value and position are not applicable.\n12. `STATUS TASK IMPOSSIBLE `: Indicate the task "
               "is impossible to complete, value and position are not applicable.\n\nFormat the action as a "
               "dictionary with the following keys:\n{'action': 'ACTION_TYPE', 'value': 'element', 'position': "
               "[x,y]}\n\nIf value or position is not applicable, set it as `None`.\nPosition represents the "
               "relative coordinates on the screenshot and should be scaled to a range of 0-1.\n")
# data/template/mind2web.py: _MIND2WEB_SYSTEM (mind2web_to_qwen adds no format text)
MIND2WEB_SYSTEM = ("You are an assistant trained to navigate the web. \nGiven a task instruction, a screen "
                   "observation, and an action history sequence, \noutput the next action and wait for the next "
                   "observation. \nHere is the action space:\n1. `CLICK`: Click on an element, value is the element "
                   "to click and the position [x,y] is required.\n2. `TYPE`: Type a string into an element, value is "
                   "the string to type and the position [x,y] is required.\n3. `SELECT`: Select a value for an "
                   "element, value is the value to select and the position [x,y] is required.\n\nFormat the action "
                   "as a dictionary with the following keys:\n{'action': 'ACTION_TYPE', 'value': 'element', "
                   "'position': [x,y]}\n\nPosition represents the relative coordinates on the screenshot and should "
                   "be scaled to a range of 0-1.\n")
# published figures, percent (docs/mpgui.md 4.2; docs/showui_tongui.md B.7, C), in the paper table's column order
M2W = [(f"{s} {m}", s, k) for s in ("cross-task", "cross-website", "cross-domain")
       for m, k in (("Ele.Acc", "ele_acc"), ("Op.F1", "op_f1_macro"), ("Step SR", "step_sr"))]
PAPER = {"aitw": ([(n, d, "step_sr") for d, n in DOMAINS.items()] + [("Overall", "overall", "step_sr_macro")],
                  [("MP-GUI", (63.7, 74.3, 65.3, 75.4, 67.2, 69.2)), ("ShowUI (in MP-GUI's table)", (None,) * 5 + (68.3,))]),
         "mind2web": (M2W, [("ShowUI-2B", (39.9, 88.6, 37.2, 41.6, 83.5, 35.1, 39.4, 86.8, 35.2)),
                            ("TongUI-3B", (48.0, 88.4, 44.2, 48.9, 85.4, 42.6, 50.0, 87.7, 46.0)),
                            ("MP-GUI", (42.1, 89.0, 38.1, 39.4, 87.1, 32.9, 37.6, 87.4, 33.7))])}


def add_args(p):
    p.add_argument("--num-history", type=int, default=4, help="navigation benches: past actions shown (ShowUI: 4)")
    p.add_argument("--history", choices=["tttt", "vtvt"], default="tttt",
                   help="navigation benches: past actions as text (tttt) or each after its screenshot (vtvt)")


def _xy(v):
    """[x, y] numbers -> (x, y), else None."""
    return scorers._as_point(v) if isinstance(v, (list, tuple)) and len(v) == 2 else None


# showlab/ShowUI main/utils_aitw.py: action2json / pred2json_post (kept as (x, y); upstream swaps to (y, x))
SCROLLS = {"SCROLL DOWN": ((0.5, 0.8), (0.5, 0.2)), "SCROLL UP": ((0.5, 0.2), (0.5, 0.8)),
           "SCROLL LEFT": ((0.2, 0.5), (0.8, 0.5)), "SCROLL RIGHT": ((0.8, 0.5), (0.2, 0.5))}
AITW_IDS = {"CLICK": 4, "TYPE": 3, "SELECT": 2, "PRESS BACK": 5, "PRESS HOME": 6, "PRESS ENTER": 7,
            "STATUS TASK COMPLETE": 10, "STATUS TASK IMPOSSIBLE": 11, **dict.fromkeys(SCROLLS, 4)}


def aitw_action(name, touch=None, lift=None, text=""):
    """(type id, touch, lift, typed text): scrolls as fixed drags, clicks as given, others off-screen."""
    touch, lift = SCROLLS.get(name, ((touch, lift) if name == "CLICK" else ((-1, -1), (-1, -1))))
    return AITW_IDS[name], touch, lift, (text.lower() if isinstance(text, str) else None) if name == "TYPE" else ""


def aitw_boxes(flat):
    """annot_position [y, x, h, w] * n -> xyxy, grown as _resize_annotation_bounding_boxes grows them (1.4 x each
    side added, the corner moved by 0.7 x: lopsided, as upstream)."""
    out = []
    for y, x, h, w in zip(*[iter(flat)] * 4):
        x0, y0 = max(0, x - 0.7 * w), max(0, y - 0.7 * h)
        out.append((x0, y0, x0 + min(1, 2.4 * w), y0 + min(1, 2.4 * h)))
    return out


# main/utils_aitw.py check_actions_match (Google's android_in_the_wild action_matching.py)
def aitw_match(p, g, boxes):
    """Non dual-point on either side: same type. Tap vs swipe: no. Taps: both in one grown box or within 0.14.
    Swipes: the same main axis (a tie counts as y, as argmax over (y, x))."""
    if p[0] != 4 or g[0] != 4:
        return p[0] == g[0]
    tap = [math.dist(a[1], a[2]) <= 0.04 for a in (p, g)]
    if tap[0] != tap[1]:
        return False
    if tap[0]:
        return math.dist(p[1], g[1]) <= 0.14 or any(scorers.point_in_box(p[1], b) and
                                                    scorers.point_in_box(g[1], b) for b in boxes)
    axis = [abs(a[2][0] - a[1][0]) > abs(a[2][1] - a[1][1]) for a in (p, g)]
    return axis[0] == axis[1]


def aitw_answer(s):
    """data/dset_aitw.py get_answer: the step as ShowUI's answer dict (a click at the touch/lift midpoint)."""
    name = s["action_type_text"].upper()
    if AITW_IDS.get(name) != s["action_type_id"]:
        raise ValueError(f"action_type_id {s['action_type_id']!r} / text {s['action_type_text']!r}: no AITW action")
    if name == "CLICK" and not (_xy(s["touch"]) and _xy(s["lift"])):
        raise ValueError(f"click touch {s['touch']!r} / lift {s['lift']!r} are not [x, y]")
    if name == "TYPE" and not isinstance(s["type_text"], str):
        raise ValueError(f"type_text {s['type_text']!r} is not a string")
    pos = [round((a + b) / 2, 2) for a, b in zip(s["touch"], s["lift"])] if name == "CLICK" else None
    return {"action": name, "value": s["type_text"] if name == "TYPE" else None, "position": pos}


def _aitw(rec, hist, split, o):
    if rec["domain"] not in DOMAINS:
        raise ValueError(f"domain {rec['domain']!r} not one of {', '.join(DOMAINS)}")
    ap, gold, name = rec["annot_position"], aitw_answer(rec), rec["action_type_text"].upper()
    if not (isinstance(ap, list) and len(ap) % 4 == 0 and all(map(benchmarks._num, ap))):
        raise ValueError("annot_position is not [y, x, h, w] * n numbers")
    urls = [h["img_filename"] + ".png" for h in hist if o.history == "vtvt"] + [rec["img_url"] + ".png"]
    return dict(split=rec["domain"], head=AITW_SYSTEM + f"Task: {rec['task']}", acts=[str(aitw_answer(h)) for h in hist],
                urls=urls, gold=str(gold), box=None, target=[aitw_action(name, rec["touch"], rec["lift"],
                                                                         rec["type_text"]), aitw_boxes(ap)])


# data/dset_mind2web.py get_answer; main/eval_mind2web.py get_bbox (the gold box, 3 decimals)
def m2w_answer(step, rep, size):
    """(ShowUI's answer dict: op, the element text of step_repr (TYPE: the typed value), the box centre; the box)."""
    op, b, (w, h) = step["operation"]["op"], step["bbox"], size
    if op not in ("CLICK", "TYPE", "SELECT") or not all(map(benchmarks._num, (b["x"], b["y"], b["width"], b["height"]))):
        raise ValueError(f"operation {op!r} is not CLICK/TYPE/SELECT or bbox {b!r} not numbers")
    m = re.search(r"\]\s+(.*?)\s+->", rep)
    value = step["operation"]["value"] if op == "TYPE" else m and m.group(1)
    pos = [round((b["x"] + b["width"] / 2) / w, 2), round((b["y"] + b["height"] / 2) / h, 2)]
    box = [round(v, 3) for v in (b["x"] / w, b["y"] / h, (b["x"] + b["width"]) / w, (b["y"] + b["height"]) / h)]
    return {"action": op, "value": value, "position": pos}, box


def _mind2web(rec, hist, split, o):
    size = rec["img_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(benchmarks._num(v) and v > 0 for v in size)):
        raise ValueError(f"img_size {size!r} is not [w, h] > 0")
    gold, box = m2w_answer(rec["step"], rec["step_repr"], size)
    reprs = rec["repr_history"][len(rec["step_history"]) - len(hist):] if hist else []
    acts = [str((m2w_answer(h["step"], h["step_repr"], h["img_size"]) if "step" in h else
                 m2w_answer(h, reprs[k], size))[0]) for k, h in enumerate(hist)]
    urls = [h["img_url"] for h in hist if o.history == "vtvt"] + [rec["img_url"]]
    return dict(split=split, head=MIND2WEB_SYSTEM + f"Task: {rec['task']}", acts=acts, urls=urls, gold=str(gold),
                box=box, target=[gold, box])


def _guiact(rec, hist, split, o):
    why = formats.ShowUINavigation.check(o, rec, (o.images, split))
    if why and not why.startswith("missing image"):  # a missing image is a skip, counted by read
        raise ValueError(why)
    box = rec.get("bbox") if isinstance(rec["step"], dict) and formats._unit(rec.get("bbox"), 4) else None
    golds = scorers._literal(formats.nav_answer(rec["step"]))  # the training answer; several actions: a tuple
    golds = [dict(g, position=_xy(g["position"]), box=box) for g in ([golds] if isinstance(golds, dict) else golds)]
    urls = [h["img_url"] + ".png" for h in hist if o.history == "vtvt"] + [rec["img_url"] + ".png"]
    return dict(split=split, head=formats.nav_system(split) + f"Task: {rec['task']}\n", urls=urls, box=box,
                acts=[formats.nav_answer(h.get("step", h)) for h in hist], gold=formats.nav_answer(rec["step"]),
                target=golds)


def read(bench, folder, num_history=4, history="tttt", limit=0):
    """The benchmark under folder -> (samples, skipped): each sample carries file, record, split, instruction, image
    (the current screenshot), images (all, in prompt order), question (<image> placeholders), gold, box, target.
    Malformed records raise, all listed; a missing or unreadable image skips its sample."""
    files = [(p, s) for f, s in FILES[bench] if os.path.isfile(p := os.path.join(folder, "metadata", f + ".json"))]
    if not files:
        raise FileNotFoundError(f"{folder}: none of metadata/{{{','.join(f for f, _ in FILES[bench])}}}.json")
    o = SimpleNamespace(num_history=num_history, history=history, images=os.path.join(folder, "images"))
    samples, skipped, bad = [], [], []
    for path, split in files:
        for k, rec, _ in formats.read_records(path):
            try:
                if not (isinstance(rec["task"], str) and rec["task"].strip() and isinstance(rec["step_history"], list)):
                    raise ValueError("task is no text or step_history no list")
                hist = rec["step_history"][-num_history:] if num_history else []
                s = globals()["_" + bench](rec, hist, split, o)
            except (ValueError, LookupError, TypeError, AttributeError) as e:
                bad.append(f"{path}: record {k}: " + (str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"))
                continue
            paths = [os.path.join(o.images, u) for u in s.pop("urls")]
            if why := next(filter(None, map(_image_problem, paths)), None):
                skipped.append(f"{path}: record {k}: {why}")
                continue
            question = "".join(t for t, _ in formats.nav_turn(s.pop("head"), s["acts"], history))
            samples.append(dict(s, file=path, record=k, instruction=rec["task"], image=paths[-1], images=paths,
                                question=question.replace(formats.IMAGE, "<image>")))
    if bad:
        raise ValueError(f"{len(bad)} malformed {bench} record(s):\n" + "\n".join(bad))
    return samples[:limit or None], skipped


def _image_problem(path):
    if not os.path.isfile(path):
        return f"missing image {path}"
    try:
        formats.header_size(path)
    except ValueError as e:
        return str(e)


def parse(text):
    """The answer's actions, [dict], or None: one dict (scorers.parse_action), or several joined by ','."""
    one = scorers.parse_action(text)
    v = [one] if one is not None else scorers._literal(text)
    return list(v) if isinstance(v, (list, tuple)) and v and all(isinstance(d, dict) and "action" in d for d in v) \
        else None


def score(bench, s, text):
    """One answered sample -> its predictions row: answer, parsed, point, hit and `scored` (what aggregate reads)."""
    acts = parse(text)
    one = acts[0] if acts and len(acts) == 1 else None  # AITW / Mind2Web: one action a step (upstream literal_eval)
    point = _xy(acts[0].get("position")) if acts else None
    if bench == "aitw":
        (g, boxes), name = s["target"], str(one and one["action"]).upper()
        p = aitw_action(name, point, point, one.get("value")) if name in AITW_IDS and (point or name != "CLICK") \
            else None
        hit, tap = p is not None and aitw_match(p, g, boxes), g[0] == 4 and math.dist(g[1], g[2]) <= 0.04
        # SeeClick's text rule: equal or either inside the other; a non-TYPE prediction types '', inside every text
        text_ok = p is not None and p[3] is not None and (p[3] in g[3] or g[3] in p[3])
        scored = dict(type_acc=p is not None and p[0] == g[0], click_acc=hit if tap else None, step_sr=hit,
                      scroll_acc=hit if g[0] == 4 and not tap else None, text_acc=text_ok if g[0] == 3 else None)
    elif bench == "mind2web":
        gold, box = s["target"]
        scored = dict(pred_action=one and one["action"], pred_value=one and one.get("value"), pred_point=one and point,
                      gold_op=gold["action"], gold_value=gold["value"], gold_box=box)
        hit = scorers.mind2web_scores([scored])["step_sr"] == 1
    else:
        scored = [((acts[k] if acts and k < len(acts) else None), g) for k, g in enumerate(s["target"])]
        hit = len(acts or []) == len(scored) and all(scorers.action_scores([x])["step_sr"] == 1 for x in scored)
    row = {k: v for k, v in s.items() if k not in ("question", "target")}
    return dict(row, answer=text, parsed=acts, point=point, hit=hit, scored=scored)


def aggregate(bench, rows):
    """A split's scores from its rows' `scored` entries (the same from predictions.jsonl)."""
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
    """{split: aggregate} in the paper's split order, and overall: all rows, plus step_sr_macro (the mean of the
    splits' step SR: AITW's reported overall)."""
    order = list(DOMAINS) if bench == "aitw" else [s for _, s in FILES[bench]]
    out = {s: aggregate(bench, [r for r in rows if r["split"] == s]) for s in order if any(r["split"] == s for r in rows)}
    return dict(out, overall=dict(aggregate(bench, rows), step_sr_macro=sum(v["step_sr"] for v in out.values()) / len(out)))


def table(bench, sc):
    """results.md: the paper's table (ours beside the published rows) where the docs give figures, then ours in full."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    out = [f"# {bench}", ""]
    if bench in PAPER:
        cols, published = PAPER[bench]
        out += ["| model | " + " | ".join(c for c, _, _ in cols) + " |", "|" + "---|" * (len(cols) + 1),
                "| ours | " + " | ".join(pct(sc.get(s, {}).get(k)) for _, s, k in cols) + " |"]
        out += [f"| {name} (published) | " + " | ".join("-" if v is None else str(v) for v in vals) + " |"
                for name, vals in published] + [""]
    out += ["| split | n | unparsable | " + " | ".join(METRICS[bench]) + " |", "|" + "---|" * (len(METRICS[bench]) + 3)]
    out += [f"| {DOMAINS.get(s, s)} | {v['n']} | {v['unparsable']} | " + " | ".join(pct(v[k]) for k in METRICS[bench])
            + " |" for s, v in sc.items()]
    return "\n".join(out) + "\n\nPercent. An unparsable answer is a miss. Published rows are fine-tuned models.\n"


def plan(a):
    """What eval.py checks before the model loads: the benchmark read, the skips printed."""
    if not a.data:
        raise ValueError(f"--bench {a.bench}: give --data DIR, the benchmark's folder")
    if a.family:
        raise ValueError(f"--family applies to --bench screenspot; --bench {a.bench} asks ShowUI's prompt")
    samples, skipped = read(a.bench, a.data, a.num_history, a.history, a.limit)
    for s in skipped:
        print(f"skip {s}")
    if not samples:
        raise ValueError(f"{a.data}: no usable {a.bench} sample ({len(skipped)} skipped)")
    return samples, skipped


def run(m, tok, a, bench, answer_batch):
    """Every sample through answer_batch and score; predictions.jsonl, summary.json, results.md written at the end."""
    samples, skipped = bench[0], list(bench[1])
    a = SimpleNamespace(**{**vars(a), "system": "none" if a.system is None and not m.cfg.is_internvl else a.system})
    rows = []
    for i in tqdm(range(0, len(samples), a.batch_size), desc=a.bench):
        batch, prompts = [], []
        for s in samples[i:i + a.batch_size]:
            try:
                prompts.append((s["question"], [formats.load_rgb(p) for p in s["images"]], None))
                batch.append(s)
            except ValueError as e:  # the header read but the pixels do not decode
                skipped.append(f"{s['file']}: record {s['record']}: {e}")
                print(f"skip {skipped[-1]}")
        rows += [score(a.bench, s, t) for s, t in zip(batch, answer_batch(m, tok, prompts, a)[0] if prompts else [])]
    if not rows:
        raise ValueError(f"{a.data}: every {a.bench} sample was skipped")
    sc = scores(a.bench, rows)
    summary = dict(bench=a.bench, data=a.data, model=m.folder, arch=m.cfg.arch, prompt=samples[0]["question"].replace(
                   "<image>", "<image: a screenshot>"), history=a.history, num_history=a.num_history,
                   template="chatml, " + ("no system turn" if a.system == "none" else f"system {a.system!r}"),
                   images=f"max {a.max_tiles} tiles + thumbnail" if m.cfg.is_internvl
                   else f"{a.min_pixels}..{a.max_pixels} pixels", padding="left",
                   decoding=f"greedy, max_new_tokens {a.max_new_tokens} (ShowUI: 128), stop at <|im_end|>",
                   parse=parse.__doc__, scoring=__doc__.split("Scoring: ")[1].split(" Answers")[0], n=len(rows),
                   scores=sc, skipped=len(skipped), skipped_samples=skipped)
    os.makedirs(a.out, exist_ok=True)
    checkpoints.write_atomic(os.path.join(a.out, "predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    checkpoints.write_atomic(os.path.join(a.out, "summary.json"), json.dumps(summary, indent=1))
    checkpoints.write_atomic(os.path.join(a.out, "results.md"), table(a.bench, sc))
    print(table(a.bench, sc))
    return summary
