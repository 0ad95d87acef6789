"""The ShowUI, TongUI (LLaMA-Factory) and Vlaser data formats: records written here in the exact upstream shape
become samples whose whole text and supervised spans are checked against hand-written strings; crop / pad keeps
every surviving point on its element; malformed records are reported as (file, record, reason)."""
import json
import os
import random

import pytest
import torch
from PIL import Image

import data
import formats
import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MIN_PIX, MAX_PIX = 6272, 75264  # tiny: 8..96 merged tokens
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
GROUNDING = ("Based on the screenshot of the page, I give a text description and you give its corresponding location. "
             "The coordinate represents a clickable location [x, y] for an element, which is a relative coordinate on "
             "the screenshot, scaled from 0 to 1.")


@pytest.fixture(scope="module")
def qtok():
    return load.load_tokenizer(os.path.join(FIXTURES, "qwen2_vl_tiny"))


def text_of(tok, ids):
    """Decoded ids with each run of image pads collapsed to one, so a sample compares with its template string."""
    out = tok.decode([int(t) for t in ids], skip_special_tokens=False)
    while "<|image_pad|><|image_pad|>" in out:
        out = out.replace("<|image_pad|><|image_pad|>", "<|image_pad|>")
    return out


def supervised(tok, sample):
    """The supervised tokens decoded, one string per contiguous run."""
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert all(l in (-100, i) for i, l in zip(ids, labels))  # labels are the ids or ignored, never shifted
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l == -100 and cur:
            runs.append(cur)
            cur = []
        elif l != -100:
            cur.append(i)
    return [tok.decode(r, skip_special_tokens=False) for r in runs + ([cur] if cur else [])]


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def element(name, x, y, w=0.1, h=0.1):
    return {"instruction": name, "bbox": [x - w / 2, y - h / 2, x + w / 2, y + h / 2], "data_type": "text",
            "point": [x, y]}


# ----------------------------------------------------------------------------------------------------------------------
# ShowUI grounding


def grounding_dir(tmp_path, records, size=(280, 168)):
    """$_DATA_DIR/ShowUI-desktop/{images, metadata/hf_train.json}: the layout ShowUI's training code reads."""
    root = tmp_path / "ShowUI-desktop"
    os.makedirs(root / "images", exist_ok=True)
    for r in records:
        if isinstance(r, dict) and r.get("img_url") != "absent.png":
            Image.new("RGB", size, (200, 220, 240)).save(root / "images" / str(r["img_url"]))
    write_json(str(root / "metadata" / "hf_train.json"), records)
    return str(tmp_path), str(root / "metadata" / "hf_train.json")


def test_grounding_single_turn_is_showui_template(tmp_path, qtok):
    rec = {"img_url": "a.png", "img_size": [280, 168], "element": [element("Galerie", 0.6543, 0.3749)],
           "element_size": 1}
    d, _ = grounding_dir(tmp_path, [rec])
    ds = formats.ShowUIGrounding(d, ["showui-desktop:hf_train"], qtok, MIN_PIX, MAX_PIX, 4096, num_turn=100)
    s = ds[0]
    # no system turn; the uniform prompt, then the image, then the instruction, in one user turn
    assert text_of(qtok, s["input_ids"]) == (f"<|im_start|>user\n{GROUNDING}{IMG}Galerie<|im_end|>\n"
                                             "<|im_start|>assistant\n[0.65, 0.37]<|im_end|>")
    assert supervised(qtok, s) == ["[0.65, 0.37]<|im_end|>"]
    assert s["image_grid_thw"].tolist() == [[1, 12, 20]] and s["pixel_values"].shape == (240, 1176)
    assert int((s["input_ids"] == 151).sum()) == 60


def test_grounding_multi_turn_packing_samples_with_replacement(tmp_path, qtok):
    els = [element("OK", 0.2, 0.3), element("Cancel", 0.5, 0.7), element("Help", 0.8, 0.126)]
    d, _ = grounding_dir(tmp_path, [{"img_url": "a.png", "img_size": [280, 168], "element": els}])
    for num_turn, xy_int in ((2, False), (10, False), (3, True)):
        ds = formats.ShowUIGrounding(d, ["showui-desktop:hf_train"], qtok, MIN_PIX, MAX_PIX, 4096, num_turn=num_turn,
                                  xy_int=xy_int)
        random.seed(7)
        s = ds[0]
        random.seed(7)
        picked = random.choices(els, k=min(num_turn, 3))  # with replacement: k = min(num_turn, elements)
        answers = [str([int(v * 1000) for v in e["point"]] if xy_int else [round(v, 2) for v in e["point"]])
                   for e in picked]
        prompt = GROUNDING.replace("0 to 1.", "0 to 1000.") if xy_int else GROUNDING
        want = f"<|im_start|>user\n{prompt}{IMG}{picked[0]['instruction']}<|im_end|>\n<|im_start|>assistant\n"
        want += f"{answers[0]}<|im_end|>"
        for e, a in zip(picked[1:], answers[1:]):  # each further element: '\n' + user turn + answer + eos
            want += f"\n<|im_start|>user\n{e['instruction']}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>"
        assert text_of(qtok, s["input_ids"]) == want
        assert supervised(qtok, s) == [a + "<|im_end|>" for a in answers]
        assert int((s["input_ids"] == 151).sum()) == 60  # one image however many turns
    assert set(answers) <= {"[200, 300]", "[500, 700]", "[800, 126]"}  # xy_int: int(x * 1000)
    repeats = 0
    for seed in range(20):  # 3 turns from 3 elements drawn with replacement: some draws repeat an element
        random.seed(seed)
        runs = supervised(qtok, ds[0])
        repeats += len(set(runs)) < len(runs) == 3
    assert repeats > 0


def test_crop_pad_keeps_points_on_their_elements():
    """Each element is a coloured block around its point: after any crop / pad, every surviving point lands on its
    block's colour in the returned image, and its bbox still encloses it."""
    W, H = 400, 300
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    centres = [(40, 40), (360, 40), (200, 150), (40, 260), (360, 260), (120, 200)]
    image = Image.new("RGB", (W, H), (128, 128, 128))
    els = []
    for c, (x, y) in zip(colours, centres):
        image.paste(Image.new("RGB", (24, 24), c), (x - 12, y - 12))
        els.append(dict(instruction=str(c), bbox=[(x - 12) / W, (y - 12) / H, (x + 12) / W, (y + 12) / H],
                        point=[x / W, y / H]))
    kept_any = padded = 0
    for seed in range(60):
        random.seed(seed)
        out, kept = formats.showui_crop(image, [W, H], els, 0.5, 1.5)
        if kept is els:  # nothing survived: the original image and elements come back
            assert out is image
            continue
        kept_any += 1
        padded += out.size[0] > W or out.size[1] > H
        for e in kept:
            x, y = int(e["point"][0] * out.width), int(e["point"][1] * out.height)
            assert str(out.getpixel((x, y))) == e["instruction"], (seed, e)
            assert e["bbox"][0] <= e["point"][0] <= e["bbox"][2] and e["bbox"][1] <= e["point"][1] <= e["bbox"][3]
            assert all(0 <= v <= 1 for v in e["bbox"])
    assert kept_any > 30 and padded > 5
    assert els[0]["point"] == [40 / W, 40 / H]  # the record is never modified


def test_grounding_crop_in_dataset_answers_match_cropped_image(tmp_path, qtok):
    W, H = 280, 168
    image = Image.new("RGB", (W, H), (255, 255, 255))
    image.paste(Image.new("RGB", (28, 28), (255, 0, 0)), (126, 70))
    root = tmp_path / "mine"
    os.makedirs(root / "images")
    image.save(root / "images" / "a.png")
    write_json(str(root / "metadata" / "x.json"), [{"img_url": "a.png", "img_size": [W, H], "element": [
        dict(instruction="red", bbox=[126 / W, 70 / H, 154 / W, 98 / H], point=[140 / W, 84 / H])]}])
    ds = formats.ShowUIGrounding(str(tmp_path), ["mine:x"], qtok, MIN_PIX, MAX_PIX, 4096, crop_min=0.6, crop_max=1.4)
    for seed in range(10):
        random.seed(seed)
        s = ds[0]
        xy = json.loads(supervised(qtok, s)[0].replace("<|im_end|>", ""))
        random.seed(seed)
        crop, _ = formats.showui_crop(image, [W, H], ds.samples[0][2]["element"], 0.6, 1.4)
        assert s["image_grid_thw"].tolist() == [data.qwen_image(crop, MIN_PIX, MAX_PIX)[1].tolist()]
        assert crop.getpixel((int(xy[0] * crop.width), int(xy[1] * crop.height))) == (255, 0, 0)


def test_grounding_malformed_records_are_reported(tmp_path, qtok):
    good = {"img_url": "a.png", "img_size": [280, 168], "element": [element("OK", 0.5, 0.5)]}
    records = [good, {"img_url": "absent.png", "img_size": [280, 168], "element": [element("OK", 0.5, 0.5)]},
               {"img_url": "b.png", "img_size": [280, 168], "element": []},
               {"img_url": "c.png", "img_size": [280, 168], "element": [{"instruction": "OK", "point": [140, 84]}]},
               {"img_url": "d.png", "img_size": [280, 168], "element": [{"point": [0.5, 0.5]}]},
               {"img_url": "e.png", "img_size": "big", "element": [element("OK", 0.5, 0.5)]},
               ["not", "an", "object"]]
    d, meta = grounding_dir(tmp_path, records)
    ds = formats.ShowUIGrounding(d, ["showui-desktop:hf_train"], qtok, MIN_PIX, MAX_PIX, 4096)
    assert len(ds) == 1
    why = {i: r for f, i, r in ds.skipped}
    assert all(f == meta for f, _, _ in ds.skipped) and sorted(why) == [1, 2, 3, 4, 5, 6]
    assert "missing image" in why[1] and "absent.png" in why[1]
    assert "element" in why[2] and "point [140, 84]" in why[3] and "instruction" in why[4]
    assert "img_size" in why[5] and "object" in why[6]
    too_long = formats.ShowUIGrounding(d, ["showui-desktop:hf_train"], qtok, MIN_PIX, MAX_PIX, 100)[0]
    assert too_long["skip"][:2] == (meta, 0) and "max_length 100" in too_long["skip"][2]
    with pytest.raises(ValueError, match="name:json"):
        formats.ShowUIGrounding(d, ["showui-desktop"], qtok, MIN_PIX, MAX_PIX, 4096)


# ----------------------------------------------------------------------------------------------------------------------
# ShowUI navigation

SMARTPHONE = (  # upstream's _NAV_SYSTEM + _NAV_FORMAT for the smartphone split, verbatim
    "You are an assistant trained to navigate the smartphone screen. \nGiven a task instruction, a screen observation, "
    "and an action history sequence, \noutput the next action and wait for the next observation. \nHere is the action "
    "space:\n\n1. `INPUT`: Type a string into an element, value is a string to type and the position [x,y] is not "
    "applicable.\n2. `SWIPE`: Swipe the screen, value is not applicable and the position [[x1,y1], [x2,y2]] is the "
    "start and end position of the swipe operation.\n3. `TAP`: Tap on an element, value is not applicable and the "
    "position [x,y] is required.\n4. `ANSWER`: Answer the question, value is the status (e.g., 'task complete') and "
    "the position is not applicable.\n5. `ENTER`: Enter operation, value and position are not applicable.\n\n\n"
    "Format the action as a dictionary with the following keys:\n{'action': 'ACTION_TYPE', 'value': 'element', "
    "'position': [x,y]}\n\nIf value or position is not applicable, set it as `None`.\nPosition might be [[x1,y1], "
    "[x2,y2]] if the action requires a start and end position.\nPosition represents the relative coordinates on the "
    "screenshot and should be scaled to a range of 0-1.\n")


def nav_dir(tmp_path, split, records):
    root = tmp_path / "GUI_Course" / "GUIAct"
    os.makedirs(root / "images", exist_ok=True)
    for r in records:
        for url in [r.get("img_url")] + [h.get("img_url") for h in r.get("step_history", [])]:
            if url and url != "absent":
                Image.new("RGB", (150, 90), (30, 60, 90)).save(root / "images" / f"{url}.png")
    write_json(str(root / "metadata" / f"hf_train_{split}.json"), records)
    return str(tmp_path), str(root / "metadata" / f"hf_train_{split}.json")


def step(action, value=None, point=None, **kw):
    return {"action_type": action, "action_value": value, "point": point, **kw}


PHONE_RECORD = {"img_url": "s3", "task": "open the mail app", "step": step("tap", point=[0.4912, 0.4188]),
                "step_history": [dict(step("swipe", point=[[0.5, 0.8], [0.5, 0.2]]), img_url="s0"),
                                 dict(step("input", "mail", [0.1, 0.2]), img_url="s1"),
                                 dict(step("ENTER"), img_url="s2")]}
H1 = "{'action': 'INPUT', 'value': 'mail', 'position': [0.1, 0.2]}"
H2 = "{'action': 'ENTER', 'value': None, 'position': None}"
ANSWER = "{'action': 'TAP', 'value': None, 'position': [0.49, 0.42]}"


def test_navigation_tttt_is_showui_template(tmp_path, qtok):
    assert formats.nav_system("smartphone") == SMARTPHONE
    d, _ = nav_dir(tmp_path, "smartphone", [PHONE_RECORD])
    ds = formats.ShowUINavigation(d, ["guiact:hf_train_smartphone"], qtok, MIN_PIX, MAX_PIX, 8192, num_history=2,
                               history="tttt", num_turn=100)
    s = ds[0]
    # the last two past actions as text, run together as upstream's chat template joins text items, then the screen
    assert text_of(qtok, s["input_ids"]) == (f"<|im_start|>user\n{SMARTPHONE}Task: open the mail app\n{H1}{H2}{IMG}"
                                             f"<|im_end|>\n<|im_start|>assistant\n{ANSWER}<|im_end|>")
    assert supervised(qtok, s) == [ANSWER + "<|im_end|>"]
    assert len(s["image_grid_thw"]) == 1


@pytest.mark.parametrize("num_turn", [1, 100])
def test_navigation_vtvt_interleaves_screens_and_activates_history(tmp_path, qtok, num_turn):
    d, _ = nav_dir(tmp_path, "smartphone", [PHONE_RECORD])
    ds = formats.ShowUINavigation(d, ["guiact:hf_train_smartphone"], qtok, MIN_PIX, MAX_PIX, 8192, num_history=2,
                               history="vtvt", num_turn=num_turn)
    s = ds[0]
    assert text_of(qtok, s["input_ids"]) == (f"<|im_start|>user\n{SMARTPHONE}Task: open the mail app\n{IMG}{H1}{IMG}"
                                             f"{H2}{IMG}<|im_end|>\n<|im_start|>assistant\n{ANSWER}<|im_end|>")
    assert len(s["image_grid_thw"]) == 3  # s1, s2 (the last two steps), then the current screen
    # num_turn > 1: the text between <|vision_end|> and the next <|vision_start|> is a target (activate_history_labels)
    assert supervised(qtok, s) == ([H1, H2] if num_turn > 1 else []) + [ANSWER + "<|im_end|>"]


def test_navigation_answers_and_action_spaces(tmp_path, qtok):
    web = {"img_url": "w", "task": "copy it", "step_history": [],
           "step": [step("select_text", point=[[0.111, 0.222], [0.333, 0.444]]), step("copy", "hello")]}
    d, meta = nav_dir(tmp_path, "web-multi", [web, dict(web, step=step("tap", point=[0.5, 0.5])),
                                              dict(web, img_url="absent"), dict(web, step=step("click", point="x"))])
    ds = formats.ShowUINavigation(d, ["guiact:hf_train_web-multi"], qtok, MIN_PIX, MAX_PIX, 8192, num_history=4)
    assert supervised(qtok, ds[0]) == [
        "{'action': 'SELECT_TEXT', 'value': None, 'position': [[0.11, 0.22], [0.33, 0.44]]},"
        "{'action': 'COPY', 'value': 'hello', 'position': None}<|im_end|>"]
    assert "website screen" in text_of(qtok, ds[0]["input_ids"]) and "`COPY`" in text_of(qtok, ds[0]["input_ids"])
    why = {i: r for f, i, r in ds.skipped}
    assert sorted(why) == [1, 2, 3] and "web-multi action space" in why[1] and "absent.png" in why[2]
    assert why[3] == "step: CLICK point str 'x' is not [x, y] with numbers in 0..1"  # checked at load, as grounding
    with pytest.raises(ValueError, match="unknown split"):
        formats.ShowUINavigation(d, ["guiact:hf_train_desktop"], qtok, MIN_PIX, MAX_PIX, 8192)
    with pytest.raises(ValueError, match="vvvv"):
        formats.ShowUINavigation(d, ["guiact:hf_train_web-multi"], qtok, MIN_PIX, MAX_PIX, 8192, history="vvvv")


# ----------------------------------------------------------------------------------------------------------------------
# LLaMA-Factory sharegpt (TongUI)

INFO = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


def lf_dir(tmp_path, records, info=INFO, file_name="tongui.json"):
    os.makedirs(tmp_path / "shots", exist_ok=True)
    for name, size in (("a.png", (200, 150)), ("b.png", (120, 90))):
        Image.new("RGB", size, (90, 120, 150)).save(tmp_path / "shots" / name)
    write_json(str(tmp_path / "dataset_info.json"), {"tongui-tiny": dict(info, file_name=file_name)})
    with open(tmp_path / file_name, "w") as f:
        if file_name.endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f)
    return str(tmp_path), str(tmp_path / file_name)


def msg(role, content):
    return {"role": role, "content": content}


def test_llamafactory_qwen2_vl_template(tmp_path):
    tok = load.load_tokenizer(os.path.join(FIXTURES, "qwen2_5_vl_tiny"))
    rec = {"messages": [msg("user", "<image>Where is OK?"), msg("assistant", "[0.5, 0.9]"),
                        msg("user", "And Cancel in <image>?"), msg("assistant", "[0.1, 0.2]")],
           "images": ["shots/a.png", "shots/b.png"]}
    system_first = {"messages": [msg("system", "Be brief."), msg("user", "hi"), msg("assistant", "yes")]}
    for file_name in ("tongui.json", "tongui.jsonl"):
        d, _ = lf_dir(tmp_path, [rec, system_first], file_name=file_name)
        ds = formats.LlamaFactoryDataset(d, ["tongui-tiny"], tok, MIN_PIX, MAX_PIX, 8192)
        s = ds[0]
        assert text_of(tok, s["input_ids"]) == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # the template's default system turn
            f"<|im_start|>user\n{IMG}Where is OK?<|im_end|>\n<|im_start|>assistant\n[0.5, 0.9]<|im_end|>\n"
            f"<|im_start|>user\nAnd Cancel in {IMG}?<|im_end|>\n<|im_start|>assistant\n[0.1, 0.2]<|im_end|>\n")
        # LLaMA-Factory supervises every assistant message with its format's "<|im_end|>\n"
        assert supervised(tok, s) == ["[0.5, 0.9]<|im_end|>\n", "[0.1, 0.2]<|im_end|>\n"]
        assert s["image_grid_thw"].tolist() == [[1, 10, 14], [1, 6, 8]]  # images in <image> order
        # TongUI's tags name no system_tag: LLaMA-Factory leaves it unset and drops a record that opens with "system"
        where = 2 if file_name.endswith(".jsonl") else 1  # jsonl: line 2 (from 1); json: record 1 (from 0)
        assert len(ds) == 1 and [(i, "keep_untagged_system" in r) for _, i, r in ds.skipped] == [(where, True)]
        kept = formats.LlamaFactoryDataset(d, ["tongui-tiny"], tok, MIN_PIX, MAX_PIX, 8192, keep_untagged_system=True)
        assert kept.skipped == [] and kept.untagged_system == [(kept.samples[1][0], where)]
        assert text_of(tok, kept[1]["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
        assert kept[1]["pixel_values"] is None and kept[1]["image_grid_thw"] is None
        assert "kept 1 records" in formats.load_report(kept)[-1] and f"at [{where}]" in formats.load_report(kept)[-1]


def test_llamafactory_malformed_records_and_info(tmp_path, qtok):
    good = {"messages": [msg("user", "<image>x"), msg("assistant", "y")], "images": ["shots/a.png"]}
    records = [good, {"messages": [msg("user", "<image><image>x"), msg("assistant", "y")], "images": ["shots/a.png"]},
               {"messages": [msg("user", "x"), msg("user", "y")]},
               {"messages": [msg("user", "x"), msg("assistant", "y"), msg("user", "z")]},
               {"messages": [msg("user", "<image>x"), msg("assistant", "y")], "images": ["shots/none.png"]},
               {"conversations": [msg("user", "x"), msg("assistant", "y")]}]
    d, file = lf_dir(tmp_path, records)
    ds = formats.LlamaFactoryDataset(d, ["tongui-tiny"], qtok, MIN_PIX, MAX_PIX, 8192, max_samples=5)
    why = {i: r for f, i, r in ds.skipped}
    assert len(ds) == 1 and all(f == file for f, _, _ in ds.skipped) and sorted(why) == [1, 2, 3, 4]  # 5: max_samples
    assert "2 <image> tags" in why[1] and "alternate" in why[2] and "alternate" in why[3] and "none.png" in why[4]
    with pytest.raises(ValueError, match="undefined|'other'"):
        formats.LlamaFactoryDataset(d, ["other"], qtok, MIN_PIX, MAX_PIX, 8192)
    d, _ = lf_dir(tmp_path, records, info=dict(INFO, formatting="alpaca"))
    with pytest.raises(ValueError, match="tongui-tiny.*sharegpt"):
        formats.LlamaFactoryDataset(d, ["tongui-tiny"], qtok, MIN_PIX, MAX_PIX, 8192)


def test_llamafactory_image_pre_shrink_gives_tonguis_training_resolution():
    lo, hi = 3136, 12845056  # the hub processor's limits, which LLaMA-Factory leaves in place
    shot = formats.llamafactory_image(Image.new("RGB", (1920, 1080)), 1344 * 28 * 28)
    assert shot.size == (1368, 769)
    assert data.smart_resize(769, 1368, 28, lo, hi) == (756, 1372)  # 27 x 49 = 1323 tokens, not 1296
    assert data.smart_resize(1080, 1920, 28, 256 * 28 * 28, 1344 * 28 * 28) == (756, 1344)  # inference: 1296
    assert formats.llamafactory_image(Image.new("RGB", (400, 20)), 10 ** 6).size == (400, 28)


# ----------------------------------------------------------------------------------------------------------------------
# Vlaser: InternVL chat jsonl, point answers, the point-grounding prefix


def test_vlaser_point_prefix_and_point_checks(tmp_path):
    tok = load.load_tokenizer(os.path.join(FIXTURES, "internvl3_tiny"))
    Image.new("RGB", (150, 100), (10, 20, 30)).save(tmp_path / "p.png")
    lines = [{"image": "p.png", "conversations": [
                {"from": "human", "value": "<image>\nPoint to all the moai."},
                {"from": "gpt", "value": "<point>[[254, 624], [304, 624]]</point>"}]},
             {"image": "p.png", "conversations": [{"from": "human", "value": "What colour?"},
                                                  {"from": "gpt", "value": "dark blue"}]},
             {"image": "p.png", "conversations": [{"from": "human", "value": "<image>\nPoint to it."},
                                                  {"from": "gpt", "value": "<point>[[0.25, 0.6]]</point>"}]},
             {"image": "p.png", "conversations": [{"from": "human", "value": "Point to it."},
                                                  {"from": "gpt", "value": "<point>[[254, 1624]]</point>"}]}]
    with open(tmp_path / "v.jsonl", "w") as f:
        f.writelines(json.dumps(l) + "\n" for l in lines)
    write_json(str(tmp_path / "meta.json"), {"v": {"root": str(tmp_path), "annotation": str(tmp_path / "v.jsonl"),
                                                   "data_augment": False, "repeat_time": 1}})
    ds = formats.InternVLDataset(str(tmp_path / "meta.json"), tok, "internvl2_5", 16, 112, max_tiles=2,
                              point_prefix=formats.VLASER_POINT_PREFIX)
    assert sorted(l for _, l, _ in ds.skipped) == [3, 4] and all("0..1000" in r for _, _, r in ds.skipped)
    by_line = {line: ds[i] for i, (_, line, _, _) in enumerate(ds.samples)}
    point, plain = by_line[1], by_line[2]
    text = tok.decode(point["input_ids"].tolist(), skip_special_tokens=False)
    assert f"<|im_start|>user\n<img>" in text and f"</img>\n{formats.VLASER_POINT_PREFIX} Point to all the moai." in text
    assert supervised(tok, point) == ["<point>[[254, 624], [304, 624]]</point><|im_end|>"]
    assert "You are InternVL. Your task" not in tok.decode(plain["input_ids"].tolist(), skip_special_tokens=False)
    again = formats.with_point_prefix(formats.with_point_prefix(lines[0]["conversations"], "P:"), "P:")
    assert again[0]["value"] == "<image>\nP: Point to all the moai."  # added once


# ----------------------------------------------------------------------------------------------------------------------
# collate


def test_collate_qwen_samples(tmp_path, qtok):
    rec = {"messages": [msg("user", "<image>x"), msg("assistant", "y")], "images": ["shots/a.png"]}
    d, _ = lf_dir(tmp_path, [rec, {"messages": [msg("user", "text only, longer"), msg("assistant", "z")]},
                             dict(rec, images=["shots/b.png"])])
    ds = formats.LlamaFactoryDataset(d, ["tongui-tiny"], qtok, MIN_PIX, MAX_PIX, 8192)
    samples = [ds[0], ds[1], ds[2], dict(skip=("f", 9, "why"))]
    b = data.collate(samples, pad_id=0)
    n = [len(s["input_ids"]) for s in samples[:3]]
    assert b["input_ids"].shape == (3, max(n)) and b["skipped"] == [("f", 9, "why")]
    for k, s in enumerate(samples[:3]):  # right padding: ids, labels -100, mask 0 after each sample
        assert torch.equal(b["input_ids"][k, :n[k]], s["input_ids"]) and (b["input_ids"][k, n[k]:] == 0).all()
        assert torch.equal(b["labels"][k, :n[k]], s["labels"]) and (b["labels"][k, n[k]:] == -100).all()
        assert b["attention_mask"][k].tolist() == [1] * n[k] + [0] * (max(n) - n[k])
    assert torch.equal(b["pixel_values"], torch.cat([ds[0]["pixel_values"], ds[2]["pixel_values"]]))
    assert b["image_grid_thw"].tolist() == [[1, 10, 14], [1, 6, 8]]
    empty = data.collate([dict(skip=("f", 1, "x"))], pad_id=0)
    assert empty["input_ids"] is None and empty["image_grid_thw"] is None
