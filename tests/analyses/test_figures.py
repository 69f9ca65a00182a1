"""Figures render headless, save PNGs, and draw exactly the data and colour scales they are given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses import figures as F


def test_overlay_uses_shared_scale_and_saves(tmp_path):
    img = np.zeros((56, 56, 3), np.uint8)
    a, b = torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.tensor([[0.5, 4.0], [1.0, 1.0]])
    norm = F.shared_norm([a, b])
    assert (norm.vmin, norm.vmax) == (0.0, 4.0)
    fig = F.heatmap_overlay(img, a, norm=norm, box=(0, 0, 28, 28), save=tmp_path / "a.png")
    im = fig.axes[0].images[1]
    np.testing.assert_array_equal(im.get_array(), a.numpy())
    assert im.norm.vmin == 0.0 and im.norm.vmax == 4.0
    assert (tmp_path / "a.png").stat().st_size > 1000
    sym = F.shared_norm([a - 2], symmetric=True)
    assert (sym.vmin, sym.vmax) == (-2.0, 2.0)


@pytest.mark.slow
def test_video_grid_bars_panel_and_curves(tmp_path):
    frames = np.zeros((4, 28, 28, 3), np.uint8)
    maps = torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(0))
    fig = F.video_overlay(frames, maps, save=tmp_path / "v.png")
    shown = [ax.images[1].get_array() for ax in fig.axes if ax.images]
    np.testing.assert_array_equal(shown[1], maps[1].numpy())
    assert shown[0].shape == (2, 2) and fig.axes[0].images[1].norm.vmax == pytest.approx(float(maps.max()))
    grid = F.layer_head_grid(torch.arange(6.0).reshape(2, 3), save=tmp_path / "g.png")
    np.testing.assert_array_equal(grid.axes[0].images[0].get_array(), np.arange(6.0).reshape(2, 3))
    bars = F.token_bars(["a", "b", "c"], [0.5, -0.2, 0.1], save=tmp_path / "t.png")
    heights = [p.get_height() for p in bars.axes[0].patches]
    np.testing.assert_allclose(heights, [0.5, -0.2, 0.1])
    with pytest.raises(ValueError, match="3 tokens but 2 values"):
        F.token_bars(["a", "b", "c"], [0.5, -0.2])
    panel = F.map_panel(frames[0], {"attention": maps[0], "ig": maps[1]}, norm="shared", save=tmp_path / "p.png")
    assert panel.axes[0].images[1].norm.vmax == panel.axes[1].images[1].norm.vmax

    from analyses.faithfulness import Curves

    c = Curves(np.linspace(0, 1, 3), np.array([1.0, 0.5, 0.1]), np.array([0.1, 0.6, 1.0]), np.array([1.0, 0.8, 0.1]),
               np.array([0.1, 0.3, 1.0]))
    fig = F.faithfulness_curves(c, save=tmp_path / "c.png")
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [1.0, 0.5, 0.1])
    assert "0.525" in fig.axes[0].get_legend().get_texts()[0].get_text()  # deletion AUC by the trapezoid rule
    for name in ("v", "g", "t", "p", "c"):
        assert (tmp_path / f"{name}.png").exists()
