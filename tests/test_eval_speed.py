"""eval.py's length-sorted batching: prompt_length is encode's count up to the template (a per-run constant), the
batches go longest first, and every output comes back in file order, identical to batch size 1 (--data and
--bench screenspot, greedy, tiny Qwen2-VL); --compile's decode step gives eager's tokens."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import eval as E
import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN, INTERNVL = (os.path.join(ROOT, "tests", "fixtures", f) for f in ("qwen2_vl_tiny", "internvl2_tiny"))
SIZES = [(56, 56), (200, 100), (84, 300), (500, 400), (120, 120), (30, 90)]
QUESTIONS = ["Save?", "Where is the open button on this page?", "<image>\nFind it", "Close", "a b c d e f", "Help me"]


def screens(tmp_path):
    paths = []
    for k, size in enumerate(SIZES):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.new("RGB", size, (40 * k, 100, 200)).save(paths[-1])
    return paths


def settings(**kw):
    return SimpleNamespace(**{**dict(system=None, min_pixels=56 * 56, max_pixels=140 * 140, max_tiles=2, batch_size=4,
                                     max_new_tokens=6), **kw})


@pytest.mark.parametrize("folder", [QWEN, INTERNVL])
def test_prompt_length_is_encodes_count_less_a_constant(tmp_path, folder):
    m, a = load.load_model(folder), settings()
    tok = load.load_tokenizer(m.folder)
    gaps = set()
    for q, path in zip(QUESTIONS, screens(tmp_path)):
        ids, _ = E.encode(m, tok, q, [Image.open(path)], a)
        gaps.add(len(ids) - E.prompt_length(m, tok, a, q, [path]))
    # the template's (+ image wrapper) tokens, the same for all, up to one token where the question meets the
    # template (InternLM2's tokenizer splits a leading "\n" differently on its own: '<image>\nFind it' counts one more)
    assert 0 < min(gaps) and max(gaps) - min(gaps) <= 1 and max(gaps) < 128, gaps


def test_batches_longest_first_ties_in_file_order(monkeypatch):
    lengths = {"a": 5, "b": 9, "c": 5, "d": 1, "e": 9}
    monkeypatch.setattr(E, "prompt_length", lambda m, tok, a, q, paths, max_tiles=None: lengths[q])
    batches = E.length_batches(None, None, settings(batch_size=2), [(q, [], None) for q in "abcde"])
    assert batches == [[1, 4], [0, 2], [3]]  # b e (9), a c (5), d (1)


def run_data(tmp_path, batch_size, calls):
    paths = screens(tmp_path)
    with open(tmp_path / "d.jsonl", "w") as f:
        for k, (q, p) in enumerate(zip(QUESTIONS, paths)):
            f.write(json.dumps(dict(id=k, image=os.path.basename(p), conversations=[
                {"from": "human", "value": q}, {"from": "gpt", "value": "Save"}])) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"d": dict(root=str(tmp_path), annotation=str(tmp_path / "d.jsonl"),
                                                              data_augment=False, repeat_time=1)}))
    out = tmp_path / f"out{batch_size}"
    E.main(["--model", QWEN, "--data", str(tmp_path / "meta.json"), "--task", "d=match", "--out", str(out),
            "--batch-size", str(batch_size), "--max-new-tokens", "6", "--min-pixels", str(56 * 56),
            "--max-pixels", str(140 * 140), "--device", "cpu", "--shuffled-images"])
    return (out / "predictions.jsonl").read_text(), json.loads((out / "summary.json").read_text())


def test_sorted_batches_give_batch_size_ones_outputs(tmp_path, monkeypatch):
    calls, real = [], E.answer_batch
    monkeypatch.setattr(E, "answer_batch", lambda m, tok, prompts, a: calls.append(prompts) or real(m, tok, prompts, a))
    one, s1 = run_data(tmp_path, 1, calls)
    calls.clear()
    four, s4 = run_data(tmp_path, 4, calls)
    assert [len(c) for c in calls] == [4, 2, 4, 2]  # prediction, then prediction_shuffled_images
    by_len = [SIZES.index(im.size) for (_, (im,), _) in calls[0] + calls[1]]  # file index of each batched prompt
    assert by_len != sorted(by_len) and sorted(by_len) == list(range(6))  # reordered, every sample once
    assert one == four and s1 == s4  # predictions.jsonl byte for byte, scores and summary
    assert [json.loads(line)["id"] for line in one.splitlines()] == list(range(6))


def test_screenspot_sorted_batches_in_file_order(tmp_path):
    paths = screens(tmp_path / "images" if (tmp_path / "images").mkdir() is None else None)
    recs = [dict(img_url=os.path.basename(p), task=q.replace("<image>", ""), bbox=[1, 1, 10, 10], img_size=list(s), split="web",
                 data_type="text") for p, q, s in zip(paths, QUESTIONS, SIZES)]
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "hf_test_full.json").write_text(json.dumps(recs))
    rows = {}
    for bs in (1, 4):
        out = tmp_path / f"out{bs}"
        E.main(["--model", QWEN, "--bench", "screenspot", "--data", str(tmp_path), "--out", str(out), "--batch-size",
                str(bs), "--max-new-tokens", "6", "--min-pixels", str(56 * 56), "--max-pixels", str(140 * 140)])
        rows[bs] = (out / "predictions.jsonl").read_text(), (out / "summary.json").read_text()
    assert rows[1] == rows[4]
    assert [json.loads(line)["record"] for line in rows[4][0].splitlines()] == list(range(6))


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable (torch < 2.0)")
def test_compiled_decode_step_gives_eager_tokens():
    """One compile of the tiny Qwen2-VL's decode step (dynamic shapes); ~1 min of inductor codegen on 2 CPU cores."""
    m = load.load_model(QWEN)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[1, :1] = 0  # left padding, as eval.py batches
    eager = m.generate(ids, mask, max_new_tokens=8, eos_token_ids=[9999])
    torch._dynamo.reset()
    m.decode_step = torch.compile(m.decode_step, dynamic=True)
    assert torch.equal(m.generate(ids, mask, max_new_tokens=8, eos_token_ids=[9999]), eager)
