"""Vision-language backbones in plain PyTorch: tensors only (load.py reads the checkpoint folders).

Qwen2-VL / Qwen2.5-VL: a ViT over 14x14 patches (2-D RoPE, per-image or windowed attention), a 2x2 patch merger,
and a Qwen2 decoder with multimodal RoPE (M-RoPE).
InternVL2 / InternVL3: InternViT over 448-px tiles, pixel shuffle (2x2 space-to-depth), the `mlp1` projector, and
an InternLM2 (InternVL2) or Qwen2 (InternVL3) decoder with 1-D RoPE.
MP-GUI: InternVL2 + the perceivers and fusion gate of perceivers.py. ShowUI: Qwen2-VL + the token selection of
token_select.py. Module and parameter names equal the checkpoint keys, so `model.state_dict()` is the file's key set
(the tied head aside). Sources: transformers models/qwen2_vl/modeling_qwen2_vl.py and
models/qwen2_5_vl/modeling_qwen2_5_vl.py; OpenGVLab/InternVL internvl_chat/internvl/model/ (internvl_chat/
modeling_internvl_chat.py, internvl_chat/modeling_intern_vit.py, internlm2/modeling_internlm2.py).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from perceivers import FusionGate, init_perceiver, perceiver
from token_select import keep_layout, parse_skip_layers, select_mask, ui_graph

# ----------------------------------------------------------------------------------------------------------------------
# config: one flat dataclass, filled from the official config.json by load.config_from_hf


@dataclass
class ModelConfig:
    arch: str  # qwen2_vl | qwen2_5_vl | internvl | mpgui
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
    vit_hidden_size: int  # ViT width
    vit_out_hidden_size: int  # merger output = LLM width
    vit_num_layers: int
    vit_num_heads: int
    vit_intermediate_size: int
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
    mpgui_mode: str = "fusion"  # which source fills EXTRA: textual | graphical | spatial (stages 1-3) | fusion | mean
    gate_mask: str = "prompt_only"  # fusion-gate keys: official (answer leaks in, as released) | prompt_only
    # ShowUI's UI-guided token selection (Qwen2-VL decoder; token_select.py), off by default
    lm_skip_layer: str = "[1,28,0]"  # "[start,end,0|1],...": 1-indexed inclusive layer ranges, later ones win
    lm_skip_ratio: float = 0.0  # share of each UI component's image tokens a selecting layer skips
    lm_skip_rand: bool = False  # training: a random subset of each component instead of evenly spaced tokens
    uigraph_threshold: float = 1.0  # neighbouring 28x28 blocks join a component if L2(normalised pixels) < this
    uigraph_train: bool = True  # build the UI graph (so select) in train mode
    uigraph_test: bool = False  # ... and in eval mode (ShowUI: off, so every block is its own component)

    @property
    def is_internvl(self):  # InternVL2 / InternVL3, MP-GUI included
        return self.arch in ("internvl", "mpgui")

    @property
    def is_mpgui(self):
        return self.arch == "mpgui"


# ----------------------------------------------------------------------------------------------------------------------
# attention: the one function every model calls

ATTN_IMPL = "sdpa"  # "sdpa" (fused kernels) or "math" (plain softmax; tests check the fused path against it)
_FLEX = None  # compiled FlexAttention, built on first use (packed rows on CUDA, or on CPU with FLEX_CPU)
# packed rows through FlexAttention on CPU too: off, since torch's CPU FlexAttention has no backward (training) and
# compiles for ~20 s before its first forward; the boolean mask serves there
FLEX_CPU = False


def attention(q, k, v, mask=None, causal=False):
    """q (B, H, T, D); k, v (B, Hkv, S, D) with H % Hkv == 0 -> (B, H, T, D)."""
    # mask: bool, broadcastable to (B, H, T, S), True where a query may attend; never combined with `causal`
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
    """FlexAttention BlockMask for packed rows: causal within each document of doc (B, T) ids."""
    # None off CUDA unless FLEX_CPU (then decoder_mask's boolean mask serves); torch >= 2.6 has FlexAttention
    from torch.nn.attention.flex_attention import create_block_mask
    if not doc.is_cuda and not FLEX_CPU:
        return None
    B, T = doc.shape
    return create_block_mask(lambda b, h, q, k: (doc[b, q] == doc[b, k]) & (q >= k), B, None, T, T, doc.device)


def segment_layout(seqlens, device):
    """Packs variable-length segments (images, windows) of a flat sequence into a padded batch for one attention."""
    # returns gather index (n, L), validity (n, L) and a key mask or None
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

    def forward(self, x):  # normalise in fp32, multiply the weight in the input dtype (as Qwen2RMSNorm does)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inv_freq(dim, theta, device=None):  # always fp32: a bf16 inv_freq drifts the logits away from the reference's
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


class Block(nn.Module):
    """A transformer block whose `block` may be recomputed in backward (activation checkpointing)."""
    # the checkpoint sits inside forward, so hooks on the module (FSDP2's all-gathers) stay outside the recomputation
    checkpointing = False

    def forward(self, x, *rest):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, x, *rest, use_reentrant=False)
        return self.block(x, *rest)


ACT = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu, "silu": F.silu}


class VisionMlp(nn.Module):
    """fc1 -> activation -> fc2: Qwen2-VL's ViT MLP (quick_gelu) and InternViT's (exact GELU) alike."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden_size, cfg.vit_intermediate_size)
        self.fc2 = nn.Linear(cfg.vit_intermediate_size, cfg.vit_hidden_size)
        self.act = ACT[cfg.vit_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL vision tower, as transformers writes them:
#   models/qwen2_vl/modeling_qwen2_vl.py: Qwen2VisionTransformerPretrainedModel
#   models/qwen2_5_vl/modeling_qwen2_5_vl.py: Qwen2_5_VisionTransformerPretrainedModel (windows, gated MLP, RMSNorm)

VIT_NORM_EPS = 1e-6  # both Qwen ViTs hard-code it (LayerNorm / Qwen2RMSNorm); config.json has no key for it
VIT_ROPE_THETA = 10000.0  # VisionRotaryEmbedding's default theta, never set from config.json


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        p, tp = cfg.vit_patch, cfg.vit_temporal_patch
        self.proj = nn.Conv3d(3, cfg.vit_hidden_size, kernel_size=(tp, p, p), stride=(tp, p, p), bias=False)

    def forward(self, x):  # (N, 3*T*14*14) -> (N, C); the stride-equals-kernel conv is one matmul per patch
        return F.linear(x.to(self.proj.weight.dtype), self.proj.weight.flatten(1))


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.vit_num_heads
        self.qkv = nn.Linear(cfg.vit_hidden_size, 3 * cfg.vit_hidden_size, bias=True)
        self.proj = nn.Linear(cfg.vit_hidden_size, cfg.vit_hidden_size, bias=True)

    def forward(self, x, cos, sin, layout):
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # each (N, H, D)
        cos, sin = cos[:, None], sin[:, None]  # rotation in fp32, as transformers' apply_rotary_pos_emb_vision
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        return self.proj(segment_attention(q, k, v, layout).reshape(N, C))


class VisionGatedMlp(nn.Module):  # Qwen2.5-VL: SiLU-gated, with biases
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.vit_hidden_size, cfg.vit_intermediate_size)
        self.up_proj = nn.Linear(cfg.vit_hidden_size, cfg.vit_intermediate_size)
        self.down_proj = nn.Linear(cfg.vit_intermediate_size, cfg.vit_hidden_size)
        self.act = ACT[cfg.vit_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _vit_norm(cfg, dim):  # Qwen2-VL: LayerNorm; Qwen2.5-VL: RMSNorm
    return nn.LayerNorm(dim, eps=VIT_NORM_EPS) if cfg.arch == "qwen2_vl" else RMSNorm(dim, VIT_NORM_EPS)


class VisionBlock(Block):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = _vit_norm(cfg, cfg.vit_hidden_size), _vit_norm(cfg, cfg.vit_hidden_size)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg) if cfg.arch == "qwen2_vl" else VisionGatedMlp(cfg)

    def block(self, x, cos, sin, layout):
        x = x + self.attn(self.norm1(x), cos, sin, layout)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):  # 2x2 neighbouring patches (4 consecutive rows) -> one LLM token
    def __init__(self, cfg):
        super().__init__()
        d = cfg.vit_hidden_size * cfg.vit_merge ** 2
        self.ln_q = _vit_norm(cfg, cfg.vit_hidden_size)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.vit_out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


def window_index(grid_thw, win, merge):
    """Qwen2.5-VL windows: each image's merged-token grid cut into win x win windows in raster order."""
    # returns the permutation of merged tokens that makes every window contiguous, and the window lengths
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
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vit_num_layers))
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
        f = inv_freq(self.cfg.vit_hidden_size // self.cfg.vit_num_heads // 2, VIT_ROPE_THETA, device)
        ang = (pos[:, :, None] * f).flatten(1)  # (N, head_dim / 2)
        return torch.cat([ang, ang], -1)

    def forward(self, pixel_values, grid_thw):
        """pixel_values (N, 1176) patch rows, grid_thw (n_images, 3) in patches -> LLM tokens (N / 4, C_out)."""
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
# InternViT (InternVL2 / InternVL3 vision tower) + pixel shuffle + mlp1, as OpenGVLab/InternVL writes them in
# internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py (InternVisionModel) and
# internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py (InternVLChatModel: pixel_shuffle, mlp1)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, self.side = cfg.vit_hidden_size, cfg.vit_image_size // cfg.vit_patch
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
        if (h, w) != (self.side, self.side):  # other tile sizes: bicubic resize of the grid in fp32 (_get_pos_embed)
            grid = grid.float().reshape(1, self.side, self.side, C).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            grid = grid.reshape(1, C, h * w).transpose(1, 2).to(pos.dtype)
        x = torch.cat([self.class_embedding.expand(N, 1, C).to(x.dtype), x.flatten(2).transpose(1, 2)], 1)
        return x + torch.cat([pos[:, :1], grid], 1).to(x.dtype)


class InternAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.vit_num_heads
        self.qkv = nn.Linear(cfg.vit_hidden_size, 3 * cfg.vit_hidden_size, bias=cfg.vit_qkv_bias)
        self.proj = nn.Linear(cfg.vit_hidden_size, cfg.vit_hidden_size)

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
        self.norm1 = nn.LayerNorm(cfg.vit_hidden_size, eps=cfg.vit_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.vit_hidden_size, eps=cfg.vit_norm_eps)
        self.attn = InternAttention(cfg)
        self.mlp = VisionMlp(cfg)  # fc1 -> exact GELU -> fc2
        self.ls1 = nn.Parameter(torch.ones(cfg.vit_hidden_size))
        self.ls2 = nn.Parameter(torch.ones(cfg.vit_hidden_size))
        self.drop = drop  # stochastic-depth rate of this layer (InternVisionModel.set_drop_path)

    def block(self, x):
        x = x + drop_path(self.attn(self.norm1(x)) * self.ls1, self.drop, self.training)
        return x + drop_path(self.mlp(self.norm2(x)) * self.ls2, self.drop, self.training)


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(cfg, 0.0) for _ in range(cfg.vit_num_layers))


class InternVisionModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)
        sel = cfg.select_layer  # hidden state index: 0 = embeddings, -1 = last layer; there is no final norm
        self.n_run = sel if sel >= 0 else cfg.vit_num_layers + 1 + sel
        self.set_drop_path(cfg.vit_drop_path)

    def set_drop_path(self, rate):
        """Stochastic depth rising linearly from 0 at the first layer to `rate` at the last (official schedule)."""
        # plain floats: the model may be built on meta
        n = len(self.encoder.layers)
        for i, layer in enumerate(self.encoder.layers):
            layer.drop = rate * i / max(n - 1, 1)

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:self.n_run]:
            x = layer(x)
        return x


def pixel_shuffle(x, version="v2"):
    """(N, h, w, C) -> (N, h/2, w/2, 4C): 2x2 space-to-depth, patches top-left, top-right, bottom-left, bottom-right."""
    # the official view/permute sequence, written as space-to-depth; v1 leaves the token grid transposed
    N, h, w, C = x.shape
    x = x.reshape(N, h // 2, 2, w // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(N, h // 2, w // 2, 4 * C)
    return x if version == "v2" else x.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# decoders: Qwen2 (Qwen2-VL, Qwen2.5-VL, InternVL3), as transformers models/qwen2/modeling_qwen2.py writes it, and
# InternLM2 (InternVL2), as OpenGVLab/InternVL internvl_chat/internvl/model/internlm2/modeling_internlm2.py does


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


def rotary_attention(q, k, v, cos, sin, mask, causal, cache, layer):
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
        return self.o_proj(rotary_attention(q, k, v, *rest))


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


class Decoder(nn.Module):
    """The layer loop both decoders share; a subclass builds `embedding`, `layers` and `norm` (official names)."""

    @property
    def embedding(self):
        raise NotImplementedError

    def forward(self, x, cos, sin, mask, causal, cache=None, keep=None):
        """x (B, T, C) -> normed hidden states (B, T, C)."""
        # keep: None, or per layer None (all tokens) or a (B, T) bool mask: that layer runs on the kept tokens only
        # (original positions), the others pass through it unchanged (ShowUI's selection, token_select.py; no cache)
        for i, layer in enumerate(self.layers):
            if keep is None or keep[i] is None:
                x = layer(x, cos, sin, mask, causal, cache, i)
                continue
            idx, valid, sub_mask, sub_causal = keep_layout(keep[i], mask, causal)  # idx, valid (B, L)
            rows = torch.arange(len(x), device=x.device)[:, None].expand_as(idx)  # (B, L)
            # RoPE of the kept tokens: cos / sin (B or 1, 1, T, D) -> (B, 1, L, D)
            cs, sn = (r[:, 0].expand(len(x), -1, -1)[rows, idx][:, None] for r in (cos, sin))
            out = layer(x[rows, idx], cs, sn, sub_mask, sub_causal, None, i)  # (B, L, C)
            x = x.index_put((rows[valid], idx[valid]), out[valid])
        return self.norm(x)


class Qwen2Model(Decoder):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    embedding = property(lambda self: self.embed_tokens)


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
        return self.wo(rotary_attention(q, k, v, *rest))


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


class InternLM2Model(Decoder):
    def __init__(self, cfg):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    embedding = property(lambda self: self.tok_embeddings)


def decoder_mask(key_valid, T, S, window=0, device=None, doc=None):
    """One mask per forward for causal attention of T new queries over S keys (S - T cached): (mask or None, causal)."""
    # window: only the last `window` keys; key_valid (B, S) bool or None (no padding); doc (B, S) document ids of
    # packed rows or None: a token attends within its own document only
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
    """cos, sin (B, 1, T, head_dim) from position ids (B, T) (1-D RoPE) or (3, B, T) (M-RoPE)."""
    # M-RoPE frequency slots [0, s0) follow t, [s0, s0+s1) h and the rest w. Angles in fp32, cast to the activation
    # dtype as transformers' rotary embeddings do. Dynamic NTK (InternLM2) raises the base once the sequence
    # (`seq_len` keys, padding included) outgrows max_position_embeddings; below that it is plain RoPE.
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
# head and loss


def chunked_ce(h, weight, labels, chunk=1024):
    """Sum of cross-entropy(h @ weight.T, labels) over labels != -100, holding at most `chunk` rows of logits."""
    # 1024 rows x a 152k vocabulary = 0.6 GB of fp32 logits: the gradients are computed chunk by chunk in forward
    # (fused linear + CE, as Liger-Kernel's FusedLinearCrossEntropy)
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


# ----------------------------------------------------------------------------------------------------------------------
# the vision-language models: one walk for every family (splice image features, positions, decoder, head)


class VLM(nn.Module):
    """Shared forward, packing, splice and greedy generation. A family supplies what is declared below: `embed`,
    `positions`, `token_keep` (optional), `decoder`, `head`, `vision` and `lora_scopes`."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.initialised = []  # load.load_model: parts not in the checkpoint, initialised (a run saves them)
        self.folder = None  # load.load_model: the checkpoint folder it was loaded from
        self.new_tensors = []  # train.build_model: tensor names the base lacks, saved with every checkpoint

    # token embeddings (B, T, C) with the image features spliced over the image-context tokens
    def embed(self, input_ids, attention_mask=None, labels=None, **vision):
        raise NotImplementedError

    # prefill position ids, (B, T) for 1-D RoPE or (3, B, T) for M-RoPE, and each sample's next position (B,)
    def positions(self, input_ids, attention_mask=None, **vision):
        raise NotImplementedError

    # per decoder layer None (all tokens) or the (B, T) bool tokens it runs on; None: every layer, every token
    def token_keep(self, input_ids, cache=None, **vision):
        return None

    @property
    def decoder(self):  # the Decoder: (B, T, C) embeddings -> (B, T, C) normed hidden states
        raise NotImplementedError

    @property
    def head(self):  # the output nn.Linear: (B, T, C) -> (B, T, vocab) logits
        raise NotImplementedError

    @property
    def vision(self):  # the vision tower, one FSDP unit: pixels -> per-patch (or per-tile) features
        raise NotImplementedError

    @property
    def lora_scopes(self):  # LoRA's default places: {"llm" | "vit": (module prefix, suffixes of the nn.Linear to wrap)}
        raise NotImplementedError

    def tie_weights(self):
        """A tied head shares the embedding's Parameter (lost whenever either is reassigned)."""
        if self.cfg.tie_word_embeddings:
            self.head.weight = self.decoder.embedding.weight

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None, labels=None, doc=None, **vision):
        """The walk every forward takes: embed (spliced), positions, RoPE, one mask, decoder -> normed (B, T, C)."""
        # the mask is one of three kinds: None (plain causal or one decode token, the fused kernels' own paths), a
        # boolean (B or 1, 1, T, S) tensor (padding, sliding window, packed documents), or, for packed rows on CUDA,
        # a FlexAttention BlockMask
        if cache is not None and cache.length:  # a decode step: a generated image token is an ordinary token
            x = self.decoder.embedding(input_ids)
        else:
            x = self.embed(input_ids, attention_mask, labels, **vision)
        if position_ids is None:
            position_ids, _ = self.positions(input_ids, attention_mask, **vision)
        T = input_ids.shape[1]
        S = T + (cache.length if cache is not None else 0)
        cos, sin = rope(position_ids, self.cfg, x.dtype, S)
        key_valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        mask, causal = decoder_mask(key_valid, T, S, self.cfg.sliding_window, x.device, doc)
        keep = self.token_keep(input_ids, cache, **vision)
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
        if self.cfg.is_mpgui and self.cfg.mpgui_mode == "fusion":
            raise ValueError("pack: MP-GUI's fusion gate reads the whole row's prompt; pack only its perceiver stages")
        pos, _ = self.positions(input_ids, attention_mask, **vision)
        valid = attention_mask.bool()
        if bool((input_ids[~valid] == self.cfg.image_token_id).any()):  # train.vision_inputs' blank FSDP image
            raise ValueError("pack: image tokens in padding (a text-only Qwen micro-batch under FSDP) cannot be packed")
        n = valid.sum(1)  # (B,) real tokens per sample
        first = torch.arange(labels.shape[1], device=labels.device) == valid.int().argmax(1, keepdim=True)  # (B, T)
        doc = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)[None]  # (1, N): sample of each token
        return dict(input_ids=input_ids[valid][None], labels=labels.masked_fill(first, -100)[valid][None],
                    position_ids=pos[..., valid][..., None, :],  # (1, N) or (3, 1, N)
                    doc=doc, **vision)

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
        """Grows the embedding and the head to n rows for added tokens, new rows the mean of the old ones."""
        # the official init of new output rows (new input rows never matter for MP-GUI's EXTRA token, whose
        # positions are always overwritten)
        emb = self.decoder.embedding
        for mod in {id(m): m for m in (emb, self.head)}.values():
            w = mod.weight
            mod.weight = nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(n - w.shape[0], -1)]),
                                      requires_grad=w.requires_grad)
        emb.num_embeddings = self.head.out_features = self.cfg.vocab_size = n
        self.tie_weights()

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
            tok = self.decode_step(tok[:, None], mask, step_pos, cache)
        return torch.stack(out, 1)

    def decode_step(self, tok, mask, pos, cache):  # tok (B, 1) after the cache -> next (B,); eval.py --compile
        return self.head(self.hidden(tok, mask, pos, cache)[:, -1]).argmax(-1)


# LoRA's default targets: every nn.Linear of a block, by name suffix (what PEFT's target_modules match)
QWEN2_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]
INTERNLM2_TARGETS = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
INTERNVIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
QWEN_VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    head = property(lambda self: self.output)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    head = property(lambda self: self.lm_head)


# OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py: InternVLChatModel
class InternVL(VLM):
    """InternVLChatModel: vision_model.*, mlp1.*, language_model.* (InternLM2 or Qwen2). Image features of all
    tiles, in order, replace the <IMG_CONTEXT> tokens; positions are 1-D over each sample's unpadded tokens."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vision_model = InternVisionModel(cfg)
        d = cfg.vit_hidden_size * int(1 / cfg.downsample_ratio) ** 2
        # nn.LayerNorm's default eps (1e-5), as the official mlp1 leaves it
        self.mlp1 = nn.Sequential(nn.LayerNorm(d, eps=1e-5), nn.Linear(d, cfg.hidden_size), nn.GELU(),
                                  nn.Linear(cfg.hidden_size, cfg.hidden_size))
        self.language_model = (InternLM2ForCausalLM if cfg.llm_arch == "internlm2" else Qwen2ForCausalLM)(cfg)

    decoder = property(lambda self: self.language_model.model)
    head = property(lambda self: self.language_model.head)
    vision = property(lambda self: self.vision_model)

    @property
    def lora_scopes(self):
        llm = INTERNLM2_TARGETS if self.cfg.llm_arch == "internlm2" else QWEN2_TARGETS
        return {"llm": ("language_model.", llm), "vit": ("vision_model.", INTERNVIT_TARGETS)}

    def visual_clues(self, pixel_values):
        """Pixel-shuffled ViT features before mlp1, (tiles, num_image_token, 4 * vit_hidden_size)."""
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
        return self.splice(self.decoder.embedding(input_ids), input_ids, feats)

    def positions(self, input_ids, attention_mask=None, **vision):
        if attention_mask is None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        else:  # padding-aware: left and right padding give each sample the same positions
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos, pos.amax(-1) + 1


# BigTaige/MP-GUI: its InternVL chat model with the perceivers and the fusion gate (perceivers.py)
class MPGUI(InternVL):
    """MP-GUI: InternVL + textual / graphical / spatial perceivers + fusion gate. Each image is <img>,
    <IMG_CONTEXT> x (n * tiles), <EXTRA_IMG_CONTEXT> x (n * tiles), </img>: the context tokens take the mlp1
    features, the EXTRA tokens take cfg.mpgui_mode's source, tile by tile: one perceiver (stages 1-3) or the fusion
    gate (stages 4-5 and inference)."""

    PARTS = ("textual_perceiver", "graphical_perceiver", "spatial_perceiver", "fusion_gate")

    def __init__(self, cfg):
        super().__init__(cfg)
        d_in = 4 * cfg.vit_hidden_size  # the pixel-shuffled ViT features, before mlp1
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
            x = self.splice(self.decoder.embedding(input_ids), input_ids, None)
            return self.splice(x, input_ids, None, self.cfg.extra_token_id)
        ctx = (input_ids == self.cfg.image_token_id).sum(1)
        ext = (input_ids == self.cfg.extra_token_id).sum(1)  # per sample: whole tiles, one EXTRA per context token
        whole_tiles = not bool((ctx % self.cfg.num_image_token).any())
        all_tiles = int(ctx.sum()) == len(pixel_values) * self.cfg.num_image_token
        if not (whole_tiles and all_tiles and torch.equal(ctx, ext)):
            raise ValueError(f"per sample {ctx.tolist()} context and {ext.tolist()} EXTRA tokens do not make whole "
                             f"tiles of {self.cfg.num_image_token} for the {len(pixel_values)} tiles given")
        clues = self.visual_clues(pixel_values)  # (T, n, 4 * vit_hidden_size), T tiles of the whole batch
        vit = self.mlp1(clues)  # (T, n, C)
        x = self.splice(self.decoder.embedding(input_ids), input_ids, vit.flatten(0, 1))
        mode = self.cfg.mpgui_mode
        if mode == "mean":  # the paper's ablation: the three perceivers averaged in place of the gate
            extra = sum(getattr(self, f"{k}_perceiver")(clues) for k in ("graphical", "textual", "spatial")) / 3
        elif mode != "fusion":
            extra = getattr(self, f"{mode}_perceiver")(clues)
        else:  # each tile's gate reads its own sample's prompt, after the context splice
            tiles = (input_ids == self.cfg.image_token_id).sum(1) // self.cfg.num_image_token  # (B,)
            sample = torch.repeat_interleave(torch.arange(len(tiles), device=x.device), tiles)  # (T,)
            keys = self.gate_keys(input_ids, attention_mask, labels)
            parts = (self.graphical_perceiver(clues), self.textual_perceiver(clues), self.spatial_perceiver(clues))
            extra = self.fusion_gate(vit, *parts, x[sample], keys[sample], attention)
        return self.splice(x, input_ids, extra.flatten(0, 1), self.cfg.extra_token_id)


# transformers models/qwen2_vl/modeling_qwen2_vl.py: Qwen2VLForConditionalGeneration (get_rope_index);
# models/qwen2_5_vl/modeling_qwen2_5_vl.py: Qwen2_5_VLForConditionalGeneration
class Qwen2VL(VLM):
    """Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration: visual.*, model.*, lm_head. Image
    features replace the <|image_pad|> tokens; positions are M-RoPE (t, h, w)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.visual = VisionTransformer(cfg)
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        parse_skip_layers(cfg.lm_skip_layer, cfg.num_layers)  # a bad lm_skip_layer fails here, not mid-run

    decoder = property(lambda self: self.model)
    head = property(lambda self: self.lm_head)
    vision = property(lambda self: self.visual)
    lora_scopes = property(lambda self: {"llm": ("model.", QWEN2_TARGETS), "vit": ("visual.", QWEN_VIT_TARGETS)})

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
        return self.splice(self.decoder.embedding(input_ids), input_ids, feats)

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
