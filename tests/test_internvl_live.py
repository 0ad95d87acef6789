"""InternVL2 / InternVL3 vs transformers' native InternVLForConditionalGeneration (the oracle) on tiny random models
built here, with shapes unlike the fixtures: a 3-head ViT over 84- or 56-px tiles, GQA 6/2 (ratio 3) and 5/1 heads.

The native model is built with a LlamaConfig decoder standing in for InternLM2 (no biases) or a Qwen2Config one
(q/k/v biases) for InternVL3's LLM, re-randomised, converted here into the OFFICIAL remote-code layout (vision_model.*,
mlp1.*, InternLM2's fused `wqkv` or Qwen2's language_model.model.*) with an official InternVLChatModel config.json,
and loaded by `load.load_model`. The native model is set up as the official one runs: vision_feature_layer -1 (=
select_layer -1, the last layer, no final norm since use_mean_pooling), CLS dropped, its pixel shuffle is the official
v2 sequence, and the projector LayerNorm keeps nn.LayerNorm's eps 1e-5 as mlp1.0 does.

The batch: sample 0 holds one image of 3 tiles, sample 1 one image of 1 tile (4 tiles in pixel_values), each as
<img> + IMG_CONTEXT x (tokens per tile x tiles) + </img> inside text; left and right padding. The reference for every
padded batch is the native model run on each sample alone, unpadded.
"""
import copy
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

import load
import model
from parity import pad, rel_err

RTOL = 1e-4  # fp32: max |ours - ref| / max |ref| over the unpadded positions
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: single-threaded is faster
PAD = 0
NEW_TOKENS = 6
TILES = [3, 1]  # tiles per sample (one image each)

# the decoder stand-ins; vocab, tile size and heads differ between the two so that a mixed-up size shows
CASES = {
    "internlm2": dict(llm="InternLM2ForCausalLM", vocab=200, hidden=96, inter=160, layers=2, heads=6, kv_heads=2,
                      eps=1e-5, theta=1e6, image_size=84, template="internlm2-chat"),
    "qwen2": dict(llm="Qwen2ForCausalLM", vocab=230, hidden=80, inter=144, layers=2, heads=5, kv_heads=1,
                  eps=1e-6, theta=1e6, image_size=56, template="internvl2_5"),
}
VIT = dict(hidden=48, heads=3, layers=2, inter=96, patch=14, eps=1e-6)


def ids_of(case):  # special tokens at the top of the vocab; text draws below them
    v = CASES[case]["vocab"]
    return dict(image=v - 1, img_start=v - 3, img_end=v - 2)


def tokens_per_tile(case):
    return (CASES[case]["image_size"] // VIT["patch"] // 2) ** 2  # downsample_ratio 0.5: 2x2 patches -> 1 token


# ----------------------------------------------------------------------------------------------------------------------
# the native model


def native_config(case):
    c = CASES[case]
    text = dict(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                rms_norm_eps=c["eps"], max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2, rope_parameters=dict(rope_type="default", rope_theta=c["theta"]))
    if case == "internlm2":
        text = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **text)
    else:
        text = transformers.Qwen2Config(use_sliding_window=False, **text)
    vision = transformers.InternVLVisionConfig(
        hidden_size=VIT["hidden"], num_attention_heads=VIT["heads"], num_hidden_layers=VIT["layers"],
        intermediate_size=VIT["inter"], image_size=c["image_size"], patch_size=VIT["patch"], attention_bias=True,
        norm_type="layer_norm", layer_norm_eps=VIT["eps"], hidden_act="gelu", use_qk_norm=False, use_mean_pooling=True)
    return transformers.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=ids_of(case)["image"], downsample_ratio=0.5,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=tokens_per_tile(case), tie_word_embeddings=False)


def randomise(module, seed):
    """Every parameter re-drawn: weights, biases, CLS / position embeddings and layer scales N(0, 0.2); norm weights
    1 + 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = "norm" in name and name.endswith("weight")  # layer_norm, layernorm_*, *_layernorm, norm
            p.copy_(1 + 0.1 * noise if is_norm_weight else 0.2 * noise)


def build_native(case, seed=0):
    torch.manual_seed(seed)
    config = native_config(case)
    config._attn_implementation = "eager"
    ref = transformers.InternVLForConditionalGeneration(config).float().eval()
    randomise(ref, seed)
    return ref


# ----------------------------------------------------------------------------------------------------------------------
# native -> official layout


def fuse_wqkv(q, k, v, kv_heads):
    """InternLM2's wqkv rows: per kv head h, [q rows of heads h*g .. h*g+g-1, k rows of h, v rows of h]."""
    qs, ks, vs = q.chunk(kv_heads), k.chunk(kv_heads), v.chunk(kv_heads)
    return torch.cat([torch.cat([qs[h], ks[h], vs[h]]) for h in range(kv_heads)])


def to_official(state, case):
    """The native state dict (model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head)
    in the official InternVLChatModel key layout. Every native key must be used exactly once."""
    state, out = dict(state), {}

    def take(key):
        return state.pop(key).clone().contiguous()

    vt, vo = "model.vision_tower.", "vision_model."
    out[vo + "embeddings.class_embedding"] = take(vt + "embeddings.cls_token")
    out[vo + "embeddings.position_embedding"] = take(vt + "embeddings.position_embeddings")
    for p in ("weight", "bias"):
        out[vo + f"embeddings.patch_embedding.{p}"] = take(vt + f"embeddings.patch_embeddings.projection.{p}")
    for i in range(VIT["layers"]):
        src, dst = vt + f"encoder.layer.{i}.", vo + f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.qkv.{p}"] = torch.cat([take(src + f"attention.{n}_proj.{p}") for n in "qkv"])
            out[dst + f"attn.proj.{p}"] = take(src + f"attention.projection_layer.{p}")
            out[dst + f"norm1.{p}"] = take(src + f"layernorm_before.{p}")
            out[dst + f"norm2.{p}"] = take(src + f"layernorm_after.{p}")
            out[dst + f"mlp.fc1.{p}"] = take(src + f"mlp.fc1.{p}")
            out[dst + f"mlp.fc2.{p}"] = take(src + f"mlp.fc2.{p}")
        out[dst + "ls1"] = take(src + "lambda_1")
        out[dst + "ls2"] = take(src + "lambda_2")
    for i, n in ((0, "layer_norm"), (1, "linear_1"), (3, "linear_2")):
        for p in ("weight", "bias"):
            out[f"mlp1.{i}.{p}"] = take(f"model.multi_modal_projector.{n}.{p}")

    lm = "model.language_model."
    if case == "qwen2":
        for key in [k for k in state if k.startswith(lm)]:
            out["language_model.model." + key[len(lm):]] = take(key)
        out["language_model.lm_head.weight"] = take("lm_head.weight")
    else:
        dst = "language_model.model."
        out[dst + "tok_embeddings.weight"] = take(lm + "embed_tokens.weight")
        out[dst + "norm.weight"] = take(lm + "norm.weight")
        for i in range(CASES[case]["layers"]):
            s, d = lm + f"layers.{i}.", dst + f"layers.{i}."
            q, k, v = (take(s + f"self_attn.{n}_proj.weight") for n in "qkv")
            out[d + "attention.wqkv.weight"] = fuse_wqkv(q, k, v, CASES[case]["kv_heads"])
            out[d + "attention.wo.weight"] = take(s + "self_attn.o_proj.weight")
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[d + f"feed_forward.{ours}.weight"] = take(s + f"mlp.{theirs}.weight")
            out[d + "attention_norm.weight"] = take(s + "input_layernorm.weight")
            out[d + "ffn_norm.weight"] = take(s + "post_attention_layernorm.weight")
        out["language_model.output.weight"] = take("lm_head.weight")
    assert not state, f"native keys left unconverted: {sorted(state)}"
    return out


def official_config(case):
    """config.json as the official remote code writes it (the structure of tests/fixtures/internvl2_tiny)."""
    c = CASES[case]
    vision = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=VIT["hidden"],
                  num_attention_heads=VIT["heads"], num_hidden_layers=VIT["layers"], intermediate_size=VIT["inter"],
                  image_size=c["image_size"], patch_size=VIT["patch"], num_channels=3, qkv_bias=True,
                  qk_normalization=False, norm_type="layer_norm", layer_norm_eps=VIT["eps"], hidden_act="gelu",
                  drop_path_rate=0.0, dropout=0.0, attention_dropout=0.0, initializer_factor=1.0,
                  use_flash_attn=False)
    llm = dict(architectures=[c["llm"]], vocab_size=c["vocab"], hidden_size=c["hidden"],
               intermediate_size=c["inter"], num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
               num_key_value_heads=c["kv_heads"], hidden_act="silu", max_position_embeddings=2048,
               rms_norm_eps=c["eps"], rope_theta=c["theta"], bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
               tie_word_embeddings=False, attn_implementation="eager")
    if case == "internlm2":
        llm.update(model_type="internlm2", bias=False)  # no rope_scaling: plain RoPE, as the native Llama
    else:
        llm.update(model_type="qwen2", sliding_window=2048, use_sliding_window=False, max_window_layers=c["layers"])
    return dict(vision_config=vision, llm_config=llm, downsample_ratio=0.5, template=c["template"], select_layer=-1,
                ps_version="v2", force_image_size=c["image_size"], dynamic_image_size=True, use_thumbnail=True,
                min_dynamic_patch=1, max_dynamic_patch=6, tie_word_embeddings=False,
                architectures=["InternVLChatModel"], model_type="internvl_chat", torch_dtype="float32")


def write_official(ref, case, folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(official_config(case), f, indent=2)
    save_file(to_official(ref.state_dict(), case), os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "added_tokens.json"), "w") as f:  # where load_model finds <IMG_CONTEXT>'s id
        json.dump({"<img>": ids_of(case)["img_start"], "</img>": ids_of(case)["img_end"],
                   "<IMG_CONTEXT>": ids_of(case)["image"]}, f)


# ----------------------------------------------------------------------------------------------------------------------
# inputs


def samples(case):
    """Unpadded samples [(token ids, pixel_values of its tiles)] and all tiles concatenated (4, 3, S, S)."""
    g = torch.Generator().manual_seed(1)
    s, ids = CASES[case]["image_size"], ids_of(case)
    pixel_values = torch.randn(sum(TILES), 3, s, s, generator=g)

    def text(n):
        return torch.randint(3, ids["img_start"], (n,), generator=g).tolist()

    def image(tiles):
        return [ids["img_start"]] + [ids["image"]] * (tokens_per_tile(case) * tiles) + [ids["img_end"]]

    rows = [text(4) + image(TILES[0]) + text(6), text(9) + image(TILES[1]) + text(3)]
    starts = [0, TILES[0]]
    return [(r, pixel_values[a:a + n]) for r, a, n in zip(rows, starts, TILES)], pixel_values


def batch(case, side):
    rows, pixel_values = samples(case)
    ids, mask = pad([r for r, _ in rows], side)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)


@torch.no_grad()
def native_logits(ref, ids, pixel_values):  # one unpadded sample
    return ref(input_ids=torch.tensor(ids)[None], pixel_values=pixel_values).logits[0].float()


@torch.no_grad()
def native_greedy(ref, ids, pixel_values, n=NEW_TOKENS):
    """n greedy tokens by full native forwards (no cache, no eos) of one unpadded sample."""
    out = []
    for _ in range(n):
        out.append(int(native_logits(ref, ids + out, pixel_values)[-1].argmax()))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", params=list(CASES))
def setup(request, tmp_path_factory):
    """The native model, our model loaded from its official-layout folder, and the native per-sample references."""
    case = request.param
    ref = build_native(case)
    folder = str(tmp_path_factory.mktemp(case))
    write_official(ref, case, folder)
    ours = load.load_model(folder)
    rows, _ = samples(case)
    return dict(case=case, ref=ref, ours=ours, folder=folder,
                logits=[native_logits(ref, r, pv) for r, pv in rows],
                greedy=[native_greedy(ref, r, pv) for r, pv in rows])


# ----------------------------------------------------------------------------------------------------------------------
# tests


def test_native_model_is_set_up_as_the_official_one(setup):
    ref, case = setup["ref"], setup["case"]
    assert ref.lm_head.weight.data_ptr() != ref.model.language_model.embed_tokens.weight.data_ptr()  # untied
    assert isinstance(ref.model.vision_tower.layernorm, torch.nn.Identity)  # no final ViT norm
    assert ref.model.multi_modal_projector.layer_norm.eps == 1e-5  # as mlp1.0 = nn.LayerNorm(d)
    assert ref.config.vision_feature_layer == -1 and ref.config.vision_feature_select_strategy == "default"
    cfg = setup["ours"].cfg
    assert setup["ours"].mlp1[0].eps == 1e-5
    assert (cfg.llm_arch, cfg.ps_version, cfg.select_layer, cfg.rope_dynamic) == (case, "v2", -1, 0.0)
    assert cfg.image_token_id == ids_of(case)["image"] and cfg.num_image_token == tokens_per_tile(case)
    assert cfg.num_heads // cfg.num_kv_heads == CASES[case]["heads"] // CASES[case]["kv_heads"] > 1


def test_converted_weights_are_the_native_ones(setup):
    ours, ref = setup["ours"].state_dict(), setup["ref"].state_dict()
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in ref.values())
    assert torch.equal(ours["vision_model.embeddings.class_embedding"],
                       ref["model.vision_tower.embeddings.cls_token"])
    head = "language_model.output.weight" if setup["case"] == "internlm2" else "language_model.lm_head.weight"
    assert torch.equal(ours[head], ref["lm_head.weight"])


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_image_features(setup, impl, monkeypatch):
    monkeypatch.setattr(model, "ATTN_IMPL", impl)
    _, pixel_values = samples(setup["case"])
    with torch.no_grad():
        ref = setup["ref"].model.get_image_features(pixel_values).pooler_output
        ours = setup["ours"].image_features(pixel_values)
    assert ours.shape == ref.shape == (sum(TILES), tokens_per_tile(setup["case"]), CASES[setup["case"]]["hidden"])
    assert rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_logits(setup, side, impl, monkeypatch):
    """Our padded batch at its unpadded positions vs the native model on each sample alone."""
    monkeypatch.setattr(model, "ATTN_IMPL", impl)
    inputs = batch(setup["case"], side)
    with torch.no_grad():
        ours = setup["ours"](**inputs)
    assert ours.dtype == torch.float32 and ours.shape == (*inputs["input_ids"].shape, CASES[setup["case"]]["vocab"])
    mask = inputs["attention_mask"].bool()
    ours = torch.cat([ours[b][mask[b]] for b in range(len(TILES))])
    assert rel_err(ours, torch.cat(setup["logits"])) <= RTOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_matches_native_argmax_loop(setup, side):
    """Our cached greedy generation on the padded batch vs full native forwards per unpadded sample (no eos)."""
    tokens = setup["ours"].generate(**batch(setup["case"], side), max_new_tokens=NEW_TOKENS, eos_token_ids=[-1])
    assert tokens.tolist() == setup["greedy"]


@pytest.mark.parametrize("setup", ["internlm2"], indirect=True)  # Qwen2 keeps separate q/k/v projections
def test_wqkv_kv_group_layout_is_exercised(setup):
    """Swapping the kv-group blocks [q_0 .. q_g-1, k, v] of wqkv changes our logits; swapping wo's matching head
    columns as well gives them back (the blocks are whole attention groups). A converter that wrote [all q; all k;
    all v] instead would disagree with the native model."""
    c = CASES["internlm2"]
    hkv, g, d = c["kv_heads"], c["heads"] // c["kv_heads"], c["hidden"] // c["heads"]
    inputs = batch("internlm2", "left")
    mask = inputs["attention_mask"].bool()

    def logits(m):
        with torch.no_grad():
            return m(**inputs)[mask]

    base = logits(setup["ours"])
    swapped, both, naive = (copy.deepcopy(setup["ours"]) for _ in range(3))
    native = setup["ref"].state_dict()
    with torch.no_grad():
        for i in range(c["layers"]):
            for m in (swapped, both):
                w = m.language_model.model.layers[i].attention.wqkv.weight
                w.copy_(w.view(hkv, (g + 2) * d, -1).flip(0).reshape(w.shape))
            wo = both.language_model.model.layers[i].attention.wo.weight
            wo.copy_(wo.view(wo.shape[0], hkv, g * d).flip(1).reshape(wo.shape))
            p = f"model.language_model.layers.{i}.self_attn."
            naive.language_model.model.layers[i].attention.wqkv.weight.copy_(
                torch.cat([native[p + f"{n}_proj.weight"] for n in "qkv"]))
    assert rel_err(logits(swapped), base) > 1e-2
    assert rel_err(logits(both), base) <= 1e-5
    assert rel_err(logits(naive), base) > 1e-2
