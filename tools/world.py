"""A synthetic GUI world: deterministic screens drawn with PIL from a seed, every element's box, type, text and
parent recorded, and the MP-GUI stage datasets (InternVL meta json + jsonl) and ShowUI grounding metadata made from
them, with a held-out evaluation split (also written as a ScreenSpot set: screenspot, --screenspot DIR). Boxes are
0-1000 integers (xyxy, normalised by width and height), as in the official data.

The world is small on purpose (a 4 x 4 layout grid, six colours, four glyphs, eight words) so that a model of a few
million parameters can learn parts of it on a CPU in minutes: `bash demo.sh` trains the five MP-GUI stages on it.
"""
import argparse
import json
import os
import random
import sys

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import load  # noqa: E402
import model  # noqa: E402

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (140, 50, 170), "orange": (240, 130, 20)}
GLYPHS = ["circle", "square", "triangle", "cross"]
WORDS = ["home", "mail", "save", "send", "back", "menu", "next", "done"]
GRID = 4  # layout cells per side
RELATIONS = ["sibling", "contains", "inside", "no containment", "unrelated"]  # the five official SRP types


def cell_box(r, c, w, h, rows=1, cols=1, pad=0.08):
    """Pixel box of a block of layout cells, shrunk by a margin; its 0-1000 box (`norm`) is exact on the grid, the
    same numbers on phone and desktop screens."""
    x1, y1, x2, y2 = (round((v + p) * 1000 / GRID) for v, p in ((c, pad), (r, pad), (c + cols, -pad), (r + rows, -pad)))
    return (x1 * w / 1000, y1 * h / 1000, x2 * w / 1000, y2 * h / 1000)


def norm(box, w, h):  # pixels -> 0-1000 integers
    return [round(box[0] * 1000 / w), round(box[1] * 1000 / h), round(box[2] * 1000 / w), round(box[3] * 1000 / h)]


def draw_glyph(d, box, glyph, fill):
    x1, y1, x2, y2 = box
    s = min(x2 - x1, y2 - y1)
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, s * 0.42
    if glyph == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif glyph == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif glyph == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        d.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fill)
        d.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=fill)


def draw_word(d, box, word, fill):
    """Words as fat bar codes: one bar per letter, its height set by the letter, so each word has its own shape that
    a 14-px-patch ViT can tell apart (real glyphs would be unreadable at the demo's resolution)."""
    x1, y1, x2, y2 = box
    step = (x2 - x1) / (len(word) + 1)
    for i, ch in enumerate(word):
        top = y1 + (y2 - y1) * (0.1 + 0.6 * ((ord(ch) - 97) % 7) / 6)
        d.rectangle([x1 + step * (i + 0.6), top, x1 + step * (i + 1.2), y2 - 1], fill=fill)


def make_screen(seed, kind=None):
    """One screen: (PIL image, elements). An element is {id, type (toolbar, card, button, icon, text), box (0-1000),
    text, color, glyph, parent (id or None), clickable}. Phone screens are tall, desktop screens wide."""
    rng = random.Random(seed)
    kind = kind or rng.choice(["phone", "desktop"])
    w, h = (180, 320) if kind == "phone" else (320, 180)
    img = Image.new("RGB", (w, h), (245, 246, 248))
    d = ImageDraw.Draw(img)
    free = {(r, c) for r in range(1, GRID) for c in range(GRID)}
    els = []

    def add(type_, box, parent=None, **kw):
        els.append(dict(id=len(els), type=type_, box=norm(box, w, h), parent=parent, text=kw.get("text"),
                        color=kw.get("color"), glyph=kw.get("glyph"), clickable=type_ in ("button", "icon")))
        return len(els) - 1

    bar = add("toolbar", cell_box(0, 0, w, h, cols=GRID, pad=0.02))  # row 0: a toolbar with two icons
    d.rectangle(cell_box(0, 0, w, h, cols=GRID, pad=0.02), fill=(60, 60, 70))
    for c in rng.sample(range(GRID), 2):
        color, glyph = rng.choice(list(COLORS)), rng.choice(GLYPHS)
        draw_glyph(d, cell_box(0, c, w, h), glyph, COLORS[color])
        add("icon", cell_box(0, c, w, h), bar, color=color, glyph=glyph)
    if rng.random() < 0.7:  # a 2 x 2 card holding a button and an icon
        r, c = rng.choice([(1, 0), (1, 2), (2, 0), (2, 2)])
        card = add("card", cell_box(r, c, w, h, 2, 2, pad=0.03))
        d.rectangle(cell_box(r, c, w, h, 2, 2, pad=0.03), fill="white", outline=(150, 150, 150), width=2)
        cells = [(r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1)]
        free -= set(cells)
        (br, bc), (ir, ic) = rng.sample(cells, 2)
        color, word = rng.choice(list(COLORS)), rng.choice(WORDS)
        d.rectangle(cell_box(br, bc, w, h), fill=COLORS[color])
        draw_word(d, cell_box(br, bc, w, h, pad=0.2), word, "white")
        add("button", cell_box(br, bc, w, h), card, text=word, color=color)
        color, glyph = rng.choice(list(COLORS)), rng.choice(GLYPHS)
        draw_glyph(d, cell_box(ir, ic, w, h), glyph, COLORS[color])
        add("icon", cell_box(ir, ic, w, h), card, color=color, glyph=glyph)
    for (r, c) in rng.sample(sorted(free), min(len(free), rng.randint(3, 5))):  # loose texts, buttons, icons
        kind_ = rng.choice(["text", "button", "icon"])
        color = rng.choice(list(COLORS))
        if kind_ == "icon":
            glyph = rng.choice(GLYPHS)
            draw_glyph(d, cell_box(r, c, w, h), glyph, COLORS[color])
            add("icon", cell_box(r, c, w, h), color=color, glyph=glyph)
        else:
            word = rng.choice(WORDS)
            if kind_ == "button":
                d.rectangle(cell_box(r, c, w, h), fill=COLORS[color])
            draw_word(d, cell_box(r, c, w, h, pad=0.2), word, "white" if kind_ == "button" else (30, 30, 30))
            add(kind_, cell_box(r, c, w, h), text=word, color=color if kind_ == "button" else None)
    return img, els


def name(e):
    """How the prompts refer to an element."""
    if e["type"] == "icon":
        return f"{e['color']} {e['glyph']} icon"
    if e["type"] == "button":
        return f"{e['color']} {e['text']} button"
    return f"text {e['text']}" if e["type"] == "text" else e["type"]


def relation(a, b):
    """The relation of two elements, the five official types (no containment = a box that encloses without being
    the parent; synthetic negatives are not needed here, the cards' neighbours provide them)."""
    inside = lambda x, y: x["box"][0] >= y["box"][0] and x["box"][1] >= y["box"][1] and \
        x["box"][2] <= y["box"][2] and x["box"][3] <= y["box"][3]
    if a["parent"] is not None and a["parent"] == b["parent"]:
        return "sibling"
    if b["parent"] == a["id"]:
        return "contains"
    if a["parent"] == b["id"]:
        return "inside"
    if inside(b, a) or inside(a, b):
        return "no containment"
    return "unrelated"


def box_text(box):
    return f"[[{box[0]}, {box[1]}, {box[2]}, {box[3]}]]"


def conv(q, a):
    return [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]


def samples(img_path, els, rng):
    """Every task's question/answer pairs for one screen, keyed by task."""
    leaves = [e for e in els if e["type"] in ("button", "icon", "text")]
    words = [e for e in els if e["text"]]
    icons = [e for e in els if e["type"] == "icon"]
    out = {k: [] for k in ("text2bbox", "bbox2text", "icon_grounding", "relation", "color_qa", "tappable", "refexp")}
    unique = lambda e, pool: sum(name(x) == name(e) for x in pool) == 1
    for e in words:
        out["bbox2text"].append(conv(f"What text is in {box_text(e['box'])}?", e["text"]))
        if sum(x["text"] == e["text"] for x in words) == 1:
            out["text2bbox"].append(conv(f"Where is the text \"{e['text']}\"?", box_text(e["box"])))
    for e in icons:  # asked by colour alone, for a colour one icon of the screen has (cf. AITW's unique-type filter)
        if sum(x["color"] == e["color"] for x in icons) == 1:
            out["icon_grounding"].append(conv(f"Give the bounding box of the {e['color']} icon.", box_text(e["box"])))
    # relation: two leaves that one card could hold (rows 1-3, adjacent or equal rows, the same half of the columns),
    # siblings when a card holds them (its button and icon) and unrelated when they are loose. Only these pairs need
    # the screen: a pair with the toolbar or a card, or leaves no card could hold together, has its answer in the
    # boxes' numbers (the toolbar and the cards have boxes of their own).
    cell = lambda e: (e["box"][1] * GRID // 1000, e["box"][0] * GRID // 1000)
    for a in leaves:
        for b in leaves:
            (ra, ca), (rb, cb) = cell(a), cell(b)
            if a is not b and min(ra, rb) >= 1 and abs(ra - rb) <= 1 and ca // 2 == cb // 2:
                out["relation"].append(conv(f"What is the relationship between the elements at {box_text(a['box'])} "
                                            f"and {box_text(b['box'])}?", relation(a, b)))
    # tappable: the leaves below the toolbar (the toolbar's row holds only icons, so its answer is in the box's numbers)
    below = [e for e in leaves if cell(e)[0] >= 1]
    yes, no = [e for e in below if e["clickable"]], [e for e in below if not e["clickable"]]  # texts are not
    k = min(len(yes), len(no))  # balanced: as many clickable as not, so neither answer is a free win
    for e in rng.sample(yes, k) + rng.sample(no, k):
        out["tappable"].append(conv(f"Whether the element within the selected area {box_text(e['box'])} is "
                                    "clickable? If clickable, output 0. otherwise output 1.",
                                    "0" if e["clickable"] else "1"))
    for e in leaves:
        if e["color"]:
            out["color_qa"].append(conv(f"What color is the element at {box_text(e['box'])}?", e["color"]))
        if unique(e, leaves):
            out["refexp"].append(conv(f"Please provide the bounding box coordinate of the region this sentence "
                                      f"describes: <ref>{name(e)}</ref>", box_text(e["box"])))
    return {k: [dict(image=img_path, conversations=c) for c in v] for k, v in out.items()}


def captions(img_path, els):
    """The tiny base's pre-training (tools/pretrain_tiny.sh): grounded descriptions of a whole screen, standing in
    for the grounded captions and OCR of InternVL2's pre-training. No question of a stage or of the benchmark is
    among them: each answer lists every element, in reading order (name then box, or box then name) or by type."""
    order = sorted(els, key=lambda e: (e["box"][1], e["box"][0]))
    by_type = [f"{t}: " + " ".join(box_text(e["box"]) for e in order if e["type"] == t)
               for t in ("toolbar", "card", "button", "icon", "text") if any(e["type"] == t for e in els)]
    return [dict(image=img_path, conversations=conv(q, "\n".join(a))) for q, a in (
        ("Describe the screen.", [f"{name(e)} {box_text(e['box'])}" for e in order]),
        ("List the boxes on the screen.", [f"{box_text(e['box'])} {name(e)}" for e in order]),
        ("Group the screen's elements by type.", by_type))]


def regions(img_path, els):
    """The pre-training's second part: region captions (REG: an element's box -> its name) and referring expressions
    (REC: a name unique on the screen -> its box), as in InternVL2's grounding pre-training; both ask of every
    element, the toolbar and the cards too, in words no stage or benchmark question uses."""
    out = [conv(f"Name the element at {box_text(e['box'])}.", name(e)) for e in els]
    out += [conv(f"Find the {name(e)}.", box_text(e["box"])) for e in els if sum(name(x) == name(e) for x in els) == 1]
    return [dict(image=img_path, conversations=c) for c in out]


def attributes(img_path, els, rng):
    """The pre-training's third part: region captions that put each attribute of an element first in turn -- its
    type ("button red save"), its content, a word or a glyph ("save red button") -- as region captions "Name the
    element at" put its colour first, so that every attribute is a first answer word the base can give; each in one of
    three phrasings, the box at another place in each, none of them a stage's or the benchmark's question."""
    out = []
    for e in els:
        content = e["text"] or e["glyph"]
        orders = {"type": [e["type"], e["color"], content]}
        if content:
            orders["content"] = [content, e["color"], e["type"]]
        for first, words in orders.items():
            q = rng.choice([f"Caption the element at {{box}}, {first} first.", f"{{box}}: its {first} first.",
                            f"Begin with the {first}: what is at {{box}}?"]).format(box=box_text(e["box"]))
            out.append(conv(q, " ".join(w for w in words if w)))
    return [dict(image=img_path, conversations=c) for c in out]


STAGES = {  # which tasks each MP-GUI stage trains on
    "textual": ["text2bbox", "bbox2text"],
    "graphical": ["icon_grounding"],
    "spatial": ["relation"],
    "fusion": ["text2bbox", "bbox2text", "icon_grounding", "relation", "color_qa"],
    "benchmark": ["bbox2text", "icon_grounding", "relation", "color_qa"],
}
# The final table's tasks: reading text, finding icons, layout, QA. The tappable questions (official wording, answer
# "0" / "1") are written but in no stage: the tiny base does not learn a one-digit answer from the screen within the
# demo's budget (docs/demo.md)
BENCHMARK = STAGES["benchmark"]
MIX = sorted({t for ts in STAGES.values() for t in ts})  # demo.sh --ablations' one end-to-end mix, instead of stages


def first_seed(split, seed=0):
    """make_screen's seed for screen 0 of a split built with `seed` (screen i: this + i)."""
    return seed * 100003 + {"train": 0, "eval": 10 ** 6, "pretrain": 2 * 10 ** 6}[split]


def build(out, n_train=600, n_eval=100, seed=0, n_pretrain=0):
    """Writes out/images, one jsonl per (split, task), one meta json per stage (train), the eval meta, and ShowUI
    grounding metadata (out/showui/metadata.json); with n_pretrain, also the base's pre-training data of that many
    other screens: captions (meta_pretrain.json), captions + regions (meta_pretrain_region.json), these + attribute
    captions (meta_pretrain_attribute.json). Returns {stage: meta path, "eval": meta path}."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rows = {}
    for i in range(n_pretrain):
        img, els = make_screen(first_seed("pretrain", seed) + i)
        img.save(os.path.join(out, f"images/pretrain_{i}.png"))
        rng = random.Random(first_seed("pretrain", seed) + i)
        for task, items in (("caption", captions(f"images/pretrain_{i}.png", els)),
                            ("region", regions(f"images/pretrain_{i}.png", els)),
                            ("attribute", attributes(f"images/pretrain_{i}.png", els, rng))):
            rows.setdefault(("pretrain", task), []).extend(dict(it, width=img.width, height=img.height) for it in items)
    for split, n in (("train", n_train), ("eval", n_eval)):
        base = first_seed(split, seed)
        rng = random.Random(base)
        showui = []
        for i in range(n):
            img, els = make_screen(base + i)
            rel = f"images/{split}_{i}.png"
            img.save(os.path.join(out, rel))
            for task, items in samples(rel, els, rng).items():
                for it in items:
                    rows.setdefault((split, task), []).append(dict(it, width=img.width, height=img.height))
            showui.append(dict(img_url=rel, img_size=[img.width, img.height], element_size=len(els), element=[
                dict(instruction=name(e), bbox=[v / 1000 for v in e["box"]], data_type="text" if e["text"] else "icon",
                     point=[(e["box"][0] + e["box"][2]) / 2000, (e["box"][1] + e["box"][3]) / 2000])
                for e in els if e["type"] in ("button", "icon", "text")]))
        os.makedirs(os.path.join(out, "showui"), exist_ok=True)
        with open(os.path.join(out, "showui", f"{split}.json"), "w") as f:
            json.dump(showui, f)
        rel = rows[(split, "relation")]  # as many siblings as unrelated pairs, so neither answer is a free win
        sib = [r for r in rel if r["conversations"][1]["value"] == "sibling"]
        other = [r for r in rel if r["conversations"][1]["value"] != "sibling"]
        k = min(len(sib), len(other))
        both = rng.sample(sib, k) + rng.sample(other, k)
        rows[(split, "relation")] = rng.sample(both, 2 * k)  # mixed, so that the first lines (eval --limit) are too
    for (split, task), items in rows.items():
        with open(os.path.join(out, f"{split}_{task}.jsonl"), "w") as f:
            f.writelines(json.dumps(dict(it, id=k)) + "\n" for k, it in enumerate(items))
    metas = {}  # meta_{stage}.json trains a stage; meta_eval_{stage}.json scores it on held-out screens
    for stage, tasks in list(STAGES.items()) + [(f"eval_{s}", t) for s, t in STAGES.items()] + \
            [("eval", BENCHMARK), ("mix", MIX)] + \
            ([("pretrain", ["caption"]), ("pretrain_region", ["caption", "region"]),
              ("pretrain_attribute", ["caption", "region", "attribute"])] if n_pretrain else []):
        split = "eval" if stage.startswith("eval") else "pretrain" if stage.startswith("pretrain") else "train"
        meta = {t: dict(root=out, annotation=os.path.join(out, f"{split}_{t}.jsonl"), data_augment=False,
                        repeat_time=1, length=str(len(rows[(split, t)]))) for t in tasks}
        metas[stage] = os.path.join(out, f"meta_{stage}.json")
        with open(metas[stage], "w") as f:
            json.dump(meta, f, indent=1)
    return metas


def screenspot(out, n_eval=100, seed=0):
    """A ScreenSpot set in ShowUI's layout (out/metadata/hf_test_full.json + out/images/) from build's held-out screens
    (the same seeds): one record per button, icon and text whose name is unique on its screen (so the instruction
    names one element), bbox [x, y, w, h] px from the 0-1000 box, data_type text for an element with text (buttons,
    texts) and icon for icons, split mobile for phone screens and desktop for desktop ones (the world draws no web
    pages, so the web cells stay empty). Returns the records."""
    os.makedirs(os.path.join(out, "metadata"), exist_ok=True)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    records, base = [], first_seed("eval", seed)
    for i in range(n_eval):
        img, els = make_screen(base + i)
        (w, h), rel = img.size, f"eval_{i}.png"
        img.save(os.path.join(out, "images", rel))
        leaves = [e for e in els if e["type"] in ("button", "icon", "text")]
        for e in leaves:
            if sum(name(x) == name(e) for x in leaves) > 1:
                continue
            x1, y1, x2, y2 = e["box"]
            records.append(dict(img_url=rel, task=name(e), img_size=[w, h], id=f"eval_{i}_{e['id']}",
                                bbox=[x1 * w / 1000, y1 * h / 1000, (x2 - x1) * w / 1000, (y2 - y1) * h / 1000],
                                split="mobile" if h > w else "desktop", data_type="text" if e["text"] else "icon"))
    with open(os.path.join(out, "metadata", "hf_test_full.json"), "w") as f:
        json.dump(records, f, indent=1)
    return records


# InternVL2's tokens (no <EXTRA_IMG_CONTEXT>: stage 1 adds it)
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>",
           "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


def write_tiny_model(folder, texts, vit=(64, 2, 2, 128), llm=(128, 4, 4, 2, 344), seed=0):
    """A random-init InternVL2-layout checkpoint (InternViT + InternLM2 shapes, 112-px tiles, 16 tokens per tile)
    and a byte-level BPE tokenizer.json trained on `texts`, so the demo runs through the loaders real checkpoints
    use. vit = (hidden, layers, heads, mlp); llm = (hidden, layers, heads, kv heads, ffn)."""
    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # InternLM2 BOS
    tok.save(os.path.join(folder, "tokenizer.json"))
    (vh, vl, vhd, vm), (h, n, hd, kv, ffn) = vit, llm
    cfg = dict(architectures=["InternVLChatModel"], model_type="internvl_chat", torch_dtype="float32",
               template="internlm2-chat", downsample_ratio=0.5, select_layer=-1, ps_version="v2", force_image_size=112,
               dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=1,
               tie_word_embeddings=False,
               vision_config=dict(architectures=["InternVisionModel"], hidden_size=vh, num_hidden_layers=vl,
                                  num_attention_heads=vhd, intermediate_size=vm, image_size=112, patch_size=14,
                                  qkv_bias=True, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6,
                                  hidden_act="gelu", drop_path_rate=0.0),
               llm_config=dict(architectures=["InternLM2ForCausalLM"], vocab_size=tok.get_vocab_size(), hidden_size=h,
                               intermediate_size=ffn, num_hidden_layers=n, num_attention_heads=hd,
                               num_key_value_heads=kv, max_position_embeddings=2048, rms_norm_eps=1e-5, bias=False,
                               rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                               tie_word_embeddings=False))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with torch.device("meta"):  # built from the same config a loader reads, then every tensor drawn at random
        m = model.InternVL(load.config_from_hf(cfg))
    g = torch.Generator().manual_seed(seed)
    state = {}
    # Unit-scale activations (weights std 1/sqrt(fan_in), embeddings std 1), not the real models' std 0.02: at 0.02 a
    # 192-wide model starts with flat attention and a frozen output head that caps every logit near 4 (loss >= 2.6
    # nats per token under LoRA), and it never learned to look at the image within the demo's steps.
    for k, p in m.state_dict().items():
        if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ls1", "ls2", "mlp1.0.weight",
                       "attention_norm.weight", "ffn_norm.weight")):
            state[k] = torch.ones(p.shape)
        elif k.endswith("bias"):
            state[k] = torch.zeros(p.shape)
        elif k.endswith(("tok_embeddings.weight", "position_embedding", "class_embedding")):
            state[k] = torch.randn(p.shape, generator=g)
        else:
            state[k] = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
    save_file(state, os.path.join(folder, "model.safetensors"))
    return folder


def corpus(out):
    """Every text the world's jsonl files hold, plus the template's system message weighted so BPE merges it."""
    texts = [data.TEMPLATES["internlm2-chat"]["system_message"]] * 2000
    for f in sorted(os.listdir(out)):
        if f.endswith(".jsonl"):
            for line in open(os.path.join(out, f)):
                texts += [t["value"] for t in json.loads(line)["conversations"]]
    return texts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Draws the synthetic GUI world (OUT/data) and a random-init tiny "
                                "InternVL2-layout checkpoint (OUT/base).")
    p.add_argument("out", nargs="?", default="demo")
    p.add_argument("n_train", nargs="?", type=int, default=600, help="training screens")
    p.add_argument("n_eval", nargs="?", type=int, default=100, help="held-out screens")
    p.add_argument("--pretrain", type=int, default=0, metavar="N", help="also write the tiny base's pre-training "
                   "data of N other screens: captions (data/meta_pretrain.json), captions + region captions "
                   "(data/meta_pretrain_region.json), these + attribute captions "
                   "(data/meta_pretrain_attribute.json); tools/pretrain_tiny.sh")
    p.add_argument("--screenspot", metavar="DIR", help="only write a ScreenSpot set of the held-out screens to DIR, "
                   "in ShowUI's layout (eval.py --bench screenspot --data DIR)")
    a = p.parse_args()
    out, n_train, n_eval = a.out, a.n_train, a.n_eval
    if a.screenspot:
        n = len(screenspot(a.screenspot, n_eval))
        raise SystemExit(print(f"wrote {a.screenspot}: ScreenSpot layout, {n} records on {n_eval} held-out screens"))
    build(os.path.join(out, "data"), n_train, n_eval, n_pretrain=a.pretrain)
    write_tiny_model(os.path.join(out, "base"), corpus(os.path.join(out, "data")), vit=(96, 2, 3, 192),
                     llm=(192, 4, 4, 2, 512))
    print(f"wrote {out}/data (world: {n_train} train / {n_eval} eval screens) and {out}/base (tiny InternVL2)")
