"""tools/plot.py (training curves drawn with PIL) and tools/demo_report.py (demo.sh's final table, margins, ablation
table, box pictures) on hand-made metrics, summaries and predictions."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tools import demo_report, plot, world


def write_run(folder, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(folder)


def colour_at(a, colour):
    return np.argwhere((a == np.array(colour)).all(-1))  # (y, x) of every pixel of exactly that colour


def test_plot_draws_each_run_in_its_colour_on_shared_axes(tmp_path):
    a = write_run(tmp_path / "a", [dict(step=s, loss=4.0 - s, lr=1e-3) for s in range(1, 4)])  # falls 3 -> 1
    b = write_run(tmp_path / "b", [dict(step=s, loss=2.0) for s in range(1, 7)])  # flat at 2, no lr
    out = plot.plot([a, b], str(tmp_path / "p.png"), ["loss", "lr"])
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (plot.H, 2 * plot.W, 3)  # two panels side by side
    loss = img[:, :plot.W]
    red, blue = colour_at(loss, plot.COLOURS[1]), colour_at(loss, plot.COLOURS[0])
    # a's line falls from the top-left (loss 3 at step 1) to the middle of the x axis (step 3 of 6), b's is level
    top, bottom = 2 * plot.PAD, plot.H - plot.BOTTOM
    line_a = blue[blue[:, 1] < plot.W // 2]
    assert line_a[:, 0].min() <= top + 3 and line_a[line_a[:, 1].argmax(), 0] >= bottom - 3
    y_b = (bottom - (2.0 - 1.0) / (3.0 - 1.0) * (bottom - top))  # loss 2 on the shared 1..3 axis
    assert abs(np.median(red[red[:, 1] > plot.LEFT + 20][:, 0]) - y_b) <= 2
    assert len(colour_at(img[:, plot.W:], plot.COLOURS[0])) and not len(colour_at(img[:, plot.W:], plot.COLOURS[1]))
    with pytest.raises(ValueError, match="no run logged 'eval_score'"):
        plot.plot([a, b], str(tmp_path / "q.png"), ["eval_score"])
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"a/metrics.jsonl:2: not a metrics row"):
        plot.plot([a], str(tmp_path / "r.png"))


def summary(folder, scores):
    """eval.py's summary.json for the benchmark tasks: task -> (score, shuffled, majority) in the task's metric."""
    ds = {t: {k: {demo_report.METRIC[t]: v} for k, v in zip(("score", "shuffled_images", "majority_baseline"), s)}
          for t, s in scores.items()}
    os.makedirs(folder, exist_ok=True)
    json.dump(dict(datasets=ds), open(os.path.join(folder, "summary.json"), "w"))
    return str(folder)


def test_table_holds_every_task_to_the_margin_over_both_controls(tmp_path, capsys):
    good = {t: (0.8, 0.3, 0.5) for t in world.BENCHMARK}
    assert demo_report.table(summary(tmp_path / "ok", good), margin=0.3)
    assert "+0.300" in capsys.readouterr().out
    bad = dict(good, relation=(0.8, 0.6, 0.5))  # the shuffled control within 0.2: read from the question
    assert not demo_report.table(summary(tmp_path / "bad", bad), margin=0.3)
    assert "< margin" in [ln for ln in capsys.readouterr().out.splitlines() if "relation" in ln][0]
    with pytest.raises(ValueError, match="shuffled-image control for \\['color_qa'\\]"):
        demo_report.final_rows(summary(tmp_path / "part", {t: good[t] for t in world.BENCHMARK[:-1]}))


def test_ablation_table_means_spreads_and_relative_change(tmp_path, capsys):
    for variant, seeds in (("full", (0.8, 0.6)), ("mean_gate", (0.35, 0.35))):
        for k, v in enumerate(seeds):
            summary(tmp_path / variant / f"seed{k}" / "eval", {t: (v, 0.1, 0.2) for t in world.BENCHMARK})
    mean = demo_report.ablations(str(tmp_path))
    assert mean["full"]["relation"] == pytest.approx(0.7) and mean["mean_gate"]["relation"] == pytest.approx(0.35)
    out = capsys.readouterr().out
    assert "0.70 (0.60-0.80)" in out and "0.35 (0.35-0.35) -50%" in out and demo_report.PAPER["mean_gate"] in out


def test_pictures_draw_gold_and_predicted_boxes_and_loss_curves(tmp_path):
    world.build(str(tmp_path / "data"), n_train=3, n_eval=2)
    items = [json.loads(line) for line in open(tmp_path / "data" / "eval_icon_grounding.jsonl")]
    preds = [dict(dataset="icon_grounding", id=it["id"], question=it["conversations"][0]["value"],
                  answer=it["conversations"][1]["value"], prediction=p)
             for it, p in zip(items, [items[0]["conversations"][1]["value"], "[[0, 0, 100, 100]]", "no box"])]
    os.makedirs(tmp_path / "eval")
    with open(tmp_path / "eval" / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in preds)
    write_run(tmp_path / "runs" / "textual", [dict(step=s, loss=1.0 / s) for s in range(1, 5)])
    folder = demo_report.pictures(str(tmp_path))
    names = sorted(os.listdir(os.path.join(folder, "boxes")))
    assert names[:len(preds)] == ["000_hit.png", "001_miss.png", "002_miss.png"][:len(preds)]
    assert os.path.isfile(os.path.join(folder, "loss_textual.png")) and os.path.isfile(os.path.join(folder, "boxes.png"))
