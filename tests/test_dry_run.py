"""tools/dry_run.py: the simulated step's sharded parameter, gradient and Adam bytes equal the exact sums over the
model's parameters; its activation bytes match a real CPU step of the same tiny model measured by the same tracker;
the shipped configs/models/ have the official parameter counts."""
import json
import math
import os

import pytest
import torch

import load
import train
from model import InternVL, Qwen2VL
from tools import dry_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = 4


def tiny_cfg(**kw):
    over = dict(base=os.path.join(ROOT, "tests", "fixtures", "internvl2_tiny"), max_tiles=1, micro_batch=2,
                global_batch=8, max_length=80, bf16=True, activation_checkpointing=True) | kw
    return train.load_config(os.path.join(ROOT, "configs", "textual.json"), [f"--{k}={v}" for k, v in over.items()])


def shard_bytes(p):  # FSDP2 shards dim 0 into RANKS chunks of ceil(n / RANKS) rows (rank 0's is a full one)
    rows = math.ceil(p.shape[0] / RANKS) if p.dim() else 1
    return rows * math.prod(p.shape[1:]) * p.element_size()


@pytest.fixture(scope="module")
def fake_and_real():
    return dry_run.simulate(tiny_cfg(), RANKS), dry_run.simulate(tiny_cfg(), RANKS, fake=False)


def test_sharded_state_is_the_exact_sum(fake_and_real):
    r, _ = fake_and_real
    params = [p.to_local() for p in r["model"].parameters()]  # rank 0's shards, as FSDP2 holds them
    trained = [p for p in r["model"].parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert r["peak"]["Sharded Param"] == sum(p.numel() * p.element_size() for p in params)
    assert r["peak"]["Sharded Param"] == sum(shard_bytes(p) for p in r["model"].parameters())
    assert r["grads"] == sum(shard_bytes(p) for p in trained)
    # Adam: exp_avg and exp_avg_sq per trained shard, plus one fp32 step count per parameter
    assert r["peak"]["OptState"] == sum(2 * shard_bytes(p) + 4 for p in trained)


def test_activations_match_a_real_cpu_step(fake_and_real):
    fake, real = fake_and_real
    # the same ops on the same shapes: only the tracker's view of a few real scalars (the loss normaliser, masks)
    # can differ, so 1% is room for those, not for a modelling error
    assert fake["peak"]["Activation"] == pytest.approx(real["peak"]["Activation"], rel=0.01)
    assert fake["peak"]["Activation"] > 0 and fake["counted"] == real["counted"]


@pytest.mark.parametrize("name, cls, billions", [("InternVL2-8B", InternVL, 8.0754), ("InternVL3-2B", InternVL, 2.0890),
                                                 ("Qwen2-VL-2B-Instruct", Qwen2VL, 2.2090),
                                                 ("Qwen2.5-VL-3B-Instruct", Qwen2VL, 3.7546)])
def test_shipped_configs_have_the_official_sizes(name, cls, billions):
    folder = os.path.join(ROOT, "configs", "models", name)
    cfg = load.config_from_hf(json.load(open(os.path.join(folder, "config.json"))))
    with torch.device("meta"):
        m = cls(cfg)
    # docs/ parameter counts (Qwen: from the shapes, 2208.99M / 3754.62M; InternVL: the shards' byte sizes / 2)
    assert sum(p.numel() for p in m.parameters()) / 1e9 == pytest.approx(billions, abs=1e-4)
    if cfg.is_internvl:
        assert load.special_token_id(folder, "<IMG_CONTEXT>") == cfg.vocab_size - 7
