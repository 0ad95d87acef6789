"""InternVL / MP-GUI training data: meta json, jsonl lines, skips, collate, length-grouped sampling.
Runs on the real MP-GUI benchmark QA / CQA files (tests/fixtures/mpgui_data) with blank images of each line's size."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data
import formats

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mpgui_data")
FILES = ["QA.jsonl", "CQA.jsonl"]
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
            "<EXTRA_IMG_CONTEXT>"]
EXTRA = "<EXTRA_IMG_CONTEXT>"
S, NT = 28, 4  # tiny tiles and 4 tokens per tile keep sequences short; the grid still follows each line's size


def read_lines(name):
    with open(os.path.join(FIX, name), encoding="utf-8") as f:
        return f.readlines()


@pytest.fixture(scope="module")
def tok():
    # byte-level BPE trained on the files' own texts; InternLM2-style BOS via the post-processor
    texts = [t["value"] for name in FILES for line in read_lines(name) for t in json.loads(line)["conversations"]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok


def write_meta(path, **datasets):
    with open(path, "w") as f:
        defaults = dict(root="", data_augment=False, repeat_time=1)
        json.dump({name: dict(defaults, **d) for name, d in datasets.items()}, f)
    return str(path)


def dataset(meta, tok, **kw):
    return formats.InternVLDataset(meta, tok, "internlm2-chat", NT, image_size=S, extra_token=EXTRA, **kw)


def answer_runs(labels):
    # contiguous supervised spans, in order
    runs, cur = [], []
    for x in labels.tolist() + [data.IGNORE_INDEX]:
        if x != data.IGNORE_INDEX:
            cur.append(x)
        elif cur:
            runs, cur = runs + [cur], []
    return runs


def n_tiles(w, h, max_tiles=6):
    cols, rows = data.internvl_grid(w, h, 1, max_tiles, S)
    return cols * rows + (cols * rows > 1)


# ----------------------------------------------------------------------------- the real benchmark files

@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    # one blank PNG per distinct (width, height), hard-linked to every image path a line names
    root = tmp_path_factory.mktemp("bench")
    blanks, made = {}, set()
    for name in FILES:
        for line in read_lines(name):
            item = json.loads(line)
            wh, path = (item["width"], item["height"]), root / item["image"]
            if wh not in blanks:
                blanks[wh] = str(root / f"blank_{wh[0]}x{wh[1]}.png")
                Image.new("L", wh, 255).save(blanks[wh], optimize=False)
            if path not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.link(blanks[wh], path)
                made.add(path)
    meta = write_meta(root / "meta.json", **{n[:-6]: dict(root=str(root), annotation=os.path.join(FIX, n),
                                                              length="doc only") for n in FILES})
    return meta


def test_benchmark_files(bench, tok):
    ds = dataset(bench, tok, max_length=100_000)
    lines = {n: read_lines(n) for n in FILES}
    assert ds.skipped == [] and len(ds) == len(lines["QA.jsonl"]) + len(lines["CQA.jsonl"]) == 16347
    shuffled = {}
    for di, n in enumerate(FILES):  # upstream's order: each file's lines shuffled with its dataset index as seed
        shuffled[n] = list(lines[n])
        np.random.default_rng(seed=di).shuffle(shuffled[n])
    n_qa = len(lines["QA.jsonl"])
    for i in sorted(random.Random(0).sample(range(len(ds)), 300)):
        s = ds[i]
        assert "skip" not in s, s
        path, ln = s["source"]
        name = os.path.basename(path)
        assert lines[name][ln - 1] == shuffled[name][i if i < n_qa else i - n_qa]
        item = json.loads(lines[name][ln - 1])
        n = n_tiles(item["width"], item["height"])
        assert s["tiles"] == [n] and s["pixel_values"].shape == (n, 3, S, S)
        ids = s["input_ids"].tolist()
        assert ids.count(tok.token_to_id("<IMG_CONTEXT>")) == ids.count(tok.token_to_id(EXTRA)) == NT * n
        want = [t["value"].strip() + "<|im_end|>" for t in item["conversations"] if t["from"] == "gpt"]
        assert [tok.decode(r, skip_special_tokens=False) for r in answer_runs(s["labels"])] == want
        text = "\n".join(t["value"] for t in item["conversations"])
        assert ds.lengths[i] == len(tok.encode(text).ids) + 2 * NT * n


# ----------------------------------------------------------------------------- skips, repeats, collate

def conv(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def small(tmp_path):
    Image.new("RGB", (100, 50), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (60, 60), (10, 200, 10)).save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    good = [
        dict(id=0, image="a.png", width=100, height=50, conversations=conv("<image>\nWhat is red?", "The box")),
        dict(id=1, conversations=conv("Text only question", "Text only answer")),
        dict(id=2, image=["a.png", "b.png"], conversations=conv("<image>\n<image>\nCompare them.", "Different")),
        dict(id=3, image="b.png", width=60, height=60, conversations=conv("Where?", "Here")
             + conv("And now?", "There")),
    ]
    return tmp_path, good


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def test_skips_are_reported(small, tok):
    root, good = small
    rows = good[:2] + [
        '{"id": 9, "image": "a.png", "conversations": [',  # line 3: bad JSON
        dict(id=10, image="a.png"),  # line 4: no conversations
        dict(id=11, conversations=[{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]),  # 5: roles
        dict(id=12, image="nope.png", width=10, height=10, conversations=conv("<image>\nq", "a")),  # 6: missing
        dict(id=13, image="a.png", width=100, height=50, conversations=conv("<image>\nq", "word " * 400)),  # 7: long
        dict(id=14, image="broken.png", width=10, height=10, conversations=conv("<image>\nq", "a")),  # 8: unreadable
    ]
    ann = write_jsonl(root / "d.jsonl", rows)
    ds = dataset(write_meta(root / "meta.json", d=dict(root=str(root), annotation=ann)), tok, max_length=300)
    assert [(f, ln) for f, ln, _ in ds.skipped] == [(ann, 3), (ann, 4), (ann, 5), (ann, 6)]
    reasons = [r for _, _, r in ds.skipped]
    assert reasons[0].startswith("bad JSON") and "conversations" in reasons[1] and "human/gpt" in reasons[2]
    assert reasons[3] == f"missing image {os.path.join(str(root), 'nope.png')}"
    assert len(ds) == 4
    batch = data.collate([ds[i] for i in range(len(ds))], pad_id=0)
    long_, broken = sorted(batch["skipped"], key=lambda s: s[1])
    assert long_[:2] == (ann, 7) and "tokens > max_length 300" in long_[2]
    assert broken[:2] == (ann, 8) and broken[2].startswith("unreadable image")
    assert batch["input_ids"].shape[0] == 2 and len(batch["tiles_per_sample"]) == 2
    empty = data.collate([dict(skip=(ann, 7, "x"))], pad_id=0)
    assert empty["input_ids"] is None and empty["pixel_values"] is None and empty["skipped"] == [(ann, 7, "x")]


def test_repeat_time_and_max_dynamic_patch(small, tok):
    root, good = small
    anns = [write_jsonl(root / f"{k}.jsonl", good) for k in "abc"]
    meta = write_meta(root / "meta.json", a=dict(root=str(root), annotation=anns[0], repeat_time=2),
                      b=dict(root=str(root), annotation=anns[1], repeat_time=0.5),
                      c=dict(root=str(root), annotation=anns[2], max_dynamic_patch=1, repeat_time=1.0))
    ds = dataset(meta, tok)
    assert len(ds) == 2 * 4 + 2 + 4 and ds.skipped == []
    by_file = {}
    for i in range(len(ds)):
        s = ds[i]
        by_file.setdefault(s["source"][0], []).append((s["source"][1], s["tiles"]))
    assert sorted(ln for ln, _ in by_file[anns[0]]) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert sorted(ln for ln, _ in by_file[anns[1]]) == [1, 2]  # upstream cuts before it shuffles
    tiles = {f: dict(v) for f, v in by_file.items()}
    assert tiles[anns[0]][1] == [n_tiles(100, 50)] == [3]  # (2, 1) grid + thumbnail
    assert tiles[anns[2]][1] == [1]  # max_dynamic_patch 1: one tile, no thumbnail
    assert tiles[anns[0]][3] == [n_tiles(100, 50, 3), n_tiles(60, 60, 3)]  # the budget is split among images
    assert len(ds.lengths) == len(ds) and all(x > 0 for x in ds.lengths)


def test_collate(small, tok):
    root, good = small
    ann = write_jsonl(root / "d.jsonl", good)
    ds = dataset(write_meta(root / "meta.json", d=dict(root=str(root), annotation=ann)), tok)
    by_line = {ds[i]["source"][1]: ds[i] for i in range(len(ds))}
    samples = [by_line[3], by_line[2], by_line[1]]  # two images, text only, one image
    assert by_line[2]["pixel_values"] is None and by_line[2]["tiles"] == []
    b = data.collate(samples, pad_id=7)
    lens = [len(s["input_ids"]) for s in samples]
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, max(lens))
    assert b["tiles_per_sample"].tolist() == [sum(by_line[3]["tiles"]), 0, 3] and b["skipped"] == []
    assert torch.equal(b["pixel_values"], torch.cat([by_line[3]["pixel_values"], by_line[1]["pixel_values"]]))
    for k, (s, n) in enumerate(zip(samples, lens)):
        assert torch.equal(b["input_ids"][k, :n], s["input_ids"]) and torch.equal(b["labels"][k, :n], s["labels"])
        assert (b["input_ids"][k, n:] == 7).all() and (b["labels"][k, n:] == -100).all()
        assert b["attention_mask"][k].tolist() == [1] * n + [0] * (max(lens) - n)
    assert data.collate([by_line[2]], pad_id=0)["pixel_values"] is None


# ----------------------------------------------------------------------------- meta, sampler

def test_read_meta(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "x.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    meta = write_meta(sub / "meta.json", d=dict(annotation="x.jsonl", root="imgs", max_dynamic_patch=4, length="9"))
    (m,) = formats.read_meta(meta)  # neither exists relative to the cwd: both are taken from the meta file's folder
    assert m == dict(name="d", root=str(sub / "imgs"), annotation=str(sub / "x.jsonl"), repeat_time=1,
                     data_augment=False, max_dynamic_patch=4)
    meta = write_meta(sub / "meta.json", d=dict(annotation="sub/x.jsonl", root=""))
    assert formats.read_meta(meta)[0]["annotation"] == "sub/x.jsonl"  # exists from the cwd: kept as upstream
    bad = [({"annotation": "x.jsonl", "root": "", "data_augment": False}, "missing key 'repeat_time'"),
           ({"annotation": "x.jsonl", "root": "", "data_augment": False, "repeat_time": 1, "typo": 1}, "unknown"),
           ({"annotation": "x.jsonl", "root": "", "data_augment": False, "repeat_time": 1.5}, "'repeat_time'"),
           ({"annotation": "x.jsonl", "root": "", "data_augment": 0, "repeat_time": 1}, "'data_augment'"),
           ({"annotation": "x.jsonl", "root": "", "data_augment": False, "repeat_time": 1, "max_dynamic_patch": 0},
            "'max_dynamic_patch'")]
    for d, msg in bad:
        (sub / "bad.json").write_text(json.dumps({"ds": d}))
        with pytest.raises(ValueError, match="bad.json: dataset 'ds'.*" + msg.replace("(", r"\(")):
            formats.read_meta(str(sub / "bad.json"))


def test_length_grouped_indices():
    lengths = [random.Random(k).randint(1, 5000) for k in range(1003)]
    idx = data.length_grouped_indices(lengths, 16, seed=3)
    assert sorted(idx) == list(range(1003))
    for s in range(0, 1003, 16):
        mb = [lengths[i] for i in idx[s:s + 16]]
        assert mb == sorted(mb, reverse=True)
    assert idx == data.length_grouped_indices(lengths, 16, seed=3) != data.length_grouped_indices(lengths, 16, seed=4)
