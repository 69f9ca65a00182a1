"""Attention maps from the kernels' statistics against the materialised ``hook_pattern`` (numpy), on every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from map_cases import VLM_FAMILIES, case, patterns
from scipy.stats import entropy as sp_entropy

from analyses.attention_maps import (
    MethodNotApplicableError,
    attention_map,
    fuse_heads,
    gradient_weighted_attention,
    pool_grid,
    relative_attention,
    two_hop_flow,
)
from hooked_vlm.families.llava_inputs import GRID


def _last_and_text(lay):
    text = (lay.kind[0] == 0).nonzero().flatten().tolist()
    return {"last": [int(lay.last_token(0))], "text": text}


@pytest.mark.slow
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_lm_map_equals_materialised_pattern(family):
    """Per key, per layer and head: the group's mean attention row, read off hook_pattern in numpy."""
    model, inputs = case(family)
    lay = model.layout(**inputs)
    groups = _last_and_text(lay)
    amap = attention_map(model, inputs, groups)
    pats = patterns(model, inputs)
    assert amap.values.shape[0] == len(pats) and amap.queries == ["last", "text"]
    for li, layer in enumerate(amap.layers):
        p = pats[layer][0].numpy()  # H L L
        for gi, pos in enumerate(groups.values()):
            want = p[:, pos, :].mean(axis=1)  # H L
            np.testing.assert_allclose(amap.values[li, 0, :, gi].numpy(), want, atol=2e-5)


def test_vision_tower_map_qwen_and_clip():
    """Vision-tower maps from query rows (Qwen block-diagonal tower; CLIP [CLS]) equal the tower's patterns."""
    model, inputs = case("qwen2-vl-image")
    amap = attention_map(model, inputs, {"rows": [0, 1, 2, 3]}, tower="vision")
    pats = patterns(model, inputs, prefix="vision.")
    for li, layer in enumerate(amap.layers):
        want = pats[layer][0, :, [0, 1, 2, 3], :].mean(1).numpy()
        np.testing.assert_allclose(amap.values[li, 0, :, 0].numpy(), want, atol=2e-5)
    grid = amap.grid(image=0)  # [layers, H, QG, t, rows, cols] on the patch grid
    t, h, w = model.layout(**inputs).items[0].grid_thw
    assert grid.shape[-3:] == (t, h, w)
    clip, cin = case("clip")
    cmap = attention_map(clip, cin, [0], tower="vision")
    cp = patterns(clip, cin, prefix="vision.")
    np.testing.assert_allclose(cmap.values[-1, 0, :, 0].numpy(), cp[1][0, :, 0].numpy(), atol=2e-5)
    tmap = attention_map(clip, cin, [3], tower="text")
    tp = patterns(clip, cin, prefix="text.")
    np.testing.assert_allclose(tmap.values[0, 0, :, 0].numpy(), tp[0][0, :, 3].numpy(), atol=2e-5)


@pytest.mark.parametrize("family", ["qwen2-vl-image", "llava-next", "qwen2.5-vl-video", "gemma3"])
def test_grid_view_places_each_token_at_its_layout_cell(family):
    """grid[f, r, c] is the value at the position the layout gives for that cell (brute force over positions)."""
    model, inputs = case(family)
    lay = model.layout(**inputs)
    vals = torch.arange(lay.seq_len, dtype=torch.float32)[None, None, None, None].expand(1, 1, 1, 1, -1)
    from analyses.attention_maps import AttentionMap

    am = AttentionMap(vals.clone(), [0], ["q"], "lm", lay)
    kw = {"video": 0} if "video" in family else {"image": 0}
    grid = am.grid(**kw)[0, 0, 0]
    _, it = lay.find_item(**kw)
    item_id = lay.items.index(it)
    part = getattr(lay, "part", None)
    seen = 0
    for p in (lay.item[0] == item_id).nonzero().flatten().tolist():
        if part is not None and family == "llava-next" and int(part[0, p]) != GRID:  # crops stitched: GRID tokens only
            continue
        f, r, c = int(lay.frame[0, p]), int(lay.row[0, p]), int(lay.col[0, p])
        if c < 0:
            continue
        assert grid[max(f, 0), r, c] == p
        seen += 1
    assert seen == grid.numel()


def test_pool_grid_mass_preserving_matches_fine_grid_sums():
    """24x24 -> 10x10: each cell's mass spread evenly over a 120x120 common grid, then summed per output block."""
    g = torch.rand(24, 24, generator=torch.Generator().manual_seed(0)).double()
    fine = np.kron(g.numpy(), np.ones((5, 5))) / 25.0  # 120 x 120
    want = fine.reshape(10, 12, 10, 12).sum(axis=(1, 3))
    got = pool_grid(g, 10, mode="mass")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert abs(float(got.sum()) - float(g.sum())) < 1e-4
    dist = pool_grid(g, (10, 10), mode="distribution")
    np.testing.assert_allclose(dist.numpy(), want / want.sum(), rtol=1e-5)
    mean = pool_grid(g, (10, 10), mode="mean")
    np.testing.assert_allclose(mean.numpy(), np.kron(g.numpy(), np.ones((5, 5))).reshape(10, 12, 10, 12).mean(axis=(1, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        pool_grid(g, 10, mode="sum")


def test_relative_attention_and_head_fusion_by_hand():
    task = torch.tensor([[0.2, 0.6, 0.2]])
    generic = torch.tensor([[0.4, 0.3, 0.3]])
    np.testing.assert_allclose(relative_attention(task, generic, eps=0).numpy(), [[0.5, 2.0, 2 / 3]], rtol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        relative_attention(task, generic[:, :2])
    heads = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])  # [H, K], head axis -2 here
    w = np.array([1 / sp_entropy(h) for h in heads.numpy()])
    w = w / w.sum()
    want = (heads.numpy() * w[:, None]).sum(0)
    np.testing.assert_allclose(fuse_heads(heads, "entropy", head_dim=-2, eps=0).numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(fuse_heads(heads, "max", head_dim=-2).numpy(), [0.7, 1 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(fuse_heads(heads, "min", head_dim=-2).numpy(), [1 / 3, 0.2, 0.1], rtol=1e-6)
    with pytest.raises(ValueError, match="head fusion must be"):
        fuse_heads(heads, "median")


def test_shares_sum_to_one_and_match_pattern():
    model, inputs = case("qwen2-vl-image")
    lay = model.layout(**inputs)
    amap = attention_map(model, inputs, "last")
    shares = amap.shares()
    total = sum(shares.values())
    np.testing.assert_allclose(total.numpy(), np.ones_like(total.numpy()), atol=1e-5)
    p = patterns(model, inputs)[1][0, :, -1].numpy()  # H L
    kind = lay.kind[0].numpy()
    np.testing.assert_allclose(shares["image"][1, 0, :, 0].numpy(), p[:, kind == 1].sum(-1), atol=2e-5)
    np.testing.assert_allclose(shares["bos"][1, 0, :, 0].numpy(), p[:, 0], atol=2e-5)


@pytest.mark.parametrize("family", ["qwen2-vl-image", "gemma3"])
def test_gradient_weighted_attention_matches_pattern_gradients(family):
    """A * ReLU(dm/dA) on the query rows equals the same product from the materialised pattern's autograd."""
    model, inputs = case(family)

    def metric(logits):
        return torch.log_softmax(logits[:, -1], -1)[:, 7]

    a, gw = gradient_weighted_attention(model, inputs, metric, query=[-1, -2])
    keep = {}

    def grab(i):
        def fn(p, hook):
            p.retain_grad()
            keep[i] = p
            return p
        return fn

    n = len(model.blocks)
    out = model.run_with_hooks(**inputs, fwd_hooks=[(f"blocks.{i}.attn.hook_pattern", grab(i)) for i in range(n)])
    metric(out).sum().backward()
    L = out.shape[1]
    for i in range(n):
        pa = keep[i].detach()[0][:, [L - 1, L - 2]]
        pg = keep[i].grad[0][:, [L - 1, L - 2]]
        np.testing.assert_allclose(a[i, 0].numpy(), pa.numpy(), atol=2e-5)
        np.testing.assert_allclose(gw[i, 0].numpy(), (pa * pg.clamp(min=0)).numpy(), atol=2e-5)


def test_two_hop_flow_matches_numpy():
    model, inputs = case("qwen2-vl-image")
    lay = model.layout(**inputs)
    image = lay.positions(image=0).tolist()
    text = (lay.kind[0] == 0).nonzero().flatten().tolist()
    flow = two_hop_flow(model, inputs, source=image, via=text, target=-1)
    pats = {i: p[0].mean(0).numpy() for i, p in patterns(model, inputs).items()}  # head mean, L L
    want = (pats[1][-1, text] * pats[0][text][:, image].sum(-1)).sum()
    assert flow.shape == (2, 2) and torch.isnan(flow[1, 0]) and torch.isnan(flow[0, 0])
    np.testing.assert_allclose(float(flow[0, 1]), want, rtol=1e-4)


def test_errors_are_explicit():
    clip, cin = case("clip")
    with pytest.raises(MethodNotApplicableError, match="has no language model"):
        attention_map(clip, cin, "last")
    model, inputs = case("qwen2-vl-image")
    with pytest.raises(ValueError, match="select no position"):
        attention_map(model, inputs, {"nothing": []})
    with pytest.raises(ValueError, match="do not exist"):
        attention_map(model, inputs, "last", layers=[5])
    with pytest.raises(ValueError, match="unknown query"):
        attention_map(model, inputs, "first")


@pytest.mark.parametrize("family", ["qwen2-vl-image", "gemma3"])
def test_rows_route_equals_column_route(family):
    """Few query rows use exact rows; many use the column pass; both equal the pattern (plain causal / windowed)."""
    from analyses.attention_maps import capture_qk, query_weights, weighted_attention

    model, inputs = case(family)
    got = {}

    def on_layer(s):
        w, _ = query_weights({"a": [1, 4, 6], "b": [-1]}, None, s.q.shape[2], 1)
        got[s.layer] = (weighted_attention(s, w, rows_limit=64), weighted_attention(s, w, rows_limit=0))

    with torch.no_grad(), capture_qk(model, on_layer):
        model(**inputs)
    pats = patterns(model, inputs)
    for layer, (rows, cols) in got.items():
        p = pats[layer][0]
        want = torch.stack([p[:, [1, 4, 6]].mean(1), p[:, -1]], dim=1)  # H QG L
        np.testing.assert_allclose(rows[0].numpy(), want.numpy(), atol=2e-5)
        np.testing.assert_allclose(cols[0].numpy(), want.numpy(), atol=2e-5)


def test_qwen25_windowed_vision_tower_map_and_rollout():
    """Qwen2.5-VL's vision tower mixes window and full-attention layers (segment masks): map and rollout vs patterns."""
    from analyses.rollout import rollout

    model, inputs = case("qwen2.5-vl-video")
    amap = attention_map(model, inputs, {"rows": [0, 5, 17]}, tower="vision")
    pats = patterns(model, inputs, prefix="vision.")
    for li, layer in enumerate(amap.layers):
        want = pats[layer][0, :, [0, 5, 17], :].mean(1).numpy()
        np.testing.assert_allclose(amap.values[li, 0, :, 0].numpy(), want, atol=2e-5)
    ro = rollout(model, inputs, [3], tower="vision")
    r = np.eye(pats[0].shape[-1])
    for i in sorted(pats):
        a = 0.5 * np.eye(r.shape[0]) + 0.5 * pats[i][0].mean(0).numpy()
        r = (a / a.sum(-1, keepdims=True)) @ r
    np.testing.assert_allclose(ro.values[0, 0].numpy(), r[3], atol=2e-5)
