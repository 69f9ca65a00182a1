"""Map metrics on known vectors and against scipy / brute-force loops; box -> cells through the layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from map_cases import case
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as sp_entropy

from analyses import map_metrics as mm


def test_gini_and_gini_simpson_are_different_named_functions():
    """Known vectors: one-hot and flat give opposite extremes; a Gini-Simpson value is not a Gini coefficient."""
    onehot = torch.tensor([0.0, 0.0, 0.0, 1.0])
    flat = torch.full((4,), 0.25)
    assert float(mm.gini(onehot)) == pytest.approx(0.75)  # 1 - 1/n
    assert float(mm.gini(flat)) == pytest.approx(0.0)
    assert float(mm.gini_simpson(onehot)) == pytest.approx(0.0)
    assert float(mm.gini_simpson(flat)) == pytest.approx(0.75)
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    brute = np.abs(x.numpy()[:, None] - x.numpy()[None]).sum() / (2 * 16 * x.numpy().mean())  # mean abs difference form
    assert float(mm.gini(x)) == pytest.approx(brute)
    p = x.numpy() / x.numpy().sum()
    assert float(mm.gini_simpson(x)) == pytest.approx(1 - (p**2).sum())
    assert abs(float(mm.gini(x)) - float(mm.gini_simpson(x))) > 0.1


def test_entropy_topk_js_against_scipy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 5, 4, generator=g), torch.rand(3, 5, 4, generator=g)
    ent = mm.entropy(a, ndim=2)
    want = [sp_entropy(a[i].numpy().ravel()) for i in range(3)]
    np.testing.assert_allclose(ent.numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(mm.entropy(a, ndim=2, normalized=True).numpy(), np.array(want) / np.log(20), rtol=1e-6)
    js = mm.js_divergence(a, b, ndim=2)
    want_js = [jensenshannon(a[i].numpy().ravel(), b[i].numpy().ravel(), base=2) ** 2 for i in range(3)]
    np.testing.assert_allclose(js.numpy(), want_js, rtol=1e-6)
    v = torch.tensor([0.1, 0.5, 0.2, 0.2])
    assert float(mm.topk_concentration(v, 2)) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="k must be in 1..4"):
        mm.topk_concentration(v, 5)
    with pytest.raises(ValueError, match="non-negative map"):
        mm.entropy(torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="sums to 0"):
        mm.entropy(torch.zeros(3))


def test_box_metrics_by_hand():
    m = torch.tensor([[0.0, 1.0, 0.0], [0.0, 6.0, 1.0], [0.0, 1.0, 1.0]])  # total 10
    box = torch.zeros(3, 3, dtype=torch.bool)
    box[1:, 1:] = True  # 4 cells holding 6 + 1 + 1 + 1 = 9
    assert float(mm.box_mass(m, box)) == pytest.approx(0.9)
    assert float(mm.contrast(m, box)) == pytest.approx((9 / 4) / (1 / 5))
    assert bool(mm.pointing_game(m, box))
    assert not bool(mm.pointing_game(m, ~box))
    # threshold 0.5 * max = 3 -> only the 6 cell is on: IoU = 1 / 4
    assert float(mm.iou(m, box)) == pytest.approx(0.25)
    assert float(mm.iou(m, box, threshold=0.5, relative=False)) == pytest.approx(4 / 5)  # 5 cells on, 4 in box
    with pytest.raises(ValueError, match="inside and outside"):
        mm.contrast(m, torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("family", ["qwen2-vl-image", "llava"])
def test_box_cells_through_the_layout(family):
    """A pixel box selects exactly the cells whose pixel boxes overlap it (checked cell by cell)."""
    model, inputs = case(family)
    lay = model.layout(**inputs)
    box = (10, 20, 40, 45)
    cells = mm.box_cells(lay, box, image=0)
    _, it = lay.find_item(image=0)
    s = it.cell_pixels
    for r in range(cells.shape[1]):
        for c in range(cells.shape[2]):
            overlap = r * s < box[2] and (r + 1) * s > box[0] and c * s < box[3] and (c + 1) * s > box[1]
            assert bool(cells[0, r, c]) == overlap, (r, c)
    summary = mm.map_summary(torch.rand(*cells.shape, generator=torch.Generator().manual_seed(1)), cells)
    assert set(summary) >= {"entropy", "gini", "gini_simpson", "box_mass", "contrast", "pointing", "iou"}
