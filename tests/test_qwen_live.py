"""Qwen2-VL / Qwen2.5-VL vs transformers (the oracle) on tiny random models built here, with shapes unlike the
fixtures: GQA 6/2 heads, mrope_section [4, 2, 2], a 3-block ViT with 3 heads, Qwen2.5-VL windows with ragged edges.

Every checkpoint is saved by transformers and reloaded by `load.load_model` in three layouts (save_pretrained's own,
the nested model.visual.* / model.language_model.* one, and two shards with an index). The batch mixes two images in
one sample, one in another and a text-only sample; image sides are not multiples of 28; left and right padding.
"""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import load
import model
from parity import pad, rel_err

RTOL = 1e-4  # fp32: max |ours - ref| / max |ref| over the unpadded positions
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: single-threaded is faster
ARCHS = ["qwen2_vl", "qwen2_5_vl"]
LAYOUTS = ["flat", "nested", "sharded"]
PAD, EOS, IMAGE, VIDEO, VISION_START, VISION_END = 0, 2, 290, 291, 292, 293
VOCAB = 300
IMAGE_SIZES = [(45, 130), (200, 317), (90, 61)]  # (H, W), none a multiple of 28
MIN_PIX, MAX_PIX = 4 * 28 * 28, 60 * 28 * 28
NEW_TOKENS = 6

# ----------------------------------------------------------------------------------------------------------------------
# tiny reference models


def text_config():
    return dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=PAD,
                eos_token_id=EOS, bos_token_id=1,
                rope_parameters=dict(rope_type="default", mrope_section=[4, 2, 2], rope_theta=10000.0))


def hf_config(arch):
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END, tie_word_embeddings=True)
    if arch == "qwen2_vl":
        vision = dict(depth=3, embed_dim=48, num_heads=3, hidden_size=96, mlp_ratio=2)
        return transformers.Qwen2VLConfig(text_config=text_config(), vision_config=vision, **ids)
    # window 112 px = 4x4 merged tokens; the image grids below are not multiples of 4, so edge windows are ragged
    vision = dict(depth=3, hidden_size=48, num_heads=3, intermediate_size=80, out_hidden_size=96, window_size=112,
                  fullatt_block_indexes=[2])
    return transformers.Qwen2_5_VLConfig(text_config=text_config(), vision_config=vision, **ids)


def randomise(module, seed):
    """Every parameter re-drawn: weights and biases N(0, 0.2), norm weights 1 + 0.1 N(0, 1), so that biases and norm
    parameters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = name.endswith("weight") and p.dim() == 1
            p.copy_(1 + 0.1 * noise if is_norm_weight else 0.2 * noise)


def build_reference(arch, seed=0):
    torch.manual_seed(seed)
    cls = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[arch]
    config = hf_config(arch)
    config._attn_implementation = "eager"
    ref = cls(config).float().eval()
    randomise(ref, seed)
    return ref


# ----------------------------------------------------------------------------------------------------------------------
# checkpoint layouts


def nested_key(key):  # save_pretrained's flat visual.* / model.* -> model.visual.* / model.language_model.*
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def copy_configs(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        with open(os.path.join(src, name)) as f, open(os.path.join(dst, name), "w") as g:
            g.write(f.read())


def write_nested(src, dst):
    copy_configs(src, dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    save_file({nested_key(k): v for k, v in state.items()}, os.path.join(dst, "model.safetensors"))


def write_sharded(src, dst):
    copy_configs(src, dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, os.path.join(dst, name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    """The transformers model, its folders in the three layouts and our model loaded from each."""
    arch = request.param
    ref = build_reference(arch)
    root = tmp_path_factory.mktemp(arch)
    folders = {layout: str(root / layout) for layout in LAYOUTS}
    ref.save_pretrained(folders["flat"])
    write_nested(folders["flat"], folders["nested"])
    write_sharded(folders["flat"], folders["sharded"])
    ours = {layout: load.load_model(folder) for layout, folder in folders.items()}
    return dict(arch=arch, ref=ref, folders=folders, ours=ours)


# ----------------------------------------------------------------------------------------------------------------------
# inputs: a 3-sample batch (two images, one image, text only), as the processor would tokenise it


def random_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]


def image_block(grid):
    return [VISION_START] + [IMAGE] * (int(grid.prod()) // 4) + [VISION_END]


def samples():
    """Unpadded samples: (token ids, the indices of its images)."""
    pixel_values, grid = data.qwen_images(random_images(), MIN_PIX, MAX_PIX)
    g = torch.Generator().manual_seed(1)

    def text(n):
        return torch.randint(3, 280, (n,), generator=g).tolist()

    rows = [(text(5) + image_block(grid[0]) + text(3) + image_block(grid[1]) + text(4), [0, 1]),
            (text(7) + image_block(grid[2]) + text(6), [2]),
            (text(11), [])]
    return rows, pixel_values, grid


def image_inputs(pixel_values, grid, which):
    """pixel_values / image_grid_thw of the images `which` (in order); (None, None) for none."""
    if not which:
        return None, None
    rows = grid.prod(-1).tolist()
    starts = np.cumsum([0] + rows)
    pv = torch.cat([pixel_values[starts[i]:starts[i + 1]] for i in which])
    return pv, grid[which]


def batch(side):
    rows, pixel_values, grid = samples()
    ids, mask = pad([s for s, _ in rows], side)
    pv, thw = image_inputs(pixel_values, grid, [i for _, which in rows for i in which])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)


def hf_kwargs(inputs):  # transformers 5.x wants the token types (0 text, 1 image) whenever image_grid_thw is given
    return dict(inputs, mm_token_type_ids=(inputs["input_ids"] == IMAGE).long())


# ----------------------------------------------------------------------------------------------------------------------
# helpers


@torch.no_grad()
def hf_logits(ref, inputs):
    return ref(**hf_kwargs(inputs)).logits.float()


@torch.no_grad()
def full_forward_greedy(forward, ids, pixel_values, grid, n=NEW_TOKENS):
    """Greedy continuation of one unpadded sample by n full forwards (no cache); forward(ids, pv, grid) -> logits."""
    ids, out = ids[None], []
    for _ in range(n):
        tok = forward(ids, pixel_values, grid)[0, -1].argmax()
        out.append(int(tok))
        ids = torch.cat([ids, tok.view(1, 1)], 1)
    return out


def per_sample_greedy(forward):
    """full_forward_greedy of every sample, unpadded."""
    rows, pixel_values, grid = samples()
    return [full_forward_greedy(forward, torch.tensor(s), *image_inputs(pixel_values, grid, which))
            for s, which in rows]


# ----------------------------------------------------------------------------------------------------------------------
# tests


def test_save_pretrained_writes_flat_layout(setup):
    keys = set(load_file(os.path.join(setup["folders"]["flat"], "model.safetensors")))
    assert {k.split(".")[0] for k in keys} == {"visual", "model"}  # tied head: no lm_head.weight stored
    assert not any(k.startswith(("model.visual.", "model.language_model.")) for k in keys)


def test_inputs_cover_the_cases():
    rows, pixel_values, grid = samples()
    assert [len(which) for _, which in rows] == [2, 1, 0]
    merged = grid[:, 1:] // 2
    assert (merged % 4 != 0).any(dim=1).all()  # every image has a ragged Qwen2.5-VL edge window
    assert pixel_values.shape == (int(grid.prod(-1).sum()), 1176)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_load_the_same_weights(setup, layout):
    ours, ref = setup["ours"][layout].state_dict(), setup["ref"].state_dict()  # transformers nests in memory
    assert {nested_key(k) for k in ours} == set(ref)
    assert all(torch.equal(v, ref[nested_key(k)]) for k, v in ours.items())


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_image_features(setup, impl, monkeypatch):
    monkeypatch.setattr(model, "ATTN_IMPL", impl)
    _, pixel_values, grid = samples()
    with torch.no_grad():
        ref = torch.cat(setup["ref"].model.get_image_features(pixel_values, grid).pooler_output)
        ours = setup["ours"]["flat"].image_features(pixel_values, grid)
    assert ours.shape == ref.shape == (int(grid.prod(-1).sum()) // 4, 96)
    assert rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_logits(setup, layout, side, impl, monkeypatch):
    monkeypatch.setattr(model, "ATTN_IMPL", impl)
    inputs = batch(side)
    ref = hf_logits(setup["ref"], inputs)
    with torch.no_grad():
        ours = setup["ours"][layout](**inputs)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (*inputs["input_ids"].shape, VOCAB)
    assert rel_err(ours, ref, inputs["attention_mask"]) <= RTOL


def test_padding_does_not_change_logits(setup):
    """Each sample alone, unpadded, gives the logits it gets inside the left-padded batch."""
    ours, (rows, pixel_values, grid) = setup["ours"]["flat"], samples()
    inputs = batch("left")
    with torch.no_grad():
        padded = ours(**inputs)
        for b, (s, which) in enumerate(rows):
            pv, thw = image_inputs(pixel_values, grid, which)
            alone = ours(torch.tensor(s)[None], None, pixel_values=pv, image_grid_thw=thw)[0]
            assert rel_err(padded[b, -len(s):], alone) <= RTOL


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_generate_matches_transformers(setup, impl, monkeypatch):
    """Left-padded batch of the two-image and the text-only prompt vs transformers' own greedy generate."""
    monkeypatch.setattr(model, "ATTN_IMPL", impl)
    rows, pixel_values, grid = samples()
    ids, mask = pad([rows[0][0], rows[2][0]], "left")
    pv, thw = image_inputs(pixel_values, grid, rows[0][1])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)
    with torch.no_grad():
        ref = setup["ref"].generate(**hf_kwargs(inputs), do_sample=False, max_new_tokens=NEW_TOKENS,
                                    eos_token_id=EOS, pad_token_id=PAD)[:, ids.shape[1]:]
    ours = setup["ours"]["flat"].generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_ids=[EOS])
    assert ours.tolist() == ref.tolist()


def test_transformers_generate_equals_its_full_forward_loop(setup):
    """The oracle's left-padded batched generate agrees with its own unpadded full forwards (so the test above
    checks against a sound reference)."""
    ref = setup["ref"]
    inputs = batch("left")
    with torch.no_grad():
        batched = ref.generate(**hf_kwargs(inputs), do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=EOS,
                               pad_token_id=PAD)[:, inputs["input_ids"].shape[1]:]
    loop = per_sample_greedy(lambda ids, pv, thw: hf_logits(ref, dict(input_ids=ids, pixel_values=pv,
                                                                        image_grid_thw=thw)))
    assert batched.tolist() == loop


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_generate_equals_full_forward_loop(setup, side):
    ours = setup["ours"]["flat"]
    tokens = ours.generate(**batch(side), max_new_tokens=NEW_TOKENS, eos_token_ids=[EOS])
    loop = per_sample_greedy(lambda ids, pv, thw: ours(ids, None, pixel_values=pv, image_grid_thw=thw))
    assert tokens.tolist() == loop


def test_generate_goes_on_after_emitting_an_image_pad(setup, monkeypatch):
    """A generated <|image_pad|> is an ordinary token in a decode step, as in transformers."""
    ours = setup["ours"]["flat"]
    monkeypatch.setattr(ours.lm_head, "forward", lambda h: torch.nn.functional.one_hot(
        torch.full(h.shape[:-1], IMAGE), VOCAB).float())  # the head always picks <|image_pad|>
    assert ours.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3).tolist() == [[IMAGE] * 3]
