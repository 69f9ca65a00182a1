"""Deletion / insertion curves against one-forward-per-step loops written here; AUC by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from map_cases import case

from analyses.faithfulness import auc, deletion_insertion, grid_positions, region_ablation


def answer_prob(logits):
    return torch.softmax(logits[:, -1].float(), -1)[:, 7]


def _score_with_zeroed(model, inputs, positions):
    def put(v, hook):
        v = v.clone()
        v[0, positions] = 0
        return v

    with torch.no_grad():
        return float(answer_prob(model.run_with_hooks(**inputs, fwd_hooks=[("hook_embed", put)])))


def test_auc_trapezoid_by_hand():
    assert auc(np.array([0, 0.5, 1.0]), np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)


@pytest.mark.parametrize("family", ["qwen2-vl-image", "llava"])
def test_token_deletion_insertion_equal_a_manual_loop(family):
    model, inputs = case(family)
    lay = model.layout(**inputs)
    pos = grid_positions(lay, image=0)
    sal = torch.rand(pos.shape, generator=torch.Generator().manual_seed(0))
    cur = deletion_insertion(model, inputs, answer_prob, sal, perturb="tokens", fill="zero", steps=4, n_random=1)
    flat_pos, flat_sal = pos.reshape(-1), sal.reshape(-1)
    order = flat_pos[torch.argsort(flat_sal, descending=True)]
    n = order.numel()
    for s, frac in enumerate(cur.fractions):
        c = int(round(frac * n))
        assert cur.deletion[s] == pytest.approx(_score_with_zeroed(model, inputs, order[:c].tolist()), abs=1e-6)
        assert cur.insertion[s] == pytest.approx(_score_with_zeroed(model, inputs, order[c:].tolist()), abs=1e-6)
    assert cur.aucs["deletion"] == pytest.approx(np.trapezoid(cur.deletion, cur.fractions))
    assert np.isfinite(cur.random_deletion).all()
    assert cur.deletion[-1] == pytest.approx(cur.insertion[0]) and cur.deletion[0] == pytest.approx(cur.insertion[-1])


def test_pixel_deletion_on_clip_boxes():
    """CLIP: perturbing the cell's pixel box with the black baseline, scored as the image-text cosine."""
    from analyses.attribution import clip_match, pixel_baseline

    model, inputs = case("clip")
    sal = torch.tensor([[0.9, 0.1], [0.5, 0.2]])
    cur = deletion_insertion(model, inputs, clip_match, sal, perturb="pixels", fill="black", steps=4, n_random=0)
    x, b = inputs["pixel_values"], pixel_baseline(model, inputs, "black")
    pert = x.clone()
    pert[..., :32, :32] = b[..., :32, :32]  # top cell (0, 0) of a 2x2 grid on 64 px
    with torch.no_grad():
        want = float(clip_match(model(input_ids=inputs["input_ids"], pixel_values=pert)))
    assert cur.deletion[1] == pytest.approx(want, abs=1e-6)


def test_region_ablation_and_qwen_pixel_rows():
    model, inputs = case("qwen2-vl-image")
    lay = model.layout(**inputs)
    img = lay.positions(image=0).tolist()
    res = region_ablation(model, inputs, answer_prob, {"image": img, "first": [1]}, cumulative=True)
    assert res["image"] == pytest.approx(_score_with_zeroed(model, inputs, img), abs=1e-6)
    assert res["first"] == pytest.approx(_score_with_zeroed(model, inputs, img + [1]), abs=1e-6)
    pos = grid_positions(lay, image=0)
    cur = deletion_insertion(model, inputs, answer_prob, torch.ones(pos.shape), perturb="pixels", fill="black", steps=1, n_random=0)
    from analyses.attribution import pixel_baseline

    with torch.no_grad():
        black = dict(inputs, pixel_values=pixel_baseline(model, inputs, "black"))
        assert cur.deletion[-1] == pytest.approx(float(answer_prob(model(**black))), abs=1e-6)


@pytest.mark.parametrize("family", ["llava-next", "llava-onevision"])
def test_pixel_deletion_on_anyres_crops_perturbs_every_view_of_a_cell(family):
    """5-D any-res pixels: a cell of the LM's token grid is blanked in the base crop (its image fraction) and in every
    high-resolution crop, at exactly its token's canvas pixel box (layout.pixel_box); scores == a manual loop."""
    from analyses.attribution import pixel_baseline

    model, inputs = case(family)
    lay = model.layout(**inputs)
    pos = grid_positions(lay, image=0)[0]  # the any-res token grid [rows, cols]
    gr, gc = pos.shape
    sal = torch.arange(gr * gc, dtype=torch.float64).flip(0).reshape(gr, gc)  # raster order = deletion order
    cur = deletion_insertion(model, inputs, answer_prob, sal, perturb="pixels", fill="black", steps=gr * gc, n_random=0)
    x, base = inputs["pixel_values"], pixel_baseline(model, inputs, "black")
    s = x.shape[-1]
    pert = x.clone()
    for n in range(gr * gc):
        i, j = divmod(n, gc)
        y0, x0, y1, x1 = lay.pixel_box(0, int(pos[i, j]))  # canvas pixels: crops side by side
        for y in range(y0, y1):
            for xx in range(x0, x1):
                crop = 1 + (y // s) * (lay.items[0].crop_grid[1]) + xx // s
                pert[0, crop, :, y % s, xx % s] = base[0, crop, :, y % s, xx % s]
        by0, by1, bx0, bx1 = i * s // gr, (i + 1) * s // gr, j * s // gc, (j + 1) * s // gc
        pert[0, 0, :, by0:by1, bx0:bx1] = base[0, 0, :, by0:by1, bx0:bx1]
        with torch.no_grad():
            want = float(answer_prob(model(**dict(inputs, pixel_values=pert))))
        assert cur.deletion[n + 1] == pytest.approx(want, abs=1e-6)
    assert not torch.equal(pert[0, 1:], base[0, 1:])  # the padding rows of the canvas were left alone
    assert cur.insertion[0] == pytest.approx(cur.deletion[-1], abs=1e-6)


def test_pixel_deletion_on_llava_video_frames():
    """LLaVA-NeXT-Video 5-D frames: cell (frame, row, col) of the token grid blanks that box of that frame only."""
    from analyses.attribution import pixel_baseline

    model, inputs = case("llava-next-video")
    pos = grid_positions(model.layout(**inputs), video=0)  # [frames, rows, cols]
    sal = torch.zeros(pos.shape, dtype=torch.float64)
    sal[1, 0, 1] = 1.0  # the most salient cell: frame 1, row 0, col 1
    n = pos.numel()
    cur = deletion_insertion(model, inputs, answer_prob, sal, perturb="pixels", fill="black", video=0, steps=n, n_random=0)
    x, base = inputs["pixel_values_videos"], pixel_baseline(model, inputs, "black")
    s, (_, gr, gc) = x.shape[-1], pos.shape
    pert = x.clone()
    pert[0, 1, :, 0 : s // gr, s // gc : 2 * s // gc] = base[0, 1, :, 0 : s // gr, s // gc : 2 * s // gc]
    with torch.no_grad():
        want = float(answer_prob(model(**dict(inputs, pixel_values_videos=pert))))
        clean = float(answer_prob(model(**inputs)))
    assert cur.deletion[0] == pytest.approx(clean, abs=1e-6)
    assert cur.deletion[1] == pytest.approx(want, abs=1e-6)
