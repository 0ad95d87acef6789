"""The README's predicted-memory table: tools/dry_run.py's simulated step for every recipe config at real sizes.

    python bench/memory_table.py [--ranks 1 8] [--configs configs/textual.json ...] [--variants]

Each cell is rank 0's peak GiB (FSDP2's memory tracker on fake tensors, one step after a first). --variants adds,
for the first config, the fp32 base and activation checkpointing off."""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from tools import dry_run  # noqa: E402

RECIPES = ["textual", "graphical", "spatial", "fusion", "benchmark", "showui_grounding", "showui_navigation",
           "tongui_3b", "vlaser_2b"]


def peak(config, ranks, overrides=()):
    r = dry_run.simulate(train.load_config(config, list(overrides)), ranks)
    return r["peak"]["Total"] / 2 ** 30, r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    p.add_argument("--configs", nargs="+", default=[os.path.join(ROOT, "configs", f"{n}.json") for n in RECIPES])
    p.add_argument("--variants", action="store_true")
    a = p.parse_args(argv)
    print("| config | base | micro_batch x max_length | " + " | ".join(f"{n} GPU{'s' * (n > 1)}" for n in a.ranks)
          + " | largest part at 8 GPUs |")
    print("|---|---|---|" + "---|" * len(a.ranks) + "---|")
    for config in a.configs:
        t0, cells = time.time(), []
        for n in a.ranks:
            gib, r = peak(config, n)
            cells.append(f"{gib:.1f}")
        cfg = train.load_config(config)
        top = max((k for k in r["peak"] if k != "Total"), key=r["peak"].get)
        print(f"| {os.path.basename(config)} | {os.path.basename(cfg.base)} | {cfg.micro_batch} x {cfg.max_length} | "
              + " | ".join(cells) + f" | {top} {r['peak'][top] / 2 ** 30:.1f} | ", f"({time.time() - t0:.0f} s)",
              flush=True)
    if a.variants:
        for label, over in (("fp32 base", ["--base_dtype=float32"]), ("no activation checkpointing",
                                                                      ["--activation_checkpointing=False"])):
            cells = [f"{peak(a.configs[0], n, over)[0]:.1f}" for n in a.ranks]
            print(f"| {os.path.basename(a.configs[0])}, {label} | | | " + " | ".join(cells) + " | |", flush=True)


if __name__ == "__main__":
    main()
