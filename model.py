"""Vision-language backbones in plain PyTorch, loaded from the official safetensors under their official key names.

Qwen2-VL / Qwen2.5-VL: a ViT over 14x14 patches (2-D RoPE, per-image or windowed attention), a 2x2 patch merger,
and a Qwen2 decoder with multimodal RoPE (M-RoPE).
InternVL2 / InternVL3: InternViT over 448-px tiles, pixel shuffle (2x2 space-to-depth), the `mlp1` projector, and
an InternLM2 (InternVL2) or Qwen2 (InternVL3) decoder with 1-D RoPE.
Module and parameter names equal the checkpoint keys, so `model.state_dict()` is the file's key set (the tied head
aside).
"""
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint

from perceivers import FusionGate, init_perceiver, perceiver

# ----------------------------------------------------------------------------------------------------------------------
# config: one flat dataclass, filled from the official config.json (flat 4.x layout or nested 5.x `text_config`)


@dataclass
class ModelConfig:
    arch: str  # qwen2_vl | qwen2_5_vl
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list  # frequency slots per (t, h, w) axis; sums to head_dim // 2
    tie_word_embeddings: bool
    image_token_id: int
    vision_start_token_id: int
    eos_token_ids: list  # end-of-turn ids that stop generation
    pad_token_id: int
    vit_hidden: int  # ViT width
    vit_out: int  # merger output = LLM width
    vit_depth: int
    vit_heads: int
    vit_intermediate: int
    vit_act: str
    vit_patch: int = 14
    vit_temporal_patch: int = 2
    vit_merge: int = 2
    vit_window: int = 0  # Qwen2.5-VL: window side in pixels (112 = 4x4 merged tokens)
    vit_fullatt_blocks: list = field(default_factory=list)  # Qwen2.5-VL: blocks with per-image attention
    llm_arch: str = "qwen2"  # qwen2 | internlm2
    attention_bias: bool = True  # q/k/v biases (Qwen2 always; InternLM2's `bias` also covers wo)
    max_position_embeddings: int = 32768
    rope_dynamic: float = 0.0  # dynamic-NTK factor (0 = off), applied beyond max_position_embeddings
    sliding_window: int = 0  # keys further back than this are masked (0 = off)
    vit_image_size: int = 448  # InternViT tile side
    vit_qkv_bias: bool = True
    vit_norm_eps: float = 1e-6
    vit_drop_path: float = 0.0  # stochastic depth, active in train mode only (MP-GUI trains with 0.1)
    downsample_ratio: float = 0.5  # pixel shuffle: 2x2 patches -> 1 token
    ps_version: str = "v2"
    select_layer: int = -1
    num_image_token: int = 256  # tokens per InternVL tile
    template: str = ""
    extra_token_id: int = None  # MP-GUI's <EXTRA_IMG_CONTEXT>
    im_start_token_id: int = None  # <|im_start|>: the prompt_only gate mask cuts at the last one
    mpgui_mode: str = "fusion"  # which source fills EXTRA: textual | graphical | spatial (stages 1-3) | fusion
    gate_mask: str = "prompt_only"  # fusion-gate keys: official (answer leaks in, as released) | prompt_only
    # ShowUI's UI-guided token selection (Qwen2-VL decoder; showui_tongui.md B.1-B.2), off by default
    lm_skip_layer: str = "[1,28,0]"  # "[start,end,0|1],...": 1-indexed inclusive layer ranges, later ones win
    lm_skip_ratio: float = 0.0  # share of each UI component's image tokens a selecting layer skips
    lm_skip_rand: bool = False  # training: a random subset of each component instead of evenly spaced tokens
    uigraph_threshold: float = 1.0  # neighbouring 28x28 blocks join a component if L2(normalised pixels) < this
    uigraph_train: bool = True  # build the UI graph (so select) in train mode
    uigraph_test: bool = False  # ... and in eval mode (ShowUI: off, so every block is its own component)


def _need(d, key, where):
    if key not in d:
        raise KeyError(f"{where}: config.json has no '{key}'")
    return d[key]


def config_from_hf(d, where="config.json", generation_config=None):
    """Reads an official Qwen2-VL / Qwen2.5-VL config.json (dict). Vision keys absent from the file take the
    reference class defaults, as the official Qwen2-VL-2B config stores only a few of them."""
    archs = d.get("architectures") or [""]
    if archs[0] in ("InternVLChatModel", "MPGUI"):
        cfg = internvl_config(d, where, generation_config)
        cfg.arch = "mpgui" if archs[0] == "MPGUI" else "internvl"
        return cfg
    arch = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}.get(
        archs[0], d.get("model_type"))
    if arch not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"{where}: unsupported architecture {archs[0]!r} / model_type {d.get('model_type')!r}")
    t = {**d, **d.get("text_config", {})}  # 5.x nests the decoder under text_config; 4.x keeps it flat
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    hidden, heads = _need(t, "hidden_size", where), _need(t, "num_attention_heads", where)
    v = d.get("vision_config", {})
    if arch == "qwen2_vl":
        vit_hidden, vit_out = v.get("embed_dim", 1280), v.get("hidden_size", 1536)
        vit_inter, act = vit_hidden * v.get("mlp_ratio", 4), v.get("hidden_act", "quick_gelu")
    else:
        vit_hidden, vit_out = v.get("hidden_size", 1280), v.get("out_hidden_size", hidden)
        vit_inter, act = v.get("intermediate_size", 3420), v.get("hidden_act", "silu")
    eos = (generation_config or {}).get("eos_token_id", t.get("eos_token_id"))
    ties = [c["tie_word_embeddings"] for c in (d, d.get("text_config", {})) if "tie_word_embeddings" in c]
    tie = any(ties) if ties else True  # either level asks for it, as transformers reads it; old configs omit it
    return ModelConfig(
        arch=arch, vocab_size=_need(t, "vocab_size", where), hidden_size=hidden,
        intermediate_size=_need(t, "intermediate_size", where), num_layers=_need(t, "num_hidden_layers", where),
        num_heads=heads, num_kv_heads=t.get("num_key_value_heads", heads), head_dim=t.get("head_dim") or hidden // heads,
        rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)),
        mrope_section=list(_need(rope, "mrope_section", where + " rope_scaling")), tie_word_embeddings=bool(tie),
        image_token_id=_need(t, "image_token_id", where), vision_start_token_id=_need(t, "vision_start_token_id", where),
        eos_token_ids=eos if isinstance(eos, list) else [eos], pad_token_id=t.get("pad_token_id") or 0,
        vit_hidden=vit_hidden, vit_out=vit_out, vit_depth=v.get("depth", 32), vit_heads=v.get("num_heads", 16),
        vit_intermediate=vit_inter, vit_act=act, vit_patch=v.get("patch_size", v.get("spatial_patch_size", 14)),
        vit_temporal_patch=v.get("temporal_patch_size", 2), vit_merge=v.get("spatial_merge_size", 2),
        vit_window=v.get("window_size", 112) if arch == "qwen2_5_vl" else 0,
        vit_fullatt_blocks=list(v.get("fullatt_block_indexes", [7, 15, 23, 31])) if arch == "qwen2_5_vl" else [])


def internvl_config(d, where, generation_config=None):
    """An official InternVLChatModel config.json: vision_config (InternViT) + llm_config (InternLM2 or Qwen2). The
    special-token ids are not in it: they come from the tokenizer files (see `special_token_id`)."""
    v, l = _need(d, "vision_config", where), _need(d, "llm_config", where)
    llm = (l.get("architectures") or [""])[0]
    if llm not in ("InternLM2ForCausalLM", "Qwen2ForCausalLM"):
        raise ValueError(f"{where}: unsupported llm_config.architectures {llm!r}")
    if v.get("qk_normalization") or v.get("norm_type", "layer_norm") != "layer_norm":
        raise ValueError(f"{where}: InternViT-6B (rms_norm / qk_normalization) is not supported")
    rope = l.get("rope_scaling") or {}
    kind = rope.get("type") or rope.get("rope_type")
    if kind not in (None, "default", "dynamic"):
        raise ValueError(f"{where}: unsupported rope_scaling {rope}")
    hidden, heads = _need(l, "hidden_size", where), _need(l, "num_attention_heads", where)
    image, patch, ratio = d.get("force_image_size") or v["image_size"], v["patch_size"], d.get("downsample_ratio", 0.5)
    eos = (generation_config or {}).get("eos_token_id", l.get("eos_token_id"))
    return ModelConfig(
        arch="internvl", llm_arch="internlm2" if llm == "InternLM2ForCausalLM" else "qwen2",
        vocab_size=_need(l, "vocab_size", where), hidden_size=hidden, intermediate_size=_need(l, "intermediate_size",
                                                                                            where),
        num_layers=_need(l, "num_hidden_layers", where), num_heads=heads,
        num_kv_heads=l.get("num_key_value_heads", heads), head_dim=l.get("head_dim") or hidden // heads,
        rms_norm_eps=l.get("rms_norm_eps", 1e-6), rope_theta=l.get("rope_theta", 10000.0), mrope_section=[],
        tie_word_embeddings=False,  # the official code forces an untied head for every size; never tie by default
        image_token_id=None, vision_start_token_id=None, eos_token_ids=eos if isinstance(eos, list) else [eos],
        pad_token_id=l.get("pad_token_id") or 0, attention_bias=l.get("bias", True) if llm != "Qwen2ForCausalLM"
        else True, max_position_embeddings=l.get("max_position_embeddings", 32768),
        # the official code runs Qwen2 under transformers 4.37.2, which ignores rope_scaling and always applies
        # sliding_window (use_sliding_window notwithstanding); both matter only past 32k tokens on real checkpoints
        rope_dynamic=float(rope.get("factor", 0.0)) if kind == "dynamic" and llm != "Qwen2ForCausalLM" else 0.0,
        sliding_window=(l.get("sliding_window") or 0) if llm == "Qwen2ForCausalLM" else 0,
        vit_hidden=v["hidden_size"], vit_out=hidden, vit_depth=v["num_hidden_layers"], vit_heads=v["num_attention_heads"],
        vit_intermediate=v["intermediate_size"], vit_act=v.get("hidden_act", "gelu"), vit_patch=patch,
        vit_image_size=image, vit_qkv_bias=v.get("qkv_bias", True), vit_norm_eps=v.get("layer_norm_eps", 1e-6),
        vit_drop_path=v.get("drop_path_rate", 0.0), downsample_ratio=ratio, ps_version=d.get("ps_version", "v1"),
        select_layer=d.get("select_layer", -1), num_image_token=int((image // patch) ** 2 * ratio ** 2),
        template=d.get("template", ""))


def special_token_id(folder, token):
    """The id of an added token from the folder's tokenizer files (tokenizer.json, tokenizer_config.json or
    added_tokens.json), or None. Read here so model.py needs no tokenizer library."""
    def load(name):
        path = os.path.join(folder, name)
        return json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
    for t in load("tokenizer.json").get("added_tokens", []):
        if t["content"] == token:
            return t["id"]
    for i, t in load("tokenizer_config.json").get("added_tokens_decoder", {}).items():
        if t["content"] == token:
            return int(i)
    return load("added_tokens.json").get(token)


# ----------------------------------------------------------------------------------------------------------------------
# attention: the one function every model calls

ATTN_IMPL = "sdpa"  # "sdpa" (fused kernels) or "math" (plain softmax; tests check the fused path against it)
_FLEX = None  # compiled FlexAttention, built on first use (packed rows on CUDA)


def attention(q, k, v, mask=None, causal=False):
    """q (B, H, T, D); k, v (B, Hkv, S, D) with H % Hkv == 0. mask: bool, broadcastable to (B, H, T, S), True where a
    query may attend; never combined with `causal` (one mask per call). Returns (B, H, T, D)."""
    assert not (causal and mask is not None)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: query head i reads kv head i // (H / Hkv)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask (packed rows, CUDA)
        global _FLEX
        if _FLEX is None:
            from torch.nn.attention.flex_attention import flex_attention
            _FLEX = torch.compile(flex_attention)
        return _FLEX(q, k, v, block_mask=mask)
    if ATTN_IMPL == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def doc_block_mask(doc):
    """FlexAttention BlockMask for packed rows: causal within each document of doc (B, T) ids; None off CUDA or
    where torch has no FlexAttention (then the boolean mask of decoder_mask serves)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:
        return None
    if not doc.is_cuda:
        return None
    B, T = doc.shape
    return create_block_mask(lambda b, h, q, k: (doc[b, q] == doc[b, k]) & (q >= k), B, None, T, T, doc.device)


def chunked_ce(h, weight, labels, chunk=1024):
    """Sum of cross-entropy(h @ weight.T, labels) over the rows with labels != -100, never holding more than `chunk`
    rows of fp32 logits: the gradients are computed chunk by chunk in forward (fused linear + CE, as Liger's)."""
    keep = labels != -100
    return _ChunkedCE.apply(h[keep], weight, labels[keep], chunk)


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, y, chunk):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if h.requires_grad else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if w.requires_grad else None
        for i in range(0, len(h), chunk):
            x, t = h[i:i + chunk], y[i:i + chunk]
            z = (x @ w.T).float()  # logits in the matmul's dtype, then fp32, as head(h).float()
            loss += F.cross_entropy(z, t, reduction="sum")
            g = torch.softmax(z, -1)  # d loss / d z = softmax - onehot
            g[torch.arange(len(t), device=t.device), t] -= 1
            g = g.to(x.dtype)
            if gh is not None:
                gh[i:i + chunk] = g @ w.to(x.dtype)
            if gw is not None:
                gw += (g.T @ x).float()
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, go):
        gh, gw = ctx.saved_tensors
        return (gh * go.to(gh.dtype) if gh is not None else None,
                (gw * go).to(ctx.w_dtype) if gw is not None else None, None, None)


def segment_layout(seqlens, device):
    """Packs variable-length segments (images, windows) of a flat sequence into a padded batch, so one fused
    attention call serves them all. Returns gather index (n, L), validity (n, L) and a key mask or None."""
    seqlens = [s for s in seqlens if s > 0]
    L, starts = max(seqlens), [0]
    for s in seqlens[:-1]:
        starts.append(starts[-1] + s)
    ar = torch.arange(L, device=device)
    lens = torch.tensor(seqlens, device=device)
    valid = ar[None] < lens[:, None]  # (n, L)
    index = (torch.tensor(starts, device=device)[:, None] + ar[None]).clamp(max=sum(seqlens) - 1)
    mask = None if all(s == L for s in seqlens) else valid[:, None, None, :]
    return index, valid, mask


def segment_attention(q, k, v, layout):
    """q, k, v (N, H, D) of a packed sequence; attention within each segment of `layout` only. Returns (N, H, D)."""
    index, valid, mask = layout
    q, k, v = (x[index].transpose(1, 2) for x in (q, k, v))  # (n, H, L, D)
    return attention(q, k, v, mask).transpose(1, 2)[valid]


# ----------------------------------------------------------------------------------------------------------------------
# shared pieces


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # normalise in fp32, multiply the weight in the input dtype (as the reference does)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inv_freq(dim, theta, device=None):  # always fp32: a bf16 inv_freq drifts the logits (internvl.md 6.4)
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


class Block(nn.Module):
    """A transformer block whose `block` may be recomputed in backward (activation checkpointing). The checkpoint
    sits inside forward, so hooks on the module (FSDP2's all-gathers) stay outside the recomputed region."""
    checkpointing = False

    def forward(self, x, *rest):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, x, *rest, use_reentrant=False)
        return self.block(x, *rest)


ACT = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu, "silu": F.silu}

# ----------------------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL vision tower


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        p, tp = cfg.vit_patch, cfg.vit_temporal_patch
        self.proj = nn.Conv3d(3, cfg.vit_hidden, kernel_size=(tp, p, p), stride=(tp, p, p), bias=False)

    def forward(self, x):  # (N, 3*T*14*14) -> (N, C); the stride-equals-kernel conv is one matmul per patch
        return F.linear(x.to(self.proj.weight.dtype), self.proj.weight.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.vit_heads
        self.qkv = nn.Linear(cfg.vit_hidden, 3 * cfg.vit_hidden, bias=True)
        self.proj = nn.Linear(cfg.vit_hidden, cfg.vit_hidden, bias=True)

    def forward(self, x, cos, sin, layout):
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # each (N, H, D)
        cos, sin = cos[:, None], sin[:, None]  # rotation in fp32, as the reference does
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        return self.proj(segment_attention(q, k, v, layout).reshape(N, C))


class VisionMlp(nn.Module):  # Qwen2-VL: fc1 -> quick_gelu -> fc2
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden, cfg.vit_intermediate)
        self.fc2 = nn.Linear(cfg.vit_intermediate, cfg.vit_hidden)
        self.act = ACT[cfg.vit_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMlp(nn.Module):  # Qwen2.5-VL: SiLU-gated, with biases
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.vit_hidden, cfg.vit_intermediate)
        self.up_proj = nn.Linear(cfg.vit_hidden, cfg.vit_intermediate)
        self.down_proj = nn.Linear(cfg.vit_intermediate, cfg.vit_hidden)
        self.act = ACT[cfg.vit_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _vit_norm(cfg, dim):
    return nn.LayerNorm(dim, eps=1e-6) if cfg.arch == "qwen2_vl" else RMSNorm(dim, 1e-6)


class VisionBlock(Block):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = _vit_norm(cfg, cfg.vit_hidden), _vit_norm(cfg, cfg.vit_hidden)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg) if cfg.arch == "qwen2_vl" else VisionGatedMlp(cfg)

    def block(self, x, cos, sin, layout):
        x = x + self.attn(self.norm1(x), cos, sin, layout)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):  # 2x2 neighbouring patches (4 consecutive rows) -> one LLM token
    def __init__(self, cfg):
        super().__init__()
        d = cfg.vit_hidden * cfg.vit_merge ** 2
        self.ln_q = _vit_norm(cfg, cfg.vit_hidden)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.vit_out))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


def window_index(grid_thw, win, merge):
    """Qwen2.5-VL windows: the merged-token grid of each image cut into win x win windows in raster order.
    Returns the permutation of merged tokens that makes every window contiguous, and the window lengths."""
    index, seqlens, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        lh, lw = h // merge, w // merge
        g = torch.arange(t * lh * lw).view(t, lh, lw)
        ph, pw = (-lh) % win, (-lw) % win
        g = F.pad(g, (0, pw, 0, ph), value=-1)
        g = g.view(t, (lh + ph) // win, win, (lw + pw) // win, win).permute(0, 1, 3, 2, 4).reshape(-1, win * win)
        keep = g >= 0
        index.append(g[keep] + offset)
        seqlens += keep.sum(1).tolist()
        offset += t * lh * lw
    return torch.cat(index), seqlens


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vit_depth))
        self.merger = PatchMerger(cfg)

    def rotary(self, grid_thw, device):
        """2-D RoPE angles per patch, (N, head_dim): [h * f, w * f] duplicated, rows in merge-block-major order."""
        m, pos = self.cfg.vit_merge, []
        for t, h, w in grid_thw.tolist():
            hh = torch.arange(h, device=device)[:, None].expand(h, w)
            ww = torch.arange(w, device=device)[None, :].expand(h, w)
            hw = torch.stack([hh, ww], -1).view(h // m, m, w // m, m, 2).transpose(1, 2).reshape(-1, 2)
            pos.append(hw.repeat(t, 1))
        pos = torch.cat(pos).float()  # (N, 2)
        f = inv_freq(self.cfg.vit_hidden // self.cfg.vit_heads // 2, 10000.0, device)
        ang = (pos[:, :, None] * f).flatten(1)  # (N, head_dim / 2)
        return torch.cat([ang, ang], -1)

    def forward(self, pixel_values, grid_thw):
        """pixel_values (N, 1176) patch rows, grid_thw (n_images, 3) in patches -> (N / 4, vit_out) LLM tokens."""
        x = self.patch_embed(pixel_values)
        ang = self.rotary(grid_thw, x.device)
        frames = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0]).tolist()
        full = segment_layout(frames, x.device)  # attention never crosses images (or frames)
        unit, order = self.cfg.vit_merge ** 2, None
        if self.cfg.vit_window:  # reorder merged tokens so each window is contiguous, attend within windows
            order, seqlens = window_index(grid_thw, self.cfg.vit_window // self.cfg.vit_merge // self.cfg.vit_patch,
                                          self.cfg.vit_merge)
            order = order.to(x.device)
            x = x.view(-1, unit, x.shape[-1])[order].flatten(0, 1)
            ang = ang.view(-1, unit, ang.shape[-1])[order].flatten(0, 1)
            windows = segment_layout([s * unit for s in seqlens], x.device)
        cos, sin = ang.cos(), ang.sin()
        for i, blk in enumerate(self.blocks):
            use_full = not self.cfg.vit_window or i in self.cfg.vit_fullatt_blocks
            x = blk(x, cos, sin, full if use_full else windows)
        x = self.merger(x)
        return x if order is None else x[torch.argsort(order)]


# ----------------------------------------------------------------------------------------------------------------------
# InternViT (InternVL2 / InternVL3 vision tower) + pixel shuffle + mlp1


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, self.side = cfg.vit_hidden, cfg.vit_image_size // cfg.vit_patch
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, C))
        self.patch_embedding = nn.Conv2d(3, C, cfg.vit_patch, cfg.vit_patch)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.side ** 2, C))

    def grid(self, pixel_values):  # patches per side of a tile
        return pixel_values.shape[-1] // self.patch_embedding.kernel_size[0]

    def forward(self, pixel_values):  # (N, 3, S, S) -> (N, 1 + (S/14)^2, C)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        N, C, h, w = x.shape
        pos = self.position_embedding
        grid = pos[:, 1:]
        if (h, w) != (self.side, self.side):  # other tile sizes: bicubic resize of the grid in fp32, as the reference
            grid = grid.float().reshape(1, self.side, self.side, C).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            grid = grid.reshape(1, C, h * w).transpose(1, 2).to(pos.dtype)
        x = torch.cat([self.class_embedding.expand(N, 1, C).to(x.dtype), x.flatten(2).transpose(1, 2)], 1)
        return x + torch.cat([pos[:, :1], grid], 1).to(x.dtype)


class InternAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.vit_heads
        self.qkv = nn.Linear(cfg.vit_hidden, 3 * cfg.vit_hidden, bias=cfg.vit_qkv_bias)
        self.proj = nn.Linear(cfg.vit_hidden, cfg.vit_hidden)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def drop_path(x, p, training):  # stochastic depth: drop a sample's residual branch with probability p
    if not training or p == 0.0:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class InternVisionEncoderLayer(Block):
    def __init__(self, cfg, drop):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.vit_hidden, eps=cfg.vit_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.vit_hidden, eps=cfg.vit_norm_eps)
        self.attn = InternAttention(cfg)
        self.mlp = VisionMlp(cfg)  # fc1 -> exact GELU -> fc2
        self.ls1, self.ls2 = nn.Parameter(torch.ones(cfg.vit_hidden)), nn.Parameter(torch.ones(cfg.vit_hidden))
        self.drop = drop

    def block(self, x):
        x = x + drop_path(self.attn(self.norm1(x)) * self.ls1, self.drop, self.training)
        return x + drop_path(self.mlp(self.norm2(x)) * self.ls2, self.drop, self.training)


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n = cfg.vit_depth  # per-layer rates rise linearly from 0 (plain floats: the model may be built on meta)
        rates = [cfg.vit_drop_path * i / max(n - 1, 1) for i in range(n)]
        self.layers = nn.ModuleList(InternVisionEncoderLayer(cfg, r) for r in rates)


class InternVisionModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)
        sel = cfg.select_layer  # hidden state index: 0 = embeddings, -1 = last layer; there is no final norm
        self.n_run = sel if sel >= 0 else cfg.vit_depth + 1 + sel

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:self.n_run]:
            x = layer(x)
        return x


def pixel_shuffle(x, version="v2"):
    """(N, h, w, C) -> (N, h/2, w/2, 4C): each output token concatenates its 2x2 patches in the order top-left,
    top-right, bottom-left, bottom-right (the official view/permute sequence, written as space-to-depth).
    v1 leaves the token grid transposed."""
    N, h, w, C = x.shape
    x = x.reshape(N, h // 2, 2, w // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(N, h // 2, w // 2, 4 * C)
    return x if version == "v2" else x.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# decoders: Qwen2 (Qwen2-VL, Qwen2.5-VL, InternVL3) and InternLM2 (InternVL2)


class KVCache:
    """Static per-layer key/value buffers (B, Hkv, max_len, D); `length` tokens are filled."""

    def __init__(self, num_layers, batch, num_kv_heads, max_len, head_dim, dtype, device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    def update(self, i, k, v):  # write the new positions of layer i, return all filled positions
        end = self.length + k.shape[2]
        self.k[i][:, :, self.length:end] = k
        self.v[i][:, :, self.length:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]


def attend(q, k, v, cos, sin, mask, causal, cache, layer):
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D), extend the cache, attend; returns (B, T, H * D)."""
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    if cache is not None:
        k, v = cache.update(layer, k, v)
    B, _, T, _ = q.shape
    return attention(q, k, v, mask, causal).transpose(1, 2).reshape(B, T, -1)


class Qwen2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=True)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)

    def forward(self, x, *rest):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.hkv, self.d).transpose(1, 2)
        return self.o_proj(attend(q, k, v, *rest))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(Block):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def block(self, x, *rest):
        x = x + self.self_attn(self.input_layernorm(x), *rest)
        return x + self.mlp(self.post_attention_layernorm(x))


def parse_skip_layers(spec, num_layers):
    """ShowUI's `lm_skip_layer` "[start,end,0|1],..." -> one 0/1 flag per layer: 1-indexed inclusive ranges, later
    ones override, ends past the last layer clipped ("[1,28,1]" = every layer, "[1,28,0]" = none)."""
    item = r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*([01])\s*\]"
    ok = isinstance(spec, str) and re.fullmatch(rf"\s*{item}(\s*,\s*{item})*\s*", spec)
    ranges = [tuple(map(int, r)) for r in re.findall(item, spec)] if ok else []
    if not ok or any(not 1 <= a <= b for a, b, _ in ranges):
        raise ValueError(f"lm_skip_layer {spec!r}: expected '[start,end,0|1],...' with 1 <= start <= end")
    on = [0] * num_layers
    for a, b, v in ranges:
        on[a - 1:b] = [v] * len(on[a - 1:b])
    return on


def ui_graph(pixel_values, image_grid_thw, merge, threshold):
    """ShowUI's UI connected graph. A node is a merged block (one image token: merge^2 consecutive rows of normalised
    values, both temporal copies); it joins its right / bottom neighbour if their L2 distance is < threshold.
    Returns each image token's component id, numbered by first appearance in raster order, image after image."""
    out, row = [], 0
    for t, h, w in image_grid_thw.tolist():
        v = pixel_values[row:row + t * h * w].float().view(t, h // merge, w // merge, -1)  # (t, bh, bw, values)
        row += t * h * w
        node = torch.arange(v.shape[:3].numel()).view(v.shape[:3])
        parent = list(range(node.numel()))

        def find(a):  # union-find; a root is its component's first node in raster order
            while parent[a] != a:
                parent[a] = a = parent[parent[a]]
            return a
        for d, step in ((2, 1), (1, w // merge)):  # right, bottom neighbours
            near = (torch.linalg.vector_norm(v.diff(dim=d), dim=-1) < threshold).cpu()
            for a in node.narrow(d, 0, node.shape[d] - 1)[near].tolist():
                a, b = find(a), find(a + step)
                parent[max(a, b)] = min(a, b)
        roots = torch.tensor([find(a) for a in range(len(parent))])
        out.append(torch.unique(roots, return_inverse=True)[1] + (out[-1].max() + 1 if out else 0))
    return torch.cat(out).to(pixel_values.device)


def select_mask(assign, ratio, rand=False, generator=None):
    """ShowUI's get_select_mask. assign (T,): -1 for text, else a UI-component id. Keeps the text and, of each
    component of n tokens, max(1, n - round(n * ratio)) (round half to even, as Python): evenly spaced
    (float32 linspace(0, n - 1) truncated, as upstream) or, with rand, a random subset. Returns (T,) bool."""
    keep = assign < 0
    pos = (~keep).nonzero().flatten()
    if rand:  # a random order inside each component: its first k tokens are a uniform random subset
        pos = pos[torch.randperm(len(pos), generator=generator).to(pos.device)]
    pos = pos[torch.sort(assign[pos], stable=True).indices]  # grouped by component
    n = torch.unique_consecutive(assign[pos], return_counts=True)[1]
    k = (n - torch.round(n.double() * ratio).long()).clamp(min=1)
    rank = torch.arange(len(pos), device=pos.device) - torch.repeat_interleave(n.cumsum(0) - n, n)
    hit = rank < k.repeat_interleave(n)
    if not rand:
        size = n.repeat_interleave(n)
        for m, km in set(zip(n.tolist(), k.tolist())):
            hit[size == m] = torch.isin(rank[size == m], torch.linspace(0, m - 1, km).long().to(pos.device))
    return keep.index_fill(0, pos[hit], True)


def keep_layout(keep, mask, causal):
    """Each sample's kept positions (keep (B, T) bool) packed left into (B, L): index, validity, and the attention
    mask over kept queries and keys (original order, so still causal); a padded slot sees only itself."""
    n = keep.sum(1)
    idx = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :int(n.max())]  # kept first, in order
    valid = torch.arange(idx.shape[1], device=keep.device) < n[:, None]
    if mask is None and causal and bool(valid.all()):
        return idx, valid, None, True
    (B, T), L = keep.shape, idx.shape[1]  # no cache here, so mask None means plain causal
    full = (mask[:, 0] if mask is not None else torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()[None])
    sub = full.expand(B, T, T)[torch.arange(B, device=keep.device)[:, None, None], idx[:, :, None], idx[:, None, :]]
    return idx, valid, ((sub & valid[:, None]) | torch.eye(L, dtype=torch.bool, device=keep.device))[:, None], False


class Qwen2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, causal, cache=None, keep=None):
        """keep: None, or per layer None (all tokens) or a (B, T) bool mask: that layer runs on the kept tokens only
        (original positions), the others pass through it unchanged (ShowUI's UI-guided selection; no cache)."""
        for i, layer in enumerate(self.layers):
            if keep is None or keep[i] is None:
                x = layer(x, cos, sin, mask, causal, cache, i)
                continue
            idx, valid, m, c = keep_layout(keep[i], mask, causal)
            b = torch.arange(len(x), device=x.device)[:, None].expand_as(idx)
            cs, sn = (r[:, 0].expand(len(x), -1, -1)[b, idx][:, None] for r in (cos, sin))
            x = x.index_put((b[valid], idx[valid]), layer(x[b, idx], cs, sn, m, c, None, i)[valid])
        return self.norm(x)


class InternLM2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=cfg.attention_bias)
        self.wo = nn.Linear(self.h * self.d, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, *rest):
        B, T, _ = x.shape
        g = self.h // self.hkv
        qkv = self.wqkv(x).view(B, T, self.hkv, g + 2, self.d)  # rows blocked per kv group: [q_0 .. q_g-1, k, v]
        q = qkv[..., :g, :].reshape(B, T, self.h, self.d).transpose(1, 2)  # query head kv * g + j reads kv head kv
        k, v = qkv[..., g, :].transpose(1, 2), qkv[..., g + 1, :].transpose(1, 2)
        return self.wo(attend(q, k, v, *rest))


class InternLM2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(Block):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = InternLM2Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = InternLM2MLP(cfg)

    def block(self, x, *rest):
        x = x + self.attention(self.attention_norm(x), *rest)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2Model(Qwen2Model):  # same loop; its own names
    def __init__(self, cfg):
        nn.Module.__init__(self)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def decoder_mask(key_valid, T, S, window=0, device=None, doc=None):
    """One mask per forward for causal attention of T new queries over S keys (S - T cached), optionally limited
    to the last `window` keys. key_valid (B, S) bool or None (no padding). doc (B, S) document ids of packed rows
    or None: a token attends within its own document only. Returns (mask or None, causal flag)."""
    window = window if window and S > window else 0
    if key_valid is None and not window and T == S and doc is None:
        return None, True  # the fused kernels' own causal path
    if key_valid is None and not window and T == 1:
        return None, False  # one new token sees every cached key
    qpos = torch.arange(S - T, S, device=device)
    kpos = torch.arange(S, device=device)
    mask = (kpos[None, :] <= qpos[:, None])[None, None]  # (1, 1, T, S)
    if window:
        mask = mask & (qpos[:, None] - kpos[None, :] < window)
    if doc is not None:
        mask = mask & (doc[:, None, -T:, None] == doc[:, None, None, :])
    if key_valid is not None:  # a padded query still sees itself, so no softmax row is empty
        mask = (mask & key_valid[:, None, None, :]) | (kpos[None, :] == qpos[:, None])
    return mask, False


def rope(position_ids, cfg, dtype, seq_len):
    """cos, sin (B, 1, T, head_dim). Position ids (B, T) give 1-D RoPE; (3, B, T) give M-RoPE, whose frequency
    slots [0, s0) follow t, [s0, s0+s1) h and the rest w. Angles in fp32, cast to the activation dtype as the
    reference does. Dynamic NTK (InternLM2) raises the base once the sequence (`seq_len` keys, padding included)
    outgrows max_position_embeddings; below that it is plain RoPE."""
    theta, D = cfg.rope_theta, cfg.head_dim
    if cfg.rope_dynamic and seq_len > cfg.max_position_embeddings:
        f = cfg.rope_dynamic
        theta = theta * ((f * seq_len / cfg.max_position_embeddings) - (f - 1)) ** (D / (D - 2))
    ang = position_ids.float()[..., None] * inv_freq(D, theta, position_ids.device)
    if position_ids.dim() == 3:  # (3, B, T, D/2) -> (B, T, D/2)
        sec = torch.tensor(cfg.mrope_section, device=ang.device)
        axis = torch.repeat_interleave(torch.arange(3, device=ang.device), sec)
        ang = ang.gather(0, axis.expand(1, *ang.shape[1:-1], -1))[0]
    ang = torch.cat([ang, ang], -1)[:, None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# the vision-language models: one walk for every family (splice image features, positions, decoder, head)


class VLM(nn.Module):
    """Shared forward and greedy generation. A family supplies `embed` (token embeddings with image features
    spliced in), `positions` (prefill position ids + each sample's next position), `decoder` and `head`."""

    def tokens(self, input_ids):
        return self.decoder.get_submodule("tok_embeddings" if self.cfg.llm_arch == "internlm2" else "embed_tokens")(
            input_ids)

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None, labels=None, doc=None, **vision):
        if cache is not None and cache.length:  # a decode step: a generated image token is an ordinary token
            x = self.tokens(input_ids)
        else:
            x = self.embed(input_ids, attention_mask, labels, **vision)
        if position_ids is None:
            position_ids, _ = self.positions(input_ids, attention_mask, **vision)
        T = input_ids.shape[1]
        S = T + (cache.length if cache is not None else 0)
        cos, sin = rope(position_ids, self.cfg, x.dtype, S)
        key_valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        mask, causal = decoder_mask(key_valid, T, S, self.cfg.sliding_window, x.device, doc)
        keep = self.token_keep(input_ids, cache, **vision) if hasattr(self, "token_keep") else None  # Qwen2-VL
        if doc is not None and keep is None and key_valid is None and not self.cfg.sliding_window:
            block = doc_block_mask(doc)  # CUDA: FlexAttention skips the blocks across documents
            mask = mask if block is None else block
        h = self.decoder(x, cos, sin, mask, causal, cache, keep)
        if cache is not None:
            cache.length = S
        return h

    def forward(self, input_ids, attention_mask=None, labels=None, return_loss=False, position_ids=None, doc=None,
                **vision):
        """Logits (B, T, vocab) in fp32; `labels` steer MP-GUI's prompt_only gate mask. return_loss: instead the sum
        of next-token cross-entropy over the supervised labels, without materialising the logits (chunked_ce)."""
        h = self.hidden(input_ids, attention_mask, position_ids, labels=labels, doc=doc, **vision)
        if return_loss:  # inside forward, so FSDP2 has the head's weight unsharded
            return chunked_ce(h[:, :-1].flatten(0, 1), self.head.weight, labels[:, 1:].flatten())
        return self.head(h).float()

    def pack(self, input_ids, attention_mask, labels, **vision):
        """A padded micro-batch as one packed row: forward's kwargs with each sample's own positions (as unpacked),
        document ids for the block-diagonal causal mask, and no label at a document's first token."""
        if self.cfg.arch == "mpgui" and self.cfg.mpgui_mode == "fusion":
            raise ValueError("pack: MP-GUI's fusion gate reads the whole row's prompt; pack only its perceiver stages")
        pos, _ = self.positions(input_ids, attention_mask, **vision)
        valid = attention_mask.bool()
        if bool((input_ids[~valid] == self.cfg.image_token_id).any()):  # train.vision_inputs' blank FSDP image
            raise ValueError("pack: image tokens in padding (a text-only Qwen micro-batch under FSDP) cannot be packed")
        n = valid.sum(1)
        first = torch.arange(labels.shape[1], device=labels.device) == valid.int().argmax(1, keepdim=True)
        return dict(input_ids=input_ids[valid][None], labels=labels.masked_fill(first, -100)[valid][None],
                    position_ids=pos[..., valid][..., None, :],
                    doc=torch.repeat_interleave(torch.arange(len(n), device=n.device), n)[None], **vision)

    def splice(self, x, input_ids, feats, token=None):
        """Writes image features (n, C) over the image-context tokens of x (B, T, C), in order; counts must agree."""
        token = self.cfg.image_token_id if token is None else token
        sel = input_ids == token
        n_tok = int(sel.sum())
        n_feat = 0 if feats is None else feats.shape[0]
        if n_tok != n_feat:
            raise ValueError(f"image tokens ({token}) and image features differ: {n_tok} tokens, {n_feat} features")
        return x if feats is None else x.masked_scatter(sel[..., None], feats.to(x.dtype))

    @torch.no_grad()
    def resize_vocab(self, n):
        """Grows the embedding and the head to n rows for added tokens. New rows are the mean of the old ones: the
        official init of new output rows (new input rows never matter for MP-GUI's EXTRA token, whose positions
        are always overwritten)."""
        emb = self.decoder.get_submodule("tok_embeddings" if self.cfg.llm_arch == "internlm2" else "embed_tokens")
        for mod in {id(m): m for m in (emb, self.head)}.values():
            w = mod.weight
            mod.weight = nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(n - w.shape[0], -1)]),
                                      requires_grad=w.requires_grad)
        emb.num_embeddings = self.head.out_features = self.cfg.vocab_size = n
        if self.cfg.tie_word_embeddings:
            self.head.weight = emb.weight

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, eos_token_ids=None, **vision):
        """Greedy decoding with a static KV cache. Works with left or right padding. Returns (B, n) new tokens; a
        finished sample continues with pad_token_id."""
        B, T = input_ids.shape
        eos = torch.tensor(eos_token_ids or self.cfg.eos_token_ids, device=input_ids.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        p = next(self.parameters())
        cache = KVCache(self.cfg.num_layers, B, self.cfg.num_kv_heads, T + max_new_tokens, self.cfg.head_dim,
                        p.dtype, p.device)
        pos, nxt = self.positions(input_ids, mask, **vision)
        h = self.hidden(input_ids, mask, pos, cache, **vision)
        last = T - 1 - mask.flip(-1).argmax(-1)  # the last real token of each sample
        tok = self.head(h[torch.arange(B), last]).argmax(-1)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            tok = torch.where(done, self.cfg.pad_token_id, tok)
            out.append(tok)
            done = done | torch.isin(tok, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], 1)
            step_pos = (nxt + step).view(B, 1) if pos.dim() == 2 else (nxt + step).view(1, B, 1).expand(3, B, 1)
            tok = self.head(self.hidden(tok[:, None], mask, step_pos, cache)[:, -1]).argmax(-1)
        return torch.stack(out, 1)


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class InternVL(VLM):
    """InternVLChatModel: vision_model.*, mlp1.*, language_model.* (InternLM2 or Qwen2). Image features of all
    tiles, in order, replace the <IMG_CONTEXT> tokens; positions are 1-D over each sample's unpadded tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vision_model = InternVisionModel(cfg)
        d = cfg.vit_hidden * int(1 / cfg.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(d, eps=1e-5), nn.Linear(d, cfg.hidden_size), nn.GELU(),
                                  nn.Linear(cfg.hidden_size, cfg.hidden_size))
        self.language_model = (InternLM2ForCausalLM if cfg.llm_arch == "internlm2" else Qwen2ForCausalLM)(cfg)

    decoder = property(lambda self: self.language_model.model)
    head = property(lambda self: getattr(self.language_model, "output", None) or self.language_model.lm_head)

    def visual_clues(self, pixel_values):
        """Pixel-shuffled ViT features before mlp1, (tiles, num_image_token, 4 * vit_hidden)."""
        x = self.vision_model(pixel_values)[:, 1:]  # drop CLS
        n, hw, C = x.shape
        side = self.vision_model.embeddings.grid(pixel_values)
        return pixel_shuffle(x.reshape(n, side, side, C), self.cfg.ps_version).reshape(n, side * side // 4, 4 * C)

    def image_features(self, pixel_values):
        return self.mlp1(self.visual_clues(pixel_values))  # (tiles, num_image_token, hidden)

    def embed(self, input_ids, attention_mask=None, labels=None, pixel_values=None):
        if pixel_values is not None and self.cfg.image_token_id is None:
            raise ValueError("image_token_id (<IMG_CONTEXT>) is unknown: no tokenizer files in the checkpoint folder; "
                             "pass image_token_id to load_model")
        feats = None if pixel_values is None else self.image_features(pixel_values).flatten(0, 1)
        return self.splice(self.tokens(input_ids), input_ids, feats)

    def positions(self, input_ids, attention_mask=None, **vision):
        if attention_mask is None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        else:  # padding-aware: left and right padding give each sample the same positions
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos, pos.amax(-1) + 1


class MPGUI(InternVL):
    """MP-GUI: InternVL + textual / graphical / spatial perceivers + fusion gate. Each image is <img>,
    <IMG_CONTEXT> x (n * tiles), <EXTRA_IMG_CONTEXT> x (n * tiles), </img>: the context tokens take the mlp1
    features, the EXTRA tokens take cfg.mpgui_mode's source, tile by tile: one perceiver (stages 1-3) or the fusion
    gate (stages 4-5 and inference)."""

    PARTS = ("textual_perceiver", "graphical_perceiver", "spatial_perceiver", "fusion_gate")

    def __init__(self, cfg):
        super().__init__(cfg)
        d_in = 4 * cfg.vit_hidden
        self.textual_perceiver = perceiver(d_in, cfg.hidden_size)
        self.graphical_perceiver = perceiver(d_in, cfg.hidden_size)
        self.spatial_perceiver = perceiver(d_in, cfg.hidden_size)
        self.fusion_gate = FusionGate(cfg.hidden_size)

    def init_part(self, name):  # a part's first stage: perceivers as the official code, the gate explicitly
        init_perceiver(getattr(self, name)) if name != "fusion_gate" else self.fusion_gate.reset_parameters()

    def gate_keys(self, input_ids, attention_mask=None, labels=None):
        """(B, L) True where the fusion gate's align layer may read a token. official: every token but EXTRA and
        id 0 (the released collator's padding). prompt_only: also not the supervised answers nor anything from the
        last <|im_start|> on (the final assistant turn), so training sees what inference sees."""
        keys = input_ids != self.cfg.extra_token_id
        if attention_mask is not None:
            keys &= attention_mask.bool()
        if self.cfg.gate_mask == "official":
            return keys & (input_ids != 0)
        if self.cfg.gate_mask != "prompt_only":
            raise ValueError(f"gate_mask must be official or prompt_only, not {self.cfg.gate_mask!r}")
        if labels is not None:
            keys &= labels == -100
        if self.cfg.im_start_token_id is None:
            raise ValueError("prompt_only needs <|im_start|>'s id (cfg.im_start_token_id): no tokenizer files found")
        starts = input_ids == self.cfg.im_start_token_id
        L = input_ids.shape[1]
        last = torch.where(starts.any(1), L - 1 - starts.flip(1).int().argmax(1), L)  # (B,)
        return keys & (torch.arange(L, device=input_ids.device)[None] < last[:, None])

    def embed(self, input_ids, attention_mask=None, labels=None, pixel_values=None):
        if pixel_values is None:
            return self.splice(self.splice(self.tokens(input_ids), input_ids, None), input_ids, None,
                               self.cfg.extra_token_id)
        ctx = (input_ids == self.cfg.image_token_id).sum(1)
        ext = (input_ids == self.cfg.extra_token_id).sum(1)  # per sample: whole tiles, one EXTRA per context token
        if bool((ctx % self.cfg.num_image_token).any()) or not torch.equal(ctx, ext) or \
                int(ctx.sum()) != len(pixel_values) * self.cfg.num_image_token:
            raise ValueError(f"per sample {ctx.tolist()} context and {ext.tolist()} EXTRA tokens do not make whole "
                             f"tiles of {self.cfg.num_image_token} for the {len(pixel_values)} tiles given")
        clues = self.visual_clues(pixel_values)  # (T, n, 4 * vit_hidden), T tiles of the whole batch
        vit = self.mlp1(clues)  # (T, n, C)
        x = self.splice(self.tokens(input_ids), input_ids, vit.flatten(0, 1))
        mode = self.cfg.mpgui_mode
        if mode != "fusion":
            extra = getattr(self, f"{mode}_perceiver")(clues)
        else:  # each tile's gate reads its own sample's prompt, after the context splice
            tiles = (input_ids == self.cfg.image_token_id).sum(1) // self.cfg.num_image_token  # (B,)
            sample = torch.repeat_interleave(torch.arange(len(tiles), device=x.device), tiles)  # (T,)
            keys = self.gate_keys(input_ids, attention_mask, labels)
            parts = (self.graphical_perceiver(clues), self.textual_perceiver(clues), self.spatial_perceiver(clues))
            extra = self.fusion_gate(vit, *parts, x[sample], keys[sample], attention)
        return self.splice(x, input_ids, extra.flatten(0, 1), self.cfg.extra_token_id)


class Qwen2VL(VLM):
    """Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration: visual.*, model.*, lm_head. Image
    features replace the <|image_pad|> tokens; positions are M-RoPE (t, h, w)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        parse_skip_layers(cfg.lm_skip_layer, cfg.num_layers)  # a bad lm_skip_layer fails here, not mid-run

    decoder = property(lambda self: self.model)
    head = property(lambda self: self.lm_head)

    def image_features(self, pixel_values, image_grid_thw):
        return self.visual(pixel_values, image_grid_thw)  # (n_image_tokens, hidden)

    def token_keep(self, input_ids, cache=None, pixel_values=None, image_grid_thw=None):
        """ShowUI's UI-guided token selection: per decoder layer None (all tokens) or the (B, T) tokens it runs on
        (text, and of each UI component of n image tokens max(1, n - round(n * lm_skip_ratio))); None when off."""
        c, on = self.cfg, parse_skip_layers(self.cfg.lm_skip_layer, self.cfg.num_layers)
        graph = c.uigraph_train if self.training else c.uigraph_test
        if pixel_values is None or not (c.lm_skip_ratio > 0 and any(on) and graph):
            return None
        if cache is not None:
            raise ValueError("UI-guided token selection (lm_skip_ratio > 0 on some lm_skip_layer) runs without a KV "
                             "cache only; for generation set uigraph_test=False or lm_skip_ratio=0")
        ids = ui_graph(pixel_values, image_grid_thw, c.vit_merge, c.uigraph_threshold).to(input_ids.device)
        assign = torch.full_like(input_ids, -1).masked_scatter(input_ids == c.image_token_id, ids).flatten()
        rand = self.training and c.lm_skip_rand  # one draw per forward for all layers, as ShowUI's uimask_pre
        keep = select_mask(assign, c.lm_skip_ratio, rand).view_as(input_ids)
        return [keep if f else None for f in on]

    def embed(self, input_ids, attention_mask=None, labels=None, pixel_values=None, image_grid_thw=None):
        feats = None if pixel_values is None else self.image_features(pixel_values, image_grid_thw)
        return self.splice(self.model.embed_tokens(input_ids), input_ids, feats)

    def positions(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        return self.rope_index(input_ids, image_grid_thw, attention_mask)

    def rope_index(self, input_ids, image_grid_thw=None, attention_mask=None):
        """M-RoPE position ids (3, B, T) for (t, h, w), computed on the unpadded tokens of each sample: text runs
        count up on all three axes; an image's tokens share t = p and take h = p + row, w = p + col over its merged
        grid, after which p advances by max(rows, cols). Padded positions are 0. Also returns the next position
        (B,) for cached decoding."""
        B, T = input_ids.shape
        m, img = self.cfg.vit_merge, self.cfg.image_token_id
        pos = torch.zeros(3, B, T, dtype=torch.long)
        nxt = torch.zeros(B, dtype=torch.long)
        grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
        ids_all, valid_all = input_ids.cpu(), (attention_mask.cpu().bool() if attention_mask is not None else None)
        for b in range(B):
            keep = valid_all[b] if valid_all is not None else torch.ones(T, dtype=torch.bool)
            ids = ids_all[b, keep]
            out, p, i, n = torch.empty(3, len(ids), dtype=torch.long), 0, 0, len(ids)
            starts = (ids == img).nonzero().flatten().tolist()
            for s in starts:
                if s < i:  # inside an image already placed
                    continue
                out[:, i:s] = torch.arange(p, p + s - i)
                p += s - i
                t, h, w = next(grids, (0, 0, 0))
                if t != 1:
                    raise ValueError(f"sample {b}: image tokens without a matching image_grid_thw row (t={t})")
                hh, ww = h // m, w // m
                i = s + hh * ww
                if i > n or not bool((ids[s:i] == img).all()):
                    raise ValueError(f"sample {b}: an image of {hh * ww} tokens does not fit the image-pad run at {s}")
                out[0, s:i] = p
                out[1, s:i] = p + torch.arange(hh).repeat_interleave(ww)
                out[2, s:i] = p + torch.arange(ww).repeat(hh)
                p += max(hh, ww)
            out[:, i:] = torch.arange(p, p + n - i)
            pos[:, b, keep] = out
            nxt[b] = out.max() + 1 if n else 0
        return pos.to(input_ids.device), nxt.to(input_ids.device)


# ----------------------------------------------------------------------------------------------------------------------
# loading: official folders (sharded or not), both key layouts, every key checked


def resolve(path):
    """A local folder, or a hub id fetched (config, weights, tokenizer files) through huggingface_hub."""
    if os.path.isdir(path):
        return path
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:  # a path, not an owner/name hub id
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    from huggingface_hub import snapshot_download
    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"])


def safetensors_files(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(folder, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
    return [single]


def qwen_key(k):  # newer transformers nest the modules: model.visual.* / model.language_model.* / lm_head
    if k.startswith("model.visual."):
        return k[len("model."):]
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    return k


def load_weights(model, folder, rename=lambda k: k, dtype=None, device="cpu", optional=()):
    """Fills every parameter of `model` from the folder's safetensors. Missing, unexpected or mis-shaped keys stop
    the load with their names. A tied head takes the embedding; a stored head that differs from it is an error.
    Submodules named in `optional` may be absent as a whole: they are allocated (for the caller to initialise)
    and their names returned."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model.cfg, "tie_word_embeddings", False)
    head = "lm_head.weight"
    seen, unexpected, wrong = set(), [], []
    state = {}
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                name = rename(key)
                if name not in params:
                    unexpected.append(key)
                    continue
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(params[name].shape):
                    wrong.append(f"{key}: file {tuple(t.shape)}, model {tuple(params[name].shape)}")
                    continue
                seen.add(name)
                state[name] = t
    expected = set(params) - ({head} if tied else set())
    absent = [p for p in optional if not any(n.startswith(p + ".") for n in seen)]
    expected -= {n for n in expected if any(n.startswith(p + ".") for p in absent)}
    missing = sorted(expected - seen)
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            problems.append(f"{what} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
    if problems:
        raise ValueError(f"{folder}: checkpoint does not match the model: " + "; ".join(problems))
    if tied and head in state:
        emb = [n for n in state if n.endswith("embed_tokens.weight")][0]
        if not torch.equal(state.pop(head), state[emb]):
            raise ValueError(f"{folder}: tie_word_embeddings is true but {head} differs from {emb}; a merged head "
                             "would be silently replaced by the embedding. Set tie_word_embeddings false.")
    for name, t in state.items():
        p = params[name]
        state[name] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for name in absent:
        model.get_submodule(name).to_empty(device=device).to(dtype or next(iter(state.values())).dtype)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight  # meta-built ties are lost by assign=True
    return absent


def load_model(path, dtype=None, device="cpu", special_ids=None, mpgui=False):
    """Builds the model a checkpoint folder (or hub id) describes and loads its weights; dtype None keeps the
    file's dtype. InternVL / MP-GUI read their special-token ids from the tokenizer files unless `special_ids`
    ({"image_token_id": .., "extra_token_id": .., "im_start_token_id": ..}) gives them. mpgui=True builds MP-GUI
    on an InternVL checkpoint: the perceivers and gate it lacks start from their first-stage init."""
    folder = resolve(path)
    with open(os.path.join(folder, "config.json")) as f:
        d = json.load(f)
    gen = os.path.join(folder, "generation_config.json")
    gen = json.load(open(gen)) if os.path.exists(gen) else None
    cfg = config_from_hf(d, os.path.join(folder, "config.json"), gen)
    if cfg.arch in ("internvl", "mpgui"):  # special ids live in the tokenizer files, not in config.json
        ids = dict(image_token_id="<IMG_CONTEXT>", extra_token_id="<EXTRA_IMG_CONTEXT>",
                   im_start_token_id="<|im_start|>")
        for field_, token in ids.items():
            given = (special_ids or {}).get(field_)
            setattr(cfg, field_, given if given is not None else special_token_id(folder, token))
        end = special_token_id(folder, "<|im_end|>")
        cfg.eos_token_ids = [end] if end is not None else cfg.eos_token_ids
        cfg.arch = "mpgui" if mpgui else cfg.arch
    with torch.device("meta"):
        model = {"internvl": InternVL, "mpgui": MPGUI}.get(cfg.arch, Qwen2VL)(cfg)
    new_parts = load_weights(model, folder, lambda k: k if cfg.arch in ("internvl", "mpgui") else qwen_key(k), dtype,
                             device, optional=MPGUI.PARTS if cfg.arch == "mpgui" else ())
    for name in new_parts:  # e.g. stage 1 starts MP-GUI from InternVL2-8B, which has none of its parts
        model.init_part(name)
    model.initialised = list(new_parts)  # not from the file: a run must save them with its trained weights
    model.folder = folder
    return model.eval()
