"""Training curves of one or several runs, one panel per metric, drawn with PIL into a PNG (no plotting library).

    python tools/plot.py runs/textual runs/graphical -o curves.png
    python tools/plot.py runs/fusion --metrics loss,grad_norm -o fusion.png

Each RUN is a folder with train.py's metrics.jsonl (or that file itself); the runs share each panel's axes, one colour
a run. A metric a run never logged is left out of its panel; a metric no run logged is an error.
"""
import argparse
import json
import os

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]
W, H, LEFT, BOTTOM, PAD = 520, 260, 62, 28, 12  # one panel, px; LEFT and BOTTOM hold the tick labels


def read_metrics(run):
    """[(step, {metric: value})] of a run folder's metrics.jsonl; a bad line names the file and line."""
    path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
    rows = []
    with open(path) as f:
        for k, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                rows.append((int(r["step"]), {n: float(v) for n, v in r.items() if isinstance(v, (int, float))}))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{k}: not a metrics row with a step ({e})") from None
    return rows


def label(v):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def panel(metric, series):
    """One metric's panel: series = [(name, colour, [(step, value)])], at least one point in all."""
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    pts = [p for _, _, s in series for p in s]
    (x0, x1), (y0, y1) = [(min(p[i] for p in pts), max(p[i] for p in pts)) for i in (0, 1)]
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-9)  # a flat line still plots
    box = (LEFT, 2 * PAD, W - PAD, H - BOTTOM)
    sx = lambda x: box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0])
    sy = lambda y: box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1])
    d.rectangle(box, outline=(0, 0, 0))
    for y in (y0, (y0 + y1) / 2, y1):
        d.text((4, sy(y) - 5), label(y), fill=(0, 0, 0))
        d.line([(box[0], sy(y)), (box[2], sy(y))], fill=(225, 225, 225))
    for x in (x0, (x0 + x1) / 2, x1):
        d.text((sx(x) - 10, box[3] + 4), f"{x:.0f}", fill=(0, 0, 0))
    d.text((box[0], 6), metric, fill=(0, 0, 0))
    for k, (name, colour, s) in enumerate(series):
        xy = [(sx(x), sy(y)) for x, y in s]
        d.line(xy, fill=colour, width=2) if len(xy) > 1 else d.ellipse(
            [xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        d.text((box[2] - 8 - 7 * len(name), box[1] + 4 + 12 * k), name, fill=colour)
    d.text((box[2] - 30, H - 12), "step", fill=(0, 0, 0))
    return im


def plot(runs, out, metrics=("loss", "lr", "grad_norm", "tok_per_s"), names=None):
    """Draws `metrics` of `runs` (folders or metrics.jsonl files) into the PNG `out`, panels two a row."""
    data = [read_metrics(r) for r in runs]
    names = names or [os.path.basename(os.path.normpath(r)) for r in runs]
    panels = []
    for metric in metrics:
        series = [(n, COLOURS[k % len(COLOURS)], [(s, v[metric]) for s, v in rows if metric in v])
                  for k, (n, rows) in enumerate(zip(names, data))]
        series = [s for s in series if s[2]]
        if not series:
            raise ValueError(f"no run logged {metric!r} ({', '.join(runs)})")
        panels.append(panel(metric, series))
    cols = min(2, len(panels))
    sheet = Image.new("RGB", (W * cols, H * -(-len(panels) // cols)), "white")
    for k, p in enumerate(panels):
        sheet.paste(p, (W * (k % cols), H * (k // cols)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sheet.save(out)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder (with metrics.jsonl) or a metrics.jsonl")
    p.add_argument("-o", "--out", default="curves.png", help="the PNG to write (default curves.png)")
    p.add_argument("--metrics", default="loss,lr,grad_norm,tok_per_s", help="comma-separated metrics.jsonl keys")
    a = p.parse_args()
    try:
        print("wrote", plot(a.runs, a.out, [m for m in a.metrics.split(",") if m]))
    except (OSError, ValueError) as e:
        raise SystemExit(f"plot.py: {e}")
