"""eval.py's data checks and outputs on a stand-in model (answer_batch replaced): every dataset and image is checked
before the first batch, a missing or unreadable image is a counted, named skip, and a failed run leaves the previous
run's predictions.jsonl and summary.json as they were."""
import io
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import checkpoints
import eval as E

MODEL = SimpleNamespace(folder="stand-in", cfg=SimpleNamespace(arch="internvl", is_internvl=True, is_mpgui=False,
                                                                template="internlm2-chat"))


@pytest.fixture(autouse=True)
def file_order(monkeypatch):
    """The stand-in has no tokenizer: every prompt the same length, so batches keep file order."""
    monkeypatch.setattr(E, "prompt_length", lambda m, tok, a, question, paths, max_tiles=None: 0)


def write_dataset(folder, name, images):
    """name.jsonl: one question per image name, answered with the name; the meta entry for it."""
    with open(folder / f"{name}.jsonl", "w") as f:
        for k, im in enumerate(images):
            f.write(json.dumps(dict(id=k, image=im, conversations=[{"from": "human", "value": "<image>\nWhich?"},
                                                                    {"from": "gpt", "value": im}])) + "\n")
    return {name: dict(root=str(folder), annotation=str(folder / f"{name}.jsonl"), data_augment=False, repeat_time=1)}


def args(tmp_path, meta, **kw):
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return SimpleNamespace(**dict(task=["a=match", "b=match"], out=str(tmp_path / "out"), max_new_tokens=8,
                                  system=None, max_tiles=1, data=str(tmp_path / "meta.json"), limit=0, batch_size=2,
                                  shuffled_images=False, **kw))


def stand_in(calls):
    """answer_batch that answers each prompt with the name of its image ("8.png" for the 8x8 screen), recording
    the prompts."""
    def answer_batch(m, tok, prompts, a):
        calls.append(prompts)
        return [f"{images[0].size[0]}.png" for _, images, _ in prompts], 0
    return answer_batch


def save_screens(tmp_path):
    for name in ("8.png", "9.png"):
        Image.new("RGB", (int(name[0]),) * 2, "red").save(tmp_path / name)
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()  # a real PNG header (PIL opens it) whose pixel data is cut: it fails only when decoded
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])


def test_missing_and_unreadable_images_are_counted_named_skips(tmp_path, monkeypatch, capsys):
    """e7b8d93 opened each image in the batch loop: the missing one raised FileNotFoundError mid-run."""
    save_screens(tmp_path)
    calls = []
    monkeypatch.setattr(E, "answer_batch", stand_in(calls))
    a = args(tmp_path, write_dataset(tmp_path, "a", ["8.png", "missing.png", "garbage.png", "truncated.png", "9.png"]))
    r = E.evaluate(MODEL, None, a)["datasets"]["a"]
    ann = str(tmp_path / "a.jsonl")
    assert r["n"] == 2 and r["score"]["accuracy"] == 1.0 and r["skipped"] == 3
    assert [s.split(": ")[0] for s in r["skipped_samples"]] == [f"{ann}:2", f"{ann}:3", f"{ann}:4"]
    assert "missing image" in r["skipped_samples"][0] and "unreadable image" in r["skipped_samples"][1]
    assert "truncated" in r["skipped_samples"][2]  # header fine, pixels cut: skipped when decoded
    out = capsys.readouterr().out
    assert all(f"skip {s}" in out for s in r["skipped_samples"])
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert [(row["id"], row["prediction"]) for row in rows] == [(0, "8.png"), (4, "9.png")]
    assert [len(p) for p in calls] == [1, 1]  # batches [8.png, truncated.png] and [9.png]; the truncated one left out
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["datasets"]["a"]["skipped_samples"] == r["skipped_samples"]


def test_every_dataset_is_checked_before_the_first_batch(tmp_path, monkeypatch):
    """e7b8d93 read each dataset when it came to it: the first was decoded before the second's fault showed."""
    save_screens(tmp_path)
    calls = []
    monkeypatch.setattr(E, "answer_batch", stand_in(calls))
    meta = {**write_dataset(tmp_path, "a", ["8.png"]), **write_dataset(tmp_path, "b", ["9.png"])}
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"b\.jsonl:2: bad JSON"):
        E.evaluate(MODEL, None, args(tmp_path, meta))
    meta["b"]["annotation"] = str(tmp_path / "nosuch.jsonl")
    with pytest.raises(FileNotFoundError, match="dataset 'b': no annotation file .*nosuch.jsonl"):
        E.evaluate(MODEL, None, args(tmp_path, meta))
    write_dataset(tmp_path, "b", ["missing.png"])
    meta["b"]["annotation"] = str(tmp_path / "b.jsonl")
    with pytest.raises(ValueError, match="dataset 'b': no usable sample"):  # every image missing: nothing to score
        E.evaluate(MODEL, None, args(tmp_path, meta))
    assert calls == [] and not os.path.exists(tmp_path / "out" / "predictions.jsonl")


def test_a_failed_run_leaves_the_previous_outputs(tmp_path, monkeypatch):
    """e7b8d93 opened predictions.jsonl for writing before the first dataset and wrote summary.json at the end: a
    failure in the second dataset left a partial predictions.jsonl beside the previous run's summary.json."""
    save_screens(tmp_path)
    calls = []
    monkeypatch.setattr(E, "answer_batch", stand_in(calls))
    meta = {**write_dataset(tmp_path, "a", ["8.png", "9.png"]), **write_dataset(tmp_path, "b", ["9.png"])}
    E.evaluate(MODEL, None, args(tmp_path, meta))
    out = tmp_path / "out"
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert sorted(before) == ["predictions.jsonl", "summary.json"] and before["predictions.jsonl"].count(b"\n") == 3

    def fails_on_b(m, tok, prompts, a):
        if len(calls) == 1:  # the second call: dataset b's first batch
            raise RuntimeError("injected failure in dataset b")
        calls.append(prompts)
        return ["0"] * len(prompts), 0
    calls.clear()
    monkeypatch.setattr(E, "answer_batch", fails_on_b)
    with pytest.raises(RuntimeError, match="injected"):
        E.evaluate(MODEL, None, args(tmp_path, meta))
    assert len(calls) == 1  # dataset a was decoded (answers "0"), then b failed
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # untouched, and no partial or temp file


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old")
    monkeypatch.setattr(checkpoints.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        checkpoints.write_atomic(str(path), "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]  # the temporary file is removed
    monkeypatch.undo()
    checkpoints.write_atomic(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["summary.json"]
