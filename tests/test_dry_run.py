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


def shard_bytes(p, ranks=RANKS):  # FSDP2 shards dim 0 into `ranks` chunks of ceil(n / ranks) rows (rank 0's is full)
    rows = math.ceil(p.shape[0] / ranks) if p.dim() else 1
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


def test_hsdp_by_default_across_nodes(monkeypatch):
    # torchrun on 2 nodes of 2 GPUs (LOCAL_WORLD_SIZE 2 of 4 ranks): replicas across the nodes, shards within each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    r = dry_run.simulate(tiny_cfg(), RANKS)
    mesh = next(r["model"].parameters()).device_mesh
    assert mesh.mesh.shape == (2, 2) and mesh.mesh_dim_names == ("dp_replicate", "dp_shard")
    assert r["peak"]["Sharded Param"] == sum(shard_bytes(p, 2) for p in r["model"].parameters())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(RANKS))  # one node: plain FSDP over all ranks
    assert next(dry_run.simulate(tiny_cfg(), RANKS)["model"].parameters()).device_mesh.mesh.shape == (RANKS,)


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


@pytest.mark.parametrize("config, base", [("textual", "InternVL2-8B"), ("showui_grounding", "Qwen2-VL-2B-Instruct"),
                                          ("tongui_3b", "Qwen2.5-VL-3B-Instruct")])
def test_mfu_formula_equals_the_counted_flops(config, base, tmp_path):
    # the official widths with two layers per tower (each layer's FLOPs are the same, so the ratio is that of the
    # whole model), one sample of max_length tokens with the largest image the recipe allows
    folder = tmp_path / base
    folder.mkdir()
    for f in os.listdir(os.path.join(ROOT, "configs", "models", base)):
        c = json.load(open(os.path.join(ROOT, "configs", "models", base, f)))
        if f == "config.json":
            llm, vit = (c["llm_config"], c["vision_config"]) if "llm_config" in c else (c, c["vision_config"])
            llm["num_hidden_layers"] = 2
            vit["num_hidden_layers" if "llm_config" in c else "depth"] = 2
            vit["fullatt_block_indexes"] = [1] if "fullatt_block_indexes" in vit else None
            vit = {k: v for k, v in vit.items() if v is not None}
            c["vision_config"] = vit
        json.dump(c, open(folder / f, "w"))
    over = [f"--base={folder}", "--micro_batch=1", "--max_tiles=1", f"--out={tmp_path / 'run'}"]
    r = dry_run.simulate(train.load_config(os.path.join(ROOT, "configs", f"{config}.json"), over), 1)
    # what the formula leaves out at these widths: LoRA dropout's and biases' elementwise ops are not FLOPs here,
    # and the patch embedding's input gradient it does not count is never computed; all below 0.3% of the step
    assert r["formula"] == pytest.approx(r["counted"], rel=3e-3)
