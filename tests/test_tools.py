"""The data tools: SRP and AITW generators on hand-written inputs in the upstream schemas, and the synthetic-data
pipeline end to end with our tiny models and with a local chat-completions server (retries, resume, no repeats)."""
import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import data
import formats
import load
from tools import aitw, srp, synth
from tools.common import Skips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")


def node(label, bounds, children=None, icon=None):
    n = {"class": "android.widget.View", "bounds": bounds, "componentLabel": label}
    if icon:
        n["iconClass"] = icon
    if children is not None:
        n["children"] = children
    return n


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def consumable(meta, n):
    """The output loads in the training dataset: every line valid, every image found, the first sample encodes."""
    tok = load.load_tokenizer(os.path.join(FIX, "internvl2_tiny"))
    ds = formats.InternVLDataset(meta, tok, "internlm2-chat", num_image_token=16, image_size=112, max_tiles=1,
                              max_length=100000)
    assert ds.skipped == [] and len(ds) == n
    if n:
        assert "skip" not in ds[0] and ds[0]["labels"].ne(-100).sum() > 1


# ---------------------------------------------------------------------------------------------------------- SRP

def rico(tmp_path):
    """Screen 1 (1000x2000 from --size): A toolbar holding B, C, H (H's box equals B's once normalised) and an
    off-screen D with a child; a big E holding F; an off-screen G. Screen 2 (2000x1000 from its png): one child of a
    full-screen parent. Screens 3 and 4 are broken."""
    A, B = [0, 0, 1000, 200], [10, 20, 110, 120]
    C, H = [200, 20, 300, 120], [10, 20, 110, 121]
    E, F = [0, 300, 1000, 1200], [0, 300, 1000, 700]  # F: 20 % of the screen, no enclosing box has IoU <= 0.1
    doc1 = {"bounds": [0, 0, 1000, 2000], "children": [
        node("Toolbar", A, [node("Text Button", B), node("Icon", C, icon="arrow_backward"), node("On/Off Switch", H),
                            node("Text", [900, 20, 1100, 120], [node("Icon", [950, 30, 960, 40])])]),
        node("List Item", E, [node("", F, icon="star")]),
        node("Image", [-5, 1300, 100, 1400])]}
    sem = tmp_path / "semantic"
    write_json(str(sem / "1.json"), doc1)
    write_json(str(sem / "2.json"), {"children": [node("Drawer", [0, 0, 2000, 1000], [node("Icon", [500, 250, 1000,
                                                                                                    500])])]})
    Image.new("RGB", (2000, 1000)).save(sem / "2.png")
    write_json(str(sem / "3.json"), {"children": [node("Drawer", [0, 0, 10, 10], [{"componentLabel": "Icon"}])]})
    (sem / "4.json").write_text("{not json")
    for i in (1, 2):
        os.makedirs(tmp_path / "Rico", exist_ok=True)
        Image.new("RGB", (54, 96), (255, 255, 255)).save(tmp_path / "Rico" / f"{i}.jpg")
    return sem


def test_srp_relations_counts_boxes_and_both_styles(tmp_path):
    sem = rico(tmp_path)
    out, skips = srp.main([str(sem), str(tmp_path / "out"), "--size", "1000x2000", "--image-root", str(tmp_path)])
    for style in ("natural", "xml"):
        rows = jsonl(tmp_path / "out" / f"srp_{style}.jsonl")
        assert rows == out[style]
        one = [r for r in rows if r["image"] == "Rico/1.jpg"]
        two = [r for r in rows if r["image"] == "Rico/2.jpg"]
        # siblings: B-C, C-B, C-H, H-C (B-H, H-B dropped: same normalised box); contains/inside: A-B, A-C, A-H,
        # E-F each way; no containment: 2 for each of B, C, H, none for F; unrelated: 2 for each of B, C, H from {E, F}
        assert Counter(r["relation"] for r in one) == {"sibling": 4, "contains": 4, "inside": 4, "no containment": 6,
                                                       "unrelated": 6}
        assert Counter(r["relation"] for r in two) == {"contains": 1, "inside": 1}  # 2000x1000 from 2.png
        assert [r["id"] for r in rows] == list(range(len(rows)))
        for r in rows:
            q, a = r["conversations"]
            assert q["from"] == "human" and q["value"].startswith("<image>\n") and a["from"] == "gpt"
            assert q["value"].endswith("(with XML format)") == (style == "xml")
    assert skips.counts == {"off-screen node (with its subtree)": 3, "same box twice": 4, "unreadable file": 2}

    nat = {(r["relation"], r["conversations"][0]["value"]): r["conversations"][1]["value"]
           for r in out["natural"]}
    A, C, B, Fb = "[0, 0, 1000, 100]", "[200, 10, 300, 60]", "[10, 10, 110, 60]", "[0, 150, 1000, 350]"
    # contains: asked parent first, answered child first, in every template
    (q, a), = [(q, a) for (rel, q), a in nat.items() if rel == "contains" and q.find(A) < q.find(C) and C in q]
    assert a in [t.format(bbox1=C, type1="Icon", bbox2=A, type2="Toolbar") for t in srp.ANSWERS["natural"][1]]
    xml_contains = [r["conversations"][1]["value"] for r in out["xml"] if r["relation"] == "contains" and
                    C in r["conversations"][0]["value"]]
    assert xml_contains == ["Related:\n<Toolbar>\n    <box>[0, 0, 1000, 100]</box>\n    <Icon>\n        "
                            "<box>[200, 10, 300, 60]</box>\n    </Icon>\n</Toolbar>"]
    xml_sib = [r["conversations"][1]["value"] for r in out["xml"] if r["relation"] == "sibling" and
               r["conversations"][0]["value"].find(C) < r["conversations"][0]["value"].find(B) and
               B in r["conversations"][0]["value"]]
    sib = "Related:\n<Toolbar>\n    <box>[0, 0, 1000, 100]</box>\n    <Icon>\n        <box>[200, 10, 300, 60]</box>\n" \
          "    </Icon>\n    <{0}>\n        <box>[10, 10, 110, 60]</box>\n    </{0}>\n</Toolbar>"
    assert sorted(xml_sib) == [sib.format("Button"), sib.format("Switch")]  # C-B and C-H (H's box equals B's)
    # labels: "Text Button" -> Button, "On/Off Switch" -> Switch (XML only), empty label -> iconClass
    xml_text = "\n".join(r["conversations"][1]["value"] for r in out["xml"])
    nat_text = "\n".join(r["conversations"][1]["value"] for r in out["natural"])
    assert "<Switch>" in xml_text and "On/Off" not in xml_text and '"On/Off Switch"' in nat_text
    assert "<List_Item>" in xml_text and '"List Item"' in nat_text and '"star"' in nat_text and "<star>" in xml_text
    assert "Text Button" not in nat_text and "Text_Button" not in xml_text
    # F inside E, natural: child first; screen 2 normalised by its png's 2000x1000
    inside_f = [a for (rel, q), a in nat.items() if rel == "inside" and Fb in q]
    assert len(inside_f) == 1 and Fb in inside_f[0] and "[0, 150, 1000, 600]" in inside_f[0]
    assert any("[250, 250, 500, 500]" in r["conversations"][0]["value"] for r in out["natural"]
               if r["image"] == "Rico/2.jpg")
    # no containment: the second box encloses the node; unrelated partners are E or F only
    for r in out["xml"]:
        boxes = [[int(v) for v in b] for b in re.findall(r"\[(\d+), (\d+), (\d+), (\d+)\]",
                                                          r["conversations"][0]["value"])]
        if r["relation"] == "no containment":
            n, s = boxes
            assert s[0] <= n[0] and s[1] <= n[1] and s[2] >= n[2] and s[3] >= n[3] and max(s) <= 1000
            assert r["conversations"][1]["value"].endswith(f"<Unknown>\n    <box>{s}</box>\n</Unknown>")
        if r["relation"] == "unrelated" and r["image"] == "Rico/1.jpg":
            assert boxes[1] in ([0, 150, 1000, 600], [0, 150, 1000, 350])
    consumable(str(tmp_path / "out" / "srp_meta.json"), len(out["natural"]) + len(out["xml"]))


def test_srp_negatives_respect_the_iou_thresholds():
    import random
    node_, parent = [400, 900, 500, 1000], [300, 800, 700, 1200]
    rng = random.Random(0)
    boxes = [srp.enclosing_box(node_, parent, (1000, 2000), rng) for _ in range(200)]
    assert all(b is not None for b in boxes)
    for b in boxes:
        assert b[0] <= 400 and b[1] <= 900 and b[2] >= 500 and b[3] >= 1000 and b[2] <= 1000 and b[3] <= 2000
        assert srp.iou(b, node_) <= 0.1 and srp.iou(b, parent) <= 0.3
    assert srp.enclosing_box([0, 0, 1000, 400], [0, 0, 1000, 2000], (1000, 2000), rng) is None  # 20 % of the screen
    assert srp.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150, abs=1e-12)


def test_srp_errors_name_the_file_and_field(tmp_path, capsys):
    sem = rico(tmp_path)
    skips = srp.Skips()
    srp.generate(str(sem), ["natural"], ["3"], skips=skips)
    err = capsys.readouterr().err
    assert "3.json" in err and "children[0].children[0].bounds" in err and skips.counts == {"unreadable file": 1}


# --------------------------------------------------------------------------------------------------------- AITW

def yxhw(x1, y1, x2, y2, w=1000, h=2000):
    return [y1 / h, x1 / w, (y2 - y1) / h, (x2 - x1) / w]


def test_aitw_small_icon_selection(tmp_path):
    screen = {"image_path": "general/ep1/0.png", "image/width": 1000, "image/height": 2000,
              "image/ui_annotations_text": [""] * 9, "image/ui_annotations_ui_types": [
                  "ICON_HOME", "ICON_STAR", "ICON_HEART", "TEXT", "ICON_PLUS", "ICON_PLUS", "ICON_SEND",
                  "ICON_NOT_IN_MAP", "ICON_CHECK"],
              "image/ui_annotations_positions": [
                  yxhw(100, 200, 160, 300),  # 6000 px = exactly 0.3 % of 1000x2000: out
                  yxhw(100, 400, 159, 500),  # 5900 px = 0.295 %: in
                  yxhw(500, 600, 561, 700),  # 6100 px: out
                  yxhw(0, 0, 5, 5),  # TEXT: out
                  yxhw(0, 0, 5, 5), yxhw(10, 10, 15, 15),  # a type seen twice: out
                  yxhw(50, 50, 50, 60),  # zero area: out
                  yxhw(0, 0, 5, 5),  # not in the icon map: out
                  yxhw(0, 0, 10, 10)]}  # in
    bad = dict(screen)
    del bad["image/height"]
    write_json(str(tmp_path / "aitw" / "general" / "ep1" / "meta.json"), [screen, bad])
    os.makedirs(tmp_path / "aitw" / "general" / "ep_empty")
    x = {"image_path": "install/ep9/3.png", "image/width": 1080, "image/height": 2400,
         "image/ui_annotations_ui_types": ["ICON_X"],
         "image/ui_annotations_positions": [[0.1, 0.5, 0.02, 0.04]]}  # y 240..288, x 540..583
    write_json(str(tmp_path / "aitw" / "install" / "ep9" / "meta.json"), [x])
    write_json(str(tmp_path / "aitw" / "googleapps" / "ep2" / "meta.json"), [x])  # not among --splits: not read
    for p in ("general/ep1/0.png", "install/ep9/3.png"):
        os.makedirs(os.path.dirname(tmp_path / "img" / p), exist_ok=True)
        Image.new("RGB", (50, 100)).save(tmp_path / "img" / p)
    out, skips = aitw.main([str(tmp_path / "aitw"), str(tmp_path / "out"), "--image-root", str(tmp_path / "img"),
                            "--splits", "general", "install"])
    rows = jsonl(tmp_path / "out" / "aitw_small_icon.jsonl")
    assert rows == out
    assert [(r["type"], r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in rows] == [
        ("ICON_STAR", '<image>\nGive the bounding box reffering to "star icon".', "[[100, 200, 159, 250]]"),
        ("ICON_CHECK", '<image>\nGive the bounding box reffering to "checkmark icon".', "[[0, 0, 10, 5]]"),
        ("ICON_X", '<image>\nGive the bounding box reffering to "close icon".', "[[500, 100, 539, 120]]")]
    assert rows[0]["rate"] == pytest.approx(0.295, abs=1e-12) and (rows[2]["width"], rows[2]["height"]) == (1080, 2400)
    assert skips.counts == {"bad record": 1, "episode without meta.json": 1}
    assert json.load(open(tmp_path / "out" / "aitw_meta.json"))["AITW_small_icon"]["length"] == "3"
    consumable(str(tmp_path / "out" / "aitw_meta.json"), 3)
    assert len(aitw.ICONS) == 62
    with pytest.raises(FileNotFoundError, match="nosuch"):
        aitw.generate(str(tmp_path / "aitw"), ["nosuch"])


def test_aitw_reads_every_split_folder_by_default(tmp_path):
    """Upstream's get_folds reads every folder of the root; e7b8d93 read only general/ and install/ unless told."""
    x = {"image_path": "a.png", "image/width": 1080, "image/height": 2400, "image/ui_annotations_ui_types": ["ICON_X"],
         "image/ui_annotations_positions": [[0.1, 0.5, 0.02, 0.04]]}
    for split in ("install", "googleapps", "general", "web_shopping"):
        write_json(str(tmp_path / "aitw" / split / "ep" / "meta.json"), [dict(x, image_path=f"{split}/0.png")])
    (tmp_path / "aitw" / "README.txt").write_text("not a split")
    skips = Skips()
    rows = aitw.generate(str(tmp_path / "aitw"), skips=skips)
    assert [r["image"] for r in rows] == ["general/0.png", "googleapps/0.png", "install/0.png", "web_shopping/0.png"]
    assert skips.counts == {"not a split folder": 1}  # the README, reported
    rows = aitw.generate(str(tmp_path / "aitw"), ["web_shopping", "general"])  # --splits: those, in that order
    assert [r["image"] for r in rows] == ["web_shopping/0.png", "general/0.png"]
    with pytest.raises(FileNotFoundError, match="no AITW folder"):
        aitw.generate(str(tmp_path / "nosuch"))


def test_aitw_boxes_are_upstreams_int():
    """Upstream's process_bbox is int(v * size) of each normalised edge; e7b8d93 added 1e-6 before flooring, so float
    noise kept a pixel upstream loses (and lost none it keeps), and the 0 < area < 0.3 % rule then kept other icons."""
    assert aitw.pixel_box([0.29, 0.29, 0.01, 0.01], 100, 100) == [28, 28, 30, 30]  # 0.29 * 100 = 28.999...96
    assert aitw.pixel_box([0.06, 0.06, 0.01, 0.01], 100, 100) == [6, 6, 6, 6]  # 0.07 * 100 = 6.999...: zero area
    screen = {"image_path": "0.png", "image/width": 100, "image/height": 100,
              "image/ui_annotations_ui_types": ["ICON_STAR", "ICON_HEART"],
              "image/ui_annotations_positions": [[0.06, 0.06, 0.01, 0.01],  # e7b8d93: a 1x1 box, kept; upstream: 0
                                                 [0.29, 0.29, 0.001, 0.001]]}  # e7b8d93: 0x0; upstream: 1x1, kept
    assert aitw.select(screen) == [("ICON_HEART", [28, 28, 29, 29], 0.01)]


def test_tools_run_as_scripts(tmp_path):
    sem = rico(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "srp.py"), str(sem), str(tmp_path / "o"),
                        "--style", "xml", "--size", "1000x2000"], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "srp: xml 26 samples" in r.stdout and not os.path.exists(tmp_path / "o" / "srp_natural.jsonl")
    assert not [f for f in os.listdir(tmp_path / "o") if f.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- synthetic pipeline

def screens(tmp_path):
    d = tmp_path / "screens"
    os.makedirs(d / "sub")
    Image.new("RGB", (200, 400), (250, 250, 250)).save(d / "a.png")
    Image.new("RGB", (100, 200), (20, 20, 20)).save(d / "b.jpg")
    Image.new("RGB", (300, 300), (0, 200, 0)).save(d / "sub" / "c.png")
    (d / "notes.txt").write_text("not a screenshot")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.png": [[100, 100, 500, 300], [0, 0, 1000, 1000], [100, 100, 500, 300]],
                                 "sub/c.png": [[500, 500, 900, 700]], "gone.png": [[0, 0, 10, 10]]}))
    return str(d), str(boxes)


class Teacher(BaseHTTPRequestHandler):
    """A chat-completions server: a deterministic answer per request; every request is recorded as (image digest,
    prompt); requests named in server.fail_once fail with a 500 the first time, server.always_fail every time."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        msgs = body["messages"]
        assert msgs[0] == {"role": "system", "content": "You are a helpful assistant."} and body["model"] == "teacher"
        text = [c["text"] for c in msgs[1]["content"] if c["type"] == "text"][0]
        urls = [c["image_url"]["url"] for c in msgs[1]["content"] if c["type"] == "image_url"]
        digest = ""
        if urls:
            png = base64.b64decode(urls[0].split(",", 1)[1])
            digest = hashlib.sha1(png).hexdigest()[:8]
            with Image.open(io.BytesIO(png)) as im:
                self.server.sizes[digest] = im.size
                if text.startswith("Describe this image."):  # the blue 2-px box outline
                    self.server.blue[digest] = any(b > max(r, g) + 20 for _, (r, g, b) in im.getcolors(1 << 16))
        req = (digest, text)
        with self.server.lock:
            self.server.requests.append(req)
            n = self.server.requests.count(req)
        kind = "global" if text == synth.GLOBAL_PROMPT else "qa" if text == synth.QA_PROMPT else \
            "format" if text.startswith(synth.FORMAT_PROMPT) else "local"
        if (kind, digest) in self.server.always_fail or (n == 1 and (kind, digest) in self.server.fail_once):
            self.send_response(500)
            self.end_headers()
            return
        if kind == "local":
            reply = "Box " + text[text.rindex("<|box_start|>"):]
        elif kind == "format":  # Python-literal quotes, as the official prompt's example; the last pair is broken
            reply = ("Sure: [{'question': 'What is shown?', 'type': 'icon', 'answer': '%s'}, {'question': 'Where?', "
                     "'type': 'location', 'answer': 7}, {'question': 'no answer'}]" % text[len(synth.FORMAT_PROMPT):])
        else:
            reply = f"A screen {digest}." if kind == "global" else f"Q: what? A: {digest}"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    srv.requests, srv.lock, srv.sizes, srv.blue = [], threading.Lock(), {}, {}
    srv.fail_once, srv.always_fail = set(), set()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def digest_of(path, region="", scale=0.7):
    buf = io.BytesIO()
    synth.picture(path, region, scale).save(buf, format="PNG")
    return hashlib.sha1(buf.getvalue()).hexdigest()[:8]


def test_synth_server_retries_resumes_and_never_repeats(tmp_path, server):
    d, boxes = screens(tmp_path)
    out = str(tmp_path / "out")
    url = f"http://127.0.0.1:{server.server_address[1]}"
    args = [d, out, "--server", url, "--server-model", "teacher", "--boxes", boxes, "--workers", "3",
            "--backoff", "0.01", "--max-retries", "2"]
    ga, gb = digest_of(os.path.join(d, "a.png")), digest_of(os.path.join(d, "b.jpg"))
    server.fail_once.add(("global", gb))
    # 9 jobs: global x3, local x3 (a: 2 distinct boxes, c: 1), qa x3; the first run stops after 4
    synth.main(args + ["--limit", "4"])
    cache = jsonl(os.path.join(out, "cache.jsonl"))
    assert [(r["image"], r["task"], r["region"]) for r in sorted(cache, key=lambda r: (r["task"], r["image"]))] == [
        ("a.png", "global", ""), ("b.jpg", "global", ""), ("sub/c.png", "global", ""),
        ("a.png", "local", "[100,100,500,300]")]
    assert len(server.requests) == 5 and server.requests.count((gb, synth.GLOBAL_PROMPT)) == 2  # one retry
    assert server.sizes[ga] == (140, 280) and server.sizes[gb] == (70, 140)  # downscaled by 0.7
    first = list(server.requests)
    rows, _ = synth.main(args)  # resume: the other 5 jobs, qa taking two calls each
    assert len(server.requests) == 5 + 2 + 3 * 2
    repeats = {r: c for r, c in Counter(server.requests).items() if c > 1}
    assert repeats == {(gb, synth.GLOBAL_PROMPT): 2} and not set(server.requests[5:]) & set(first)
    assert len(server.blue) == 3 and all(server.blue.values())  # the outline survives the downscale
    im = synth.picture(os.path.join(d, "a.png"), "[100,100,500,300]", 1)  # 200x400: x 20..100, y 40..120, 2 px
    assert im.getpixel((20, 80)) == im.getpixel((21, 80)) == im.getpixel((60, 120)) == (0, 0, 255)
    assert im.getpixel((22, 80)) == im.getpixel((19, 80)) == im.getpixel((60, 121)) == (250, 250, 250)
    cache = jsonl(os.path.join(out, "cache.jsonl"))
    keys = [(r["image"], r["task"], r["region"]) for r in cache]
    assert len(keys) == 9 == len(set(keys))
    # a finished run asks nothing and writes the same files
    before = {f: open(os.path.join(out, f)).read() for f in os.listdir(out)}
    synth.main(args)
    assert len(server.requests) == 13 and before == {f: open(os.path.join(out, f)).read() for f in os.listdir(out)}
    g = jsonl(os.path.join(out, "global_des.jsonl"))
    assert [(r["image"], r["width"], r["height"], r["conversations"]) for r in g] == [
        (im, w, h, [{"from": "human", "value": "<image>\nDescribe this screen."},
                    {"from": "gpt", "value": f"A screen {digest_of(os.path.join(d, im))}."}])
        for im, w, h in (("a.png", 200, 400), ("b.jpg", 100, 200), ("sub/c.png", 300, 300))]
    loc = jsonl(os.path.join(out, "local_des.jsonl"))
    assert [(r["image"], r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in loc] == [
        ("a.png", "<image>\nDescribe the content in the bounding box [[0, 0, 1000, 1000]] and the component it belongs "
                  "to.", "Box <|box_start|>(0,0),(1000,1000)<|box_end|>"),
        ("a.png", "<image>\nDescribe the content in the bounding box [[100, 100, 500, 300]] and the component it "
                  "belongs to.", "Box <|box_start|>(100,100),(500,300)<|box_end|>"),
        ("sub/c.png", "<image>\nDescribe the content in the bounding box [[500, 500, 900, 700]] and the component it "
                      "belongs to.", "Box <|box_start|>(500,500),(900,700)<|box_end|>")]
    qa = jsonl(os.path.join(out, "spe_qa.jsonl"))
    assert len(qa) == 6 and [r["type"] for r in qa] == ["icon", "location"] * 3
    assert qa[1]["conversations"] == [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "7"}]
    assert qa[0]["conversations"][1]["value"] == f"Q: what? A: {ga}"
    meta = formats.read_meta(os.path.join(out, "meta.json"))
    assert [(m["name"], os.path.basename(m["annotation"]), m["root"]) for m in meta] == [
        ("global_des", "global_des.jsonl", d), ("local_des", "local_des.jsonl", d), ("spe_qa", "spe_qa.jsonl", d)]
    consumable(os.path.join(out, "meta.json"), 3 + 3 + 6)


def test_synth_gives_up_naming_image_and_task_then_resumes(tmp_path, server):
    d, boxes = screens(tmp_path)
    out = str(tmp_path / "out")
    args = [d, out, "--server", f"http://127.0.0.1:{server.server_address[1]}/v1", "--server-model", "teacher",
            "--tasks", "global", "--backoff", "0.001", "--max-retries", "2", "--workers", "1"]
    gc = digest_of(os.path.join(d, "sub", "c.png"))
    server.always_fail.add(("global", gc))  # the server is down for this one
    with pytest.raises(RuntimeError, match=r"sub/c\.png task global: no answer .* after 3 attempts"):
        synth.main(args)
    assert server.requests.count((gc, synth.GLOBAL_PROMPT)) == 3 and len(jsonl(os.path.join(out, "cache.jsonl"))) == 2
    assert len(jsonl(os.path.join(out, "global_des.jsonl"))) == 2  # what was done is converted anyway
    with open(os.path.join(out, "cache.jsonl"), "a") as f:
        f.write('{"image": "sub/c.png", "task": "glo')  # a write torn by a kill
    server.always_fail.clear()
    rows, skips = synth.main(args)
    assert len(server.requests) == 2 + 3 + 1 and len(rows["global"]) == 3 and skips.counts["torn cache line"] == 1
    keys = [(r["image"], r["task"]) for r in jsonl(os.path.join(out, "cache.jsonl"))]
    assert sorted(keys) == [("a.png", "global"), ("b.jpg", "global"), ("sub/c.png", "global")]


@pytest.mark.parametrize("fixture", ["internvl2_tiny", "qwen2_vl_tiny"])
def test_synth_with_our_tiny_model(tmp_path, fixture, monkeypatch):
    d, boxes = screens(tmp_path)
    out = str(tmp_path / "out")
    args = [d, out, "--model", os.path.join(FIX, fixture), "--boxes", boxes, "--max-new-tokens", "6",
            "--batch-size", "8", "--max-tiles", "1", "--min-pixels", "3136", "--max-pixels", "12544", "--device", "cpu"]
    rows, skips = synth.main(args + ["--limit", "5"])  # global x3, local for a.png x2
    cache = jsonl(os.path.join(out, "cache.jsonl"))
    assert len(cache) == 5 and all(isinstance(r["response"], str) for r in cache)
    rows, skips = synth.main(args)  # the rest: local for c.png, qa x3
    cache = jsonl(os.path.join(out, "cache.jsonl"))
    keys = [(r["image"], r["task"], r["region"]) for r in cache]
    assert len(keys) == 9 == len(set(keys))
    qa = [r for r in cache if r["task"] == "qa"]
    assert len(qa) == 3 and all(isinstance(r["formatted"], str) for r in qa)
    empty = sum(not r["response"].strip() for r in cache if r["task"] != "qa")
    assert empty == 0 or fixture == "qwen2_vl_tiny"  # the tiny Qwen often ends its turn at once
    assert len(rows["global"]) + len(rows["local"]) + empty == 6
    assert skips.counts.get("empty answer", 0) == empty
    parsed = sum(synth.parse_pairs(r["formatted"]) is not None for r in qa)  # gibberish: most likely none
    assert skips.counts.get("SPE-QA reply without a JSON list", 0) == 3 - parsed
    for r in rows["global"]:
        assert r["conversations"][0]["value"] == "<image>\nDescribe this screen."
        assert r["conversations"][1]["value"] == next(c["response"].strip() for c in cache
                                                      if c["image"] == r["image"] and c["task"] == "global")
    before = open(os.path.join(out, "cache.jsonl")).read()
    monkeypatch.setattr(synth, "OwnModel", None)  # all done: the model is not even loaded, nothing is appended
    synth.main(args)
    assert open(os.path.join(out, "cache.jsonl")).read() == before
