"""Evaluation driver: greedy generation from a checkpoint folder (or hub id), for one prompt or a whole benchmark.
With --data it checks each dataset of a meta json (a missing or unreadable image skips its sample), batches them
through the model, scores each with scorers.py (scorers.TASKS or --task NAME=KIND), writes predictions.jsonl and
summary.json.

    python eval.py --model tests/fixtures/qwen2_vl_tiny --image examples/screen.png --prompt "Where is Save?"
    python eval.py --model merged/benchmark --data training_data/benchmark_eval.json --out eval/benchmark
"""
import argparse
import math
import os
import time
from collections import Counter

import torch
from PIL import Image

import benchmarks
import data
import formats
import load
import navigation
import scorers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encode(m, tok, question, images, a, max_tiles=None):
    """Prompt token ids (T,) and vision inputs for one question (images without an <image> placeholder go first)."""
    if m.cfg.is_internvl:
        tiles = [data.internvl_tiles(im, max_tiles or a.max_tiles, m.cfg.vit_image_size) for im in images]
        enc = data.encode_internvl(tok, [{"from": "human", "value": question}], m.cfg.template,
                                   [len(t) for t in tiles], m.cfg.num_image_token,
                                   data.EXTRA_CONTEXT if m.cfg.is_mpgui else None, a.system)
        return enc["input_ids"], (dict(pixel_values=torch.cat(tiles)) if tiles else {})
    system = data.QWEN_SYSTEM if a.system is None else None if a.system.lower() == "none" else a.system
    question = question if "<image>" in question else "<image>" * len(images) + question
    enc = data.encode_qwen(tok, [{"role": "user", "content": question}], images, a.min_pixels, a.max_pixels, system)
    return enc["input_ids"], (dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
                              if images else {})


def answer_batch(m, tok, prompts, a):
    """Greedy answers for [(question, images, max_tiles)], batched with left padding, cut at the end-of-turn."""
    encs = [encode(m, tok, q, ims, a, max_tiles) for q, ims, max_tiles in prompts]
    T, device = max(len(ids) for ids, _ in encs), next(m.parameters()).device
    ids = torch.full((len(encs), T), m.cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(encs), T, dtype=torch.long)
    for i, (x, _) in enumerate(encs):
        ids[i, T - len(x):], mask[i, T - len(x):] = x, 1
    vision = {k: torch.cat([v[k] for _, v in encs if k in v]).to(device) for k in ("pixel_values", "image_grid_thw")
              if any(k in v for _, v in encs)}
    eos = tok.token_to_id("<|im_end|>")
    out = m.generate(ids.to(device), mask.to(device), max_new_tokens=a.max_new_tokens,
                     eos_token_ids=[eos] if eos is not None else None, **vision).tolist()
    return [tok.decode(o[:o.index(eos)] if eos in o else o, skip_special_tokens=True).strip() for o in out], T


def prompt_length(m, tok, a, question, paths, max_tiles=None):
    """encode's token count less the template's (fixed per run and image count; +-1), from image header sizes."""
    # Qwen: the smart_resize grid / 4; InternVL: num_image_token per internvl_grid tile (+ thumbnail)
    n = len(tok.encode(question.replace("<image>", ""), add_special_tokens=False).ids)
    for w, h in map(formats.header_size, paths):
        if m.cfg.is_internvl:
            c, r = data.internvl_grid(w, h, 1, max_tiles or a.max_tiles, m.cfg.vit_image_size)
            n += m.cfg.num_image_token * (c * r + (c * r > 1)) * (1 + m.cfg.is_mpgui)
        else:
            n += math.prod(data.smart_resize(h, w, 28, a.min_pixels, a.max_pixels)) // 28**2
    return n


def length_batches(m, tok, a, prompts):
    """[(question, image paths, max_tiles)] -> index batches, longest first (ties in file order): little padding."""
    order = sorted(range(len(prompts)), key=lambda j: -prompt_length(m, tok, a, *prompts[j]))  # stable: ties kept
    return [order[i:i + a.batch_size] for i in range(0, len(order), a.batch_size)]


def task_table(task_args):
    """Dataset name (lower case) -> scorer kind: scorers.TASKS overridden by --task NAME=KIND (bad: ValueError)."""
    tasks = dict(scorers.TASKS)
    for t in task_args:
        name, _, kind = t.partition("=")
        if not name or kind not in scorers.KINDS:
            raise ValueError(f"--task {t!r}: expected NAME=KIND, KIND one of {', '.join(scorers.KINDS)}")
        tasks[name.lower()] = kind  # evaluate looks datasets up by their lower-cased name
    return tasks


def read_dataset(spec, limit):
    """The first `limit` (0: all) lines of a dataset as dicts (line, id, question, answer, images) and the skipped
    "file:line: reason"s (a missing or unreadable image); no annotation file or a non-chat line is an error."""
    path, rows, skipped = spec["annotation"], [], []
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset {spec['name']!r}: no annotation file {path}")
    for k, value, why in formats.read_jsonl(path)[:limit or None]:  # the training reader's checks: bytes, JSON,
        item, images = formats.parse_line(value) if why is None else (None, why)  # turns, image field
        if item is None or item["conversations"][0]["from"] != "human":
            raise ValueError(f"{path}:{k}: {images if item is None else 'a system turn (eval.py takes --system)'}")
        paths = [os.path.join(spec["root"], p) for p in images]
        if why := next(filter(None, map(benchmarks.image_problem, paths)), None):
            skipped.append(f"{path}:{k}: {why}")
        else:
            rows.append(dict(line=k, id=item.get("id"), question=item["conversations"][0]["value"],
                             answer=item["conversations"][1]["value"], images=paths))
    return rows, skipped


def majority(kind, golds):
    """The score of always giving the most common gold answer: what a model that ignores the question gets."""
    return scorers.score(kind, [Counter(golds).most_common(1)[0][0]] * len(golds), golds)


def plan(a, specs=None):
    """Every --data dataset (or specs) read and checked before the model loads: [(spec, kind, rows, runs, skipped)]."""
    tasks, plans = task_table(a.task), []
    for spec in specs or formats.read_meta(a.data):
        kind = tasks.get(spec["name"].lower())
        if kind is None:
            raise ValueError(f"{a.data}: no scorer for dataset {spec['name']!r}; pass --task {spec['name']}=KIND")
        rows, skipped = read_dataset(spec, a.limit)
        print("".join(f"skip {s}\n" for s in skipped), end="")
        if not rows:
            raise ValueError(f"{a.data}: dataset {spec['name']!r}: no usable sample ({len(skipped)} skipped)")
        paths = [r["images"] for r in rows]
        runs = {"prediction": paths}  # run -> image paths per row; + prediction_shuffled_images
        if a.shuffled_images:  # each question asked of the next distinct screen of its dataset (a rotation)
            screens = list(dict.fromkeys(p for ps in paths for p in ps))
            if len(screens) < 2:
                raise ValueError(f"--shuffled-images: dataset {spec['name']!r} has {len(screens)} distinct "
                                 "image(s); the control needs two or more")
            nxt = dict(zip(screens, screens[1:] + screens[:1]))
            runs["prediction_shuffled_images"] = [[nxt[p] for p in ps] for ps in paths]
        majority(kind, [r["answer"] for r in rows])  # so that a gold answer the scorer cannot read fails now
        plans.append((spec, kind, rows, runs, skipped))
    return plans


def evaluate(m, tok, a, plans=None):
    """Every planned dataset -> predictions.jsonl + summary.json (scores, majority baseline, skips, settings)."""
    # both written atomically once all are done: a failed run leaves the previous run's files as they were
    os.makedirs(a.out, exist_ok=True)
    summary = dict(model=m.folder, arch=m.cfg.arch, template=m.cfg.template or "chatml", padding="left",
                   decoding=f"greedy, max_new_tokens {a.max_new_tokens}, stop at <|im_end|>", system=a.system,
                   images=f"max {a.max_tiles} tiles + thumbnail" if m.cfg.is_internvl
                   else f"{a.min_pixels}..{a.max_pixels} pixels", datasets={})
    if m.cfg.is_mpgui:
        summary["mpgui_mode"] = m.cfg.mpgui_mode
    records = []
    for spec, kind, rows, runs, skipped in plans or plan(a):
        max_tiles = spec["max_dynamic_patch"]  # the dataset's own tile budget; None: --max-tiles
        preds, bad = {}, {}  # bad: row -> why, run by run in file order, as unsorted
        where = lambda j: f"{spec['annotation']}:{rows[j]['line']}"
        for k, imgs in runs.items():  # a row whose pixels do not decode is skipped here, and not asked in later runs
            asks = [(r["question"], imgs[j], max_tiles) for j, r in enumerate(rows)]
            progress = spec["name"] + k.removeprefix("prediction")  # e.g. "re", "re_shuffled_images"
            preds[k], failed = benchmarks.answer_each(m, tok, a, asks, where, answer_batch, length_batches, progress,
                                                      skip=bad)
            bad.update(sorted(failed.items()))
        skipped = list(skipped) + list(bad.values())
        keep = [j for j in range(len(rows)) if j not in bad]  # answered in every run
        if not keep:
            raise ValueError(f"{a.data}: dataset {spec['name']!r}: every sample was skipped")
        golds = [rows[j]["answer"] for j in keep]
        records += [dict(dataset=spec["name"], **{c: rows[j][c] for c in ("id", "question", "answer")},
                         **{k: v[j] for k, v in preds.items()}) for j in keep]
        r = summary["datasets"][spec["name"]] = {"score" if k == "prediction" else k.removeprefix("prediction_"):
                                                 scorers.score(kind, [v[j] for j in keep], golds)
                                                 for k, v in preds.items()}  # score[, shuffled_images]
        r.update(scorer=kind, n=len(keep), majority_baseline=majority(kind, golds), skipped=len(skipped),
                 skipped_samples=skipped)
    benchmarks.write_outputs(a.out, records, summary)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder or hub id (config.json + safetensors)")
    p.add_argument("--image", action="append", default=[], help="screenshot path; repeat for several")
    p.add_argument("--prompt", help="one question (with --image); or evaluate a benchmark with --data")
    p.add_argument("--data", help="meta json of jsonl benchmarks (InternVL format) to evaluate")
    p.add_argument("--out", default="eval_out", help="--data: folder for predictions.jsonl and summary.json")
    p.add_argument("--task", action="append", default=[],
                   help=f"--data: NAME=KIND, the scorer of dataset NAME; KIND one of {' '.join(scorers.KINDS)}")
    p.add_argument("--limit", type=int, default=0, help="--data: first N lines of each dataset (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--system", default=None, help="system message (default: the family's); 'none' omits Qwen's")
    p.add_argument("--min-pixels", type=int, default=256 * 28 * 28, help="Qwen pixel budget (ShowUI/TongUI: 256)")
    p.add_argument("--max-pixels", type=int, default=1344 * 28 * 28, help="Qwen pixel budget (ShowUI/TongUI: 1344)")
    p.add_argument("--max-tiles", type=int, default=12, help="InternVL: max 448-px tiles per image (+ thumbnail)")
    p.add_argument("--max-new-tokens", type=int, help="default: the source's, 128 for screenspot and navigation "
                   "(ShowUI's), 100 for vlaser_points (Vlaser's), else 32")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU; README: speed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shuffled-images", action="store_true", help="--data: also score every question asked of "
                   "another screen of its dataset, to show how much of a score comes from the image, not the text")
    p.add_argument("--mpgui-mode", choices=["textual", "graphical", "spatial", "fusion", "mean"],
                   help="MP-GUI: what fills the EXTRA tokens (default fusion, the released inference); a perceiver "
                        "scores a model after its own stage (1-3), before the fusion gate is trained; mean: the three "
                        "perceivers' average, the paper's ablation")
    benchmarks.add_args(p)
    navigation.add_args(p)
    a = p.parse_args(argv)
    if a.max_new_tokens is None:
        a.max_new_tokens = 100 if a.bench == "vlaser_points" else 128 if a.bench and a.bench != "mpgui" else 32
    bench_module = navigation if a.bench in navigation.BENCHES else benchmarks
    try:  # a wrong --task, a broken dataset or image fail here, not after the model is loaded and a dataset decoded
        task_table(a.task)
        if a.visualize < 0 or a.visualize and not a.bench:  # pictures are drawn of a benchmark's rows
            raise ValueError(f"--visualize {a.visualize}: give N >= 0, with --bench NAME")
        bench = bench_module.plan(a) if a.bench else None  # --bench NAME --data DIR: read in the upstream layout
        plans = plan(a, bench) if a.bench == "mpgui" else plan(a) if a.data and not a.bench else None
    except (ValueError, OSError) as e:
        p.error(str(e))
    for why in filter(None, map(benchmarks.image_problem, a.image)):
        p.error(f"--image: {why}")
    t0 = time.time()
    try:
        m = load.load_model(a.model, dtype=DTYPES[a.dtype], device=a.device, mpgui_mode=a.mpgui_mode)
    except FileNotFoundError as e:  # no such folder, or no config.json in it; the hub's errors are one line already
        raise SystemExit(f"eval.py: {e}") from None
    if a.mpgui_mode and not m.cfg.is_mpgui:
        p.error(f"--mpgui-mode: {a.model} is {m.cfg.arch}, not an MP-GUI checkpoint")
    if a.compile:  # dynamic: the cached length grows by one each step
        m.decode_step = torch.compile(m.decode_step, dynamic=True)
    tok = load.load_tokenizer(m.folder)
    print(f"model {m.cfg.arch} from {m.folder} ({sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params, "
          f"{a.dtype}, {a.device})")
    if a.bench and a.bench != "mpgui":  # mpgui: MP-GUI's eight tasks are --data datasets, by name
        return bench_module.run(m, tok, a, bench, answer_batch, length_batches)
    if a.data:
        summary = evaluate(m, tok, a, plans)
        for name, r in summary["datasets"].items():
            fmt = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items() if isinstance(v, float))
            shuffled = f"shuffled images: {fmt(r['shuffled_images'])}; " if "shuffled_images" in r else ""
            print(f"{name:<16} n={r['n']:<5} {fmt(r['score'])}   ({shuffled}majority answer: "
                  f"{fmt(r['majority_baseline'])}; {r['skipped']} skipped)")
        if a.bench:  # results.md: the paper's eight metrics beside MP-GUI's published row
            summary["paper_metrics"] = benchmarks.mpgui_table(summary, a.out)
        return summary
    if not a.prompt:
        p.error("give --prompt (with --image) or --data")
    images = [Image.open(path) for path in a.image]
    (text,), n_prompt = answer_batch(m, tok, [(a.prompt, images, None)], a)
    print(f"prompt {n_prompt} tokens, {len(images)} image(s); {time.time() - t0:.1f}s")
    print(f"answer: {text}")
    return text


if __name__ == "__main__":
    main()
