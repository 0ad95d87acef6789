"""eval.py --bench ... --visualize N: benchmarks.visualize on hand-made rows (files, names, pixels at hand-computed
places), through the CLI with MP-GUI's predicted box, and the README's ScreenSpot example table kept true by running
the README's own command."""
import json
import os
import re
import shlex
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import benchmarks as B
import eval as E
from test_bench import showui_dir, rec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHITE = (255, 255, 255)


def px(path, x, y):
    return Image.open(path).convert("RGB").getpixel((x, y))


def caption_hue(path, top):
    """'red' or 'blue': the text of the caption strip below row `top` (anti-aliased, so by its dominant channel)."""
    a = np.asarray(Image.open(path).convert("RGB"))[top:].astype(int)
    ink = a[(a != 255).any(-1)]
    assert len(ink), "no caption drawn"
    red, blue = (ink[:, 0] > ink[:, 2]).all(), (ink[:, 2] > ink[:, 0]).all()
    assert red != blue, "the caption is not in one colour"
    return "red" if red else "blue"


@pytest.fixture
def rows(tmp_path):
    Image.new("RGB", (1600, 800), "white").save(tmp_path / "big.png")  # drawn at 800 x 400: scale 0.5
    Image.new("RGB", (200, 100), "white").save(tmp_path / "small.png")  # never upscaled
    big, small, box = str(tmp_path / "big.png"), str(tmp_path / "small.png"), (0.1, 0.2, 0.3, 0.4)
    row = lambda split, point, hit, **kw: dict(dict(image=big, instruction="go", split=split, box=box, point=point,
                                                    hit=hit), **kw)
    return [row("mobile", (0.2, 0.3), True), row("mobile", (0.9, 0.9), False),
            row("web", None, False, pred_box=(0.7, 0.7, 0.5, 0.5)), row("desktop", (0.2, 0.3), True, image=small),
            row("web", (0.0, 0.0), False), row("web", (0.0, 0.0), False), row("web", (0.0, 0.0), False)]


def test_pictures_files_names_and_pixels(rows, tmp_path):
    folder = tmp_path / "out" / "pictures"
    B.visualize(rows, str(folder), 4)
    assert sorted(os.listdir(folder)) == ["000_hit.png", "001_miss.png", "002_miss.png", "003_hit.png",
                                          "misses_mobile.png", "misses_web.png"]  # desktop: no miss, no grid
    assert os.listdir(tmp_path / "out") == ["pictures"]  # no pictures.tmp left
    # 1600 x 800 drawn at 800 x 400, a one-line caption strip (4 + 12 px) under it; the 200 x 100 one kept as it is
    assert Image.open(folder / "000_hit.png").size == (800, 416)
    assert Image.open(folder / "003_hit.png").size == (200, 116)
    f = folder / "000_hit.png"  # gold box (0.1, 0.2, 0.3, 0.4) -> x 80..240, y 80..160, 2 px wide inside
    assert px(f, 80, 120) == px(f, 81, 120) == px(f, 240, 100) == px(f, 160, 80) == B.GOLD
    assert px(f, 79, 120) == px(f, 83, 120) == px(f, 100, 100) == WHITE
    assert px(f, 160, 120) == B.HIT and px(f, 400, 200) == WHITE  # the point (0.2, 0.3) -> (160, 120), a hit
    assert caption_hue(f, 400) == "blue"
    f = folder / "001_miss.png"
    assert px(f, 720, 360) == B.MISS and px(f, 160, 120) == WHITE and caption_hue(f, 400) == "red"
    f = folder / "002_miss.png"  # no point; the predicted box, reversed, (0.7, 0.7, 0.5, 0.5) -> x 400..560, y 200..280
    assert px(f, 400, 240) == px(f, 560, 240) == px(f, 480, 280) == B.MISS and px(f, 480, 240) == WHITE
    assert px(f, 80, 120) == B.GOLD
    f = folder / "003_hit.png"  # scale 1: the gold box x 20..60, y 20..40; the point at (40, 30)
    assert px(f, 20, 25) == B.GOLD and px(f, 40, 30) == B.HIT
    # grids: thumbnails at 320 x 160 (+16 caption), cells 4 px larger, three a row; web has 4 misses -> 3 x 2 cells
    assert Image.open(folder / "misses_mobile.png").size == (324, 180)
    f = folder / "misses_web.png"
    assert Image.open(f).size == (3 * 324, 2 * 180)
    assert px(f, 32, 48) == B.GOLD  # first cell, gold box at scale 0.2: x 32..96, y 32..64
    assert px(f, 324 + 32, 48) == B.GOLD and px(f, 324 + 1, 1) == B.MISS  # second cell: the point at (0, 0)


def test_a_rerun_replaces_the_pictures_and_misses_are_capped(rows, tmp_path):
    folder = tmp_path / "pictures"
    B.visualize(rows, str(folder), 7)
    assert len(os.listdir(folder)) == 7 + 2
    B.visualize([dict(r, hit=True) for r in rows[:2]], str(folder), 1)  # no miss now: the old grids go too
    assert os.listdir(folder) == ["000_hit.png"]
    B.visualize(rows[4:] * 4, str(folder), 0)  # 12 web misses, the first 9 drawn (the default): 3 x 3 cells
    assert os.listdir(folder) == ["misses_web.png"] and Image.open(folder / "misses_web.png").size == (972, 540)
    B.visualize(rows[4:] * 4, str(folder), 0, misses=5)  # the first 5: 3 + 2 cells, the sixth left white
    f = folder / "misses_web.png"
    assert Image.open(f).size == (972, 360)
    assert px(f, 324 + 32, 180 + 48) == B.GOLD and px(f, 2 * 324 + 32, 180 + 48) == WHITE


def test_cli_visualize_with_mpgui_boxes_and_bad_arguments(tmp_path, monkeypatch, capsys):
    folder = showui_dir(tmp_path / "ss", [rec("Save", [20, 10, 40, 20]), rec("Open", [20, 10, 40, 20])])
    m = SimpleNamespace(folder="stand-in", parameters=lambda: [], cfg=SimpleNamespace(
        arch="mpgui", is_internvl=True, is_mpgui=True, template="internvl2_5", mpgui_mode="fusion"))
    answers = ["<ref>a</ref><box>[[100, 100, 200, 200]]</box>", "[[0, 0, 100, 100]]"]  # centres: hit, miss
    monkeypatch.setattr(E, "answer_batch", lambda m, tok, prompts, a: (answers[:len(prompts)], 0))
    monkeypatch.setattr(E, "prompt_length", lambda *args: 0)  # no tokenizer: one length, file order
    monkeypatch.setattr(E.load, "load_model", lambda *args, **kw: m)
    monkeypatch.setattr(E.load, "load_tokenizer", lambda folder: None)
    out = tmp_path / "out"
    argv = ["--model", "x", "--bench", "screenspot", "--data", str(folder), "--out", str(out)]
    E.main(argv + ["--visualize", "5"])
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [r["pred_box"] for r in rows] == [[0.1, 0.1, 0.2, 0.2], [0.0, 0.0, 0.1, 0.1]]
    pics = out / "pictures"
    assert sorted(os.listdir(pics)) == ["000_hit.png", "001_miss.png", "misses_mobile.png"]  # 5 asked, 2 rows
    f = pics / "000_hit.png"  # 200 x 100 at scale 1: gold box x 20..60, y 10..30; predicted box x 20..40, y 10..20
    assert px(f, 60, 25) == B.GOLD and px(f, 40, 15) == B.HIT and px(f, 30, 15) == B.HIT  # its right edge, the dot
    f = pics / "001_miss.png"  # predicted box x 0..20, y 0..10, its centre (10, 5) a red dot
    assert px(f, 20, 5) == B.MISS and px(f, 10, 5) == B.MISS and px(f, 60, 25) == B.GOLD
    for extra, why in [(["--visualize", "-1"], "--visualize -1: give N >= 0"), (["--visualize", "2"], None)]:
        a = ["--model", "x", "--data", str(folder)] if why is None else argv
        monkeypatch.setattr(E.load, "load_model", lambda *args, **kw: pytest.fail("the model must not load"))
        with pytest.raises(SystemExit):
            E.main(a + extra)
        assert (why or "with --bench NAME") in capsys.readouterr().err


def readme_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    cmd = re.search(r"^python eval.py --model tests/fixtures/qwen2_vl_tiny --bench screenspot .*$", readme, re.M)
    assert cmd, "README: no ScreenSpot example command on the tiny fixture"
    return readme, cmd.group(0)


def test_readme_screenspot_example_is_what_the_command_prints(tmp_path, monkeypatch):
    """The README's example table is results.md of its own command, and its picture one of the pictures it draws."""
    readme, cmd = readme_command()
    argv = shlex.split(cmd)[2:]
    argv[argv.index("--out") + 1] = str(tmp_path / "out")  # the same run, written here instead of eval/screenspot
    monkeypatch.chdir(ROOT)
    E.main(argv + ["--device", "cpu"])
    table = [line for line in (tmp_path / "out" / "results.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 4 and "\n".join(table) in readme
    shown = re.search(r"!\[[^]]*\]\((examples/screenspot_example\.png)\)", readme)
    assert shown, "README: no example picture"
    produced = sorted(os.listdir(tmp_path / "out" / "pictures"))
    assert len([p for p in produced if not p.startswith("misses_")]) == int(argv[argv.index("--visualize") + 1])
    assert Image.open(os.path.join(ROOT, shown.group(1))).size == Image.open(tmp_path / "out" / "pictures" /
                                                                              "000_miss.png").size
