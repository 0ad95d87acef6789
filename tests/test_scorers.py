"""scorers.py: hand-computed cases, and CIDEr-D / ROUGE-L against pycocoevalcap / rouge-score; eval.py's kinds
through score(), its --task check and the shuffled-images control on a stand-in model."""
import json
import math
import random
from types import SimpleNamespace

import pytest
from PIL import Image
from pycocoevalcap.cider.cider_scorer import CiderScorer
from rouge_score import rouge_scorer

import eval as E
import scorers as S


def test_parse_point_formats_and_failures():
    assert S.parse_point("[0.49, 0.42]") == (0.49, 0.42)
    assert S.parse_point(" (0.1, 0.2) ") == (0.1, 0.2)
    assert S.parse_point("[0.2, 0.4, 0.4, 0.8]") == pytest.approx((0.3, 0.6))  # TongUI box -> centre
    assert S.parse_point("<point>[[500, 250]]</point>") == (0.5, 0.25)
    assert S.parse_point("The <point>[[12, 998], [3, 4]]</point> here") == (0.012, 0.998)
    for bad in ("", "click it", "[0.1]", "[0.1, 'a']", "[True, 0.2]", "{'x': 1}", "[0.1, 0.2", "None"):
        assert S.parse_point(bad) is None, bad


def test_point_in_box_inclusive():
    box = (0.1, 0.2, 0.3, 0.4)
    assert S.point_in_box((0.1, 0.4), box) and S.point_in_box((0.3, 0.2), box) and S.point_in_box((0.2, 0.3), box)
    assert not S.point_in_box((0.31, 0.3), box) and not S.point_in_box(None, box)
    assert S.point_in_box((0.5, 0.5), (0.5, 0.5, 0.5, 0.5))  # a degenerate box still holds its own point


def test_screenspot_macro_vs_micro():
    recs = [dict(split="mobile", data_type="text", hit=True)] * 3 + [dict(split="mobile", data_type="text", hit=False)]
    recs += [dict(split="web", data_type="icon", hit=False), dict(split="web", data_type="icon", hit=None)]  # unparsed
    s = S.screenspot_scores(recs)
    assert s["mobile/text"] == 0.75 and s["web/icon"] == 0.0
    assert s["avg"] == 0.375 and s["micro"] == 0.5 and s["n"] == 6
    six = [dict(split=a, data_type=t, hit=a == "web") for a in ("mobile", "desktop", "web") for t in ("text", "icon")]
    assert S.screenspot_scores(six)["avg"] == pytest.approx(1 / 3)
    assert S.screenspot_scores([])["avg"] == 0.0


def test_iou_and_parse_box():
    assert S.iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert S.iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert S.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert S.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # degenerate: zero union
    assert S.iou((0, 0, 0, 1), (0, 0, 1, 1)) == 0.0  # zero-width box
    assert S.iou((2, 2, 0, 0), (0, 0, 2, 2)) == 0.0  # inverted box has area 0
    assert S.parse_box("<ref>Save</ref><box>[[100, 200, 300, 400]]</box>") == (0.1, 0.2, 0.3, 0.4)
    assert S.parse_box("[[0, 0, 1000, 500]]") == (0.0, 0.0, 1.0, 0.5)
    assert S.parse_box("box: [10,20,30,40] and [1, 2, 3, 4]") == (0.01, 0.02, 0.03, 0.04)
    for bad in ("", "[1, 2, 3]", "<box>[[1, 2]]</box>", "no box"):
        assert S.parse_box(bad) is None


def test_refexp_scores():
    gt = (0.0, 0.0, 1.0, 1.0)
    pairs = [((0.0, 0.0, 1.0, 1.0), gt),  # iou 1
             ((0.0, 0.0, 0.6, 1.0), gt),  # iou 0.6, centre in
             ((0.0, 0.0, 0.2, 1.0), gt),  # iou 0.2, centre in
             ((0.9, 0.9, 2.9, 2.9), gt),  # iou 0.01/7.99, centre out
             (None, gt)]
    s = S.refexp_scores(pairs)
    assert (s["acc@0.1"], s["acc@0.3"], s["acc@0.5"], s["acc@0.7"]) == (0.6, 0.4, 0.4, 0.2)
    assert s["center_acc"] == 0.6 and s["n"] == 5
    assert S.refexp_scores([((0, 0, 0.5, 1), gt)])["acc@0.5"] == 1.0  # IoU exactly 0.5 counts
    assert S.refexp_scores([])["acc@0.5"] == 0.0


def test_binary_f1_positive_is_clickable_zero():
    golds = ["0", "0", "0", "1", "1"]
    preds = ["0", " 0", "1", "0", "maybe"]  # TP, TP, FN, FP, unparsable (wrong, not positive)
    s = S.binary_f1(preds, golds)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3) and s["acc"] == 0.4
    s = S.binary_f1(["x", None, "1"], ["0", "0", "1"])
    assert (s["precision"], s["recall"], s["f1"], s["acc"]) == (0.0, 0.0, 0.0, pytest.approx(1 / 3))
    assert S.binary_f1([0, 1], [0, 1])["f1"] == 1.0  # ints compare as their strings
    assert S.binary_f1(["1"], ["1"], positive="1")["f1"] == 1.0


def test_squad():
    assert S.normalize_answer("The  Cat, sat on an A-mat!") == "cat sat on amat"
    assert S.normalize_answer("  ") == ""
    assert S.squad_em("the Cat.", "cat") == 1.0 and S.squad_em("cat", "dog") == 0.0
    assert S.squad_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 2 / (2 + 3))
    assert S.squad_f1("cat cat", "cat") == pytest.approx(2 * 1 / 3)  # counts clip
    assert S.squad_f1("the", "") == 1.0 and S.squad_f1("the", "cat") == 0.0 and S.squad_em("", "an") == 1.0
    assert S.squad_f1("dog", ["cat", "big dog", "dog"]) == 1.0
    assert S.squad_f1("big dog", ["cat", "big brown dog"]) == pytest.approx(0.8)
    assert S.squad_em("dog", []) == 0.0
    # ScreenQA's <no answer> is its own token
    assert S.squad_em("<no answer>", "<no answer>") == 1.0 and S.squad_f1(" <No Answer> ", "<no answer>") == 1.0
    assert S.squad_em("no answer", "<no answer>") == 0.0 and S.squad_f1("no answer", "<no answer>") == 0.0
    assert S.squad_f1("<no answer>", "no answer") == 0.0
    assert S.squad_f1("<no answer>", ["cat", "<no answer>"]) == 1.0


def test_rouge_l_hand():
    assert S.rouge_l("the cat sat", "the cat sat") == 1.0
    assert S.rouge_l("The cat, sat!", "a cat sat down") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert S.rouge_l("", "cat") == 0.0 and S.rouge_l("!!", "cat") == 0.0 and S.rouge_l("dog", "cat") == 0.0


WORDS = "a the cat dog sat on mat red blue big small button menu click open close settings".split()


def test_rouge_l_matches_rouge_score():
    rnd = random.Random(0)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    punct = ["", ",", ".", "!", " -", "'s", "Ä"]

    def sent():
        return " ".join(rnd.choice(WORDS).upper() * (rnd.random() < .1) or rnd.choice(WORDS) + rnd.choice(punct)
                        for _ in range(rnd.randint(0, 12)))
    pairs = [(sent(), sent()) for _ in range(100)] + [("", "cat"), ("cat", "")]
    for pred, ref in pairs:
        assert abs(S.rouge_l(pred, ref) - scorer.score(ref, pred)["rougeL"].fmeasure) < 1e-9, (pred, ref)


def _coco_cider(cands, refs):
    scorer = CiderScorer(n=4, sigma=6.0)
    for i in refs:
        scorer += (cands[i], refs[i])
    return scorer.compute_score()


def test_cider_d_matches_pycocoevalcap():
    rnd = random.Random(1)

    def sent(lo=1):
        return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, 10)))
    for trial in range(5):
        refs = {f"im{i}": [sent() for _ in range(rnd.randint(2, 5))] for i in range(30)}
        cands = {i: (rs[0] if rnd.random() < .2 else sent(lo=0)) for i, rs in refs.items()}
        mean, per = S.cider_d(cands, refs)
        ref_mean, ref_per = _coco_cider(cands, refs)
        assert abs(mean - ref_mean) < 1e-9
        assert all(abs(per[i] - r) < 1e-9 for i, r in zip(refs, ref_per))
        assert mean > 0


def test_cider_d_hand():
    # one image: idf = log(1) - log(1) = 0 everywhere, so every score is 0 (as in pycocoevalcap)
    assert S.cider_d({"a": "cat"}, {"a": ["cat"]}) == (0.0, {"a": 0.0})
    # two images, disjoint vocab: every n-gram has idf log 2; the candidate equals its only reference -> 10 per n
    # that has n-grams, averaged over n=1..4: "cat sat" has uni- and bigrams only -> 10 * 2 / 4 = 5
    mean, per = S.cider_d({"a": "cat sat", "b": "x"}, {"a": ["cat sat"], "b": ["dog"]})
    assert per["a"] == pytest.approx(5.0) and per["b"] == 0.0 and mean == pytest.approx(2.5)
    # length penalty uses the bigram counts: an empty candidate vs a 3-word reference
    assert S.cider_d({"a": "", "b": "y"}, {"a": ["p q r"], "b": ["z"]})[0] == 0.0


def test_parse_points():
    assert S.parse_points("<point>[[1, 2], [30,40]]</point> and <point>[[5, 6]]</point>") == [(1, 2), (30, 40), (5, 6)]
    assert S.parse_points("<point>[1, 2]</point>") == [] and S.parse_points("") == []
    assert S.parse_points("<point>[[1.5, 2]]</point>") == []


def test_parse_action():
    showui = "{'action': 'CLICK', 'value': None, 'position': [0.49, 0.42]}"
    assert S.parse_action(showui) == {"action": "CLICK", "value": None, "position": [0.49, 0.42]}
    tongui = 'Thought: I should open settings.\nAction: {"action": "TAP", "value": null, "position": [0.1, 0.2]}'
    assert S.parse_action(tongui) == {"action": "TAP", "value": None, "position": [0.1, 0.2]}
    assert S.parse_action("Action: sure {'action': 'SCROLL', 'value': 'up'} done")["value"] == "up"
    for bad in ("", "CLICK", "[0.1, 0.2]", "{'value': 1}", "Action: {'action': 'CLICK'", "{'action': x}"):
        assert S.parse_action(bad) is None, bad


def test_action_scores():
    gold_click = {"action": "CLICK", "value": None, "position": [0.5, 0.5]}
    pairs = [({"action": "click", "position": [0.6, 0.6]}, gold_click),  # dist 0.141 > 0.14: miss
             ({"action": "CLICK", "position": [0.55, 0.6]}, gold_click),  # dist 0.112: hit
             ({"action": "CLICK", "position": [0.9, 0.9]}, dict(gold_click, box=(0.8, 0.8, 1.0, 1.0))),  # in box
             ({"action": "CLICK", "position": [0.5, 0.5]}, dict(gold_click, box=(0.8, 0.8, 1.0, 1.0))),  # box wins
             (None, gold_click),
             ({"action": "TYPE", "value": "Hello!"}, {"action": "TYPE", "value": "hello"}),
             ({"action": "SCROLL", "value": "down"}, {"action": "SCROLL", "value": "up"}),
             ({"action": "PRESS_BACK"}, {"action": "PRESS_BACK", "value": None})]
    s = S.action_scores(pairs)
    assert s["type_acc"] == 7 / 8 and s["click_acc"] == 2 / 5 and s["step_sr"] == 4 / 8 and s["n"] == 8
    assert S.action_scores(pairs[:1], click_radius=0.15)["click_acc"] == 1.0
    tap = ({"action": "TAP", "position": [0.4, 0.4, 0.6, 0.6]}, {"action": "TAP", "position": [0.5, 0.5]})
    assert S.action_scores([tap])["step_sr"] == 1.0  # a box position reduces to its centre
    assert S.action_scores([])["type_acc"] == 0.0


def test_mind2web_scores():
    box = (0.1, 0.1, 0.3, 0.3)
    steps = [dict(pred_action="CLICK", pred_value=None, pred_point=(0.2, 0.2), gold_op="CLICK", gold_value=None,
                  gold_box=box),  # element + op right
             dict(pred_action="TYPE", pred_value="New York", pred_point=(0.2, 0.2), gold_op="TYPE",
                  gold_value="new york city", gold_box=box),  # {TYPE new york} vs {TYPE new york city}: 6/7
             dict(pred_action="SELECT", pred_value="Blue", pred_point=(0.5, 0.5), gold_op="SELECT", gold_value="blue",
                  gold_box=box),  # op F1 1, element wrong
             dict(pred_action=None, pred_value=None, pred_point=None, gold_op="CLICK", gold_value=None, gold_box=box)]
    s = S.mind2web_scores(steps)
    assert s["ele_acc"] == 0.5 and s["step_sr"] == 0.25 and s["n"] == 4
    assert s["op_f1"] == pytest.approx((1 + 6 / 7 + 1 + 0) / 4)
    assert s["op_f1_macro"] == pytest.approx((0.5 + 6 / 7 + 1) / 3)
    wrong_op = dict(steps[0], pred_action="TYPE", pred_value="x")  # {TYPE x} vs {CLICK}: F1 0
    assert S.mind2web_scores([wrong_op])["op_f1"] == 0.0 and S.mind2web_scores([])["step_sr"] == 0.0
    assert not math.isnan(S.mind2web_scores([])["op_f1_macro"])


def test_shuffled_images_control(tmp_path, monkeypatch):
    """--shuffled-images asks every question again of the next distinct screen of its dataset: a stand-in model that
    answers with the colour of the image it is shown scores 1.0 on the true screens and 0.0 on the shuffled ones."""
    colours = ["red", "green", "blue"]
    for c in colours:
        Image.new("RGB", (8, 8), c).save(tmp_path / f"{c}.png")
    with open(tmp_path / "colour.jsonl", "w") as f:  # two questions per screen, as the world writes them
        for k, c in enumerate(colours * 2):
            f.write(json.dumps(dict(id=k, image=f"{c}.png", conversations=[
                {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": c}])) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"colour": dict(root=str(tmp_path), annotation=str(tmp_path / "colour.jsonl"),
                                               data_augment=False, repeat_time=1)}))
    names = {Image.new("RGB", (1, 1), c).getpixel((0, 0)): c for c in colours}
    monkeypatch.setattr(E, "answer_batch", lambda m, tok, prompts, a: (
        [names[images[0].getpixel((0, 0))] for _, images, _ in prompts], 0))
    monkeypatch.setattr(E, "prompt_length", lambda *args: 0)  # no tokenizer: one length, file order
    m = SimpleNamespace(folder="stand-in", cfg=SimpleNamespace(arch="internvl", is_internvl=True, is_mpgui=False,
                                                                template="internlm2-chat"))
    a = SimpleNamespace(task=["colour=match"], out=str(tmp_path / "out"), max_new_tokens=8, system=None, max_tiles=1,
                        data=str(meta), limit=0, batch_size=4, shuffled_images=True)
    r = E.evaluate(m, None, a)["datasets"]["colour"]
    assert r["score"]["accuracy"] == 1.0 and r["shuffled_images"]["accuracy"] == 0.0 and r["n"] == 6
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert [r["prediction_shuffled_images"] for r in rows] == ["green", "blue", "red"] * 2
    with open(tmp_path / "colour.jsonl", "w") as f:  # one screen only: nothing to shuffle with, an error
        f.write(json.dumps(dict(id=0, image="red.png", conversations=[
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}])) + "\n")
    with pytest.raises(ValueError, match="'colour' has 1 distinct image"):
        E.evaluate(m, None, a)


def test_score_point_kind():
    """ScreenSpot accuracy (first point in the gold box) and Vlaser point precision (all points) on 0-1000 gold
    boxes; ShowUI's [x, y] answers are 0-1, Vlaser's <point> answers 0-1000."""
    golds = ["<ref>Save</ref><box>[[100, 200, 300, 400]]</box>", "[[100, 200, 300, 400]]",
             "<box>[[100, 200, 300, 400]]</box>", "[100, 200, 300, 400]", "[[100, 200, 300, 400]]"]
    preds = ["[0.2, 0.3]",  # inside: 1 of 1 point
             "<point>[[150, 250], [900, 900]]</point>",  # first inside: 1 of 2 points
             "[0.5, 0.5]",  # outside: 0 of 1
             "click Save",  # unparsable: a miss, one point counted
             "[0.3, 0.4]"]  # on the corner: edges count, 1 of 1
    s = S.score("point", preds, golds)
    assert s["accuracy"] == 3 / 5 and s["point_precision"] == 3 / 6
    assert S.score("point", ["<point>[[900, 900]]</point>"], golds[:1]) == dict(accuracy=0.0, point_precision=0.0)
    with pytest.raises(ValueError, match="point scorer: cannot read the gold answer 'Save'"):
        S.score("point", ["[0.2, 0.3]"], ["Save"])


def test_score_action_kind():
    """ShowUI navigation answers (str of a dict) on both sides; TongUI's 'Action: {json}' predictions read too."""
    click = "{'action': 'CLICK', 'value': None, 'position': [0.5, 0.5]}"
    swipe = "{'action': 'SWIPE', 'value': None, 'position': [[0.5, 0.8], [0.5, 0.2]]}"
    pairs = [("{'action': 'CLICK', 'value': None, 'position': [0.55, 0.6]}", click),  # 0.112 from the gold: hit
             ('Thought: type it.\nAction: {"action": "INPUT", "value": "new york", "position": [0.21, 0.12]}',
              "{'action': 'INPUT', 'value': 'New York', 'position': [0.2, 0.1]}"),  # point and value right
             ("{'action': 'CLICK', 'value': None, 'position': [0.9, 0.9]}", click),  # right type, too far
             ("{'action': 'ENTER', 'value': None, 'position': None}",
              "{'action': 'ENTER', 'value': None, 'position': None}"),  # no position to match
             (swipe, swipe),  # a drag never matches on position: right type only
             ("I don't know", click),  # unparsable: wrong
             ("{'action': 'TAP', 'value': None, 'position': [0.5, 0.5]}", swipe)]  # wrong type (no crash on the drag)
    s = S.score("action", [p for p, _ in pairs], [g for _, g in pairs])
    assert s["type_acc"] == 5 / 7 and s["click_acc"] == 1 / 3 and s["step_sr"] == 3 / 7 and s["n"] == 7
    with pytest.raises(ValueError, match="action scorer: cannot read the gold answer"):
        S.score("action", [click], ["CLICK"])


def test_every_kind_is_dispatched():
    golds = {"box": "[[0, 0, 500, 500]]", "tap": "0", "squad": "cat", "rouge": "cat", "cider": "cat", "match": "cat",
             "point": "[[0, 0, 500, 500]]", "action": "{'action': 'ENTER'}"}
    assert set(golds) == set(S.KINDS) and set(S.TASKS.values()) <= set(S.KINDS)
    for kind, gold in golds.items():
        assert isinstance(S.score(kind, [gold], [gold]), dict), kind
    with pytest.raises(ValueError, match="unknown scorer 'points'"):
        S.score("points", ["x"], ["x"])


def _colour_meta(tmp_path, answer):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    line = dict(id=0, image="red.png", conversations=[{"from": "human", "value": "<image>\nWhere?"},
                                                       {"from": "gpt", "value": answer}])
    (tmp_path / "colour.jsonl").write_text(json.dumps(line) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"colour": dict(root=str(tmp_path), annotation=str(tmp_path / "colour.jsonl"),
                                               data_augment=False, repeat_time=1)}))
    return str(meta)


def test_unknown_kind_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --task was checked")
    monkeypatch.setattr(E.load, "load_model", load_model)
    meta = _colour_meta(tmp_path, "red")
    for bad in ("colour=colour_match", "colour", "=match"):
        with pytest.raises(SystemExit):
            E.main(["--model", "none", "--data", meta, "--task", bad])
        assert f"--task {bad!r}: expected NAME=KIND" in capsys.readouterr().err
    assert E.task_table(["Colour=point"])["colour"] == "point"  # looked up by the lower-cased dataset name


def test_unreadable_gold_fails_before_inference(tmp_path, monkeypatch):
    def answer_batch(*args):
        raise AssertionError("inference ran before the gold answers were checked")
    monkeypatch.setattr(E, "answer_batch", answer_batch)
    m = SimpleNamespace(folder="stand-in", cfg=SimpleNamespace(arch="internvl", is_internvl=True, is_mpgui=False,
                                                                template="internlm2-chat"))
    a = SimpleNamespace(task=["colour=point"], out=str(tmp_path / "out"), max_new_tokens=8, system=None, max_tiles=1,
                        data=_colour_meta(tmp_path, "red"), limit=0, batch_size=4, shuffled_images=False)
    with pytest.raises(ValueError, match="point scorer: cannot read the gold answer 'red'"):
        E.evaluate(m, None, a)
    a.task = ["colour=nope"]
    with pytest.raises(ValueError, match="expected NAME=KIND"):
        E.evaluate(m, None, a)
