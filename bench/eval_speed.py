"""Evaluation throughput: eval.py's batching in file order vs sorted by prompt length (eval.length_batches), and
the eager decode step vs torch.compile'd (eval.py --compile), on the same workload, in one process.

    python bench/eval_speed.py                      # tiny Qwen2-VL and InternVL2 fixtures, CPU, fp32
    python bench/eval_speed.py --device cuda --fixtures tests/fixtures/qwen2_vl_tiny

The workload: --n prompts, each a screenshot of a different size (so prompt lengths differ, as ScreenSpot's do)
and a question of 1-12 words, answered greedily through eval.answer_batch, --batch-size at a time, --new tokens at
most (a sample stops at <|im_end|>; the tiny fixtures are random weights, so most run the whole budget). samples/s
is the best of --reps timed passes; a warm-up pass before them is excluded, and the compiled variant's warm-up
(where torch.compile traces and generates code) is reported as its compile time. Every variant's answers are
checked equal to the eager ones in the same order, and compared with the file-order ones (last column: they differ
only where padding changes the model's numbers, e.g. the tiny InternLM2's dynamic NTK RoPE, which counts padded keys
and starts at 96 positions).
"""
import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as E  # noqa: E402
import load  # noqa: E402

WORDS = "open the settings menu and click save button near top left corner of page".split()


def workload(folder, n):
    """n (question, [image path]) with image sizes from 56x56 to ~336x448 px, in a shuffled order."""
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        w, h = (int(v) for v in torch.randint(56, 449, (2,), generator=g))
        path = os.path.join(folder, f"{k}.png")
        Image.new("RGB", (w, h), (k * 7 % 256, 90, 160)).save(path)
        out.append((" ".join(WORDS[:1 + k * 5 % 12]) + "?", [path]))
    return out


def passes(m, tok, a, prompts, batches, reps, sync):
    """Warm-up seconds, best timed seconds, answers in file order."""
    images = {p: Image.open(p).convert("RGB") for _, paths in prompts for p in paths}  # decoded once, not timed

    def one():
        answers = {}
        for b in batches:
            out, _ = E.answer_batch(m, tok, [(prompts[j][0], [images[p] for p in prompts[j][1]], None) for j in b], a)
            answers.update(zip(b, out))
        sync()
        return [answers[j] for j in range(len(prompts))]
    t = time.perf_counter()
    ref = one()
    warm, best = time.perf_counter() - t, float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        assert one() == ref
        best = min(best, time.perf_counter() - t)
    return warm, best, ref


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fixtures", nargs="+", default=["tests/fixtures/qwen2_vl_tiny", "tests/fixtures/internvl2_tiny"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    args = p.parse_args()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    a = SimpleNamespace(batch_size=args.batch_size, max_new_tokens=args.new, system=None, min_pixels=56 * 56,
                        max_pixels=448 * 448, max_tiles=4)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; {args.n} prompts, "
          f"batch {args.batch_size}, max_new_tokens {args.new}, best of {args.reps}")
    print("| fixture | variant | samples/s | vs eager unsorted | padded tokens | compile s | answers = unsorted |\n"
          "|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        prompts = workload(tmp, args.n)
        for fx in args.fixtures:
            root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), fx)
            m = load.load_model(root, dtype=torch.float32, device=args.device)
            tok = load.load_tokenizer(m.folder)
            asks = [(q, paths, None) for q, paths in prompts]
            n = [E.prompt_length(m, tok, a, *x) for x in asks]
            file_order = [list(range(i, min(i + a.batch_size, args.n))) for i in range(0, args.n, a.batch_size)]
            orders = {"unsorted": file_order,
                      "sorted": E.length_batches(m, tok, a, asks)}
            pad = {k: sum(max(n[j] for j in b) * len(b) - sum(n[j] for j in b) for b in v) for k, v in orders.items()}
            variants = [(False, "unsorted"), (False, "sorted")] + ([] if args.no_compile else
                                                                  [(True, "unsorted"), (True, "sorted")])
            base, ref = None, {}
            for compiled, order in variants:
                if compiled and "decode_step" not in vars(m):
                    torch._dynamo.reset()
                    m.decode_step = torch.compile(m.decode_step, dynamic=True)  # as eval.py --compile
                warm, best, out = passes(m, tok, a, prompts, orders[order], args.reps, sync)
                ref.setdefault(order, out)
                assert out == ref[order], f"{fx} {order}: the compiled answers differ from eager's"
                base = base or best
                print(f"| {os.path.basename(fx)} | {'compiled' if compiled else 'eager'} {order} | "
                      f"{args.n / best:.1f} | {base / best:.2f}x | {pad[order]} | "
                      f"{f'{warm - best:.1f}' if compiled and order == 'unsorted' else '-'} | "
                      f"{'yes' if out == ref['unsorted'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
