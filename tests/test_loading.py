"""The checked loader: starting from one saved tiny checkpoint (the Qwen2-VL fixture, written by save_pretrained),
each broken variant must fail with the offending key's name, and the tied / untied head must follow the config."""
import json
import os
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import load
import model
from parity import rel_err

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "qwen2_vl_tiny")
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def fixture_state():
    return load_file(os.path.join(FIXTURE, "model.safetensors"))


def fixture_config():
    with open(os.path.join(FIXTURE, "config.json")) as f:
        return json.load(f)


def write_folder(folder, state, config=None):
    """A checkpoint folder: the fixture's configs (config.json replaced by `config` if given) and `state`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config or fixture_config(), f)
    with open(os.path.join(FIXTURE, "generation_config.json")) as f, \
            open(os.path.join(folder, "generation_config.json"), "w") as g:
        g.write(f.read())
    save_file(state, os.path.join(folder, "model.safetensors"))
    return str(folder)


def untied_config():
    config = fixture_config()
    config["tie_word_embeddings"] = False
    config["text_config"]["tie_word_embeddings"] = False
    return config


def raises_naming(key):
    return pytest.raises(ValueError, match=re.escape(key))


# ----------------------------------------------------------------------------------------------------------------------
# broken checkpoints


def test_unchanged_copy_loads(tmp_path):  # so each failure below comes from its one edit
    assert isinstance(load.load_model(write_folder(tmp_path, fixture_state())), model.Qwen2VL)


def test_fixture_has_no_stored_head():  # the tied head is not saved: the variants below start from that
    assert HEAD not in fixture_state() and fixture_config()["tie_word_embeddings"]


def test_missing_key_is_named(tmp_path):
    state = fixture_state()
    del state["visual.blocks.1.attn.qkv.bias"]
    with raises_naming("visual.blocks.1.attn.qkv.bias"):
        load.load_model(write_folder(tmp_path, state))


def test_unexpected_key_is_named(tmp_path):
    state = fixture_state()
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    with raises_naming("model.layers.0.self_attn.extra.weight"):
        load.load_model(write_folder(tmp_path, state))


def test_wrong_shape_is_named(tmp_path):
    state = fixture_state()
    key = "model.layers.1.mlp.up_proj.weight"
    state[key] = state[key][:-1].clone()
    with raises_naming(key):
        load.load_model(write_folder(tmp_path, state))


# ----------------------------------------------------------------------------------------------------------------------
# tied and untied heads


def test_tied_config_with_a_different_stored_head_raises(tmp_path):
    state = fixture_state()
    state[HEAD] = state[EMBED] + 0.01
    with raises_naming(HEAD):
        load.load_model(write_folder(tmp_path, state))


def test_tied_config_with_an_equal_stored_head_loads_tied(tmp_path):
    state = fixture_state()
    state[HEAD] = state[EMBED].clone()
    m = load.load_model(write_folder(tmp_path, state))
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_untied_config_without_a_stored_head_names_it_missing(tmp_path):
    with raises_naming(HEAD):
        load.load_model(write_folder(tmp_path, fixture_state(), untied_config()))


@pytest.fixture
def untied_folder(tmp_path):
    state = fixture_state()
    state[HEAD] = torch.randn(state[EMBED].shape, generator=torch.Generator().manual_seed(0))
    return write_folder(tmp_path, state, untied_config())


def test_untied_config_loads_the_stored_head(untied_folder):
    m = load.load_model(untied_folder)
    assert torch.equal(m.lm_head.weight, load_file(os.path.join(untied_folder, "model.safetensors"))[HEAD])


def test_untied_head_is_not_the_embedding(untied_folder):
    m = load.load_model(untied_folder)
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)


def test_untied_logits_match_transformers(untied_folder):
    ids = torch.arange(3, 40)[None]
    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(untied_folder, attn_implementation="eager")
    assert not torch.equal(ref.lm_head.weight, ref.model.language_model.embed_tokens.weight)  # the oracle unties too
    with torch.no_grad():
        expected, got = ref(input_ids=ids).logits, load.load_model(untied_folder)(ids)
    assert rel_err(got, expected) <= 1e-4
