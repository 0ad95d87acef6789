"""MP-GUI's three perceivers and its fusion gate (CVPR 2025), as plain modules named like the official ones, so
official checkpoints load and merged ones are written back under the same keys.

A perceiver reads the pixel-shuffled ViT features of a tile (`visual_clues`, before mlp1) and writes one token per
ViT token; the fusion gate mixes the three perceivers' outputs, steered by the prompt.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# BigTaige/MP-GUI: the textual / graphical / spatial perceivers of its InternVL chat model
def perceiver(d_in, d_llm):
    """LayerNorm -> Linear(d_in, 2H) -> GELU -> Linear(2H, 2H) -> GELU -> Linear(2H, H): keys .0 .1 .3 .5."""
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, 2 * d_llm), nn.GELU(), nn.Linear(2 * d_llm, 2 * d_llm),
                         nn.GELU(), nn.Linear(2 * d_llm, d_llm))


def init_perceiver(p):
    """The official first-stage init: xavier-uniform Linear weights, zero biases; LayerNorm 1 / 0."""
    for m in p.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# torch/nn/modules/activation.py: MultiheadAttention (parameters and math; attention through our fused function)
class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters (packed in_proj_weight / in_proj_bias, out_proj) and math
    (batch_first, no dropout), with the attention itself done by the caller's fused `attention_fn(q, k, v, mask)`."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def reset_parameters(self):  # PyTorch's own MHA init
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q, kv, attention_fn, key_mask=None):
        """q (N, Lq, C), kv (N, Lk, C); key_mask (N, Lk) True where a key may be attended. Returns (N, Lq, C)."""
        N, Lq, C = q.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        heads = lambda x: x.view(N, x.shape[1], self.num_heads, C // self.num_heads).transpose(1, 2)  # (N, H, L, D)
        q, k, v = heads(F.linear(q, wq, bq)), heads(F.linear(kv, wk, bk)), heads(F.linear(kv, wv, bv))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return self.out_proj(attention_fn(q, k, v, mask).transpose(1, 2).reshape(N, Lq, C))


# BigTaige/MP-GUI: the fusion gate of its InternVL chat model (align_layer, multi_perceiver_att)
class FusionGate(nn.Module):
    """Two cross-attentions, no residual, norm or gate nonlinearity (as released). align_layer: a tile's mlp1
    tokens query its sample's prompt embeddings; multi_perceiver_att: the result queries the tile's graphical,
    textual and spatial perceiver tokens (in that order)."""

    def __init__(self, dim, num_heads=4):  # 4 heads: the official FusionGate's, for every model size
        super().__init__()
        self.align_layer = MultiheadAttention(dim, num_heads)
        self.multi_perceiver_att = MultiheadAttention(dim, num_heads)

    def reset_parameters(self):  # the official gate is never initialised (bug B3); PyTorch's MHA init here
        self.align_layer.reset_parameters()
        self.multi_perceiver_att.reset_parameters()

    def forward(self, vit_embeds, graphical, textual, spatial, query_signal, key_mask, attention_fn):
        """vit_embeds, perceiver outputs (T, n, C) per tile; query_signal (T, L, C) the tile's sample's token
        embeddings; key_mask (T, L) True for keys the gate may read. Returns (T, n, C) for the EXTRA tokens."""
        query = self.align_layer(vit_embeds, query_signal, attention_fn, key_mask)
        return self.multi_perceiver_att(query, torch.cat([graphical, textual, spatial], dim=1), attention_fn)
