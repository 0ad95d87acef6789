"""eval.py --bench screenspot: the reader on files in ShowUI's and SeeClick's layouts (a malformed record named by
file, record and reason), the CLI end to end with injected answers against hand-computed tables, the family parse
rules, and one run through the real model path on the tiny Qwen2-VL fixture."""
import json
import os
from types import SimpleNamespace

import pytest
from PIL import Image

import benchmarks as B
import eval as E
import scorers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN = SimpleNamespace(folder="stand-in", parameters=lambda: [],
                       cfg=SimpleNamespace(arch="qwen2_vl", is_internvl=False, is_mpgui=False, template=None))


def showui_dir(tmp_path, records, images=("a.png",), size=(200, 100)):
    """ShowUI's ScreenSpot layout: metadata/hf_test_full.json + images/."""
    (tmp_path / "metadata").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    for name in images:
        Image.new("RGB", size, "white").save(tmp_path / "images" / name)
    (tmp_path / "metadata" / "hf_test_full.json").write_text(json.dumps(records))
    return tmp_path


def rec(task, bbox, split="mobile", data_type="text", img="a.png"):
    return dict(img_url=img, task=task, bbox=bbox, img_size=[200, 100], split=split, data_type=data_type, id=task)


def test_showui_layout_read_and_malformed_records_named(tmp_path):
    records = [rec("ok", [20, 10, 40, 20]), rec("gone", [0, 0, 10, 10], img="missing.png")]
    folder = showui_dir(tmp_path, records)
    samples, skipped, layout = B.read_screenspot(str(folder))
    assert layout == "showui" and [s["instruction"] for s in samples] == ["ok"]
    assert samples[0]["box"] == (0.1, 0.1, 0.3, 0.3)  # [x/W, y/H, (x+w)/W, (y+h)/H] with img_size [200, 100]
    assert len(skipped) == 1 and "hf_test_full.json: record 1: missing image" in skipped[0]
    bad = records + [rec("flat", [0, 0, 0, 5]), {k: v for k, v in rec("x", [0, 0, 1, 1]).items() if k != "split"},
                     rec("odd", [0, 0, 1, 1], data_type="widget")]
    (folder / "metadata" / "hf_test_full.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError) as e:
        B.read_screenspot(str(folder))
    msg = str(e.value)
    assert msg.startswith("3 malformed ScreenSpot record(s)")
    assert "hf_test_full.json: record 2: bbox [0, 0, 0, 5] is not [x, y, w, h] with w, h > 0" in msg
    assert "hf_test_full.json: record 3: missing field(s) split" in msg
    assert "hf_test_full.json: record 4: data_type 'widget' not one of text, icon" in msg


def test_seeclick_layout_normalises_by_the_image_size(tmp_path):
    (tmp_path / "screenspot_imgs").mkdir()
    Image.new("RGB", (400, 200), "white").save(tmp_path / "screenspot_imgs" / "m.png")
    one = dict(img_filename="m.png", bbox=[40, 20, 40, 20], instruction="open", data_type="icon", data_source="ios")
    (tmp_path / "screenspot_mobile.json").write_text(json.dumps([one]))
    (tmp_path / "screenspot_web.json").write_text(json.dumps([dict(one, instruction="go", data_type="text"),
                                                              dict(one, bbox=[1, 2, 3])]))
    with pytest.raises(ValueError, match=r"screenspot_web.json: record 1: bbox \[1, 2, 3\]"):
        B.read_screenspot(str(tmp_path))
    (tmp_path / "screenspot_web.json").write_text(json.dumps([dict(one, instruction="go", data_type="text")]))
    samples, skipped, layout = B.read_screenspot(str(tmp_path))
    assert layout == "seeclick" and not skipped
    assert [(s["split"], s["data_type"]) for s in samples] == [("mobile", "icon"), ("web", "text")]
    assert samples[0]["box"] == (0.1, 0.1, 0.2, 0.2)
    with pytest.raises(FileNotFoundError, match="neither metadata/hf_test_full.json"):
        B.read_screenspot(str(tmp_path / "screenspot_imgs"))


def test_family_parse_rules():
    assert B.showui_point("[0.2, 0.3]") == (0.2, 0.3)
    assert B.showui_point("[0.1, 0.1, 0.3, 0.3]") is None and B.showui_point("click it") is None  # ShowUI: a miss
    assert B.tongui_point("[0.1, 0.1, 0.3, 0.5]") == (0.2, 0.3)  # TongUI: a box at its centre
    assert B.vlaser_point("<point>[[150, 250], [900, 900]]</point>") == (0.15, 0.25)
    assert B.box_centre("<ref>x</ref><box>[[100, 100, 300, 500]]</box>") == (0.2, 0.3)


# instruction -> injected answer; the gold box of every record is [20, 10, 40, 20] px = (0.1, 0.1, 0.3, 0.3)
ANSWERS = {"mt-hit": "[0.15, 0.15]", "mt-junk": "click it",  # mobile/text 1/2
           "mi-edge": "[0.3, 0.1]",  # mobile/icon 1/1: the box edge counts (inclusive)
           "dt-miss": "[0.9, 0.9]",  # desktop/text 0/1
           "wi-1": "[0.2, 0.2]", "wi-2": "[0.1, 0.3]", "wi-3": "[0.31, 0.2]"}  # web/icon 2/3
CELL = {"mt": ("mobile", "text"), "mi": ("mobile", "icon"), "dt": ("desktop", "text"), "wi": ("web", "icon")}


def test_cli_end_to_end_with_injected_answers(tmp_path, monkeypatch):
    records = [rec(t, [20, 10, 40, 20], *CELL[t[:2]]) for t in ANSWERS]
    records.append(rec("gone", [20, 10, 40, 20], img="missing.png"))
    folder = showui_dir(tmp_path / "ss", records)
    calls = []

    def answer_batch(m, tok, prompts, a):
        calls.append((prompts, a.system))
        return [ANSWERS[q.rsplit("<image>", 1)[1]] for q, _, _ in prompts], 0
    monkeypatch.setattr(E, "answer_batch", answer_batch)
    monkeypatch.setattr(E, "prompt_length", lambda *args: 0)  # no tokenizer: one length, file order
    monkeypatch.setattr(E.load, "load_model", lambda *args, **kw: QWEN)
    monkeypatch.setattr(E.load, "load_tokenizer", lambda folder: None)
    out = tmp_path / "out"
    s = E.main(["--model", "x", "--bench", "screenspot", "--data", str(folder), "--out", str(out),
                "--batch-size", "3"])
    assert [len(p) for p, _ in calls] == [3, 3, 1] and {system for _, system in calls} == {"none"}  # no system turn
    assert calls[0][0][0][0] == B.SHOWUI_PROMPT.format("mt-hit")
    sc = s["scores"]
    assert s["family"] == "showui" and s["n"] == 7 and s["skipped"] == 1 and s["unparsable"] == 1
    assert (sc["mobile/text"], sc["mobile/icon"], sc["desktop/text"], sc["web/icon"]) == (0.5, 1.0, 0.0, 2 / 3)
    assert sc["avg"] == pytest.approx((0.5 + 1 + 0 + 2 / 3) / 4) and sc["micro"] == pytest.approx(4 / 7)
    assert s["skip_unparsable"]["mobile/text"] == 1.0  # TongUI's rule, beside
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [r["hit"] for r in rows] == [True, False, True, False, True, True, False]
    assert rows[1]["answer"] == "click it" and rows[1]["point"] is None
    assert scorers.screenspot_scores(rows) == json.loads((out / "summary.json").read_text())["scores"]
    md = (out / "results.md").read_text()
    assert "| ours | 50.0 | 100.0 | 0.0 | - | - | 66.7 | 54.2 | 57.1 |" in md
    assert "| ShowUI-2B (published) | 92.3 | 75.5 | 76.3 | 61.1 | 81.7 | 63.6 | 75.1 | - |" in md
    assert sorted(os.listdir(out)) == ["predictions.jsonl", "results.md", "summary.json"]  # no .tmp left


def test_bad_bench_and_records_fail_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def load_model(*args, **kw):
        raise AssertionError("the model must not load")
    monkeypatch.setattr(E.load, "load_model", load_model)
    folder = showui_dir(tmp_path, [rec("x", [20, 10, 40, 20]), rec("y", [20, 10, 40])])
    for argv, why in [(["--bench", "nope", "--data", str(folder)], "invalid choice: 'nope'"),
                      (["--bench", "screenspot", "--data", str(folder)], "record 1: bbox [20, 10, 40]"),
                      (["--bench", "screenspot"], "give --data DIR")]:
        with pytest.raises(SystemExit):
            E.main(["--model", "x"] + argv)
        assert why in capsys.readouterr().err


def test_real_model_path_on_the_tiny_qwen2_vl(tmp_path):
    folder = showui_dir(tmp_path / "ss", [rec("Save", [20, 10, 40, 20]),
                                          rec("Open", [100, 50, 60, 40], "web", "icon")])
    out = tmp_path / "out"
    s = E.main(["--model", os.path.join(ROOT, "tests", "fixtures", "qwen2_vl_tiny"), "--bench", "screenspot",
                "--data", str(folder), "--out", str(out), "--max-new-tokens", "6", "--min-pixels", str(56 * 56),
                "--max-pixels", str(112 * 112), "--device", "cpu"])
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert s["n"] == 2 and s["arch"] == "qwen2_vl" and s["system"] == "none" and len(rows) == 2
    for r in rows:  # each hit is what the ShowUI rule gives on the raw answer the model wrote
        p = B.showui_point(r["answer"])
        assert r["point"] == (list(p) if p else None) and r["hit"] == scorers.point_in_box(p, r["box"])
    assert s["scores"]["n"] == 2 and s["images"] == f"{56 * 56}..{112 * 112} pixels"


@pytest.mark.parametrize("arch,family,answers", [
    ("internvl", "vlaser", ["<point>[[150, 150]]</point>", "<point>[[900, 900]]</point>"]),
    ("mpgui", "mpgui", ["<ref>a</ref><box>[[100, 100, 200, 200]]</box>", "[[0, 0, 50, 50]]"])])
def test_internvl_families_through_the_cli(tmp_path, monkeypatch, arch, family, answers):
    """Vlaser's <point> prompt and MP-GUI's box prompt (scored at the box centre): first answer a hit, second a miss;
    a Qwen family on an InternVL model is refused."""
    folder = showui_dir(tmp_path / "ss", [rec("Save", [20, 10, 40, 20]), rec("Open", [20, 10, 40, 20])])
    m = SimpleNamespace(folder="stand-in", parameters=lambda: [], cfg=SimpleNamespace(
        arch=arch, is_internvl=True, is_mpgui=arch == "mpgui", template="internvl2_5", mpgui_mode="fusion"))
    asked = []

    def answer_batch(m, tok, prompts, a):
        asked.extend(q for q, _, _ in prompts)
        return answers[:len(prompts)], 0
    monkeypatch.setattr(E, "answer_batch", answer_batch)
    monkeypatch.setattr(E, "prompt_length", lambda *args: 0)  # no tokenizer: one length, file order
    monkeypatch.setattr(E.load, "load_model", lambda *args, **kw: m)
    monkeypatch.setattr(E.load, "load_tokenizer", lambda folder: None)
    argv = ["--model", "x", "--bench", "screenspot", "--data", str(folder), "--out", str(tmp_path / "out")]
    s = E.main(argv)
    prompt = B.VLASER_PROMPT if family == "vlaser" else B.BOX_PROMPT
    assert s["family"] == family and asked == [prompt.format("Save"), prompt.format("Open")]
    assert s["scores"]["mobile/text"] == 0.5 and s["system"] == "the template's default"
    with pytest.raises(ValueError, match=f"--family showui: its prompt does not fit a {arch} model"):
        E.main(argv + ["--family", "showui"])
