"""ShowUI's UI-guided visual token selection (CVPR 2025), in plain PyTorch: a leaf beside perceivers.py.

The screenshot's merged patches form a graph whose connected components are UI elements (`ui_graph`); on the decoder
layers `parse_skip_layers` selects, each component keeps only some of its image tokens (`select_mask`), and those
layers run on the kept tokens alone (`keep_layout` packs them; model.Qwen2Model applies it). Tokens that a layer
skips pass through it unchanged.
"""
import re

import torch


# showlab/ShowUI train.py: parse_layer_type (its lm_skip_layer argument)
def parse_skip_layers(spec, num_layers):
    """ShowUI's `lm_skip_layer` "[start,end,0|1],..." -> one 0/1 flag per layer: 1-indexed inclusive ranges, later
    ones override, ends past the last layer clipped ("[1,28,1]" = every layer, "[1,28,0]" = none)."""
    item = r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*([01])\s*\]"
    ok = isinstance(spec, str) and re.fullmatch(rf"\s*{item}(\s*,\s*{item})*\s*", spec)
    ranges = [tuple(map(int, r)) for r in re.findall(item, spec)] if ok else []
    if not ok or any(not 1 <= a <= b for a, b, _ in ranges):
        raise ValueError(f"lm_skip_layer {spec!r}: expected '[start,end,0|1],...' with 1 <= start <= end")
    on = [0] * num_layers
    for a, b, v in ranges:
        on[a - 1:b] = [v] * len(on[a - 1:b])
    return on


# showlab/ShowUI, its image processor's UI graph (union-find over merged patches)
def ui_graph(pixel_values, image_grid_thw, merge, threshold):
    """ShowUI's UI connected graph. A node is a merged block (one image token: merge^2 consecutive rows of normalised
    values, both temporal copies); it joins its right / bottom neighbour if their L2 distance is < threshold.
    Returns each image token's component id, numbered by first appearance in raster order, image after image."""
    out, row = [], 0
    for t, h, w in image_grid_thw.tolist():
        v = pixel_values[row:row + t * h * w].float().view(t, h // merge, w // merge, -1)  # (t, bh, bw, values)
        row += t * h * w
        node = torch.arange(v.shape[:3].numel()).view(v.shape[:3])
        parent = list(range(node.numel()))

        def find(a):  # union-find; a root is its component's first node in raster order
            while parent[a] != a:
                parent[a] = a = parent[parent[a]]
            return a
        for d, step in ((2, 1), (1, w // merge)):  # right, bottom neighbours
            near = (torch.linalg.vector_norm(v.diff(dim=d), dim=-1) < threshold).cpu()
            for a in node.narrow(d, 0, node.shape[d] - 1)[near].tolist():
                a, b = find(a), find(a + step)
                parent[max(a, b)] = min(a, b)
        roots = torch.tensor([find(a) for a in range(len(parent))])
        out.append(torch.unique(roots, return_inverse=True)[1] + (out[-1].max() + 1 if out else 0))
    return torch.cat(out).to(pixel_values.device)


# showlab/ShowUI model/showui/utils.py: get_select_mask
def select_mask(assign, ratio, rand=False, generator=None):
    """ShowUI's get_select_mask. assign (T,): -1 for text, else a UI-component id. Keeps the text and, of each
    component of n tokens, max(1, n - round(n * ratio)) (round half to even, as Python): evenly spaced
    (float32 linspace(0, n - 1) truncated, as upstream) or, with rand, a random subset. Returns (T,) bool."""
    keep = assign < 0
    pos = (~keep).nonzero().flatten()
    if rand:  # a random order inside each component: its first k tokens are a uniform random subset
        pos = pos[torch.randperm(len(pos), generator=generator).to(pos.device)]
    pos = pos[torch.sort(assign[pos], stable=True).indices]  # grouped by component
    n = torch.unique_consecutive(assign[pos], return_counts=True)[1]
    k = (n - torch.round(n.double() * ratio).long()).clamp(min=1)
    rank = torch.arange(len(pos), device=pos.device) - torch.repeat_interleave(n.cumsum(0) - n, n)
    hit = rank < k.repeat_interleave(n)
    if not rand:
        size = n.repeat_interleave(n)
        for m, km in set(zip(n.tolist(), k.tolist())):
            hit[size == m] = torch.isin(rank[size == m], torch.linspace(0, m - 1, km).long().to(pos.device))
    return keep.index_fill(0, pos[hit], True)


def keep_layout(keep, mask, causal):
    """Each sample's kept positions (keep (B, T) bool) packed left into (B, L): index, validity, and the attention
    mask over kept queries and keys (original order, so still causal); a padded slot sees only itself."""
    n = keep.sum(1)
    idx = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :int(n.max())]  # kept first, in order
    valid = torch.arange(idx.shape[1], device=keep.device) < n[:, None]
    if mask is None and causal and bool(valid.all()):
        return idx, valid, None, True
    (B, T), L = keep.shape, idx.shape[1]  # no cache here, so mask None means plain causal
    full = (mask[:, 0] if mask is not None else torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()[None])
    sub = full.expand(B, T, T)[torch.arange(B, device=keep.device)[:, None, None], idx[:, :, None], idx[:, None, :]]
    return idx, valid, ((sub & valid[:, None]) | torch.eye(L, dtype=torch.bool, device=keep.device))[:, None], False

