"""ShowUI's UI-guided visual token selection against plain-loop references written here: the UI graph (union-find
from scratch over merged 28x28 blocks), the keep rule, the lm_skip_layer parser, and whole forwards where each
selecting layer runs on its kept subsequence through the layer's own submodules. With selection off the model is the
plain model, bit for bit."""
import math
import os
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import load
import model
import token_select

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "fixtures", "qwen2_vl_tiny")
THR = 81.0  # about the median block distance of the fixture's images: components of many sizes


# ---------------------------------------------------------------------------------------------------------------------
# references: plain Python loops


def ref_ui_graph(pixel_values, grid_thw, merge, threshold):
    ids, row, offset = [], 0, 0
    for t, h, w in grid_thw.tolist():
        bh, bw = h // merge, w // merge
        n = t * bh * bw
        block = [pixel_values[row + k * merge * merge: row + (k + 1) * merge * merge].flatten().double()
                 for k in range(n)]
        row += t * h * w
        parent = {k: k for k in range(n)}

        def root(a):
            while parent[a] != a:
                a = parent[a]
            return a
        for tt in range(t):
            for i in range(bh):
                for j in range(bw):
                    cur = tt * bh * bw + i * bw + j
                    for ni, nj in ((i, j + 1), (i + 1, j)):
                        if ni < bh and nj < bw:
                            nb = tt * bh * bw + ni * bw + nj
                            if math.sqrt(float(((block[cur] - block[nb]) ** 2).sum())) < threshold:
                                parent[root(nb)] = root(cur)  # any union order: ids come from the relabelling
        names = {}
        for k in range(n):  # number components by first appearance in raster order
            names.setdefault(root(k), len(names))
        ids += [offset + names[root(k)] for k in range(n)]
        offset += len(names)
    return ids


def ref_select(assign, ratio):
    keep = [a == -1 for a in assign]
    for comp in dict.fromkeys(a for a in assign if a != -1):
        pos = [p for p, a in enumerate(assign) if a == comp]
        n = len(pos)
        k = max(1, n - int(round(n * ratio)))  # Python's round: half to even
        for i in torch.linspace(0, n - 1, steps=k).long().tolist():  # upstream's float32 linspace, truncated
            keep[pos[i]] = True
    return keep


def ref_layer(layer, x, cos, sin):
    """One decoder layer over the tokens x (T, C) alone, causal among them, built from the layer's submodules."""
    a, T = layer.self_attn, len(x)
    h = layer.input_layernorm(x)
    q, k, v = (p(h).view(T, -1, a.d).transpose(0, 1) for p in (a.q_proj, a.k_proj, a.v_proj))  # (heads, T, D)

    def rot(t):
        return t * cos + torch.cat([-t[..., a.d // 2:], t[..., :a.d // 2]], -1) * sin
    q, k = rot(q), rot(k).repeat_interleave(a.h // a.hkv, 0)
    v = v.repeat_interleave(a.h // a.hkv, 0)
    s = (q @ k.transpose(1, 2)) / math.sqrt(a.d)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    x = x + a.o_proj((torch.softmax(s, -1) @ v).transpose(0, 1).reshape(T, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def ref_logits(m, ids, pv, grid, on, ratio, threshold):
    """One unpadded sample: layers with on[i] run on the kept tokens only, the others pass through unchanged."""
    vision = dict(pixel_values=pv, image_grid_thw=grid)
    x = m.embed(ids[None], **vision)[0]
    pos, _ = m.positions(ids[None], **vision)
    cos, sin = (r[0, 0] for r in model.rope(pos, m.cfg, x.dtype, len(ids)))
    comps = iter(ref_ui_graph(pv, grid, m.cfg.vit_merge, threshold))
    assign = [next(comps) if t == m.cfg.image_token_id else -1 for t in ids.tolist()]
    idx = [p for p, k in enumerate(ref_select(assign, ratio)) if k]
    for i, layer in enumerate(m.model.layers):
        if on[i]:
            x = x.clone()
            x[idx] = ref_layer(layer, x[idx], cos[idx], sin[idx])
        else:
            x = ref_layer(layer, x, cos, sin)
    return m.lm_head(m.model.norm(x))


# ---------------------------------------------------------------------------------------------------------------------
# fixtures


def tiny_case():
    m = load.load_model(TINY, dtype=torch.float32).eval()
    c = load_file(os.path.join(TINY, "cases.safetensors"))
    return m, c


def batch(c):
    return c["input_ids"], dict(attention_mask=c["attention_mask"], pixel_values=c["pixel_values"],
                                image_grid_thw=c["image_grid_thw"])


def per_sample(m, c):
    """Each fixture sample unpadded with its own images (2 and 1)."""
    out, img, rows = [], 0, c["image_grid_thw"].prod(-1).tolist()
    for ids, mask in zip(c["input_ids"], c["attention_mask"]):
        ids, n, k = ids[mask.bool()], int((ids == m.cfg.image_token_id).sum()), 0
        while n > 0:
            n -= rows[img + k] // 4
            k += 1
        a = int(sum(rows[:img]))
        out.append((ids, c["pixel_values"][a:a + int(sum(rows[img:img + k]))], c["image_grid_thw"][img:img + k]))
        img += k
    return out


def select(m, layers, ratio, threshold=THR, test=True):
    m.cfg.lm_skip_layer, m.cfg.lm_skip_ratio = layers, ratio
    m.cfg.uigraph_threshold, m.cfg.uigraph_test = threshold, test


# ---------------------------------------------------------------------------------------------------------------------
# the UI graph


def block_pixels(values, merge=2, row=1176):
    """pixel_values whose blocks are constant: values (bh, bw) -> (bh*bw*merge^2, row) in merge-block row order."""
    v = torch.as_tensor(values, dtype=torch.float32)
    return v.flatten().repeat_interleave(merge * merge)[:, None].expand(-1, row).clone()


def test_ui_graph_hand_made_regions():
    """A 112x112 screenshot (4x4 image tokens): white top half, red and blue bottom quarters -> 3 components."""
    img = Image.new("RGB", (112, 112), "white")
    img.paste((220, 40, 40), (0, 56, 56, 112))
    img.paste((40, 80, 220), (56, 56, 112, 112))
    pv, grid = data.qwen_image(img, 4 * 28 * 28, 16 * 28 * 28)
    assert grid.tolist() == [1, 8, 8]
    ids = token_select.ui_graph(pv, grid[None], 2, 1.0)
    assert ids.tolist() == [0] * 8 + [1, 1, 2, 2] * 2
    # a one-pixel line through the top row of blocks: those 4 blocks are alike, unlike the plain white ones below;
    # a second image continues the numbering after the first one's 3 components
    img2 = Image.new("RGB", (112, 112), "white")
    img2.paste((0, 0, 0), (0, 10, 112, 11))
    pv2, grid2 = data.qwen_image(img2, 4 * 28 * 28, 16 * 28 * 28)
    ids = token_select.ui_graph(torch.cat([pv, pv2]), torch.stack([grid, grid2]), 2, 1.0)
    assert ids.tolist()[16:] == [3] * 4 + [4] * 12
    assert torch.bincount(ids).tolist() == [8, 4, 4, 4, 12]


def test_ui_graph_raster_numbering_and_strict_threshold():
    # a U of value 0 around two other blocks: the U's right arm joins through the bottom row, so block (0, 2) gets
    # the U's id 0 though it is reached last; then B = 1 and C = 2 by first appearance
    u = [[0, 5, 0], [0, -5, 0], [0, 0, 0]]
    grid = torch.tensor([[1, 6, 6]])
    assert token_select.ui_graph(block_pixels(u), grid, 2, 1.0).tolist() == [0, 1, 0, 0, 2, 0, 0, 0, 0]
    assert token_select.ui_graph(block_pixels(u), grid, 2, 1.0).tolist() == ref_ui_graph(block_pixels(u), grid, 2, 1.0)
    # two blocks whose distance is exactly the threshold stay apart (strict <); just below, they join
    for d, want in ((1.0, [0, 1]), (0.999, [0, 0])):
        pv = torch.zeros(8, 1176)
        pv[5, 17] = d
        assert token_select.ui_graph(pv, torch.tensor([[1, 2, 4]]), 2, 1.0).tolist() == want


@pytest.mark.parametrize("threshold", [0.0, 79.0, THR, 84.0, 1e9])
def test_ui_graph_matches_reference_on_fixture_images(threshold):
    _, c = tiny_case()
    ids = token_select.ui_graph(c["pixel_values"], c["image_grid_thw"], 2, threshold)
    assert ids.tolist() == ref_ui_graph(c["pixel_values"], c["image_grid_thw"], 2, threshold)
    n = c["image_grid_thw"].prod(-1).div(4).long().tolist()
    if threshold == 0.0:  # nothing is closer than 0: every token alone
        assert ids.tolist() == list(range(sum(n)))
    if threshold == 1e9:  # everything joins: one component per image
        assert ids.tolist() == [0] * n[0] + [1] * n[1] + [2] * n[2]
    if threshold == THR:
        assert 10 < len(set(ids.tolist())) < sum(n) - 10


# ---------------------------------------------------------------------------------------------------------------------
# the keep rule


def test_select_mask_rule():
    # text (-1) kept; singletons kept; n=4, r=.5 -> 2 kept (ends); n=5 -> round(2.5) = 2 skipped -> 3 kept (0, 2, 4);
    # n=3 -> round(1.5) = 2 skipped -> 1 kept (the first)
    assign = torch.tensor([-1, 0, 0, 0, 0, -1, 1, 2, 2, 2, 2, 2, 3, 3, 3])
    keep = token_select.select_mask(assign, 0.5)
    assert keep.tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0]
    assert token_select.select_mask(assign, 0.0).all()
    assert token_select.select_mask(assign, 1.0).tolist() == [1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0]


def test_select_mask_matches_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        T = int(torch.randint(1, 300, (1,), generator=g))
        assign = torch.randint(-1, int(torch.randint(1, 40, (1,), generator=g)), (T,), generator=g)
        for ratio in (0.1, 0.25, 0.5, 0.53, 0.7, 1.0):
            assert token_select.select_mask(assign, ratio).tolist() == ref_select(assign.tolist(), ratio), (trial, ratio)


def test_select_mask_random():
    assign = torch.tensor([-1] * 5 + [0] * 10 + [1] + [2] * 7 + [-1] * 3)[torch.randperm(26)]
    picks = set()
    for seed in range(10):
        keep = token_select.select_mask(assign, 0.5, rand=True, generator=torch.Generator().manual_seed(seed))
        assert keep[assign == -1].all() and keep[assign == 1].all()
        assert int(keep[assign == 0].sum()) == 5 and int(keep[assign == 2].sum()) == 3  # 7 - round(3.5) = 3
        picks.add(tuple(keep.tolist()))
    assert len(picks) > 1  # random subsets, not the evenly spaced one each time


# ---------------------------------------------------------------------------------------------------------------------
# lm_skip_layer


def test_parse_skip_layers():
    P = token_select.parse_skip_layers
    assert P("[1,28,0]", 28) == [0] * 28 and P("[1,28,0]", 2) == [0, 0]
    assert P("[1,28,1]", 28) == [1] * 28 and P("[1,28,1]", 2) == [1, 1]  # ends past the last layer are clipped
    even = ",".join(f"[{i},{i},1]" for i in range(2, 27, 2))
    assert P(even, 28) == [int(i % 2 == 1 and i < 26) for i in range(28)]
    assert P("[1,28,1],[5,8,0]", 28) == [1] * 4 + [0] * 4 + [1] * 20  # later ranges override
    assert P(" [ 1 , 3 , 1 ] , [2,2,0] ", 4) == [1, 0, 1, 0]
    for bad in ["[1,28]", "1,28,0", "[0,3,1]", "[5,3,1]", "[1,28,2]", "[1,28,1];[2,2,0]", "", "[1,2,1]x", [1]]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            P(bad, 2)
    cfg = load.load_model(TINY).cfg
    cfg.lm_skip_layer = "[1,2,1"
    with pytest.raises(ValueError, match=re.escape("'[1,2,1'")):
        model.Qwen2VL(cfg)


# ---------------------------------------------------------------------------------------------------------------------
# the model


def test_off_is_the_plain_model():
    m, c = tiny_case()
    ids, kw = batch(c)
    plain = m(ids, **kw)
    for mode, layers, ratio, test, train in [("eval", "[1,28,1]", 0.5, False, True),  # eval: no graph by default
                                             ("eval", "[1,28,0]", 0.5, True, True),  # no layer on
                                             ("eval", "[1,28,1]", 0.0, True, True),  # ratio 0
                                             ("train", "[1,28,1]", 0.5, True, False)]:  # uigraph_train off
        select(m, layers, ratio, test=test)
        m.cfg.uigraph_train = train
        m.train(mode == "train")
        assert m.token_keep(ids, None, kw["pixel_values"], kw["image_grid_thw"]) is None
        assert torch.equal(m(ids, **kw), plain), (mode, layers, ratio)


def test_all_singletons_change_nothing():
    m, c = tiny_case()
    ids, kw = batch(c)
    plain = m(ids, **kw)
    select(m, "[1,28,1]", 0.5, threshold=0.0)  # every block its own component: everything kept
    assert all(k.all() for k in m.token_keep(ids, None, kw["pixel_values"], kw["image_grid_thw"]))
    torch.testing.assert_close(m(ids, **kw), plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers", ["[1,28,1]", "[2,2,1]", "[1,1,1]"])
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_batched_selection_matches_per_layer_reference(layers, ratio):
    """The padded batch (2 samples that keep different numbers of tokens) against the loop reference per sample."""
    m, c = tiny_case()
    ids, kw = batch(c)
    select(m, layers, ratio)
    keep = m.token_keep(ids, None, kw["pixel_values"], kw["image_grid_thw"])
    on = token_select.parse_skip_layers(layers, m.cfg.num_layers)
    assert [k is not None for k in keep] == [bool(f) for f in on]
    kept = next(k for k in keep if k is not None).sum(1)
    assert kept[0] != kept[1] and bool((kept < ids.shape[1]).all())
    with torch.no_grad():
        out = m(ids, **kw)
        for b, (sid, pv, grid) in enumerate(per_sample(m, c)):
            ref = ref_logits(m, sid, pv, grid, on, ratio, THR)
            torch.testing.assert_close(out[b, :len(sid)], ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(m(sid[None], pixel_values=pv, image_grid_thw=grid)[0], ref, rtol=1e-4,
                                       atol=1e-5)
        select(m, "[1,28,0]", 0.0)
        assert (m(ids, **kw) - out).abs().max() > 1e-3  # selection did change the result


def test_unpadded_batch_keeping_different_counts():
    """No attention mask, but the two samples keep different numbers of tokens: the packed layout pads them."""
    m, c = tiny_case()
    (_, pv0, g0), (s1, pv1, g1) = per_sample(m, c)
    img, n1 = m.cfg.image_token_id, int(g1.prod()) // 4
    start = int((s1 == img).nonzero()[0])
    pvb, gb = pv0[int(g0[0].prod()):], g0[1:]  # sample 0's second image (15 tokens) in sample 1's text
    sb = torch.cat([s1[:start], torch.full((int(gb.prod()) // 4,), img), s1[start + n1:]])
    sb = torch.cat([sb, torch.full((len(s1) - len(sb),), 7)])
    ids, pv, grid = torch.stack([s1, sb]), torch.cat([pv1, pvb]), torch.cat([g1, gb])
    select(m, "[1,28,1]", 0.5)
    kept = m.token_keep(ids, None, pv, grid)[0].sum(1)
    assert kept[0] != kept[1] and bool((kept < len(s1)).all())
    with torch.no_grad():
        out = m(ids, pixel_values=pv, image_grid_thw=grid)
        for b, (sid, p, g) in enumerate([(s1, pv1, g1), (sb, pvb, gb)]):
            torch.testing.assert_close(out[b], ref_logits(m, sid, p, g, [1, 1], 0.5, THR), rtol=1e-4, atol=1e-5)


def test_training_step_random_selection_and_checkpointing():
    m, c = tiny_case()
    ids, kw = batch(c)
    select(m, "[1,28,1]", 0.5)
    m.cfg.lm_skip_rand = True
    m.train()
    torch.manual_seed(0)
    draws = [m.token_keep(ids, None, kw["pixel_values"], kw["image_grid_thw"]) for _ in range(2)]
    assert draws[0][0] is draws[0][1]  # one draw per forward, shared by the selecting layers (ShowUI's uimask_pre)
    assert not torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][0].sum(1), draws[1][0].sum(1))
    m.eval()  # eval: never random, the evenly spaced tokens
    even = m.token_keep(ids, None, kw["pixel_values"], kw["image_grid_thw"])[0]
    assert torch.equal(even, m.token_keep(ids, None, kw["pixel_values"], kw["image_grid_thw"])[0])
    assert torch.equal(even.sum(1), draws[0][0].sum(1)) and not torch.equal(even, draws[0][0])
    m.train()
    m.cfg.lm_skip_layer = "[2,2,1]"
    assert m.token_keep(ids, None, kw["pixel_values"], kw["image_grid_thw"])[0] is None
    m.cfg.lm_skip_layer = "[1,28,1]"
    losses, grads = [], []
    for ckpt in (False, True):
        for layer in m.model.layers:
            layer.checkpointing = ckpt
        m.zero_grad()
        torch.manual_seed(1)
        loss = m(ids, **kw)[kw["attention_mask"].bool()].logsumexp(-1).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(m.model.layers[0].mlp.down_proj.weight.grad.clone())
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_selection_with_a_cache_is_an_error():
    m, c = tiny_case()
    ids, kw = batch(c)
    m.generate(ids, max_new_tokens=2, **kw)  # default: no selection in eval, generation works
    select(m, "[1,28,1]", 0.5)
    with pytest.raises(ValueError, match="KV cache"):
        m.generate(ids, max_new_tokens=2, **kw)
