"""What the data tools share: atomic writes, InternVL jsonl + meta output, counted and logged skips."""
import json
import os
import sys
from collections import Counter

from tqdm import tqdm


def atomic_write(path, fill):
    """fill(f) writes PATH.tmp, which then replaces PATH: a killed run leaves the previous PATH intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path, records):
    atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_meta(path, datasets, root=""):
    """InternVL meta json (formats.read_meta): {name: jsonl path}; annotations are written relative to the meta's
    folder (formats.py resolves them from there), `length` is documentation only, as upstream."""
    base = os.path.dirname(os.path.abspath(path))
    meta = {name: dict(root=root, annotation=os.path.relpath(os.path.abspath(jl), base), data_augment=False,
                       repeat_time=1, length=str(sum(1 for _ in open(jl, encoding="utf-8"))))
            for name, jl in datasets.items()}
    atomic_write(path, lambda f: json.dump(meta, f, indent=1))
    return meta


def conv(question, answer):
    """One InternVL conversation: the screenshot, one question, one answer."""
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


class Skips:
    """Counts skips by kind; prints the first `max_log` of each kind with where and why, and a summary."""

    def __init__(self, max_log=10):
        self.counts, self.max_log = Counter(), max_log

    def __call__(self, kind, where="", n=1):
        self.counts[kind] += n
        if where and self.counts[kind] - n < self.max_log:
            tqdm.write(f"skip ({kind}): {where}", file=sys.stderr)

    def summary(self):
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "none"
