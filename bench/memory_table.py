"""The README's predicted-memory table: tools/dry_run.py's simulated step for every recipe config at real sizes.

    python bench/memory_table.py [--ranks 1 8] [--configs configs/textual.json ...] [--jobs 2]

Each cell is rank 0's peak GiB (FSDP2's memory tracker on fake tensors, one step after a first) for the recipe as
written (bf16 frozen base, activation checkpointing on), with an fp32 base, and with activation checkpointing off.
Every cell runs in a fresh process (about 5 GB of host memory each: the new parts and adapters are real tensors),
--jobs at a time; its time is printed beside the table on stderr."""
import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from tools import dry_run  # noqa: E402

RECIPES = ["textual", "graphical", "spatial", "fusion", "benchmark", "showui_grounding", "showui_navigation",
           "tongui_3b", "vlaser_2b"]
VARIANTS = (("as written", []), ("fp32 base", ["--base_dtype=float32"]),
            ("no AC", ["--activation_checkpointing=False"]))


def cell(config, ranks, over):
    t0 = time.time()
    r = dry_run.simulate(train.load_config(config, list(over)), ranks)
    return r["peak"], time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    p.add_argument("--configs", nargs="+", default=[os.path.join(ROOT, "configs", f"{n}.json") for n in RECIPES])
    p.add_argument("--jobs", type=int, default=2, help="cells simulated at once")
    a = p.parse_args(argv)
    cols = [f"{n} GPU{'s' * (n > 1)}, {v}" for n in a.ranks for v, _ in VARIANTS]
    print("| config | base | micro_batch x max_length | " + " | ".join(cols) + " | largest part (first cell) |")
    print("|---|---|---|" + "---|" * len(cols) + "---|", flush=True)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=spawn, max_tasks_per_child=1) as pool:
        jobs = {c: [pool.submit(cell, c, n, over) for n in a.ranks for _, over in VARIANTS] for c in a.configs}
        for config, futures in jobs.items():
            peaks = [f.result() for f in futures]
            first = peaks[0][0]
            top = max((k for k in first if k != "Total"), key=first.get)
            cfg = train.load_config(config)
            print(f"| {os.path.basename(config)} | {os.path.basename(cfg.base)} | {cfg.micro_batch} x "
                  f"{cfg.max_length} | " + " | ".join(f"{pk['Total'] / 2 ** 30:.1f}" for pk, _ in peaks)
                  + f" | {top} {first[top] / 2 ** 30:.1f} |", flush=True)
            print(f"{os.path.basename(config)}: " + ", ".join(f"{t:.0f} s" for _, t in peaks), file=sys.stderr,
                  flush=True)


if __name__ == "__main__":
    main()
