"""Metrics on any map (attention, rollout, attribution): concentration, localisation against a box, divergence.

Every function reduces over the last axes it names and broadcasts over the leading ones, so a
``[layers, heads, rows, cols]`` stack gives ``[layers, heads]`` values. Maps are non-negative unless a
function says otherwise; the distribution functions normalise by the total first.

Two distinct inequality measures, named precisely (visual-search calls the second one "gini"):

* :func:`gini` - the Gini coefficient ``sum_ij |x_i - x_j| / (2 n^2 mean)``: 0 for a flat map, ``1 - 1/n`` for
  one-hot;
* :func:`gini_simpson` - the Gini-Simpson diversity index ``1 - sum p_i^2``: 0 for one-hot, ``1 - 1/n`` flat.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor


def _flat(x: Tensor | Any, ndim: int) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if ndim > t.ndim:
        raise ValueError(f"map has {t.ndim} axes, fewer than the {ndim} map axes asked for")
    return t.reshape(*t.shape[: t.ndim - ndim], -1)


def _dist(x: Tensor | Any, ndim: int) -> Tensor:
    t = _flat(x, ndim)
    if bool((t < 0).any()):
        raise ValueError("this metric needs a non-negative map; clip or shift signed attributions first (e.g. .clamp(min=0))")
    total = t.sum(-1, keepdim=True)
    if bool((total == 0).any()):
        raise ValueError("a map sums to 0, so it is no distribution; the metric is undefined for it")
    return t / total


def entropy(x: Tensor, ndim: int = 1, normalized: bool = False) -> Tensor:
    """Shannon entropy (nats) of the map as a distribution over its last ``ndim`` axes; ``normalized``: / log n."""
    p = _dist(x, ndim)
    h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)
    if normalized:
        n = p.shape[-1]
        return h / torch.log(torch.tensor(float(n), dtype=h.dtype)) if n > 1 else torch.zeros_like(h)
    return h


def topk_concentration(x: Tensor, k: int, ndim: int = 1) -> Tensor:
    """Fraction of the total mass held by the ``k`` largest cells."""
    p = _dist(x, ndim)
    if not 0 < k <= p.shape[-1]:
        raise ValueError(f"k must be in 1..{p.shape[-1]} (the number of cells), got {k}")
    return p.topk(k, dim=-1).values.sum(-1)


def gini(x: Tensor, ndim: int = 1) -> Tensor:
    """Gini coefficient of inequality (0 flat, ``1 - 1/n`` one-hot), from the sorted values."""
    t = _flat(x, ndim)
    if bool((t < 0).any()):
        raise ValueError("the Gini coefficient needs non-negative values")
    n = t.shape[-1]
    s = t.sort(-1).values
    i = torch.arange(1, n + 1, dtype=s.dtype)
    total = s.sum(-1)
    return ((2 * i - n - 1) * s).sum(-1) / (n * total)


def gini_simpson(x: Tensor, ndim: int = 1) -> Tensor:
    """Gini-Simpson diversity ``1 - sum p^2`` (0 one-hot, ``1 - 1/n`` flat). Not the Gini coefficient."""
    p = _dist(x, ndim)
    return 1 - (p**2).sum(-1)


def box_cells(layout: Any, box: tuple[int, int, int, int], image: int | None = None, video: int | None = None,
              part: int | None = None) -> Bool[Tensor, "frames rows cols"]:
    """Cells of an item's grid view whose pixel box overlaps ``box = (y0, x0, y1, x1)`` (resized-image pixels).

    Uses ``layout.box`` (the family's own cell geometry) and places the hits on the same grid as
    :meth:`AttentionMap.grid`, so ``map_grid[..., mask]`` reads the box.
    """
    from analyses.attention_maps import grid_view

    _, it = layout.find_item(image, video)
    pos = layout.box(*box, image=image, video=video)
    ind = torch.zeros(layout.batch_size, 1, 1, layout.seq_len)
    ind[it.batch, 0, 0, pos] = 1
    return grid_view(ind, layout, image=image, video=video, part=part)[0, 0] > 0


def box_mass(x: Tensor, mask: Tensor) -> Tensor:
    """Fraction of each map's mass inside ``mask`` (bool over the last ``mask.ndim`` axes)."""
    p = _dist(x, mask.ndim)
    return (p * mask.reshape(-1).to(p.dtype)).sum(-1)


def contrast(x: Tensor, mask: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean value per cell inside the box divided by the mean value per cell outside it (1 = no preference)."""
    t = _flat(x, mask.ndim)
    m = mask.reshape(-1)
    if bool(m.all()) or not bool(m.any()):
        raise ValueError("contrast needs cells both inside and outside the box")
    inside = t[..., m].mean(-1)
    outside = t[..., ~m].mean(-1)
    return inside / (outside + eps)


def pointing_game(x: Tensor, mask: Tensor) -> Tensor:
    """True where the map's maximum cell lies in the box (ties: any maximal cell counts as a hit)."""
    t = _flat(x, mask.ndim)
    m = mask.reshape(-1)
    top = t == t.amax(-1, keepdim=True)
    return (top & m).any(-1)


def iou(x: Tensor, mask: Tensor, threshold: float = 0.5, relative: bool = True) -> Tensor:
    """IoU of the thresholded map with the box: cells ``>= threshold * max`` (``relative``) or ``>= threshold``."""
    t = _flat(x, mask.ndim)
    m = mask.reshape(-1)
    thr = threshold * t.amax(-1, keepdim=True) if relative else torch.as_tensor(threshold, dtype=t.dtype)
    on = t >= thr
    inter = (on & m).sum(-1).double()
    union = (on | m).sum(-1).double()
    return inter / union


def js_divergence(x: Tensor, y: Tensor, ndim: int = 1, base: float = 2.0) -> Tensor:
    """Jensen-Shannon divergence between two maps as distributions (base 2: in [0, 1])."""
    p, q = _dist(x, ndim), _dist(y, ndim)
    if p.shape != q.shape:
        raise ValueError(f"the two maps have different shapes {tuple(p.shape)} and {tuple(q.shape)}")
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * torch.log(torch.where(a > 0, a, torch.ones_like(a)) / torch.where(a > 0, b, torch.ones_like(b))), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)) / torch.log(torch.tensor(base, dtype=p.dtype))


def map_summary(x: Float[Tensor, "... rows cols"], mask: Tensor | None = None, k: int = 5) -> dict[str, Tensor]:
    """Every metric of one map (or stack) over its last ``mask.ndim`` (default 2) axes, in one dict."""
    nd = 2 if mask is None else mask.ndim
    out = {
        "entropy": entropy(x, nd),
        "entropy_normalized": entropy(x, nd, normalized=True),
        f"top{k}": topk_concentration(x, min(k, _flat(x, nd).shape[-1]), nd),
        "gini": gini(x, nd),
        "gini_simpson": gini_simpson(x, nd),
    }
    if mask is not None:
        out.update(box_mass=box_mass(x, mask), contrast=contrast(x, mask), pointing=pointing_game(x, mask), iou=iou(x, mask))
    return out
