"""Figures for maps, per-head scalars, token attributions and faithfulness curves (matplotlib, headless Agg).

Every function returns the :class:`matplotlib.figure.Figure` and saves a PNG when ``save=`` is given. Maps of
one figure set share a colour scale: pass ``norm=shared_norm(maps)`` (or ``vmin`` / ``vmax``) to every call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def _finish(fig: Figure, save: str | Path | None) -> Figure:
    if save is not None:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=100, bbox_inches="tight")
    return fig


def shared_norm(maps: Sequence[Any], symmetric: bool = False) -> Normalize:
    """One colour scale for a set of maps (``symmetric``: centred at 0 for signed attributions)."""
    arrs = [_np(m) for m in maps]
    lo, hi = min(float(a.min()) for a in arrs), max(float(a.max()) for a in arrs)
    if symmetric:
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-12)


def _image_array(image: Any) -> np.ndarray:
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    arr = _np(image) if not isinstance(image, np.ndarray) else image
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.transpose(arr, (1, 2, 0))
    return arr


def overlay(ax: Any, image: Any, grid_map: Any, norm: Normalize | None = None, alpha: float = 0.5,
            draw_grid: bool = True, cmap: str = "jet", box: tuple[int, int, int, int] | None = None) -> Any:
    """Draw ``grid_map [rows, cols]`` stretched over ``image`` on ``ax`` with the cell grid (and a ``(y0, x0, y1, x1)`` box)."""
    img = _image_array(image)
    h, w = img.shape[:2]
    g = _np(grid_map)
    ax.imshow(img.astype(np.uint8) if img.dtype != np.uint8 and img.max() > 1.5 else img, extent=(0, w, h, 0))
    im = ax.imshow(g, cmap=cmap, alpha=alpha, norm=norm, extent=(0, w, h, 0), interpolation="nearest")
    if draw_grid:
        rows, cols = g.shape
        for r in range(1, rows):
            ax.axhline(r * h / rows, color="white", lw=0.4, alpha=0.6)
        for c in range(1, cols):
            ax.axvline(c * w / cols, color="white", lw=0.4, alpha=0.6)
    if box is not None:
        y0, x0, y1, x1 = box
        ax.add_patch(matplotlib.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5))
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def heatmap_overlay(image: Any, grid_map: Any, *, title: str = "", norm: Normalize | None = None,
                    box: tuple[int, int, int, int] | None = None, save: str | Path | None = None) -> Figure:
    """One map over its image, with the token grid drawn and a colour bar."""
    fig, ax = plt.subplots(figsize=(4, 4))
    im = overlay(ax, image, grid_map, norm=norm, box=box)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _finish(fig, save)


def video_overlay(frames: Any, maps: Any, *, title: str = "", norm: Normalize | None = None,
                  save: str | Path | None = None) -> Figure:
    """Per-frame maps ``[T, rows, cols]`` over video frames ``[T', H, W, 3]`` (frames matched by index, or by
    temporal slice when ``T' = k T``); one colour scale over all frames."""
    fr = _np(frames)
    m = _np(maps)
    t = m.shape[0]
    step = max(1, fr.shape[0] // t)
    norm = norm or shared_norm(list(m))
    fig, axes = plt.subplots(1, t, figsize=(2.5 * t, 2.8), squeeze=False)
    for i in range(t):
        im = overlay(axes[0, i], fr[i * step], m[i], norm=norm)
        axes[0, i].set_title(f"slice {i}", fontsize=8)
    fig.suptitle(title)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
    return _finish(fig, save)


def layer_head_grid(values: Any, *, title: str = "", label: str = "", norm: Normalize | None = None,
                    cmap: str = "viridis", save: str | Path | None = None) -> Figure:
    """A ``[layers, heads]`` scalar (e.g. box mass, entropy) as a heat grid, layers on the vertical axis."""
    v = _np(values)
    fig, ax = plt.subplots(figsize=(0.4 * v.shape[1] + 2, 0.3 * v.shape[0] + 1.5))
    im = ax.imshow(v, aspect="auto", cmap=cmap, norm=norm, origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    return _finish(fig, save)


def token_bars(tokens: Sequence[str], values: Any, *, title: str = "", save: str | Path | None = None) -> Figure:
    """Per-token bars (text attribution): positive in red, negative in blue."""
    v = _np(values)
    if len(tokens) != v.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but {v.shape[0]} values")
    fig, ax = plt.subplots(figsize=(max(3, 0.35 * len(tokens)), 2.5))
    ax.bar(range(len(v)), v, color=["tab:red" if x >= 0 else "tab:blue" for x in v])
    ax.set_xticks(range(len(v)))
    ax.set_xticklabels(tokens, rotation=60, fontsize=7)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title(title)
    return _finish(fig, save)


def map_panel(image: Any, maps: Mapping[str, Any], *, norm: Normalize | str | None = "per_map", title: str = "",
              save: str | Path | None = None) -> Figure:
    """Several named maps of one image side by side (attention, rollout, IG, Grad-CAM ...).

    ``norm="shared"``: one colour scale (only meaningful when the maps share units); ``"per_map"``: each its own.
    """
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), squeeze=False)
    shared = shared_norm(list(maps.values())) if norm == "shared" else (norm if isinstance(norm, Normalize) else None)
    for ax, (name, m) in zip(axes[0], maps.items()):
        overlay(ax, image, m, norm=shared)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title)
    return _finish(fig, save)


def faithfulness_curves(curves: Any, *, title: str = "", save: str | Path | None = None) -> Figure:
    """Deletion and insertion curves with their random-order baselines and AUCs in the legend."""
    a = curves.aucs
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.8))
    for ax, kind in zip(axes, ("deletion", "insertion")):
        ax.plot(curves.fractions, getattr(curves, kind), "-o", ms=3, label=f"map (AUC {a[kind]:.3f})")
        ax.plot(curves.fractions, getattr(curves, f"random_{kind}"), "--", color="gray", label=f"random (AUC {a['random_' + kind]:.3f})")
        ax.set_xlabel(f"fraction of cells {'removed' if kind == 'deletion' else 'restored'}")
        ax.set_title(kind)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("target")
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, save)
