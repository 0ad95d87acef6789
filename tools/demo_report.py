"""demo.sh's report: the final table (each benchmark task's score beside its shuffled-image control and the majority
answer), the pictures (held-out screens with predicted and gold boxes; a loss-curve PNG per stage), and the ablation
table of `demo.sh --ablations` (mean and spread over seeds, relative drop from the full recipe beside the paper's).

    python tools/demo_report.py table demo/eval [--margin 0.1]
    python tools/demo_report.py pictures demo
    python tools/demo_report.py ablations demo/ablations
"""
import argparse
import glob
import json
import os
import statistics
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks  # noqa: E402
import scorers  # noqa: E402
from tools import plot, world  # noqa: E402

# the figure each task is judged by: exact-match accuracy, or the share of boxes at IoU >= 0.5
METRIC = dict(bbox2text="accuracy", icon_grounding="acc@0.5", relation="accuracy", color_qa="accuracy")
# the MP-GUI paper's relative drops (arXiv 2503.14021, its ablation table): no fusion stage, perceivers' mean, one mix
PAPER = {"no_fusion": "WC -6.3%, RE -8.1%, CQA -4.5%", "mean_gate": "WC -5.3%, RE -7.1%, CQA -2.1%",
         "one_mix": "every metric; largest WS -2.6%, QAS -2.4%"}


def final_rows(eval_dir):
    """[(task, score, shuffled, majority)] of the benchmark tasks in eval_dir/summary.json, in world.BENCHMARK order."""
    got = json.load(open(os.path.join(eval_dir, "summary.json")))["datasets"]
    if missing := [t for t in world.BENCHMARK if t not in got or "shuffled_images" not in got[t]]:
        raise ValueError(f"{eval_dir}/summary.json: no score with the shuffled-image control for {missing}")
    return [(t, *(got[t][k][METRIC[t]] for k in ("score", "shuffled_images", "majority_baseline")))
            for t in world.BENCHMARK]


def table(eval_dir, margin=None):
    """Prints the final table; with margin, returns False when a task is not that far above both controls."""
    ok = True
    print(f"    {'task':<15} {'metric':<9} {'score':>6} {'shuffled':>9} {'majority':>9} {'margin':>7}")
    for t, s, sh, mj in final_rows(eval_dir):
        m = s - max(sh, mj)
        bad = margin is not None and m < margin
        ok &= not bad
        print(f"    {t:<15} {METRIC[t]:<9} {s:6.3f} {sh:9.3f} {mj:9.3f} {m:+7.3f}" + ("  < margin" if bad else ""))
    return ok


def pictures(out, n=4):
    """out/pictures/: the final model's icon boxes on the first n held-out screens (gold green, prediction blue when
    IoU >= 0.5, else red; boxes.png all in one, boxes/ one by one) and loss_STAGE.png per stage run in out/runs."""
    folder = os.path.join(out, "pictures")
    data = os.path.join(out, "data")
    items = {json.loads(line)["id"]: json.loads(line) for line in open(os.path.join(data, "eval_icon_grounding.jsonl"))}
    rows = []
    for line in open(os.path.join(out, "eval", "predictions.jsonl")):
        r = json.loads(line)
        if r["dataset"] != "icon_grounding":
            continue
        gold, pred = scorers.parse_box(r["answer"]), scorers.parse_box(r["prediction"])
        rows.append(dict(image=os.path.join(data, items[r["id"]]["image"]), split="held-out", box=gold, pred_box=pred,
                         instruction=r["question"].removeprefix("<image>\n"), answer=r["prediction"],
                         point=benchmarks.box_centre(r["prediction"]),
                         hit=bool(pred) and scorers.iou(pred, gold) >= 0.5))
    screens = list(dict.fromkeys(r["image"] for r in rows))[:n]
    shown = [r for r in rows if r["image"] in screens]
    benchmarks.visualize(shown, os.path.join(folder, "boxes"), len(shown))  # one file per question, misses' grid
    thumbs = [benchmarks.picture(r, 240) for r in shown]  # and all of them in one picture, four a row
    w, h = (max(t.size[i] for t in thumbs) + 4 for i in (0, 1))
    grid = Image.new("RGB", (w * min(4, len(thumbs)), h * -(-len(thumbs) // 4)), "white")
    for k, t in enumerate(thumbs):
        grid.paste(t, (w * (k % 4), h * (k // 4)))
    grid.save(os.path.join(folder, "boxes.png"))
    for run in sorted(glob.glob(os.path.join(out, "runs", "*", "metrics.jsonl"))):
        stage = os.path.basename(os.path.dirname(run))
        plot.plot([run], os.path.join(folder, f"loss_{stage}.png"), ["loss"], names=[stage])
    return folder


def ablations(folder):
    """folder/VARIANT/seedS/eval/summary.json -> the table: per variant and task the mean over seeds (spread:
    min-max), the relative change from the full recipe, and the paper's drops."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "seed*", "eval"))):
        variant = os.path.basename(os.path.dirname(os.path.dirname(path)))
        runs.setdefault(variant, []).append({t: s for t, s, _, _ in final_rows(path)})
    if "full" not in runs:
        raise ValueError(f"{folder}: no full/seed*/eval to compare the ablations with")
    mean = {v: {t: statistics.mean(r[t] for r in rs) for t in world.BENCHMARK} for v, rs in runs.items()}
    print(f"    {'variant':<10} {'seeds':>5} " + " ".join(f"{t:>21}" for t in world.BENCHMARK) + "   paper's drop")
    for v in ["full"] + [v for v in runs if v != "full"]:
        cells = []
        for t in world.BENCHMARK:
            lo, hi = min(r[t] for r in runs[v]), max(r[t] for r in runs[v])
            full = mean["full"][t]
            rel = f" {100 * (mean[v][t] / full - 1):+.0f}%" if v != "full" and full else ""
            cells.append(f"{mean[v][t]:.2f} ({lo:.2f}-{hi:.2f}){rel}")
        print(f"    {v:<10} {len(runs[v]):>5} " + " ".join(f"{c:>21}" for c in cells) + f"   {PAPER.get(v, '')}")
    return mean


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="the final table of an eval.py --shuffled-images folder")
    t.add_argument("eval_dir")
    t.add_argument("--margin", type=float, help="exit 1 unless every task beats both controls by this much")
    sub.add_parser("pictures", help="OUT/pictures from a demo folder").add_argument("out")
    sub.add_parser("ablations", help="the table of OUT/ablations").add_argument("folder")
    a = p.parse_args()
    try:
        if a.cmd == "table":
            sys.exit(0 if table(a.eval_dir, a.margin) else 1)
        print("wrote", pictures(a.out)) if a.cmd == "pictures" else ablations(a.folder)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"demo_report.py: {e}")
