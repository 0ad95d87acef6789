"""The golden fixtures pass tests/parity.py, and the checker fails when the model or the cases are wrong."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
import parity

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = sorted(os.path.join(HERE, "fixtures", d) for d in os.listdir(os.path.join(HERE, "fixtures"))
                  if os.path.exists(os.path.join(HERE, "fixtures", d, "cases.safetensors")))


@pytest.mark.parametrize("folder", FIXTURES, ids=os.path.basename)
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_fixture_parity(folder, impl, monkeypatch):
    monkeypatch.setattr(model, "ATTN_IMPL", impl)
    results = parity.run(folder)
    assert results and all(ok for _, _, ok in results), results


def test_checker_fails_on_a_perturbed_weight(tmp_path):
    src = os.path.join(HERE, "fixtures", "qwen2_vl_tiny")
    dst = shutil.copytree(src, tmp_path / "f")
    w = load_file(dst / "model.safetensors")
    w["model.layers.1.mlp.down_proj.weight"][0, 0] += 1e-2  # one weight, one entry
    save_file(w, dst / "model.safetensors")
    failed = {name for name, _, ok in parity.run(str(dst)) if not ok}
    assert "logits" in failed


def test_checker_fails_on_an_unknown_case(tmp_path):
    dst = shutil.copytree(os.path.join(HERE, "fixtures", "qwen2_vl_tiny"), tmp_path / "f")
    cases = load_file(dst / "cases.safetensors")
    cases["something_new"] = torch.zeros(2)
    save_file(cases, dst / "cases.safetensors")
    assert ("something_new", "no check for this case", False) in parity.run(str(dst))
