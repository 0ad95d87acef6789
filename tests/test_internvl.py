"""InternVL pieces the golden fixtures do not reach: pixel shuffle order, position-embedding resize at other tile
sizes, select_layer, the never-tied head, and the main command on InternVL-layout folders."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import eval as E
import load
import model

HERE = os.path.dirname(os.path.abspath(__file__))
IVL2 = os.path.join(HERE, "fixtures", "internvl2_tiny")


def official_pixel_shuffle(x, scale_factor=0.5, v2=True):
    """The official view/permute sequence, step by step, as the reference for our space-to-depth."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous() if v2 else x


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_equals_the_official_sequence(version):
    x = torch.randn(3, 8, 8, 5)
    assert torch.equal(model.pixel_shuffle(x, version), official_pixel_shuffle(x, v2=version == "v2"))


def test_pixel_shuffle_channel_order_is_tl_tr_bl_br():
    x = torch.arange(16.0).view(1, 4, 4, 1)  # value = row * 4 + col
    assert model.pixel_shuffle(x)[0, 0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # token (0, 1): (0,2) (0,3) (1,2) (1,3)


def test_position_embedding_resized_bicubic_in_fp32_for_other_tile_sizes():
    m = load.load_model(IVL2)
    emb = m.vision_model.embeddings
    px = torch.randn(2, 3, 168, 168)  # 12 x 12 patches; the checkpoint's grid is 8 x 8
    pos = emb.position_embedding  # (1, 65, C)
    C = pos.shape[-1]
    grid = F.interpolate(pos[:, 1:].float().reshape(1, 8, 8, C).permute(0, 3, 1, 2), size=(12, 12), mode="bicubic",
                         align_corners=False).reshape(1, C, 144).permute(0, 2, 1)
    patches = emb.patch_embedding(px).flatten(2).transpose(1, 2)
    ref = torch.cat([emb.class_embedding.expand(2, 1, C), patches], 1) + torch.cat([pos[:, :1], grid], 1)
    with torch.no_grad():
        assert torch.allclose(emb(px), ref, atol=1e-6)
        assert m.image_features(px).shape == (2, 36, m.cfg.hidden_size)  # (12 / 2)^2 tokens per tile


def test_select_layer_takes_that_hidden_state(tmp_path):
    dst = shutil.copytree(IVL2, tmp_path / "f")
    cfg = json.load(open(dst / "config.json"))
    cfg["select_layer"] = -2  # hidden_states[-2]: the output of the first of the two layers
    json.dump(cfg, open(dst / "config.json", "w"))
    full, cut = load.load_model(IVL2), load.load_model(str(dst))
    px = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        ref = full.vision_model.encoder.layers[0](full.vision_model.embeddings(px))
        assert torch.allclose(cut.vision_model(px), ref, atol=1e-6)


def test_head_is_never_tied_by_a_config_default(tmp_path):
    """MP-GUI's config class leaves tie_word_embeddings at the PretrainedConfig default (true); the official
    checkpoints still store their own head, which must be used as is."""
    dst = shutil.copytree(IVL2, tmp_path / "f")
    cfg = json.load(open(dst / "config.json"))
    cfg["tie_word_embeddings"] = True
    cfg["llm_config"]["tie_word_embeddings"] = True
    json.dump(cfg, open(dst / "config.json", "w"))
    m = load.load_model(str(dst))
    out, emb = m.language_model.output.weight, m.language_model.model.tok_embeddings.weight
    assert out.data_ptr() != emb.data_ptr() and not torch.equal(out, emb)


def test_image_token_id_comes_from_the_tokenizer_files():
    assert load.load_model(IVL2).cfg.image_token_id == 97


@pytest.mark.parametrize("fixture", ["qwen2_vl_tiny", "qwen2_5_vl_tiny", "internvl2_tiny", "internvl3_tiny"])
def test_main_command_runs_on_every_layout(fixture, capsys):
    screen = os.path.join(os.path.dirname(HERE), "examples", "screen.png")
    text = E.main(["--model", os.path.join(HERE, "fixtures", fixture), "--image", screen, "--prompt", "Where is Save?",
                   "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "answer:" in out and isinstance(text, str)
