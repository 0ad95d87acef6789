"""eval.py --bench aitw|mind2web|guiact: each reader on small files in ShowUI's layout (a malformed record named by
file, record and reason, a missing image skipped), the prompts as training builds them, and the CLI end to end with
injected answers against hand-computed scores; the CLI and the function path give the same numbers."""
import json
import os
from types import SimpleNamespace

import pytest
from PIL import Image

import eval as E
import formats
import navigation as N

QWEN = SimpleNamespace(folder="stand-in", parameters=lambda: [],
                       cfg=SimpleNamespace(arch="qwen2_vl", is_internvl=False, is_mpgui=False, template=None))
# showlab/ShowUI data/template/aitw.py and mind2web.py, verbatim: the oracle for the packed strings
UP_AITW = """You are an assistant trained to navigate the mobile phone. 
Given a task instruction, a screen observation, and an action history sequence, 
output the next action and wait for the next observation. 
Here is the action space:
1. `CLICK`: Click on an element, value is not applicable and the position [x,y] is required. 
2. `TYPE`: Type a string into an element, value is a string to type and the position is not applicable.
3. `SELECT`: Select a value for an element, value is the value to select and the position is not applicable.
4. `SCROLL UP`: Scroll up for the screen.
5. `SCROLL DOWN`: Scroll down for the screen.
6. `SCROLL LEFT`: Scroll left for the screen.
7. `SCROLL RIGHT`: Scroll right for the screen.
8. `PRESS BACK`: Press for returning to the previous step, value and position are not applicable.
9. `PRESS HOME`: Press for returning to the home screen, value and position are not applicable.
10. `PRESS ENTER`: Press for submitting the input content, value and position are not applicable.
11. `STATUS TASK COMPLETE`: Indicate the task is completed, value and position are not applicable.
12. `STATUS TASK IMPOSSIBLE `: Indicate the task is impossible to complete, value and position are not applicable.
""" + """
Format the action as a dictionary with the following keys:
{'action': 'ACTION_TYPE', 'value': 'element', 'position': [x,y]}

If value or position is not applicable, set it as `None`.
Position represents the relative coordinates on the screenshot and should be scaled to a range of 0-1.
"""
UP_M2W = """You are an assistant trained to navigate the web. 
Given a task instruction, a screen observation, and an action history sequence, 
output the next action and wait for the next observation. 
Here is the action space:
1. `CLICK`: Click on an element, value is the element to click and the position [x,y] is required.
2. `TYPE`: Type a string into an element, value is the string to type and the position [x,y] is required.
3. `SELECT`: Select a value for an element, value is the value to select and the position [x,y] is required.

Format the action as a dictionary with the following keys:
{'action': 'ACTION_TYPE', 'value': 'element', 'position': [x,y]}

Position represents the relative coordinates on the screenshot and should be scaled to a range of 0-1.
"""


def write(folder, files, images):
    (folder / "metadata").mkdir(parents=True)
    (folder / "images").mkdir()
    for name in images:
        Image.new("RGB", (40, 80), "white").save(folder / "images" / name)
    for name, recs in files.items():
        (folder / "metadata" / f"{name}.json").write_text(json.dumps(recs))
    return folder


def aitw_step(text, touch=(-1, -1), type_text="", img="h0"):
    ids = dict(click=4, type=3, **{"press back": 5, "scroll down": 4})
    return dict(action_type_id=ids[text], action_type_text=text, touch=list(touch), lift=list(touch),
                type_text=type_text, img_filename=img, annot_position=[])


def aitw_rec(task, domain, step, annot=(), hist=(), img="s0"):
    return dict(step, split="test", domain=domain, ep_id="e", task=task, img_url=img, annot_position=list(annot),
                step=step, step_history=list(hist), img_size=[40, 80])


# task -> (record, injected answer, hit)
AITW = {"near": (aitw_rec("near", "general", aitw_step("click", (0.5, 0.5))),
                 "{'action': 'CLICK', 'value': None, 'position': [0.55, 0.5]}", True),  # 0.05 <= 0.14
        # the annotation box [y .15, x .15, h .1, w .1] grows to x, y in [0.08, 0.32]: (0.3, 0.31) is 0.149 away
        "box": (aitw_rec("box", "general", aitw_step("click", (0.2, 0.2)), annot=(0.15, 0.15, 0.1, 0.1)),
                "{'action': 'CLICK', 'value': None, 'position': [0.3, 0.31]}", True),
        "far": (aitw_rec("far", "general", aitw_step("click", (0.9, 0.9)), hist=[aitw_step("click", (0.1, 0.2))]),
                "{'action': 'CLICK', 'value': None, 'position': [0.1, 0.1]}", False),
        "type": (aitw_rec("type", "install", aitw_step("type", type_text="Hello")),
                 "{'action': 'TYPE', 'value': 'hello world', 'position': None}", True),
        "scroll": (aitw_rec("scroll", "install", aitw_step("scroll down")),  # same main axis: a match, as upstream
                   "{'action': 'SCROLL UP', 'value': None, 'position': None}", True),
        "back": (aitw_rec("back", "install", aitw_step("press back")), "press the back button", False)}


def inject(monkeypatch, answers, asked):
    def answer_batch(m, tok, prompts, a):
        asked.extend((q, ims, a.system) for q, ims, _ in prompts)
        return [answers[next(k for k in answers if f"Task: {k}" in q)] for q, _, _ in prompts], 0
    monkeypatch.setattr(E, "answer_batch", answer_batch)
    monkeypatch.setattr(E.load, "load_model", lambda *args, **kw: QWEN)
    monkeypatch.setattr(E.load, "load_tokenizer", lambda folder: None)
    monkeypatch.setattr(E, "prompt_length", lambda *args: 0)  # no tokenizer: one length, file order


def cli(bench, folder, out, *extra):
    return E.main(["--model", "x", "--bench", bench, "--data", str(folder), "--out", str(out), "--batch-size", "4",
                   *extra])


def test_aitw_reader_names_malformed_records_and_skips_missing_images(tmp_path):
    recs = [r for r, _, _ in AITW.values()] + [aitw_rec("gone", "general", aitw_step("click", (0.5, 0.5)), img="no")]
    folder = write(tmp_path / "aitw", {"hf_test": recs}, ["s0.png", "h0.png"])
    samples, skipped = N.read("aitw", str(folder))
    assert [s["instruction"] for s in samples] == list(AITW) and len(skipped) == 1
    assert "hf_test.json: record 6: missing image" in skipped[0]
    bad = recs + [aitw_rec("x", "nowhere", aitw_step("click", (0.5, 0.5))),
                  dict(aitw_rec("y", "general", aitw_step("click", (0.5, 0.5))), action_type_id=3),
                  {k: v for k, v in aitw_rec("z", "general", aitw_step("type", type_text="a")).items() if k != "task"}]
    (folder / "metadata" / "hf_test.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError) as e:
        N.read("aitw", str(folder))
    msg = str(e.value)
    assert msg.startswith("3 malformed aitw record(s)")
    assert "hf_test.json: record 7: domain 'nowhere' not one of" in msg
    assert "hf_test.json: record 8: action_type_id 3 / text 'click' / touch [0.5, 0.5] / lift [0.5, 0.5]: no AITW action" in msg
    assert "hf_test.json: record 9: KeyError: 'task'" in msg


def test_aitw_cli_end_to_end(tmp_path, monkeypatch):
    folder = write(tmp_path / "aitw", {"hf_test": [r for r, _, _ in AITW.values()]}, ["s0.png", "h0.png"])
    asked = []
    inject(monkeypatch, {k: v[1] for k, v in AITW.items()}, asked)
    s = cli("aitw", folder, tmp_path / "out")
    assert N.AITW_SYSTEM == UP_AITW and {system for _, _, system in asked} == {"none"}
    far = next(q for q, _, _ in asked if "Task: far" in q)  # tttt: the past action as its answer text, then the screen
    assert far == UP_AITW + "Task: far{'action': 'CLICK', 'value': None, 'position': [0.1, 0.2]}<image>"
    sc = s["scores"]
    g, i = sc["general"], sc["install"]  # hand-computed from the table above
    assert (g["n"], g["step_sr"], g["click_acc"], g["type_acc"], g["text_acc"]) == (3, 2 / 3, 2 / 3, 1.0, None)
    assert (i["n"], i["step_sr"], i["type_acc"], i["scroll_acc"], i["text_acc"], i["unparsable"]) == \
        (3, 2 / 3, 2 / 3, 1.0, 1.0, 1)
    assert sc["overall"]["step_sr_macro"] == pytest.approx(2 / 3) and sc["overall"]["step_sr"] == pytest.approx(4 / 6)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert [r["hit"] for r in rows] == [v[2] for v in AITW.values()]
    assert rows[0]["point"] == [0.55, 0.5] and rows[-1]["parsed"] is None and rows[0]["box"] is None
    assert N.scores("aitw", rows) == json.loads((tmp_path / "out" / "summary.json").read_text())["scores"]
    assert "max_new_tokens 128," in json.loads((tmp_path / "out" / "summary.json").read_text())["decoding"]  # ShowUI's
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| ours | 66.7 | 66.7 | - | - | - | 66.7 |" in md and "| MP-GUI (published) | 63.7 | 74.3" in md
    vt = []
    inject(monkeypatch, {k: v[1] for k, v in AITW.items()}, vt)
    cli("aitw", folder, tmp_path / "out2", "--history", "vtvt")
    q, ims, _ = next(x for x in vt if "Task: far" in x[0])
    assert q.endswith("Task: far<image>{'action': 'CLICK', 'value': None, 'position': [0.1, 0.2]}<image>")
    assert len(ims) == 2


def m2w_rec(task, op, value, rep, hist=(), reprs=()):
    step = dict(action_uid="u", operation=dict(op=op, value=value, original_op=op),
                bbox=dict(x=20, y=10, width=40, height=20))
    return dict(split="test_task", annot_id="a", task=task, img_url="m.jpg", img_size=[200, 100], step=step,
                step_repr=rep, step_history=list(hist), repr_history=list(reprs))


def test_mind2web_cli_end_to_end(tmp_path, monkeypatch):
    search = m2w_rec("search", "CLICK", "", "[button]  Search -> CLICK")
    typed = m2w_rec("type", "TYPE", "New York", "[textbox]  From -> TYPE: New York", [search["step"]],
                    [search["step_repr"]])  # a raw step as history (prepare/hf_mind2web.py)
    sort = m2w_rec("sort", "SELECT", "Price", "[combobox]  Sort by -> SELECT: Price", [search])  # a sample
    folder = write(tmp_path / "m2w", {"hf_test_task": [search, typed], "hf_test_website": [sort]}, ["m.jpg"])
    answers = {"search": "{'action': 'CLICK', 'value': None, 'position': [0.2, 0.2]}",  # element and op right
               "type": "{'action': 'TYPE', 'value': 'new york', 'position': [0.5, 0.5]}",  # op right, element not
               "sort": "{'action': 'SELECT', 'value': 'Price', 'position': [0.2, 0.2]}"}  # gold value is 'Sort by'
    asked = []
    inject(monkeypatch, answers, asked)
    s = cli("mind2web", folder, tmp_path / "out", "--visualize", "3")
    assert N.MIND2WEB_SYSTEM == UP_M2W
    past = "{'action': 'CLICK', 'value': 'Search', 'position': [0.2, 0.2]}"
    assert [q for q, _, _ in asked][1:] == [UP_M2W + "Task: type" + past + "<image>",
                                            UP_M2W + "Task: sort" + past + "<image>"]
    t, w = s["scores"]["cross-task"], s["scores"]["cross-website"]
    assert (t["ele_acc"], t["op_f1"], t["op_f1_macro"], t["step_sr"], t["n"]) == (0.5, 1.0, 1.0, 0.5, 2)
    # {select, price} vs {select, sort, by}: 2 * 1 / (2 + 3)
    assert (w["ele_acc"], w["op_f1"], w["step_sr"]) == (1.0, pytest.approx(0.4), 0.0)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert rows[0]["box"] == [0.1, 0.1, 0.3, 0.3] and [r["hit"] for r in rows] == [True, False, False]
    assert N.scores("mind2web", rows) == s["scores"]
    # pictures as for ScreenSpot: one per sample, hit or miss as scored; a grid of the misses of each split
    assert sorted(os.listdir(tmp_path / "out" / "pictures")) == ["000_hit.png", "001_miss.png", "002_miss.png",
                                                                 "misses_cross-task.png", "misses_cross-website.png"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| ours | 50.0 | 100.0 | 50.0 | 100.0 | 40.0 | 0.0 | - | - | - |" in md
    (folder / "metadata" / "hf_test_domain.json").write_text(json.dumps([dict(search, img_size=[0, 1])]))
    with pytest.raises(SystemExit):
        cli("mind2web", folder, tmp_path / "out")


def test_guiact_asks_as_training_builds_and_scores(tmp_path, monkeypatch, capsys):
    tap = dict(action_type="tap", action_value=None, point=[0.5, 0.5])
    phone = [dict(task="tap", img_url="p0", img_size=[40, 80], step=tap, step_history=[], bbox=None),
             dict(task="input", img_url="p1", step=dict(action_type="input", action_value="abc", point=None),
                  step_history=[dict(tap, img_url="p0")])]
    web = [dict(task="two", img_url="w0", step=[dict(action_type="click", action_value=None, point=[0.2, 0.2]),
                                                dict(action_type="input", action_value="hi", point=[0.2, 0.2])],
                step_history=[])]
    folder = write(tmp_path / "g", {"hf_test_smartphone": phone, "hf_test_web-single": web},
                   ["p0.png", "p1.png", "w0.png"])
    answers = {"tap": "{'action': 'TAP', 'value': None, 'position': [0.52, 0.5]}",
               "input": "{'action': 'INPUT', 'value': 'ABC', 'position': None}",
               "two": "{'action': 'CLICK', 'value': None, 'position': [0.2, 0.2]},"
                      "{'action': 'INPUT', 'value': 'bye', 'position': [0.2, 0.2]}"}
    asked = []
    inject(monkeypatch, answers, asked)
    s = cli("guiact", folder, tmp_path / "out")
    ds = formats.ShowUINavigation(str(tmp_path), ["g:hf_test_smartphone"], None, 1, 1, 1)
    pieces, _ = ds.build(phone[1], (str(folder / "images"), "smartphone"))
    q = next(q for q, _, _ in asked if "Task: input" in q)  # the training prompt, less the turn markers
    assert pieces[0][0] == "<|im_start|>user\n" + q.replace("<image>", formats.IMAGE) + \
        "<|im_end|>\n<|im_start|>assistant\n"
    p, w = s["scores"]["smartphone"], s["scores"]["web-single"]
    assert (p["n"], p["step_sr"], p["type_acc"], p["click_acc"]) == (2, 1.0, 1.0, 1.0)
    assert (w["n"], w["actions"], w["step_sr"], w["action_sr"], w["type_acc"]) == (1, 2, 0.0, 0.5, 1.0)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert N.scores("guiact", rows) == s["scores"]
    phone.append(dict(task="bad", img_url="p0", step=dict(action_type="fly", action_value=None), step_history=[]))
    (folder / "metadata" / "hf_test_smartphone.json").write_text(json.dumps(phone))
    with pytest.raises(SystemExit):
        cli("guiact", folder, tmp_path / "out")
    assert "hf_test_smartphone.json: record 2: step: action_type 'fly' is not in the smartphone action space" in \
        capsys.readouterr().err


def test_unusual_answers_are_misses_not_crashes():
    # the row builder on a hand-made sample: a dict without 'value', a click without a point, a list
    g = N.aitw_action("TYPE", text="hi")
    sample = dict(split="general", target=[g, []], question="q")
    assert N.score("aitw", sample, "{'action': 'TYPE'}")["scored"]["type_acc"] is True
    assert N.score("aitw", sample, "{'action': 'TYPE'}")["scored"]["text_acc"] is False  # no typed text
    assert N.score("aitw", sample, "{'action': 'CLICK'}")["hit"] is False  # a click without a point: no action
    assert N.score("aitw", sample, "[1, 2]")["parsed"] is None


def test_real_model_path_on_the_tiny_qwen2_vl(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recs = [AITW["far"][0], AITW["type"][0]]
    folder = write(tmp_path / "aitw", {"hf_test": recs}, ["s0.png", "h0.png"])
    out = tmp_path / "out"
    s = E.main(["--model", os.path.join(root, "tests", "fixtures", "qwen2_vl_tiny"), "--bench", "aitw",
                "--data", str(folder), "--out", str(out), "--max-new-tokens", "6", "--min-pixels", str(56 * 56),
                "--max-pixels", str(112 * 112), "--device", "cpu", "--history", "vtvt"])
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert s["n"] == 2 and s["template"] == "chatml, no system turn" and len(rows[0]["images"]) == 2
    for r, rec in zip(rows, N.read("aitw", str(folder), history="vtvt")[0]):  # each hit is the rule on the raw answer
        assert r["hit"] == N.score("aitw", rec, r["answer"])["hit"]
