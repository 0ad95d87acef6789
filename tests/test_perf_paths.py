"""The training engine's speed and memory paths are exact: chunked fused head + cross-entropy equals the full-logits
loss (value and gradients), and a packed micro-batch (one row, attention within each sample, positions per sample)
gives every supervised token the loss it has in the padded batch."""
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import load
import model as M
from parity import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TOL = 1e-5  # fp32, relative to the largest magnitude


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_ce_equals_full_logits_ce(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 50, 32, generator=g, requires_grad=True)
    w = (torch.randn(300, 32, generator=g) * 0.3).requires_grad_(True)
    labels = torch.randint(0, 300, (2, 50), generator=g).masked_fill(torch.rand(2, 50, generator=g) < 0.4, -100)
    ref = F.cross_entropy((h[:, :-1] @ w.T).flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")
    gh_ref, gw_ref = torch.autograd.grad(ref * 0.37, (h, w))
    loss = M.chunked_ce(h[:, :-1].flatten(0, 1), w, labels[:, 1:].flatten(), chunk=chunk)
    gh, gw = torch.autograd.grad(loss * 0.37, (h, w))
    assert rel_err(loss, ref) < TOL and rel_err(gh, gh_ref) < TOL and rel_err(gw, gw_ref) < TOL


def test_chunked_ce_frozen_head_and_no_supervised_rows():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen: no weight gradient is computed
    loss = M.chunked_ce(h, w, torch.full((10,), -100))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0


# ----------------------------------------------------------------------------------------------------------------------
# models: forward(return_loss=True) and packing, on the tiny fixtures


def qwen_batch():
    """Two Qwen2-VL chats of different lengths, one screenshot each, right padding."""
    m = load.load_model(os.path.join(FIXTURES, "qwen2_vl_tiny"))
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for h, w in ((56, 84), (112, 56))]
    pv, grid = data.qwen_images(imgs, 4 * 28 * 28, 64 * 28 * 28)
    rows = [torch.cat([torch.randint(0, 150, (n0,), generator=g), torch.full((int(grid[k].prod()) // 4,), 151),
                       torch.randint(0, 150, (n1,), generator=g)]) for k, (n0, n1) in enumerate(((5, 20), (9, 11)))]
    return m, rows, dict(pixel_values=pv, image_grid_thw=grid)


def internvl_batch(name, mode=None):
    m = load.load_model(os.path.join(FIXTURES, name))
    m.cfg.rope_dynamic = 0.0  # dynamic NTK depends on the row length, which packing changes (README: Performance)
    if mode:
        m.cfg.mpgui_mode = mode
    g, n = torch.Generator().manual_seed(0), m.cfg.num_image_token
    image = lambda t: [97] * (n * t) + ([98] * (n * t) if m.cfg.arch == "mpgui" else [])
    rows = [torch.tensor([1, 3] + torch.randint(4, 90, (4,), generator=g).tolist() + image(t) +
                         torch.randint(4, 90, (k,), generator=g).tolist()) for t, k in ((1, 12), (2, 5), (1, 3))]
    return m, rows, dict(pixel_values=torch.randn(4, 3, 112, 112, generator=g))


def padded(m, rows):
    L = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r, torch.full((L - len(r),), m.cfg.pad_token_id)]) for r in rows])
    mask = (torch.arange(L)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    supervised = torch.arange(L)[None] >= torch.tensor([len(r) - 6 for r in rows])[:, None]  # the last 6 tokens
    return ids, mask, ids.masked_fill(~supervised | (mask == 0), -100)


def token_losses(logits, labels):
    lp = -torch.log_softmax(logits[:, :-1].float(), -1)
    y = labels[:, 1:]
    return lp.gather(-1, y.clamp(min=0)[..., None])[..., 0][y != -100]


CASES = {"qwen2_vl": lambda: qwen_batch(), "internvl2": lambda: internvl_batch("internvl2_tiny"),
         "mpgui_textual": lambda: internvl_batch("mpgui_tiny", "textual")}


@pytest.mark.parametrize("case", list(CASES))
def test_return_loss_equals_logits_loss(case):
    m, rows, vision = CASES[case]()
    ids, mask, labels = padded(m, rows)
    with torch.no_grad():
        ref = F.cross_entropy(m(ids, mask, labels=labels, **vision)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                              reduction="sum")
        loss = m(ids, mask, labels=labels, return_loss=True, **vision)
    assert rel_err(loss, ref) < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_packed_row_equals_padded_batch_per_token(case):
    m, rows, vision = CASES[case]()
    ids, mask, labels = padded(m, rows)
    with torch.no_grad():
        ref = token_losses(m(ids, mask, labels=labels, **vision), labels)
        kw = m.pack(ids, mask, labels, **vision)
        assert kw["input_ids"].shape == (1, sum(len(r) for r in rows))
        got = token_losses(m(**kw), kw["labels"])
        loss = m(**kw, return_loss=True)
    assert got.shape == ref.shape and rel_err(got, ref) < TOL
    assert rel_err(loss, ref.sum()) < TOL


def test_packed_documents_do_not_see_each_other():
    m, rows, vision = internvl_batch("internvl2_tiny")
    ids, mask, labels = padded(m, rows)
    with torch.no_grad():
        kw = m.pack(ids, mask, labels, **vision)
        a = m(**kw)
        kw["input_ids"] = kw["input_ids"].clone()
        kw["input_ids"][0, len(rows[0]) + 2] = 50  # a text token of the second document
        b = m(**kw)
    assert torch.equal(a[0, :len(rows[0])], b[0, :len(rows[0])])
    assert not torch.equal(a[0, len(rows[0]):], b[0, len(rows[0]):])


def test_pack_refuses_mpgui_fusion():
    m, rows, vision = internvl_batch("mpgui_tiny", "fusion")
    ids, mask, labels = padded(m, rows)
    with pytest.raises(ValueError, match="fusion gate"):
        m.pack(ids, mask, labels, **vision)


def test_train_pack_and_full_logits_loss_equal_default(tmp_path):
    """train.main end to end (InternVL3 tiny: no dynamic NTK, which depends on the row length): the packed run and the
    full-logits loss path give the default run's losses."""
    import train
    from test_train import SHRINK, fixture, losses, train_args, write_dataset
    meta = write_dataset(str(tmp_path / "data"), n=8)
    common = [*SHRINK, "--mpgui=False", "--init_parts=[]", "--train_parts=[]", "--lora_dropout=0.0", "--drop_path=0.0"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for name, extra in (("default", []), ("pack", ["--pack=True"]), ("full", ["--chunked_loss=False"])):
            runs[name] = str(tmp_path / name)
            train.main(train_args("textual", fixture("internvl3_tiny"), meta, runs[name], *common, *extra))
    finally:
        torch.set_num_threads(n)
        torch.set_flush_denormal(False)
    ref = losses(runs["default"])
    assert sorted(ref) == [1, 2]
    for name in ("pack", "full"):
        got = losses(runs[name])
        assert all(abs(got[s] - ref[s]) / abs(ref[s]) <= TOL for s in ref), (name, got, ref)


def test_train_compiled_blocks_equal_eager(tmp_path):
    """compile: true (each Block compiled by inductor, activation checkpointing around it) gives eager's losses and
    first-step gradients over 2 steps (InternVL3 tiny: InternViT blocks and Qwen2 decoder layers)."""
    import train
    from torch._dynamo.utils import counters
    from test_train import SHRINK, fixture, losses, moments, train_args, write_dataset
    # one image size and one text length: every micro-batch has the same shapes, so each block compiles once (twice
    # for the first decoder layer, whose input needs no gradient), not again per shape; inductor takes ~1 min cold
    meta = write_dataset(str(tmp_path / "data"), n=4, width=200)
    common = [*SHRINK, "--mpgui=False", "--init_parts=[]", "--train_parts=[]", "--lora_dropout=0.0", "--drop_path=0.0",
              "--save_every=1", "--lr=1e-3"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    counters.clear()
    try:
        runs = {name: str(tmp_path / name) for name in ("eager", "compiled")}
        for name, run in runs.items():
            compiled = f"--compile={name == 'compiled'}"
            train.main(train_args("textual", fixture("internvl3_tiny"), meta, run, *common, compiled))
    finally:
        torch.set_num_threads(n)
        torch.set_flush_denormal(False)
    assert counters["stats"]["unique_graphs"] == 3  # a vision block; the first decoder layer and the others
    ref, got = losses(runs["eager"]), losses(runs["compiled"])
    assert sorted(ref) == sorted(got) == [1, 2] and ref[1] != ref[2]
    # inductor fuses each block's norms, softmax and pointwise ops into its own kernels, which sum in another fp32
    # order than eager's: a few ulp per op, ~1e-6 after the layers; 1e-5 as the other exact paths here
    assert all(abs(got[s] - ref[s]) / abs(ref[s]) <= TOL for s in ref), (got, ref)
    a, b = moments(runs["compiled"], 1), moments(runs["eager"], 1)
    for k in b:
        if not k.endswith("::step") and b[k].abs().max() > 0:
            assert rel_err(a[k], b[k]) <= TOL, k


def test_packed_row_cpu_flex_equals_boolean_mask(monkeypatch):
    """The packed path through FlexAttention on CPU (model.FLEX_CPU; forward only: torch's CPU FlexAttention has no
    backward) gives the logits of the boolean block-diagonal mask through SDPA (InternVL2 tiny: the attention call
    after the grouped-query repeat is the same for every family; each one would compile for another ~10 s)."""
    m, rows, vision = CASES["internvl2"]()
    ids, mask, labels = padded(m, rows)
    with torch.no_grad():
        kw = m.pack(ids, mask, labels, **vision)
        ref = m(**kw)
        monkeypatch.setattr(M, "FLEX_CPU", True)
        monkeypatch.setattr(M, "_FLEX", None)
        assert type(M.doc_block_mask(kw["doc"])).__name__ == "BlockMask"
        got = m(**kw)
        assert M._FLEX is not None  # built on first use: the forward went through it
    # the same fp32 products; FlexAttention's kernel and SDPA's CPU kernel sum each softmax row in other orders (in
    # blocks, rescaled by a running max): a few ulp per attention, measured 3.8e-7 after the layers
    assert rel_err(got, ref) < 2e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention document masks are used on CUDA only")
def test_packed_row_equals_padded_batch_cuda_flex():
    m, rows, vision = CASES["internvl2"]()
    m = m.cuda()
    ids, mask, labels = (t.cuda() for t in padded(m, rows))
    vision = {k: v.cuda() for k, v in vision.items()}
    with torch.no_grad():
        kw = m.pack(ids, mask, labels, **vision)
        assert not isinstance(M.doc_block_mask(kw["doc"]), torch.Tensor)
        ref, got = token_losses(m(ids, mask, labels=labels, **vision), labels), token_losses(m(**kw), kw["labels"])
    assert rel_err(got, ref) < 1e-4  # fp32 FlexAttention kernel vs SDPA
