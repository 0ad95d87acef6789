"""eval.py --bench screenspot on ScreenSpot-v2's layout, --bench vlaser_points (Vlaser's PixMo / PACO point
precision), --bench mpgui (MP-GUI's eight tasks by file name, the paper row) on files written here in the upstream
layouts, with injected answers against hand-computed values (CLI and function path alike), and a ScreenSpot set of
the synthetic world's held-out screens run through the real model path on a tiny checkpoint."""
import json
import os
from types import SimpleNamespace

import pytest
from PIL import Image

import benchmarks as B
import eval as E
import scorers
from tools import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def internvl(arch="internvl"):
    return SimpleNamespace(folder="stand-in", parameters=lambda: [], cfg=SimpleNamespace(
        arch=arch, is_internvl=True, is_mpgui=arch == "mpgui", template="internvl2_5", mpgui_mode="fusion"))


def inject(monkeypatch, m, answer):
    """eval.py with a stand-in model whose answer to each question is answer(question) -> (the prompts asked, the
    arguments the CLI passed, the fake answer_batch) for the function path."""
    asked, args = [], []

    def answer_batch(m, tok, prompts, a):
        asked.extend(prompts)
        args.append(a)
        return [answer(q) for q, _, _ in prompts], 0
    monkeypatch.setattr(E, "answer_batch", answer_batch)
    monkeypatch.setattr(E.load, "load_model", lambda *args, **kw: m)
    monkeypatch.setattr(E.load, "load_tokenizer", lambda folder: None)
    monkeypatch.setattr(E, "prompt_length", lambda *args: 0)  # no tokenizer: one length, file order
    return asked, args, answer_batch


def elsewhere(args, out):
    """The arguments of the CLI's run with another --out, for the function path."""
    return SimpleNamespace(**{**vars(args[0]), "out": str(out)})


def no_model(monkeypatch):
    def load_model(*args, **kw):
        raise AssertionError("the model must not load")
    monkeypatch.setattr(E.load, "load_model", load_model)


def png(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, "white").save(path)


# ---------------------------------------------------------------------------------------------------------- v2

def v2_dir(tmp_path, mobile, web):
    """OS-Copilot/ScreenSpot-v2: screenspot_{split}_v2.json (SeeClick's records) + screenspotv2_image/."""
    png(str(tmp_path / "screenspotv2_image" / "m.png"), (400, 200))
    (tmp_path / "screenspot_mobile_v2.json").write_text(json.dumps(mobile))
    (tmp_path / "screenspot_web_v2.json").write_text(json.dumps(web))
    return tmp_path


def ss(instruction, data_type="text", bbox=(40, 20, 40, 20), img="m.png"):
    return dict(img_filename=img, bbox=list(bbox), instruction=instruction, data_type=data_type, data_source="ios")


def test_screenspot_v2_layout(tmp_path, monkeypatch, capsys):
    folder = v2_dir(tmp_path / "v2", [ss("a"), ss("b", "icon"), ss("gone", img="x.png")],
                    [ss("c"), dict(ss("d"), data_type="widget")])
    no_model(monkeypatch)
    with pytest.raises(SystemExit):
        E.main(["--model", "x", "--bench", "screenspot", "--data", str(folder)])
    assert "screenspot_web_v2.json: record 1: data_type 'widget' not one of text, icon" in capsys.readouterr().err
    (folder / "screenspot_web_v2.json").write_text(json.dumps([ss("c")]))
    samples, skipped, layout = B.read_screenspot(str(folder))
    assert layout == "v2" and [(s["split"], s["instruction"]) for s in samples] == [
        ("mobile", "a"), ("mobile", "b"), ("web", "c")]
    assert samples[0]["box"] == (0.1, 0.1, 0.2, 0.2)  # [40/400, 20/200, 80/400, 40/200], by the image's own size
    assert len(skipped) == 1 and "screenspot_mobile_v2.json: record 2: missing image" in skipped[0]
    # ShowUI's [x, y] answers: a hit (the box edge counts), a miss, a hit
    answers = {"a": "[0.2, 0.2]", "b": "[0.5, 0.5]", "c": "[0.15, 0.1]"}
    m = SimpleNamespace(folder="stand-in", parameters=lambda: [],
                        cfg=SimpleNamespace(arch="qwen2_vl", is_internvl=False, is_mpgui=False, template=None))
    _, args, fake = inject(monkeypatch, m, lambda q: answers[q.rsplit("<image>", 1)[1]])
    out = tmp_path / "out"
    s = E.main(["--model", "x", "--bench", "screenspot", "--data", str(folder), "--out", str(out)])
    assert s["layout"] == "v2" and s["n"] == 3 and s["skipped"] == 1
    assert (s["scores"]["mobile/text"], s["scores"]["mobile/icon"], s["scores"]["web/text"]) == (1.0, 0.0, 1.0)
    assert s["scores"]["avg"] == pytest.approx(2 / 3) and s["scores"]["micro"] == pytest.approx(2 / 3)
    a = elsewhere(args, tmp_path / "fn")
    assert B.run(m, None, a, B.plan(a), fake, E.length_batches)["scores"] == s["scores"]  # the function path: the same numbers


# ------------------------------------------------------------------------------------------------ vlaser_points

def turns(expr, gold=None):
    t = [{"from": "human", "value": f"<image>\nPoint to <ref>{expr}</ref>."}]
    return t + [{"from": "gpt", "value": gold if gold is not None else "ok"}]


def points_dir(tmp_path):
    """Two sets in the layout evaluate_point_pixmo.py / evaluate_point_paco.py read (one --data-path jsonl each)."""
    png(str(tmp_path / "imgs" / "p.png"), (1000, 500))
    png(str(tmp_path / "imgs" / "q.png"), (200, 100))
    pixmo = [dict(image="imgs/p.png", width=1000, height=500,
                  conversations=turns("cup", "<ref>cup</ref>[[100, 100], [500, 500]]")),
             dict(image="imgs/p.png", width=1000, height=500, conversations=turns("dog", "<ref>dog</ref>[[10, 10]]")),
             dict(image="imgs/p.png", width=1000, height=500, conversations=turns("moon", "<ref>moon</ref>none")),
             dict(image="imgs/gone.png", width=1000, height=500, conversations=turns("cat", "<ref>cat</ref>[[1, 1]]"))]
    rect = [[[0, 0, 100, 0, 100, 50, 0, 50]]]  # one object, one polygon: x 0..100, y 0..50 px of a 200 x 100 image
    paco = [dict(image="imgs/q.png", width=200, height=100, segmentation=rect, conversations=turns("handle")),
            dict(image="imgs/q.png", width=200, height=100, segmentation=rect, conversations=turns("lid"))]
    for name, recs in (("pixmo", pixmo), ("paco", paco)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tmp_path


POINT_ANSWERS = {
    # PixMo (radius 25 on the 0-1000 grid): (110, 110) is 14.1 from (100, 100): a hit; (900, 900) a miss -> 1 / 2
    "cup": "<point>[[110, 110], [900, 900]]</point>",
    "dog": "<point>[[10, 35]]</point>",  # exactly 25 from (10, 10): a hit (<=) -> 1 / 1
    # PACO (pixel int(x / 1000 * 200), int(y / 1000 * 100)): (50, 25) inside; (150, 25), (50, 90) outside; (200, 0)
    # off the 200-px-wide mask, a miss -> 1 / 4
    "handle": "<point>[[250, 250], [750, 250], [250, 900], [1000, 0]]</point>",
    "lid": "I cannot see it",  # no point: counted as one miss -> 0 / 1
}


def test_vlaser_points_end_to_end(tmp_path, monkeypatch):
    folder = points_dir(tmp_path / "pts")
    asked, args, fake = inject(monkeypatch, internvl(),
                               lambda q: POINT_ANSWERS[q.split("referring points of ")[1][:-1]])
    out = tmp_path / "out"
    s = E.main(["--model", "x", "--bench", "vlaser_points", "--data", str(folder), "--out", str(out)])
    assert asked[0][0] == " " + B.VLASER_PROMPT.format("handle") and asked[0][2] == 6  # the scripts' space, max-num 6
    sc = s["scores"]
    assert (sc["pixmo"]["inside"], sc["pixmo"]["counted"], sc["pixmo"]["n"]) == (2, 3, 2)
    assert (sc["paco"]["inside"], sc["paco"]["counted"], sc["paco"]["n"]) == (1, 5, 2)
    assert sc["pixmo"]["precision"] == pytest.approx(2 / 3) and sc["paco"]["precision"] == 0.2
    assert sc["all"]["precision"] == pytest.approx(3 / 8) and s["unparsable"] == 1 and s["skipped"] == 2
    assert any("'moon': no gold points" in x for x in s["skipped_samples"])
    assert any("'cat': missing image" in x for x in s["skipped_samples"])
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [r["inside"] for r in rows] == [1, 0, 1, 1] and [r["counted"] for r in rows] == [4, 1, 2, 1]
    assert B.point_scores(rows) == json.loads((out / "summary.json").read_text())["scores"]
    assert "max_new_tokens 100," in s["decoding"]  # Vlaser's scripts' budget, the default here
    md = (out / "results.md").read_text()
    assert "| pixmo | 2 | 2 / 3 | 66.7 |" in md and "| paco | 2 | 1 / 5 | 20.0 |" in md and "| all | 4 | 3 / 8 | 37.5 |" in md
    a = elsewhere(args, tmp_path / "fn")
    assert B.run(internvl(), None, a, B.plan(a), fake, E.length_batches)["scores"] == sc  # the function path
    with pytest.raises(ValueError, match="--family vlaser: its prompt does not fit a qwen2_vl model"):
        B.run(SimpleNamespace(folder="q", cfg=SimpleNamespace(arch="qwen2_vl", is_internvl=False)), None, a,
              B.plan(a), fake, E.length_batches)


def test_malformed_point_records_fail_before_the_model_loads(tmp_path, monkeypatch, capsys):
    folder = points_dir(tmp_path)
    bad = [dict(image="imgs/q.png", width=200, height=100, segmentation=[[[0, 0, 1]]], conversations=turns("x")),
           dict(image="imgs/q.png", height=100, conversations=turns("y")),
           dict(image="imgs/q.png", width=200, height=100, conversations=[{"from": "human", "value": "no ref"},
                                                                          {"from": "gpt", "value": "[[1, 2]]"}])]
    (folder / "paco.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad) + "{not json\n")
    no_model(monkeypatch)
    with pytest.raises(SystemExit):
        E.main(["--model", "x", "--bench", "vlaser_points", "--data", str(folder)])
    err = capsys.readouterr().err
    assert "4 malformed point record(s)" in err
    assert "paco.jsonl: record 1: segmentation is not a list of lists of polygons" in err
    assert "paco.jsonl: record 2: not one image, or width / height not >= 1" in err
    assert "paco.jsonl: record 3: no human turn with <ref>expression</ref>" in err
    assert "paco.jsonl: record 4: " in err


# ------------------------------------------------------------------------------------------------------- mpgui

def chat(q, a, img="shots/s.png"):
    return dict(image=img, conversations=[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}])


# question -> (gold, injected answer)
MPGUI_QA = {
    "WC": {"wc1": ("open the settings menu now", "open the settings menu now"),  # CIDEr-D 10 (identical, no n-gram
           "wc2": ("close this dialog window quickly", "xyz")},                  # shared with wc2's ref); 0 -> 5
    "TP": {"tp1": ("0", "0"), "tp2": ("1", "0"), "tp3": ("0", "1")},  # tp 1, predicted 2, gold 2: F1 0.5
    "RE": {"re1": ("<box>[[100, 100, 300, 300]]</box>", "<box>[[500, 500, 600, 600]]</box>"),  # IoU 0
           "re2": ("<box>[[0, 0, 100, 100]]</box>", "<box>[[0, 0, 100, 20]]</box>")},  # IoU 0.2: Acc@0.1 0.5, @0.5 0
    "QAS": {"qas1": ("blue sky", "the blue sky"), "qas2": ("red", "green")},  # SQuAD F1 1 and 0 -> 0.5
}


def mpgui_dir(tmp_path):
    png(str(tmp_path / "shots" / "s.png"), (64, 64))
    for task, qa in MPGUI_QA.items():
        (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(chat(q, g)) + "\n" for q, (g, _) in qa.items()))
    (tmp_path / "benchmark_training_data.json").write_text("{}")  # the shipped meta sits beside: not a task file
    return tmp_path


def mpgui_answer(q):
    q = q.split("\n", 1)[1]
    return next(qa[q][1] for qa in MPGUI_QA.values() if q in qa)


def test_mpgui_eight_tasks_by_name(tmp_path, monkeypatch):
    folder = mpgui_dir(tmp_path / "mp")
    m = internvl("mpgui")
    _, args, _ = inject(monkeypatch, m, mpgui_answer)
    out = tmp_path / "out"
    s = E.main(["--model", "x", "--bench", "mpgui", "--data", str(folder), "--out", str(out)])
    assert sorted(s["datasets"]) == ["QAS", "RE", "TP", "WC"]
    assert s["paper_metrics"] == {"WC": pytest.approx(500.0), "S2W": None, "RE": 50.0, "TP": 50.0, "WS": None,
                                  "QA": None, "QAS": 50.0, "CQA": None}
    md = (out / "results.md").read_text()
    assert "| ours | 500.0 | - | 50.0 | 50.0 | - | - | 50.0 | - |" in md
    assert "| MP-GUI (published) | 151.0 | 118.4 | 83.0 | 88.2 | 89.2 | 88.6 | 90.5 | 84.3 |" in md
    assert "| model | WC CIDEr | S2W CIDEr | RE Acc@IoU0.1 | TP F1 | WS SQuAD F1 | QA ROUGE-L | QAS SQuAD F1 | " \
           "CQA SQuAD F1 |" in md
    # a meta json naming the same files: the same numbers; the function path too
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({t: dict(root=str(folder), annotation=str(folder / f"{t}.jsonl"), data_augment=False,
                                        repeat_time=1) for t in MPGUI_QA}))
    s2 = E.main(["--model", "x", "--bench", "mpgui", "--data", str(meta), "--out", str(tmp_path / "out2")])
    assert s2["paper_metrics"] == s["paper_metrics"]
    a = elsewhere(args, tmp_path / "fn")
    fn = E.evaluate(m, None, a, E.plan(a, B.mpgui_specs(str(folder))))
    assert B.mpgui_table(fn, a.out) == s["paper_metrics"]


def test_mpgui_unknown_task_file_and_bad_line_fail_before_the_model_loads(tmp_path, monkeypatch, capsys):
    folder = mpgui_dir(tmp_path)
    (folder / "XYZ.jsonl").write_text(json.dumps(chat("q", "a")) + "\n")
    no_model(monkeypatch)
    argv = ["--model", "x", "--bench", "mpgui", "--data", str(folder)]
    with pytest.raises(SystemExit):
        E.main(argv)
    assert "['XYZ']: MP-GUI's tasks are WC, S2W, RE, TP, WS, QA, QAS, CQA, once" in capsys.readouterr().err
    os.remove(folder / "XYZ.jsonl")
    (folder / "tp.jsonl").write_text(json.dumps(chat("q", "0")) + "\n")  # TP twice (names match in any case)
    with pytest.raises(SystemExit):
        E.main(argv)
    assert "['TP', 'TP']: MP-GUI's tasks are" in capsys.readouterr().err
    os.remove(folder / "tp.jsonl")
    (folder / "TP.jsonl").write_text(json.dumps(chat("q", "0")) + "\n" + json.dumps({"conversations": 3}) + "\n")
    with pytest.raises(SystemExit):
        E.main(argv)
    assert "TP.jsonl:2: 'conversations' is not a list" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the world's screens

@pytest.mark.usefixtures("one_thread")
def test_world_screenspot_through_the_real_model(tmp_path):
    recs = world.screenspot(str(tmp_path / "ss"), n_eval=2)
    img, els = world.make_screen(world.first_seed("eval"))
    first = next(e for e in els if e["type"] in ("button", "icon", "text"))
    w, h = img.size
    x1, y1, x2, y2 = first["box"]
    assert recs[0]["bbox"] == pytest.approx([x1 * w / 1000, y1 * h / 1000, (x2 - x1) * w / 1000, (y2 - y1) * h / 1000])
    assert recs[0]["split"] == ("mobile" if h > w else "desktop") and {r["split"] for r in recs} <= {"mobile", "desktop"}
    assert {r["data_type"] for r in recs} == {"text", "icon"}
    samples, skipped, layout = B.read_screenspot(str(tmp_path / "ss"))
    assert layout == "showui" and not skipped and len(samples) == len(recs)
    assert samples[0]["box"] == pytest.approx((x1 / 1000, y1 / 1000, x2 / 1000, y2 / 1000))
    out = tmp_path / "out"
    s = E.main(["--model", os.path.join(ROOT, "tests", "fixtures", "mpgui_tiny"), "--bench", "screenspot", "--data",
                str(tmp_path / "ss"), "--out", str(out), "--limit", "3", "--max-tiles", "1", "--max-new-tokens", "6",
                "--device", "cpu"])
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert s["family"] == "mpgui" and s["n"] == 3 == len(rows) and s["scores"]["n"] == 3
    for r in rows:  # each hit is what MP-GUI's box rule gives on the raw answer the model wrote
        p = B.box_centre(r["answer"])
        assert r["point"] == (list(p) if p else None) and r["hit"] == scorers.point_in_box(p, r["box"])
    assert scorers.screenspot_scores(rows) == s["scores"]
    assert s["unparsable"] == sum(B.box_centre(r["answer"]) is None for r in rows)
