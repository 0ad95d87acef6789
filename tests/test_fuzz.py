"""Reader fuzz: thousands of malformed records across the four training formats (InternVL jsonl, ShowUI grounding and
navigation json, LLaMA-Factory json + jsonl), mixed with good ones from a fixed seed. Every item is read: no crash, no
silent drop (each bad record is a skip at its own file and line / record index, with a reason that names the cause),
no good record lost. Then the findings one by one: corrupt images, bad bytes, whole-file errors, NaN / deep / huge /
surrogate values, img_size, navigation points, 16-bit grey, load totals, LLaMA-Factory's image preprocessing."""
import gzip
import io
import json
import os
import random
import re
import struct

import numpy as np
import pytest
from PIL import Image

import formats
import load
import train

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
MIN_PIX, MAX_PIX = 6272, 75264  # tiny Qwen images: 8..96 merged tokens
MAX_LEN = 4000  # an "over-length" record carries a 5000-character text (the tokenizers: ~1 token a character)
LONG = "word " * 1000
SAFETY_NET = re.compile(r"\b(Key|Type|Attribute|Index|ZeroDivision|Overflow)Error\b")  # a check that missed a shape


@pytest.fixture(scope="module")
def qtok():
    return load.load_tokenizer(os.path.join(FIXTURES, "qwen2_vl_tiny"))


@pytest.fixture(scope="module")
def itok():
    return load.load_tokenizer(os.path.join(FIXTURES, "internvl3_tiny"))


# ----------------------------------------------------------------------------------------------------------------------
# images: good ones in every mode a screenshot may come in, and broken ones

def png_bytes(image):
    b = io.BytesIO()
    image.save(b, "PNG")
    return b.getvalue()


def corrupt_png(w=40, h=30):
    """A PNG whose header reads but whose IDAT length is wrong: PIL raises SyntaxError ("broken PNG file") on decode."""
    noise = np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)  # noise: IDAT well over 16 bytes
    raw = bytearray(png_bytes(Image.fromarray(noise)))
    i = raw.index(b"IDAT")
    raw[i - 4:i] = struct.pack(">I", 16)
    return bytes(raw)


def good_image(rng, w, h):
    mode = rng.choice(["RGB", "RGB", "L", "P", "RGBA", "LA", "I;16", "1"])
    if mode == "I;16":  # a 16-bit grey gradient
        a = (np.arange(w * h, dtype=np.uint32).reshape(h, w) * 65535 // max(w * h - 1, 1)).astype(np.uint16)
        return png_bytes(Image.fromarray(a))
    return png_bytes(Image.new(mode, (w, h), rng.randrange(256) if mode in ("L", "P", "1") else
                               tuple(rng.randrange(256) for _ in mode)))


BAD_IMAGES = {"zero-byte": lambda: b"", "truncated": lambda: png_bytes(Image.new("RGB", (40, 30), (9, 9, 9)))[:60],
              "corrupt": corrupt_png, "not an image": lambda: b"hello, I am text"}


class Images:
    """Writes images under root: good(w, h) -> name of a fresh decodable image; bad(kind) -> name of a broken one."""

    def __init__(self, root, rng, suffix=".png"):
        self.root, self.rng, self.n, self.suffix = root, rng, 0, suffix
        os.makedirs(root, exist_ok=True)

    def _write(self, raw):
        self.n += 1
        name = f"i{self.n}"
        with open(os.path.join(self.root, name + self.suffix), "wb") as f:
            f.write(raw)
        return name

    def good(self, w=None, h=None):
        w, h = w or self.rng.randint(28, 64), h or self.rng.randint(28, 64)
        return self._write(good_image(self.rng, w, h)), (w, h)

    def bad(self, kind=None):
        return self._write(BAD_IMAGES[kind or self.rng.choice(sorted(BAD_IMAGES))]())

    def extreme(self):
        return self._write(png_bytes(Image.new("RGB", (6000, 4), (0, 90, 0)))), (6000, 4)


# ----------------------------------------------------------------------------------------------------------------------
# jsonl writing with known line numbers

class Lines:
    """Builds a jsonl file line by line, remembering each record's line number (from 1) and whether it is good."""

    def __init__(self, rng):
        self.rng, self.chunks, self.line, self.expect = rng, [b"\xef\xbb\xbf"], 0, {}  # a UTF-8 BOM first

    def add(self, good, raw, kind):
        if self.rng.random() < 0.1:  # blank lines are not records, and do not shift the numbers
            self.chunks.append(b"\n" if self.rng.random() < 0.5 else b"  \r\n")
            self.line += 1
        self.line += 1
        self.chunks.append(raw + (b"\r\n" if self.rng.random() < 0.3 else b"\n"))  # CRLF or LF
        self.expect[self.line] = (good, kind)

    def record(self, good, obj, kind):
        raw = json.dumps(obj).encode()
        if good and self.rng.random() < 0.2:  # a raw CR between tokens is JSON whitespace: still line self.line
            raw = raw.replace(b", ", b",\r ", 1)
        self.add(good, raw, kind)

    def write(self, path):
        with open(path, "wb") as f:
            f.write(b"".join(self.chunks))


def line_breakers(rng, good_obj):
    """Whole-line malformations of a good record's text: (kind, raw bytes)."""
    raw = json.dumps(good_obj).encode()
    return rng.choice([
        ("broken JSON", raw[:len(raw) // 2]),
        ("trailing comma", raw[:-1] + b", }"),
        ("bad byte", raw.replace(b'"', b'"\xff', 1)),
        ("latin-1 text", raw.replace(b'": "', '": "caf\xe9 '.encode("latin-1"), 1)),
        ("deep nesting", b"[" * 100000 + b"]" * 100000),
        ("huge int", raw[:-1] + b', "id": ' + b"7" * 5000 + b"}"),
        ("raw CR in a string", raw.replace(b'": "', b'": "a\rb', 1)),
        ("not an object", rng.choice([b"[1, 2]", b"42", b'"text"', b"null"])),
        ("NUL byte", raw.replace(b"{", b"{\x00", 1)),
    ])


# ----------------------------------------------------------------------------------------------------------------------
# the four formats: (dataset, {(file, where): (good, kind)})

def conv(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def internvl_case(tmp, rng, tok, n=400):
    ims, lines = Images(str(tmp / "ivl"), rng), Lines(rng)
    for _ in range(n):
        name, _ = ims.good()
        good = {"image": name + ".png", "conversations": conv("<image>\nWhat is here?", "A button")}
        r = rng.random()
        if r < 0.25:
            text_only = {"conversations": conv("Text only?", "Yes") + conv("More?", "No")}
            extreme, _ = ims.extreme()
            lines.record(True, rng.choice([good, text_only, dict(good, image=extreme + ".png")]), "good")
            continue
        if r < 0.45:
            kind, raw = line_breakers(rng, good)
            lines.add(False, raw, kind)
            continue
        kind, bad = rng.choice([
            ("missing conversations", {"image": name + ".png"}),
            ("conversations not a list", dict(good, conversations="hi")),
            ("value not a string", dict(good, conversations=[{"from": "human", "value": 3}, {"from": "gpt",
                                                                                             "value": "x"}])),
            ("roles", dict(good, conversations=conv("<image>\nq", "a")[::-1])),
            ("odd turns", dict(good, conversations=conv("<image>\nq", "a") + [{"from": "human", "value": "q"}])),
            ("too many <image>", dict(good, conversations=conv("<image>\n<image>\nq", "a"))),
            ("<image> without image", {"conversations": conv("<image>\nq", "a")}),
            ("image not a path", dict(good, image=[3])),
            ("missing image", dict(good, image="nowhere.png")),
            ("broken image", dict(good, image=ims.bad() + ".png")),
            ("lone surrogate", dict(good, conversations=conv("<image>\nq\ud800", "a"))),
            ("over-length", dict(good, conversations=conv("<image>\nq", LONG))),
            ("length not int", dict(good, length="9")),
        ])
        lines.record(False, bad, kind)
    ann = str(tmp / "ivl.jsonl")
    lines.write(ann)
    with open(tmp / "meta.json", "w") as f:
        json.dump({"d": {"root": str(tmp / "ivl"), "annotation": ann, "data_augment": False, "repeat_time": 1}}, f)
    ds = formats.InternVLDataset(str(tmp / "meta.json"), tok, "internvl2_5", 16, 112, max_tiles=2, max_length=MAX_LEN)
    return ds, {(ann, k): v for k, v in lines.expect.items()}


def element(rng, bad=None):
    x, y = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
    e = {"instruction": "the OK button", "bbox": [x - 0.1, y - 0.1, x + 0.1, y + 0.1], "point": [x, y]}
    if bad:
        e[bad[0]] = bad[1]
    return e


BAD_POINTS = [float("nan"), float("inf"), None, -0.1, 1.5, 640, "x", True]


def grounding_case(tmp, rng, tok, n=400):
    root = tmp / "ShowUI-desktop"
    ims, recs, expect = Images(str(root / "images"), rng), [], {}
    meta = str(root / "metadata" / "hf_train.json")
    for i in range(n):
        name, (w, h) = ims.good()
        good = {"img_url": name + ".png", "img_size": [w, h], "element": [element(rng) for _ in range(3)]}
        if rng.random() < 0.3:
            recs.append(good)
            expect[(meta, i)] = (True, "good")
            continue
        p = rng.choice(BAD_POINTS)
        kind, bad = rng.choice([
            ("missing image", dict(good, img_url="nowhere.png")),
            ("img_url not a string", dict(good, img_url=7)),
            ("broken image", dict(good, img_url=ims.bad() + ".png")),
            ("extreme aspect", dict(good, img_url=ims.extreme()[0] + ".png", img_size=[6000, 4])),
            ("img_size inf", dict(good, img_size=[float("inf"), h])),
            ("img_size nan", dict(good, img_size=[float("nan"), h])),
            ("img_size 1", dict(good, img_size=[1, h])),
            ("img_size 0", dict(good, img_size=[0, h])),
            ("img_size huge", dict(good, img_size=[100000, 100000])),
            ("img_size not the image's", dict(good, img_size=[w + 1, h])),
            ("img_size kind", dict(good, img_size=rng.choice(["big", [w], [w, h, 3], None]))),
            ("no elements", dict(good, element=[])),
            ("element not a list", dict(good, element={"a": 1})),
            ("element not an object", dict(good, element=[3])),
            ("no instruction", dict(good, element=[element(rng, ("instruction", None))])),
            ("bad point", dict(good, element=[element(rng, ("point", [p, 0.5]))])),
            ("pixel point", dict(good, element=[element(rng, ("point", [320, 200]))])),
            ("short point", dict(good, element=[element(rng, ("point", [0.5]))])),
            ("bad bbox", dict(good, element=[element(rng, ("bbox", [0.1, p, 0.2, 0.3]))])),
            ("lone surrogate", dict(good, element=[element(rng, ("instruction", "OK \udc80"))])),
            ("over-length", dict(good, element=[element(rng, ("instruction", LONG))])),
            ("not an object", rng.choice([[1, 2], "text", None, 5])),
        ])
        recs.append(bad)
        expect[(meta, i)] = (False, kind)
    os.makedirs(root / "metadata")
    with open(meta, "w") as f:
        json.dump(recs, f)  # Python writes NaN and Infinity, as ShowUI's own tools would
    ds = formats.ShowUIGrounding(str(tmp), ["showui-desktop:hf_train"], tok, MIN_PIX, MAX_PIX, MAX_LEN, num_turn=2,
                                 crop_min=0.5, crop_max=1.5)
    return ds, expect


def nav_step(action, point=None, value=None):
    return {"action_type": action, "action_value": value, "point": point}


def navigation_case(tmp, rng, tok, n=400):
    root = tmp / "GUI_Course" / "GUIAct"
    ims, recs, expect = Images(str(root / "images"), rng), [], {}
    meta = str(root / "metadata" / "hf_train_web-multi.json")
    for i in range(n):
        urls = [ims.good()[0] for _ in range(3)]
        hist = [dict(nav_step("click", [0.1, 0.2]), img_url=urls[0]),
                dict(nav_step("input", [0.3, 0.4], "mail"), img_url=urls[1])]
        good = {"img_url": urls[2], "task": "send a mail", "step_history": hist, "step": rng.choice([
            nav_step("click", [0.5, 0.6]), nav_step("answer", value="done"), nav_step("enter"),
            [nav_step("select_text", [[0.1, 0.1], [0.2, 0.2]]), nav_step("copy", value="x")]])}
        if rng.random() < 0.3:
            recs.append(good)
            expect[(meta, i)] = (True, "good")
            continue
        p = rng.choice(BAD_POINTS)
        kind, bad = rng.choice([
            ("bad point", dict(good, step=nav_step("click", [p, 0.5]))),
            ("point None", dict(good, step=nav_step(rng.choice(["click", "hover", "input", "select"]), None, "v"))),
            ("pixel point", dict(good, step=nav_step("click", [640, 360]))),
            ("point kind", dict(good, step=nav_step("click", rng.choice(["x", [0.5], [[0.1, 0.2]], 3])))),
            ("bad drag", dict(good, step=nav_step("select_text", rng.choice([[[0.1, 0.1]], [[p, 0.1], [0.2, 0.2]],
                                                                                None, [0.1, 0.2]])))),
            ("bad history point", dict(good, step_history=[dict(nav_step("click", [p, 0.5]), img_url=urls[0])])),
            ("no action_value", dict(good, step={"action_type": "answer"})),
            ("unknown action", dict(good, step=nav_step(rng.choice(["tap", "fly", 3, None]), [0.5, 0.5]))),
            ("step missing", {k: v for k, v in good.items() if k != "step"}),
            ("task not a string", dict(good, task=None)),
            ("history not a list", dict(good, step_history="none")),
            ("history item not an object", dict(good, step_history=[3])),
            ("missing image", dict(good, img_url="nowhere")),
            ("img_url not a string", dict(good, img_url=None)),
            ("missing history image", dict(good, step_history=[dict(hist[0], img_url="nowhere")])),
            ("broken image", dict(good, img_url=ims.bad())),
            ("extreme aspect", dict(good, img_url=ims.extreme()[0])),
            ("lone surrogate", dict(good, task="send \ud83d")),
            ("over-length", dict(good, task=LONG)),
        ])
        recs.append(bad)
        expect[(meta, i)] = (False, kind)
    os.makedirs(root / "metadata")
    with open(meta, "w") as f:
        json.dump(recs, f)
    ds = formats.ShowUINavigation(str(tmp), ["guiact:hf_train_web-multi"], tok, MIN_PIX, MAX_PIX, MAX_LEN,
                                  num_history=2, history="vtvt")
    return ds, expect


def lf_msg(role, content):
    return {"role": role, "content": content}


def llamafactory_case(tmp, rng, tok, n=400):
    ims, expect = Images(str(tmp / "lf" / "shots"), rng), {}
    info, recs, lines = {}, [], Lines(rng)
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    for name, file in (("json", "lf.json"), ("jsonl", "lf.jsonl")):
        info[name] = {"file_name": file, "formatting": "sharegpt", "tags": tags,
                      "columns": {"messages": "messages", "images": "images", "system": "system"}}
    for i in range(n):
        shot, _ = ims.good()
        good = {"messages": [lf_msg("user", "<image>Where is OK?"), lf_msg("assistant", "[0.5, 0.5]")],
                "images": ["shots/" + shot + ".png"]}
        r = rng.random()
        if r < 0.3:
            good = rng.choice([good, dict(good, images=["shots/" + ims.extreme()[0] + ".png"]), dict(good, system="Hi"),
                               {"messages": [lf_msg("user", "q"), lf_msg("assistant", "a")] * 2}])
            bad = None
        elif r < 0.4 and i % 2:
            kind, raw = line_breakers(rng, good)
            lines.add(False, raw, kind)
            continue
        else:
            kind, bad = rng.choice([
                ("messages not a list", dict(good, messages="hi")),
                ("message not an object", dict(good, messages=[3, lf_msg("assistant", "a")])),
                ("content not a string", dict(good, messages=[lf_msg("user", 3), lf_msg("assistant", "a")])),
                ("roles", dict(good, messages=good["messages"][::-1])),
                ("odd messages", dict(good, messages=good["messages"] + [lf_msg("user", "q")])),
                ("untagged system first", dict(good, messages=[lf_msg("system", "Be brief.")] + good["messages"])),
                ("image count", dict(good, images=[])),
                ("images not paths", dict(good, images=[{"path": "x"}])),
                ("missing image", dict(good, images=["shots/nowhere.png"])),
                ("broken image", dict(good, images=["shots/" + ims.bad() + ".png"])),
                ("system not a string", dict(good, system=["x"])),
                ("lone surrogate", dict(good, messages=[lf_msg("user", "<image>\udfff"), lf_msg("assistant", "a")])),
                ("over-length", dict(good, messages=[lf_msg("user", "<image>q"), lf_msg("assistant", LONG)])),
                ("not an object", rng.choice([[1], "text", None])),
            ])
        if i % 2:
            lines.record(bad is None, good if bad is None else bad, "good" if bad is None else kind)
        else:
            expect[(str(tmp / "lf" / "lf.json"), len(recs))] = (bad is None, "good" if bad is None else kind)
            recs.append(good if bad is None else bad)
    with open(tmp / "lf" / "lf.json", "w") as f:
        json.dump(recs, f)
    lines.write(str(tmp / "lf" / "lf.jsonl"))
    expect.update({(str(tmp / "lf" / "lf.jsonl"), k): v for k, v in lines.expect.items()})
    with open(tmp / "lf" / "dataset_info.json", "w") as f:
        json.dump(info, f)
    ds = formats.LlamaFactoryDataset(str(tmp / "lf"), ["json", "jsonl"], tok, MIN_PIX, MAX_PIX, MAX_LEN)
    return ds, expect


def read_all(ds):
    """(sources of the samples read, skips at load and at fetch): every item fetched once."""
    got, skips = [], list(ds.skipped)
    for i in range(len(ds)):
        s = ds[i]
        if "skip" in s:
            skips.append(s["skip"])
        else:
            got.append(s["source"])
    return got, skips


@pytest.mark.parametrize("case", [internvl_case, grounding_case, navigation_case, llamafactory_case])
def test_fuzz_readers(tmp_path, qtok, itok, case):
    rng = random.Random(case.__name__)
    ds, expect = case(tmp_path, rng, itok if case is internvl_case else qtok)
    got, skips = read_all(ds)
    bad = {k for k, (good, _) in expect.items() if not good}
    assert len(bad) >= 250 and len(expect) - len(bad) >= 50  # 4 formats x >= 250 malformed records
    where = {(f, i): r for f, i, r in skips}
    assert len(where) == len(skips)  # each record is skipped at most once
    wrong = {k: (expect.get(k), r) for k, r in where.items() if k not in bad}
    assert not wrong, f"good (or unknown) records skipped: {list(wrong.items())[:5]}"
    missed = {k: expect[k] for k in bad - set(where)}
    assert not missed, f"bad records not reported: {list(missed.items())[:5]}"
    assert sorted(got) == sorted(k for k, (good, _) in expect.items() if good)  # every good record yields a sample
    for k, r in where.items():  # the reason names the cause: no safety net caught a shape the checks missed
        assert isinstance(r, str) and r and not SAFETY_NET.search(r), (k, expect[k], r)
    assert ds.records and sum(ds.records.values()) == len(expect)  # lines / records read per file
    for line in formats.load_report(ds):
        assert re.fullmatch(r"skipped \d+ of \d+ records in .* at load", line)
    train.print_skipped(skips, formats.load_report(ds))  # surrogates, latin-1 text: printed, never a crash


# ----------------------------------------------------------------------------------------------------------------------
# the findings one by one (each fails on e7b8d93)

def test_pil_raises_syntax_error_for_corrupt_png_and_readers_skip_it(tmp_path, qtok):
    path = tmp_path / "c.png"
    path.write_bytes(corrupt_png())
    with Image.open(path) as im:
        assert im.size == (40, 30)  # the header reads
        with pytest.raises(SyntaxError, match="broken PNG"):
            im.convert("RGB")
    with pytest.raises(ValueError, match=f"unreadable image {re.escape(str(path))}: SyntaxError: broken PNG"):
        formats.load_rgb(str(path))
    root = tmp_path / "ShowUI-desktop"
    os.makedirs(root / "images")
    path.rename(root / "images" / "c.png")
    os.makedirs(root / "metadata")
    (root / "metadata" / "x.json").write_text(json.dumps(
        [{"img_url": "c.png", "img_size": [40, 30], "element": [{"instruction": "a", "point": [0.5, 0.5]}]}]))
    ds = formats.ShowUIGrounding(str(tmp_path), ["showui-desktop:x"], qtok, MIN_PIX, MAX_PIX, MAX_LEN)
    assert "SyntaxError: broken PNG" in ds[0]["skip"][2]


def write_lf(tmp_path, raw, file_name="d.jsonl"):
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"d": {"file_name": file_name, "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags}}))
    (tmp_path / file_name).write_bytes(raw)
    return str(tmp_path / file_name)


GOOD_LF = json.dumps({"messages": [lf_msg("user", "q"), lf_msg("assistant", "a")]}).encode()


def test_llamafactory_jsonl_bad_lines_are_skips_at_1_based_lines(tmp_path, qtok):
    raw = (b"\xef\xbb\xbf" + GOOD_LF + b"\r\n"  # line 1, after a BOM, CRLF
           + GOOD_LF.replace(b'"q"', b'"caf\xe9"') + b"\n"  # line 2: a latin-1 byte
           + b"\n"  # line 3: blank
           + GOOD_LF.replace(b'"q"', b'"a\rb"') + b"\n"  # line 4: a raw CR inside a string
           + GOOD_LF[:20] + b"\n"  # line 5: broken JSON
           + GOOD_LF.replace(b", ", b",\r ") + b"\n"  # line 6: raw CRs as whitespace
           + GOOD_LF)  # line 7, no final newline
    file = write_lf(tmp_path, raw)
    ds = formats.LlamaFactoryDataset(str(tmp_path), ["d"], qtok, MIN_PIX, MAX_PIX, MAX_LEN)
    assert [(f, i) for f, i, _, _ in ds.samples] == [(file, 1), (file, 6), (file, 7)]
    why = {i: r for f, i, r in ds.skipped}
    assert sorted(why) == [2, 4, 5] and why[2] == "not UTF-8: byte 0xe9 at byte 47"
    assert why[4].startswith("bad JSON: Invalid control character") and why[5].startswith("bad JSON")
    assert formats.load_report(ds) == [f"skipped 3 of 6 records in {file} at load"]


@pytest.mark.parametrize("raw, msg", [
    (b"", "the file is empty"), (b"[{\"a\": 1},", "bad JSON: Expecting"), (b"[1, 2,]", "bad JSON: Expecting value"),
    (b"[\"caf\xe9\"]", "not UTF-8: byte 0xe9"), ("[1]".encode("utf-16"), "is UTF-16 text"),
    ("[1]".encode("utf-16-le"), "is UTF-16-LE text"), (gzip.compress(b"[1]"), "gzip-compressed"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"), (b"[" + b"9" * 5000 + b"]", "bad JSON: Exceeds the limit"),
    (b"{\"a\": 1}", "expected a JSON list of records, got dict")])
def test_whole_file_errors_name_the_file(tmp_path, qtok, raw, msg):
    file = write_lf(tmp_path, raw, "d.json")
    with pytest.raises(ValueError, match=re.escape(f"{file}: ") + ".*" + re.escape(msg)):
        formats.LlamaFactoryDataset(str(tmp_path), ["d"], qtok, MIN_PIX, MAX_PIX, MAX_LEN)
    assert formats.read_json(write_lf(tmp_path, b"\xef\xbb\xbf[1]", "bom.json")) == [1]  # a UTF-8 BOM is accepted


def test_dicts_where_lists_belong_and_back_name_the_file(tmp_path, qtok):
    (tmp_path / "dataset_info.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "dataset_info.json")) + ": expected a JSON object"):
        formats.LlamaFactoryDataset(str(tmp_path), ["d"], qtok, MIN_PIX, MAX_PIX, MAX_LEN)
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="meta.json: expected a non-empty JSON object"):
        formats.read_meta(str(tmp_path / "meta.json"))
    (tmp_path / "meta.json").write_text('{"d": {"root": "", "annotation": "a.jsonl"')
    with pytest.raises(ValueError, match="meta.json: bad JSON: Expecting"):
        formats.read_meta(str(tmp_path / "meta.json"))


def test_nan_repeat_time_deep_lines_huge_ints_and_surrogates(tmp_path, itok):
    ann = tmp_path / "a.jsonl"
    good = json.dumps({"conversations": conv("q", "a")})
    ann.write_text("\n".join([good, "[" * 100000 + "]" * 100000, good[:-1] + ', "id": ' + "1" * 5000 + "}",
                              json.dumps({"conversations": conv("q \ud800", "a")}), good]) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text('{"d": {"root": "", "annotation": "a.jsonl", "data_augment": false, "repeat_time": NaN}}')
    with pytest.raises(ValueError, match="'repeat_time' must be > 0.*nan"):
        formats.read_meta(str(meta))
    meta.write_text(meta.read_text().replace("NaN", "1"))
    ds = formats.InternVLDataset(str(meta), itok, "internvl2_5", 16, 112, max_tiles=2)
    why = {i: r for f, i, r in ds.skipped}
    assert sorted(l for _, l, _, _ in ds.samples) == [1, 5] and sorted(why) == [2, 3, 4]
    assert why[2] == "bad JSON: nested too deeply" and "Exceeds the limit (4300 digits)" in why[3]
    assert why[4] == "text holds a lone surrogate '\\ud800' (an unpaired \\u escape)"
    assert all("skip" not in ds[i] for i in range(len(ds)))


def test_print_skipped_survives_surrogates_and_prints_totals(capsys):
    train.print_skipped([("f\udcff.jsonl", 3, "bad 'x\ud800'")], ["skipped 1 of 2 records in f at load"])
    out = capsys.readouterr().out
    assert out == "skip f\\udcff.jsonl:3: bad 'x\\ud800'\nskipped 1 of 2 records in f at load\n"


def grounding_one(tmp_path, tok, rec, size=(40, 30), crop=(0.5, 1.5)):
    root = tmp_path / "ShowUI-desktop"
    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "metadata", exist_ok=True)
    Image.new("RGB", size, (200, 200, 200)).save(root / "images" / "a.png")
    (root / "metadata" / "x.json").write_text(json.dumps([rec]))
    return formats.ShowUIGrounding(str(tmp_path), ["showui-desktop:x"], tok, MIN_PIX, MAX_PIX, MAX_LEN,
                                   crop_min=crop[0], crop_max=crop[1])


@pytest.mark.parametrize("size, why", [
    ([float("inf"), 30], "'img_size' list [inf, 30] is not [width, height] in whole pixels"),
    ([1, 30], "'img_size' list [1, 30] is not [width, height] in whole pixels"),  # int(1 * 0.5) = 0: a 0-wide crop
    ([40.5, 30], "in whole pixels"), ([100000, 100000], "'img_size' [100000, 100000] is not the size of"),
    ([41, 30], "'img_size' [41, 30] is not the size of")])
def test_grounding_img_size_is_checked(tmp_path, qtok, size, why):
    el = {"instruction": "a", "bbox": [0.4, 0.4, 0.6, 0.6], "point": [0.5, 0.5]}
    ds = grounding_one(tmp_path, qtok, {"img_url": "a.png", "img_size": size, "element": [el]})
    for seed in range(5):  # the size check comes before the crop draws anything
        random.seed(seed)
        skip = ds.skipped[0] if ds.skipped else ds[0]["skip"]
        assert skip[1] == 0 and why in skip[2]
    ok = grounding_one(tmp_path, qtok, {"img_url": "a.png", "img_size": [40, 30], "element": [el]})
    assert ok.skipped == [] and "skip" not in ok[0]


@pytest.mark.parametrize("step, why", [
    ({"action_type": "click", "point": [float("nan"), 0.5]}, "CLICK point list [nan, 0.5] is not [x, y]"),
    ({"action_type": "click", "point": [float("inf"), 0.5]}, "CLICK point list [inf, 0.5]"),
    ({"action_type": "click", "point": None}, "CLICK point NoneType None is not [x, y] with numbers in 0..1 (req"),
    ({"action_type": "click", "point": [640, 360]}, "CLICK point list [640, 360]"),
    ({"action_type": "hover", "point": [1.2, 0.5]}, "HOVER point list [1.2, 0.5]"),
    ({"action_type": "select_text", "point": [[0.1, 0.1]]}, "SELECT_TEXT point list [[0.1, 0.1]] is not [[x1, y1]"),
    ({"action_type": "answer"}, "ANSWER has no 'action_value'")])
def test_navigation_points_are_checked_as_grounding_does(tmp_path, qtok, step, why):
    root = tmp_path / "GUI_Course" / "GUIAct"
    os.makedirs(root / "images")
    os.makedirs(root / "metadata")
    Image.new("RGB", (60, 40)).save(root / "images" / "s.png")
    (root / "metadata" / "hf_train_web-single.json").write_text(json.dumps(
        [{"img_url": "s", "task": "t", "step_history": [], "step": step}]))
    ds = formats.ShowUINavigation(str(tmp_path), ["guiact:hf_train_web-single"], qtok, MIN_PIX, MAX_PIX, MAX_LEN)
    assert len(ds) == 0 and ds.skipped[0][1] == 0 and ds.skipped[0][2].startswith(f"step: {why}")


def test_16_bit_grey_is_scaled_to_8_bits(tmp_path):
    a = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode.startswith("I")  # PIL's own RGB conversion clips this at 255
    rgb = np.asarray(formats.load_rgb(str(tmp_path / "g.png")))
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_llamafactory_image_like_upstream():
    f = formats.llamafactory_image
    assert f(Image.new("RGB", (6000, 25)), 768 * 768).size == (5040, 28)  # 28 floor, then width 180 x height
    assert f(Image.new("RGB", (25, 6000)), 0).size == (28, 5040)
    assert f(Image.new("RGB", (30, 30)), 0).size == (32, 32)  # LLaMA-Factory's 32 x 32 area floor
    assert f(Image.new("RGB", (1000, 1000)), 768 * 768).size == (768, 768)
    assert formats.LlamaFactoryDataset.__init__.__defaults__[0] == 768 * 768  # LLaMA-Factory's image_max_pixels
