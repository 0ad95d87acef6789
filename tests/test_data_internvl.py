"""InternVL input pipeline: tiling vs a literal copy of upstream's algorithm, chat strings, labels."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

import data

SYS_LM2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYS_25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


# ----------------------------------------------------------------------------- reference (upstream, written out)

def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_grid(orig_width, orig_height, min_num=1, max_num=12, image_size=448):
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)


def normalize(arr):  # by hand: ToTensor + Normalize in float32
    mean = np.array(data.IMAGENET_MEAN, dtype=np.float32)
    std = np.array(data.IMAGENET_STD, dtype=np.float32)
    return ((arr.astype(np.float32) / np.float32(255) - mean) / std).transpose(2, 0, 1)


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- tiles

@pytest.mark.parametrize("size,grid,n_tiles", [
    ((1920, 1080), (4, 2), 9), ((1000, 1000), (3, 3), 10), ((448, 448), (1, 1), 1),
    ((800, 600), (4, 3), 13), ((3000, 200), (12, 1), 13)])
def test_tiling_examples(size, grid, n_tiles):
    assert data.internvl_grid(*size) == grid
    image = Image.new("RGB", size, (10, 20, 30))
    tiles = data.dynamic_preprocess(image, max_tiles=12, use_thumbnail=True)
    assert len(tiles) == n_tiles and all(t.size == (448, 448) for t in tiles)
    x = data.internvl_tiles(image, max_tiles=12)
    assert x.shape == (n_tiles, 3, 448, 448) and x.dtype == torch.float32


def test_thumbnail_rule():
    assert len(data.dynamic_preprocess(Image.new("RGB", (1920, 1080)), use_thumbnail=False)) == 8
    assert len(data.dynamic_preprocess(Image.new("RGB", (1920, 1080)), max_tiles=1, use_thumbnail=True)) == 1
    assert len(data.internvl_tiles(Image.new("RGB", (500, 460)), use_thumbnail=True)) == 1  # one tile: no thumbnail


def test_grid_vs_reference():
    rng = random.Random(0)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(80)]
    sizes += [(rng.randint(1, 30) * 224, rng.randint(1, 30) * 224) for _ in range(20)]  # exact ratios: ties
    for w, h in sizes:
        for max_num in (1, 4, 6, 12):
            assert data.internvl_grid(w, h, 1, max_num) == ref_grid(w, h, 1, max_num), (w, h, max_num)
    for w, h in [(896, 448), (448, 896), (1344, 1344), (200, 100)]:  # tie-breaks on area both ways
        assert data.internvl_grid(w, h) == ref_grid(w, h)
    assert data.internvl_grid(200, 100) == (2, 1) and data.internvl_grid(1344, 1344) == (3, 3)


def test_tile_pixels_by_hand():
    image = noise_image(1000, 700)
    x = data.internvl_tiles(image, max_tiles=6)
    cols, rows = data.internvl_grid(1000, 700, 1, 6)
    assert x.shape[0] == cols * rows + 1
    resized = image.resize((448 * cols, 448 * rows), Image.BICUBIC)
    k = cols + 1  # second row, second column
    box = ((k % cols) * 448, (k // cols) * 448, (k % cols + 1) * 448, (k // cols + 1) * 448)
    want = normalize(np.asarray(resized.crop(box)))
    assert np.abs(x[k].numpy() - want).max() <= 1e-6
    thumb = normalize(np.asarray(image.resize((448, 448), Image.BICUBIC)))
    assert np.abs(x[-1].numpy() - thumb).max() <= 1e-6


# ----------------------------------------------------------------------------- templates

def render_internvl(conversations, template, system=None, num_images=0):
    """The whole prompt text: encode_internvl's per-turn pieces, joined."""
    return "".join(text for text, _ in data._internvl_segments(conversations, template, system, num_images))


def test_render_internlm2_chat():
    conv = [{"from": "human", "value": "<image>\nDescribe."}]
    want = (f"<|im_start|>system\n{SYS_LM2}<|im_end|><|im_start|>user\n<image>\nDescribe.<|im_end|>"
            "<|im_start|>assistant\n")
    assert render_internvl(conv, "internlm2-chat") == want
    # no placeholder but one image: upstream prepends it, then strips the value
    assert render_internvl([{"from": "human", "value": "Describe.\n "}], "internlm2-chat", num_images=1) == want
    assert render_internvl([{"from": "human", "value": " Describe."}], "internlm2-chat", num_images=1) == \
        want.replace("\nDescribe.", "\n Describe.")


def test_render_internvl2_5():
    conv = [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}]
    want = (f"<|im_start|>system\n{SYS_25}<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
            "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    assert render_internvl(conv, "internvl2_5") == want
    own = render_internvl([{"from": "system", "value": "Be brief."}] + conv, "internvl2_5")
    assert own == want.replace(SYS_25, "Be brief.")
    assert render_internvl(conv, "internvl2_5", system="X") == want.replace(SYS_25, "X")
    with pytest.raises(ValueError, match="human/gpt"):
        render_internvl([{"from": "gpt", "value": "A"}], "internvl2_5")


# ----------------------------------------------------------------------------- ids and labels

SPECIALS = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<EXTRA_IMG_CONTEXT>"]
CONV = [{"from": "human", "value": "<image>\nWhat is on screen?"}, {"from": "gpt", "value": "A login form."},
        {"from": "human", "value": "Where is OK?"}, {"from": "gpt", "value": "Bottom right, 点击"}]


def char_tokenizer(bos, merges=()):
    # BPE with no merges over single characters: one token per character, plus the specials
    chars = sorted(set(SYS_LM2 + SYS_25 + "".join(t["value"] for t in CONV) + "systemuserassistant\n"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + ["".join(m) for m in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    if bos:  # how converted InternLM2 tokenizers add <s>
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def supervised_runs(tok, ids, labels):
    runs, cur = [], []
    for i, l in zip(ids.tolist(), labels.tolist()):
        if l != data.IGNORE_INDEX:
            assert l == i
            cur.append(tok.id_to_token(i))
        elif cur:
            runs.append("".join(cur))
            cur = []
    return runs + (["".join(cur)] if cur else [])


@pytest.mark.parametrize("template", ["internlm2-chat", "internvl2_5"])
def test_labels(template):
    tok = char_tokenizer(bos=template == "internlm2-chat")
    out = data.encode_internvl(tok, CONV, template, tiles_per_image=[3], num_image_token=16)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    assert supervised_runs(tok, ids, labels) == ["A login form.<|im_end|>", "Bottom right, 点击<|im_end|>"]
    assert int((ids == tok.token_to_id("<IMG_CONTEXT>")).sum()) == 48
    assert int((ids == tok.token_to_id("<EXTRA_IMG_CONTEXT>")).sum()) == 0
    # ids are what upstream tokenizes: the full string with BOS, or each turn on its own
    text = data.expand_internvl_images(render_internvl(CONV, template), [3], 16)
    if template == "internlm2-chat":
        assert ids.tolist() == tok.encode(text).ids and ids[0] == tok.token_to_id("<s>")
    else:
        assert (ids.tolist(), labels.tolist()) == ref_internvl2_5(tok, CONV, 48)


def ref_internvl2_5(tok, conv, n_context):
    # upstream preprocess_internvl2_5, written out: each turn tokenized alone; labels mask the
    # assistant header and the final '\n' of each answer turn
    turns = [f"<|im_start|>system\n{SYS_25}<|im_end|>\n"]
    turns += [f"<|im_start|>{'user' if t['from'] == 'human' else 'assistant'}\n{t['value']}<|im_end|>\n" for t in conv]
    turns[1] = turns[1].replace("<image>", "<img>" + "<IMG_CONTEXT>" * n_context + "</img>")
    enc = [tok.encode(t, add_special_tokens=False).ids for t in turns]
    n_head = len(tok.encode("<|im_start|>assistant\n", add_special_tokens=False).ids)
    ref = []
    for k, e in enumerate(enc):
        ref += [-100] * len(e) if k % 2 == 1 or k == 0 else [-100] * n_head + e[n_head:-1] + [-100]
    return sum(enc, []), ref


def test_labels_byte_level():
    # Qwen2.5-style byte-level BPE: CJK characters become several byte tokens sharing one char offset
    specials = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    conv = [{"from": "human", "value": "<image>\n屏幕上有什么？"}, {"from": "gpt", "value": "一个登录表单。"},
            {"from": "human", "value": "OK在哪里?"}, {"from": "gpt", "value": "(右下角) 点击 123"}]
    out = data.encode_internvl(tok, conv, "internvl2_5", [2], 4)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert (ids, labels) == ref_internvl2_5(tok, conv, 8)
    k = labels.index(tok.token_to_id("<|im_end|>")) + 1  # split the two supervised runs
    first, second = ([i for i in part if i != -100] for part in (labels[:k], labels[k:]))
    assert tok.decode(first, skip_special_tokens=False) == "一个登录表单。<|im_end|>"
    assert tok.decode(second, skip_special_tokens=False) == "(右下角) 点击 123<|im_end|>"


@pytest.mark.parametrize("template", ["internlm2-chat", "internvl2_5"])
def test_extra_token(template):
    tok = char_tokenizer(bos=template == "internlm2-chat")
    ids = data.encode_internvl(tok, CONV, template, [2], 16, extra_token="<EXTRA_IMG_CONTEXT>")["input_ids"].tolist()
    ctx, extra = tok.token_to_id("<IMG_CONTEXT>"), tok.token_to_id("<EXTRA_IMG_CONTEXT>")
    start, end = ids.index(tok.token_to_id("<img>")), ids.index(tok.token_to_id("</img>"))
    assert ids[start + 1:end] == [ctx] * 32 + [extra] * 32  # extra run after the context run, inside <img>..</img>


def test_generation_prompt_and_prepend():
    tok = char_tokenizer(bos=False)
    out = data.encode_internvl(tok, [{"from": "human", "value": "What is on screen?"}], "internvl2_5", [1], 16)
    assert (out["labels"] == data.IGNORE_INDEX).all()
    text = "".join(tok.id_to_token(i) for i in out["input_ids"].tolist())
    assert text.endswith("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 16 + "</img>\nWhat is on screen?<|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_image_count_mismatch():
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        data.expand_internvl_images("<image>a<image>", [4], 16)
    conv = [{"from": "human", "value": "<image><image>hi"}, {"from": "gpt", "value": "A"}]
    for template in data.TEMPLATES:
        with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
            data.encode_internvl(char_tokenizer(bos=template == "internlm2-chat"), conv, template, [1], 16)
        with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
            data.encode_internvl(char_tokenizer(bos=template == "internlm2-chat"), CONV, template, [1, 1], 16)


def test_unlocatable_answer_raises():
    # a merge across the header/answer boundary leaves no token boundary where the answer starts
    tok = char_tokenizer(bos=True, merges=[("\n", "A")])
    with pytest.raises(ValueError, match="answer boundary"):
        data.encode_internvl(tok, CONV, "internlm2-chat", [1], 16)
    with pytest.raises(ValueError, match="did not add <s>"):
        data.encode_internvl(char_tokenizer(bos=False), CONV, "internlm2-chat", [1], 16)
