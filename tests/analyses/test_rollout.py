"""Rollout against a brute-force numpy matrix product of the materialised patterns; pitfalls from vit-explain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from map_cases import case, patterns

from analyses.attention_maps import MethodNotApplicableError
from analyses.rollout import fuse_attention, gradient_rollout, rollout, rollout_matrix


def _brute_rollout(pats: list[np.ndarray], fusion=np.mean, residual=0.5) -> np.ndarray:
    """Loop-by-loop rollout: fuse heads, mix with identity, renormalise each row (keepdim), multiply top-down."""
    n = pats[0].shape[-1]
    r = np.eye(n)
    for p in pats:
        a = fusion(p, axis=0)
        a = residual * np.eye(n) + (1 - residual) * a
        for i in range(n):
            a[i] = a[i] / a[i].sum()
        r = a @ r
    return r


def test_rollout_matrix_rows_sum_to_one_and_match_brute_force():
    """vit-explain #16: normalising without keepdim divides columns; here every row sums to 1 at every step."""
    g = torch.Generator().manual_seed(0)
    pats = [torch.softmax(torch.randn(3, 7, 7, generator=g), -1) for _ in range(3)]
    r = rollout_matrix(pats)
    np.testing.assert_allclose(r.sum(-1).numpy(), np.ones(7), atol=1e-12)
    np.testing.assert_allclose(r.numpy(), _brute_rollout([p.double().numpy() for p in pats]), atol=1e-12)
    # a rectangular-looking bug (dividing by column sums) would break row sums on a non-doubly-stochastic matrix
    a = 0.5 * np.eye(7) + 0.5 * pats[0].double().mean(0).numpy()
    wrong = a / a.sum(0)  # axis bug
    assert not np.allclose(wrong.sum(-1), 1)
    rmax = rollout_matrix(pats, head_fusion="max")
    np.testing.assert_allclose(rmax.numpy(), _brute_rollout([p.double().numpy() for p in pats], np.max), atol=1e-12)


def test_discard_ratio_zeroes_the_smallest_entries_but_not_the_diagonal():
    attn = torch.tensor([[[0.5, 0.1, 0.4], [0.3, 0.3, 0.4], [0.05, 0.15, 0.8]]])
    fused = fuse_attention(attn, "mean", discard_ratio=0.34)  # 3 of 9 entries: 0.05, 0.1, 0.15
    want = attn[0].clone()
    want[2, 0] = want[0, 1] = want[2, 1] = 0
    assert torch.equal(fused, want)
    fused2 = fuse_attention(attn, "mean", discard_ratio=0.5)  # 4 smallest: 0.05, 0.1, 0.15, one 0.3 (diag kept)
    assert fused2[1, 1] == 0.3 and fused2.diagonal().tolist() == attn[0].diagonal().tolist()


@pytest.mark.parametrize("family", ["qwen2-vl-image", "gemma3", "llava-onevision"])
def test_row_vector_rollout_equals_materialised(family):
    """Kernels' weighted column sums propagated downward == last row of the product of materialised patterns."""
    model, inputs = case(family)
    ro = rollout(model, inputs, "last")
    pats = patterns(model, inputs)
    brute = _brute_rollout([pats[i][0].numpy() for i in sorted(pats)])
    np.testing.assert_allclose(ro.values[0, 0].numpy(), brute[-1], atol=2e-5)
    assert abs(float(ro.values[0, 0].sum()) - 1) < 1e-5
    mat = rollout(model, inputs, "last", method="materialize")
    np.testing.assert_allclose(mat.values[0, 0].numpy(), brute[-1], atol=1e-5)


def test_vision_rollout_clip_cls_and_qwen_segment():
    clip, cin = case("clip")
    ro = rollout(clip, cin, [0], tower="vision")
    pats = patterns(clip, cin, prefix="vision.")
    brute = _brute_rollout([pats[i][0].numpy() for i in sorted(pats)])
    np.testing.assert_allclose(ro.values[0, 0].numpy(), brute[0], atol=2e-5)
    model, inputs = case("qwen2-vl-image")
    ro = rollout(model, inputs, {"first_rows": [0, 1]}, tower="vision")
    pats = patterns(model, inputs, prefix="vision.")
    brute = _brute_rollout([pats[i][0].numpy() for i in sorted(pats)])
    np.testing.assert_allclose(ro.values[0, 0].numpy(), brute[[0, 1]].mean(0), atol=2e-5)
    assert ro.grid(image=0).shape[-3:] == tuple(model.layout(**inputs).items[0].grid_thw)


def test_gradient_rollout_matches_brute_force():
    model, inputs = case("qwen2-vl-image")

    def metric(logits):
        return logits[:, -1, 7]

    ro = gradient_rollout(model, inputs, metric, "last")
    keep = {}

    def grab(i):
        def fn(p, hook):
            p.retain_grad()
            keep[i] = p
            return p
        return fn

    out = model.run_with_hooks(**inputs, fwd_hooks=[(f"blocks.{i}.attn.hook_pattern", grab(i)) for i in range(2)])
    metric(out).sum().backward()
    fused = [np.clip(keep[i].detach()[0].double().numpy() * keep[i].grad[0].double().numpy(), 0, None) for i in range(2)]
    brute = _brute_rollout(fused)
    np.testing.assert_allclose(ro.values[0, 0].numpy(), brute[-1], atol=1e-5)


def test_row_rollout_refuses_what_it_cannot_do():
    model, inputs = case("qwen2-vl-image")
    with pytest.raises(MethodNotApplicableError, match="method='materialize'"):
        rollout(model, inputs, "last", head_fusion="max")
    with pytest.raises(ValueError, match="rollout needs at least one layer"):
        rollout_matrix([])


def test_rollout_with_map_returns_the_same_forwards_attention_map():
    from analyses.attention_maps import attention_map

    model, inputs = case("qwen2.5-vl-video")
    ro = rollout(model, inputs, "last", with_map=True)
    amap = attention_map(model, inputs, "last")
    np.testing.assert_allclose(ro.attention.values.numpy(), amap.values.numpy(), atol=1e-6)
    pats = patterns(model, inputs)
    brute = _brute_rollout([pats[i][0].numpy() for i in sorted(pats)])
    np.testing.assert_allclose(ro.values[0, 0].numpy(), brute[-1], atol=2e-5)
    grid = ro.grid(video=0)  # [QG, slices, rows, cols]
    lay = model.layout(**inputs)
    t, h, w = lay.items[0].merged_grid
    assert grid.shape == (1, t, h, w)
    assert float(grid[0, 1, 0, 2]) == pytest.approx(float(ro.values[0, 0, lay.cell(0, 2, video=0, frame=1)]))


@pytest.mark.parametrize("family", ["llava", "llava-next", "llava-onevision", "llava-dinov2", "gemma3", "llava-next-video"])
def test_llava_and_gemma_vision_tower_maps_rollout_and_patch_views(family):
    """CLIP / SigLIP / DINOv2 towers of LLaVA (every crop or frame is a tower row) and Gemma 3's SigLIP tower:
    maps == the materialised hook_pattern rows, rollout == the brute-force product per tower row, and the patch
    view puts each patch where its crop / frame shows it (any-res crops stitched into the image)."""
    from analyses.attention_maps import attention_map

    model, inputs = case(family)
    amap = attention_map(model, inputs, {"q": [0, 1]}, tower="vision")
    pats = patterns(model, inputs, prefix="vision.")
    assert sorted(pats) == amap.layers
    for li, layer in enumerate(amap.layers):
        want = pats[layer][:, :, [0, 1], :].mean(2).numpy()  # [tower rows, H, N]
        np.testing.assert_allclose(amap.values[li, :, :, 0].numpy(), want, atol=2e-5)
    ro = rollout(model, inputs, [0], tower="vision")
    for row in range(pats[0].shape[0]):
        brute = _brute_rollout([pats[i][row].numpy() for i in sorted(pats)])
        np.testing.assert_allclose(ro.values[row, 0].numpy(), brute[0], atol=2e-5)
    lay = model.layout(**inputs)
    video = family == "llava-next-video"
    view = amap.grid(video=0) if video else amap.grid(image=0)  # [layers, H, QG, frames, rows, cols]
    vals = amap.values[:, :, :, 0]  # [layers, tower rows, H, N]
    if family == "gemma3":
        t, h, w = lay.items[0].grid_thw
        assert view.shape[-3:] == (t, h, w)
        np.testing.assert_allclose(view[:, :, 0, 0].reshape(*view.shape[:2], -1).numpy(), vals[:, 0].numpy())
        return
    side, cls = lay.geometry.side, int(lay.geometry.has_cls)
    it = lay.items[0]
    for f, r, c in np.ndindex(*view.shape[-3:]):
        if video:  # frame f is tower row f
            row, patch = f, cls + r * side + c
        elif it.crop_grid != (0, 0):  # canvas cell (top + r, c) lies in crop (y // side, x // side)
            y, x = it.unpad[0] + r, it.unpad[1] + c
            row, patch = 1 + (y // side) * it.crop_grid[1] + x // side, cls + (y % side) * side + x % side
        else:
            row, patch = 0, cls + r * side + c
        np.testing.assert_allclose(view[:, :, 0, f, r, c].numpy(), vals[:, row, :, patch].numpy())
