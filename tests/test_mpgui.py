"""MP-GUI behaviour the golden fixture does not pin down: the prompt_only gate mask (no answer leak), per-sample
isolation across batches of mixed tile counts, each EXTRA source against an independent reference (the fusion gate
against torch.nn.MultiheadAttention), the official key layout, building MP-GUI on an InternVL checkpoint,
resize_vocab, and degenerate batches."""
import math
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import load
import model

HERE = os.path.dirname(os.path.abspath(__file__))
MPGUI_DIR = os.path.join(HERE, "fixtures", "mpgui_tiny")
IVL2_DIR = os.path.join(HERE, "fixtures", "internvl2_tiny")

# stand-in ids of the tiny tokenizers
BOS, IM_START, IM_END, IMG, IMG_END, CTX, EXTRA, PAD = 1, 3, 4, 95, 96, 97, 98, 0
N = 16  # image tokens per 112-px tile
ASSISTANT = (30, 31)  # "assistant\n"
MODES = ("textual", "graphical", "spatial", "fusion")
PERCEIVERS = ("textual", "graphical", "spatial")


def file_tensors(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def loaded():
    return load.load_model(MPGUI_DIR)


@pytest.fixture
def m(loaded):
    """The module-wide model with its run-time switches restored after each test."""
    saved = (loaded.cfg.mpgui_mode, loaded.cfg.gate_mask, loaded.cfg.rope_dynamic)
    with torch.no_grad():
        yield loaded
    loaded.cfg.mpgui_mode, loaded.cfg.gate_mask, loaded.cfg.rope_dynamic = saved


def chat(tiles, user=(20, 21, 22), after=(23, 24), answer=(40, 41, 42)):
    """One chat sample: BOS, <|im_start|> user text, image block, text, <|im_end|>, <|im_start|> assistant, answer,
    <|im_end|>. Labels supervise the answer and its <|im_end|>. Returns ids, labels, index of the first answer token."""
    image = [IMG] + [CTX] * (N * tiles) + [EXTRA] * (N * tiles) + [IMG_END] if tiles else []
    ids = [BOS, IM_START, *user, *image, *after, IM_END, IM_START, *ASSISTANT]
    start = len(ids)
    ids += [*answer, IM_END]
    return ids, [-100] * start + ids[start:], start


def collate(samples):
    """Right padding with id 0 (the released collator's), labels -100, attention mask 0 on padding."""
    L = max(len(s[0]) for s in samples)
    ids = torch.tensor([s[0] + [PAD] * (L - len(s[0])) for s in samples])
    labels = torch.tensor([s[1] + [-100] * (L - len(s[1])) for s in samples])
    mask = torch.tensor([[1] * len(s[0]) + [0] * (L - len(s[0])) for s in samples])
    return ids, mask, labels, [s[2] for s in samples]


def pixels(tiles, seed=0):
    return torch.randn(tiles, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def extra_rows(m, ids, mask, labels, px):
    """Per sample, the input-embedding rows at its EXTRA tokens."""
    x = m.embed(ids, mask, labels, px)
    return [x[b][ids[b] == EXTRA] for b in range(len(ids))]


# a text token is one key among ~40-110 (mostly image tokens) of the align layer, so a text change moves the
# random-weight gate's output by 1e-4 to 4e-4: 50x above the 1e-6 used for "unchanged" (observed: bit-identical)
LEAK = 5e-5


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# 1. prompt_only: the answer never reaches the EXTRA tokens (official: it does)


ANSWERS_A, ANSWERS_B = ((40, 41, 42), (50, 51)), ((60, 61, 62), (70, 71))


def answer_pair():
    a = collate([chat(1, answer=ANSWERS_A[0]), chat(3, answer=ANSWERS_A[1])])
    b = collate([chat(1, answer=ANSWERS_B[0]), chat(3, answer=ANSWERS_B[1])])
    assert torch.equal(a[2] != -100, b[2] != -100) and not torch.equal(a[0], b[0])
    return a, b


@pytest.mark.parametrize("training", [True, False], ids=["labels", "no_labels"])
def test_prompt_only_gate_does_not_read_the_answer(m, training):
    m.cfg.mpgui_mode, m.cfg.gate_mask = "fusion", "prompt_only"
    (ids_a, mask, labels_a, starts), (ids_b, _, labels_b, _) = answer_pair()
    px = pixels(4)
    la, lb = (labels_a, labels_b) if training else (None, None)
    for b in range(2):  # the variants differ exactly in the answers
        diff = (ids_a[b] != ids_b[b]).nonzero().flatten()
        assert diff.min() == starts[b] and len(diff) == len(ANSWERS_A[b])
    ea, eb = extra_rows(m, ids_a, mask, la, px), extra_rows(m, ids_b, mask, lb, px)
    for b, tiles in enumerate((1, 3)):
        assert ea[b].shape == (N * tiles, m.cfg.hidden_size)
        close(ea[b], eb[b])
    logits_a, logits_b = m(ids_a, mask, labels=la, pixel_values=px), m(ids_b, mask, labels=lb, pixel_values=px)
    for b, s in enumerate(starts):
        close(logits_a[b, :s], logits_b[b, :s])
        assert (logits_a[b, s:s + 2] - logits_b[b, s:s + 2]).abs().max() > 1e-3  # the answers themselves do differ


def test_prompt_only_training_sees_what_inference_sees(m):
    """EXTRA rows of the supervised sequence equal those of the bare generation prompt (cut after 'assistant')."""
    m.cfg.mpgui_mode, m.cfg.gate_mask = "fusion", "prompt_only"
    full = [chat(1), chat(3, answer=(50, 51))]
    ids, mask, labels, _ = collate(full)
    prompt = collate([(s[0][:s[2]], s[1][:s[2]], s[2]) for s in full])
    px = pixels(4)
    for got, want in zip(extra_rows(m, ids, mask, labels, px), extra_rows(m, prompt[0], prompt[1], None, px)):
        close(got, want)


def test_prompt_only_gate_does_read_the_prompt(m):
    """Guard against a trivially blind gate: the user text before the image moves the EXTRA rows."""
    m.cfg.mpgui_mode, m.cfg.gate_mask = "fusion", "prompt_only"
    ids_a, mask, labels, _ = collate([chat(1), chat(3)])
    ids_b, _, _, _ = collate([chat(1, user=(60, 61, 62)), chat(3, after=(63, 64))])
    px = pixels(4)
    for ea, eb in zip(extra_rows(m, ids_a, mask, labels, px), extra_rows(m, ids_b, mask, labels, px)):
        assert (ea - eb).abs().max() > LEAK


@pytest.mark.parametrize("training", [True, False], ids=["labels", "no_labels"])
def test_official_gate_leaks_the_answer(m, training):
    """The released gate reads every non-EXTRA, non-0 token: the same answer change moves the EXTRA rows (and so
    the logits before the answer). This is what the prompt_only test would catch if the mask regressed."""
    m.cfg.mpgui_mode, m.cfg.gate_mask = "fusion", "official"
    (ids_a, mask, labels_a, starts), (ids_b, _, labels_b, _) = answer_pair()
    px = pixels(4)
    la, lb = (labels_a, labels_b) if training else (None, None)
    ea, eb = extra_rows(m, ids_a, mask, la, px), extra_rows(m, ids_b, mask, lb, px)
    for b in range(2):
        assert (ea[b] - eb[b]).abs().max() > LEAK
    logits_a, logits_b = m(ids_a, mask, labels=la, pixel_values=px), m(ids_b, mask, labels=lb, pixel_values=px)
    for b, s in enumerate(starts):
        assert (logits_a[b, :s] - logits_b[b, :s]).abs().max() > 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# 2. per-sample isolation in a batch of mixed tile counts


@pytest.mark.parametrize("gate_mask", ["official", "prompt_only"])
def test_other_samples_do_not_reach_a_samples_extra_tokens(m, gate_mask):
    m.cfg.mpgui_mode, m.cfg.gate_mask = "fusion", gate_mask
    samples = [chat(1), chat(3, answer=(50, 51))]
    ids, mask, labels, _ = collate(samples)
    px = pixels(4)
    ref = extra_rows(m, ids, mask, labels, px)
    ids2, _, labels2, _ = collate([samples[0], chat(3, user=(70, 71, 72, 73), after=(74,), answer=(75, 76))])
    px2 = px.clone()
    px2[1:] = pixels(3, seed=1)
    for i, l, p in ((ids2, labels2, px), (ids, labels, px2), (ids2, labels2, px2)):  # text, pixels, both
        other = extra_rows(m, i, (i != PAD).long(), l, p)
        close(other[0], ref[0])
        assert (other[1] - ref[1]).abs().max() > LEAK  # sample 1 did change
    # each sample alone (batch of 1, no padding) gives the same input embeddings as inside the batch
    x = m.embed(ids, mask, labels, px)
    for b, sl in enumerate((slice(0, 1), slice(1, 4))):
        one = collate([samples[b]])
        alone = m.embed(one[0], one[1], one[2], px[sl])
        n = len(samples[b][0])
        close(x[b, :n], alone[0])
        close(extra_rows(m, one[0], one[1], one[2], px[sl])[0], ref[b])


def test_batched_logits_equal_each_sample_alone(m):
    """Through the decoder too. Dynamic NTK (this fixture: factor 2 past 96 positions) scales RoPE by the padded
    length, as InternLM2's reference does, so it is switched off to compare a padded sample with itself alone."""
    m.cfg.mpgui_mode, m.cfg.gate_mask, m.cfg.rope_dynamic = "fusion", "prompt_only", 0.0
    samples = [chat(1), chat(3, answer=(50, 51))]
    ids, mask, labels, _ = collate(samples)
    px = pixels(4)
    logits = m(ids, mask, labels=labels, pixel_values=px)
    for b, sl in enumerate((slice(0, 1), slice(1, 4))):
        one = collate([samples[b]])
        close(logits[b, :len(samples[b][0])], m(one[0], one[1], labels=one[2], pixel_values=px[sl])[0], 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# 3. each EXTRA source against an independent reference


@pytest.mark.parametrize("mode", PERCEIVERS)
def test_single_perceiver_mode_fills_extra_with_that_perceiver(m, mode):
    m.cfg.mpgui_mode = mode
    ids, mask, labels, _ = collate([chat(1), chat(3)])
    px = pixels(4)
    x = m.embed(ids, mask, labels, px)
    clues = m.visual_clues(px)
    close(x[ids == EXTRA], getattr(m, f"{mode}_perceiver")(clues).flatten(0, 1))  # tile order = sample order
    close(x[ids == CTX], m.mlp1(clues).flatten(0, 1))
    text = (ids != EXTRA) & (ids != CTX)
    close(x[text], m.decoder.embedding(ids)[text])


def test_mean_mode_fills_extra_with_the_perceivers_average_and_ignores_the_gate(m):
    """The paper's ablation (demo.sh --ablations): EXTRA = the three perceivers' mean; the gate's weights unused."""
    m.cfg.mpgui_mode = "mean"
    ids, mask, labels, _ = collate([chat(1), chat(3)])
    px = pixels(4)
    x = m.embed(ids, mask, labels, px)
    clues = m.visual_clues(px)
    want = torch.stack([getattr(m, f"{p}_perceiver")(clues) for p in PERCEIVERS]).mean(0)
    close(x[ids == EXTRA], want.flatten(0, 1))
    close(x[ids == CTX], m.mlp1(clues).flatten(0, 1))
    gate = list(m.fusion_gate.parameters())
    perceivers = [p for n in PERCEIVERS for p in getattr(m, f"{n}_perceiver").parameters()]
    flags = [p.requires_grad for p in gate + perceivers]
    with torch.enable_grad():
        for p in gate + perceivers:
            p.requires_grad_(True)
        grads = torch.autograd.grad(m.embed(ids, mask, labels, px).sum(), gate + perceivers, allow_unused=True)
    for p, f in zip(gate + perceivers, flags):
        p.requires_grad_(f)
    assert all(g is None for g in grads[:len(gate)]) and all(g is not None for g in grads[len(gate):])


def test_the_three_perceivers_are_separate_weights(m):
    params = {n: dict(getattr(m, f"{n}_perceiver").named_parameters()) for n in PERCEIVERS}
    ptrs = [p.data_ptr() for ps in params.values() for p in ps.values()]
    assert len(ptrs) == len(set(ptrs)) == 3 * 8
    for a, b in ((0, 1), (0, 2), (1, 2)):
        pa, pb = params[PERCEIVERS[a]], params[PERCEIVERS[b]]
        assert all(not torch.equal(pa[k], pb[k]) for k in pa if k.endswith("weight") and not k.startswith("0."))
    clues = m.visual_clues(pixels(2))
    outs = [getattr(m, f"{n}_perceiver")(clues) for n in PERCEIVERS]
    assert min((outs[a] - outs[b]).abs().max() for a, b in ((0, 1), (0, 2), (1, 2))) > 1e-3


def official_fusion(m, ids, labels, px, gate_mask):
    """The released FusionGate, per tile: nn.MultiheadAttention(batch_first, 4 heads) align layer (a tile's mlp1
    tokens query its own sample's embeddings after the <IMG_CONTEXT> splice), then the result queries
    cat([graphical, textual, spatial], 1). key_padding_mask True = ignore."""
    C = m.cfg.hidden_size
    align, multi = nn.MultiheadAttention(C, 4, batch_first=True), nn.MultiheadAttention(C, 4, batch_first=True)
    align.load_state_dict(m.fusion_gate.align_layer.state_dict())
    multi.load_state_dict(m.fusion_gate.multi_perceiver_att.state_dict())
    align.eval(), multi.eval()
    clues = m.visual_clues(px)
    vit = m.mlp1(clues)
    g, t, s = (getattr(m, f"{n}_perceiver")(clues) for n in ("graphical", "textual", "spatial"))
    x = m.decoder.embedding(ids).clone()
    x[ids == CTX] = vit.flatten(0, 1)
    out, tile = [], 0
    for b in range(len(ids)):
        row = ids[b].tolist()
        ignore = (ids[b] == EXTRA) | (ids[b] == PAD)
        if gate_mask == "prompt_only":  # also the supervised answer and everything from the last <|im_start|> on
            last = len(row) - 1 - row[::-1].index(IM_START)
            ignore = ignore | (labels[b] != -100) | (torch.arange(len(row)) >= last)
        for _ in range(row.count(CTX) // N):
            q = align(vit[tile:tile + 1], x[b:b + 1], x[b:b + 1], key_padding_mask=ignore[None])[0]
            kv = torch.cat([g[tile:tile + 1], t[tile:tile + 1], s[tile:tile + 1]], 1)
            out.append(multi(q, kv, kv)[0][0])
            tile += 1
    assert tile == len(px)
    return torch.cat(out)


@pytest.mark.parametrize("gate_mask", ["official", "prompt_only"])
def test_fusion_mode_equals_the_official_gate_built_from_torch_mha(m, gate_mask):
    m.cfg.mpgui_mode, m.cfg.gate_mask = "fusion", gate_mask
    ids, mask, labels, _ = collate([chat(1), chat(3, answer=(50, 51)), chat(2, user=(25,))])
    px = pixels(6)
    x = m.embed(ids, mask, labels, px)
    close(x[ids == EXTRA], official_fusion(m, ids, labels, px, gate_mask), 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# 4-5. key layout; MP-GUI built on an InternVL checkpoint


def test_state_dict_is_the_official_key_layout(loaded):
    want = file_tensors(MPGUI_DIR)
    got = loaded.state_dict()
    assert sorted(got) == sorted(want)
    assert all(tuple(got[k].shape) == tuple(want[k].shape) for k in want)


def xavier_bound(w):
    fan_out, fan_in = w.shape
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_mpgui_on_an_internvl_checkpoint_initialises_the_absent_parts():
    torch.manual_seed(0)
    m = load.load_model(IVL2_DIR, mpgui=True)
    assert isinstance(m, model.MPGUI) and sorted(m.initialised) == sorted(model.MPGUI.PARTS)
    assert m.cfg.extra_token_id is None  # this tokenizer has no <EXTRA_IMG_CONTEXT>
    file = file_tensors(IVL2_DIR)
    state = m.state_dict()
    assert set(state) - set(file) == {k for k in state if k.split(".")[0] in model.MPGUI.PARTS}
    for k, t in file.items():  # the LLM, ViT and mlp1 exactly as stored
        assert torch.equal(state[k], t), k
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in m.parameters())
    for name in PERCEIVERS:
        p = getattr(m, f"{name}_perceiver")
        linears = [x for x in p if isinstance(x, nn.Linear)]
        assert len(linears) == 3
        for lin in linears:
            bound = xavier_bound(lin.weight)
            assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
            assert lin.weight.abs().max() <= bound
            assert abs(lin.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.03  # 8k-16k draws: ~1% noise
        assert torch.equal(p[0].weight, torch.ones_like(p[0].weight))  # LayerNorm 1 / 0
        assert torch.equal(p[0].bias, torch.zeros_like(p[0].bias))
    w = [getattr(m, f"{n}_perceiver")[1].weight for n in PERCEIVERS]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # independent draws
    for att in (m.fusion_gate.align_layer, m.fusion_gate.multi_perceiver_att):
        assert torch.equal(att.in_proj_bias, torch.zeros_like(att.in_proj_bias))
        assert torch.equal(att.out_proj.bias, torch.zeros_like(att.out_proj.bias))
        bound = xavier_bound(att.in_proj_weight)
        assert att.in_proj_weight.abs().max() <= bound
        assert abs(att.in_proj_weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
        assert att.out_proj.weight.abs().max() <= 1 / math.sqrt(m.cfg.hidden_size)  # kaiming_uniform(a=sqrt(5))
    m.cfg.extra_token_id = EXTRA  # it runs once told the EXTRA id
    ids, mask, labels, _ = collate([chat(1), chat(3)])
    with torch.no_grad():
        assert m(ids, mask, labels=labels, pixel_values=pixels(4)).isfinite().all()


# ----------------------------------------------------------------------------------------------------------------------
# 6. resize_vocab


def test_resize_vocab_adds_mean_rows_and_keeps_old_logits():
    m = load.load_model(IVL2_DIR)
    V = m.cfg.vocab_size
    emb, head = m.decoder.tok_embeddings, m.head
    old_in, old_out = emb.weight.detach().clone(), head.weight.detach().clone()
    ids = torch.tensor([[BOS, IM_START, 10, 20, 30, 40, IM_END, 50, 60]])
    with torch.no_grad():
        before = m(ids)
    m.resize_vocab(V + 1)
    emb, head = m.decoder.tok_embeddings, m.head
    assert m.cfg.vocab_size == V + 1 and emb.weight.shape[0] == head.weight.shape[0] == V + 1
    assert emb.num_embeddings == head.out_features == V + 1
    assert emb.weight is not head.weight and isinstance(head.weight, nn.Parameter)
    assert {id(p) for p in m.parameters()} >= {id(emb.weight), id(head.weight)}
    assert torch.equal(emb.weight[:V], old_in) and torch.equal(head.weight[:V], old_out)
    close(emb.weight[V], old_in.mean(0))
    close(head.weight[V], old_out.mean(0))
    with torch.no_grad():
        after = m(ids)
        assert after.shape == (1, ids.shape[1], V + 1)
        close(after[..., :V], before)
        close(m.embed(torch.tensor([[V]]))[0, 0], old_in.mean(0))  # the new id embeds as the mean row


# ----------------------------------------------------------------------------------------------------------------------
# 7. degenerate batches and token / tile mismatches


@pytest.mark.parametrize("gate_mask", ["official", "prompt_only"])
@pytest.mark.parametrize("mode", MODES)
def test_text_only_and_zero_tile_batches_run(m, mode, gate_mask):
    m.cfg.mpgui_mode, m.cfg.gate_mask = mode, gate_mask
    ids, mask, labels, _ = collate([chat(0), chat(0, user=(20,), answer=(50, 51, 52, 53))])
    text = m(ids, mask, labels=labels)
    zero = m(ids, mask, labels=labels, pixel_values=torch.zeros(0, 3, 112, 112))
    assert text.shape == (2, ids.shape[1], m.cfg.vocab_size) and text.isfinite().all()
    close(zero, text)
    close(m(ids, mask), text)  # inference


def drop_one(samples, b, token):
    ids, labels, start = samples[b]
    i = ids.index(token)
    samples[b] = (ids[:i] + ids[i + 1:], labels[:i] + labels[i + 1:], start - 1)
    return samples


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("token", [EXTRA, CTX])
def test_missing_image_token_raises_with_the_counts(m, mode, token):
    m.cfg.mpgui_mode = mode
    ids, mask, labels, _ = collate(drop_one([chat(1), chat(3)], 1, token))
    counts = r"\[16, 47\] EXTRA" if token == EXTRA else r"\[16, 47\] context"
    with pytest.raises(ValueError, match=counts + r".*whole tiles of 16 for the 4 tiles"):
        m(ids, mask, labels=labels, pixel_values=pixels(4))
    ids, mask, labels, _ = collate([chat(1), chat(3)])
    with pytest.raises(ValueError, match=r"64 tokens, 0 features"):
        m(ids, mask, labels=labels)  # image tokens, no pixels


def moved_tile(ctx0, extra0, ctx1, extra1):
    """Two samples whose token totals match 4 tiles, but not sample by sample."""
    def one(ctx, extra):
        ids = [BOS, IM_START, 20, IMG] + [CTX] * ctx + [EXTRA] * extra + [IMG_END, IM_END]
        return ids, [-100] * len(ids), len(ids)
    return collate([one(ctx0, extra0), one(ctx1, extra1)])


@pytest.mark.parametrize("mode", ["textual", "fusion"])
@pytest.mark.parametrize("layout", [(N, 2 * N, 3 * N, 2 * N), (N + 1, N, 3 * N - 1, 3 * N)],
                         ids=["extra_moved", "ctx_not_whole_tiles"])
def test_per_sample_token_tile_mismatch_raises(m, mode, layout):
    """Counts are checked sample by sample, so equal batch totals cannot hide a tile spliced into another sample."""
    m.cfg.mpgui_mode = mode
    ids, mask, labels, _ = moved_tile(*layout)
    assert (ids == CTX).sum() == (ids == EXTRA).sum() == 4 * N
    with pytest.raises(ValueError, match="tokens"):
        m(ids, mask, labels=labels, pixel_values=pixels(4))
