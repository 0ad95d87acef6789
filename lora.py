"""LoRA for any nn.Linear, chosen by module-name patterns; knows no model family.

A wrapped layer stays an nn.Linear with its own `weight` / `bias` (so the official key names do not move) and gains
`lora_A` (r, in) and `lora_B` (out, r): y = x W^T + b + dropout(x) A^T B^T * alpha / r. A starts kaiming-uniform,
B at zero, so training starts from the base model exactly.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# target patterns per family: a module is wrapped when its name ends with one of them, inside the given scope
TARGETS = {
    "internlm2": ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"],
    "qwen2": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "internvit": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    "qwen_vit": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}


def scopes(arch, llm_arch):
    """(llm scope, llm targets, vit scope, vit targets) of a model family (model.py's ModelConfig.arch)."""
    if arch in ("internvl", "mpgui"):
        return "language_model.", TARGETS[llm_arch], "vision_model.", TARGETS["internvit"]
    return "model.", TARGETS["qwen2"], "visual.", TARGETS["qwen_vit"]


def add_adapters(model, arch, llm_arch, llm_r=0, llm_alpha=0, vit_r=0, vit_alpha=0, dropout=0.0, targets=None):
    """LoRA on a VLM's language model and / or vision tower (rank 0 = none there). `targets` (name suffixes, as
    PEFT / LLaMA-Factory's lora_target match them) replaces the family's defaults in both scopes."""
    llm_scope, llm_targets, vit_scope, vit_targets = scopes(arch, llm_arch)
    llm_targets, vit_targets = (targets, targets) if targets else (llm_targets, vit_targets)
    for scope, targets, r, alpha in ((llm_scope, llm_targets, llm_r, llm_alpha), (vit_scope, vit_targets, vit_r,
                                                                                  vit_alpha)):
        if r:
            inject(model, scope, targets, r, alpha, dropout)


class LoRALinear(nn.Linear):
    def __init__(self, base, r, alpha, dropout=0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and storage unchanged
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
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

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False


def inject(model, scope, targets, r, alpha, dropout=0.0):
    """Wraps every nn.Linear under `scope` (a name prefix, e.g. "language_model.") whose name ends with a target.
    Returns the wrapped names; none found is an error (a silent no-op would train nothing)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith(scope)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"LoRA: no nn.Linear under {scope!r} matches {targets}")
    for n in names:
        parent, _, child = n.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), r, alpha, dropout))
    return names


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


def lora_state(model):
    """The adapters alone, {name.lora_A / name.lora_B: tensor}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


def load_lora(model, state):
    """Loads adapters saved by lora_state into a model with the same injected layers; every key must match."""
    own = {k for k in model.state_dict() if k.endswith(("lora_A", "lora_B"))}
    if set(state) != own:
        raise ValueError(f"adapter keys differ: missing {sorted(own - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - own)[:5]}")
    model.load_state_dict(state, strict=False)
