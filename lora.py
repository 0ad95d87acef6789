"""LoRA for any nn.Linear, chosen by module-name patterns; knows no model family (a model names its default
targets in `lora_scopes`, model.py).

A wrapped layer stays an nn.Linear with its own `weight` / `bias` (so the official key names do not move) and gains
`lora_A` (r, in) and `lora_B` (out, r): y = x W^T + b + dropout(x) A^T B^T * alpha / r. A starts kaiming-uniform,
B at zero, so training starts from the base model exactly.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

def add_adapters(model, llm_r=0, llm_alpha=0, vit_r=0, vit_alpha=0, dropout=0.0, targets=None):
    """LoRA on a VLM's language model and / or vision tower (rank 0 = none there), at the places its
    `lora_scopes` names. `targets` (name suffixes, as PEFT / LLaMA-Factory's lora_target match them) replaces the
    model's defaults in both scopes."""
    for part, r, alpha in (("llm", llm_r, llm_alpha), ("vit", vit_r, vit_alpha)):
        scope, defaults = model.lora_scopes[part]
        if r:
            inject(model, scope, targets or defaults, r, alpha, dropout)


# Lightning-AI/litgpt lora.py and PEFT's LoraLayer define the same y = xW^T + b + dropout(x) A^T B^T * alpha / r
class LoRALinear(nn.Linear):
    def __init__(self, base, r, alpha, dropout=0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and storage unchanged
        # fp32 masters whatever the base's storage; in full on the CPU while the base is on the meta device (as
        # train.build_model builds it), so every rank draws the same A
        device = "cpu" if base.weight.is_meta else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale, self.dropout, self.merged = alpha / r, dropout, False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = F.dropout(x, self.dropout, self.training)
        return y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale

    def delta(self):  # in fp32 whatever the storage dtype: a bf16 product drifts from the trained adapter
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True


def inject(model, scope, targets, r, alpha, dropout=0.0):
    """Wraps every nn.Linear under `scope` (a name prefix, e.g. "language_model.") whose name ends with a target.
    None found is an error (a silent no-op would train nothing)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith(scope)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"LoRA: no nn.Linear under {scope!r} matches {targets}")
    for n in names:
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(n), r, alpha, dropout))


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge(model):
    """Folds every adapter into its weight (fp32 arithmetic) and turns the layers back into plain nn.Linear, so
    the state dict is the official one again."""
    for n, m in lora_layers(model):
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    return model
