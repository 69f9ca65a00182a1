"""Faithfulness of a map: deletion / insertion curves with AUCs, a random-order baseline, region-ablation curves.

A map over an item's grid ``[rows, cols]`` (or ``[frames, rows, cols]``) orders its cells, most important
first. *Deletion* perturbs the top cells step by step (a faithful map makes the target fall fast: low AUC);
*insertion* starts from everything perturbed and restores the top cells (a faithful map makes it rise fast:
high AUC). The target is any metric of the model output (an answer probability, a CLIP similarity).

Perturbations (``perturb``): ``"tokens"`` replaces the cells' visual tokens where they enter the language
model (``hook_embed``) by ``fill`` = ``zero``, ``mean`` (the item's mean token) or ``blur`` (the tokens of a
blurred image); ``"pixels"`` replaces the cells' pixels by the ``black`` / ``blur`` / ``mean`` / ``zero``
baseline (Qwen: the tokens' packed patch rows; 4-D pixel tensors: the cell's pixel box, also for CLIP; 5-D
LLaVA-NeXT / OneVision any-res crops: the cell's region in the base crop and in every high-resolution crop that
shows it, see :func:`anyres_cell_boxes`; 5-D LLaVA video frames: cell ``(frame, row, col)`` of a
``[frames, rows, cols]`` map is that box of that frame).
The random baseline averages ``n_random`` random orders. Steps run batched (``batch_size`` copies per forward).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from analyses.attention_maps import MethodNotApplicableError, _layout_or_none, eval_mode, grid_view
from analyses.attribution import pixel_baseline, pixel_key, tile_inputs


def grid_positions(layout: Any, image: int | None = None, video: int | None = None, part: int | None = None) -> Tensor:
    """Sequence position of every cell of an item's grid view ``[frames, rows, cols]`` (-1: no token there)."""
    idx = torch.arange(layout.seq_len, dtype=torch.float64)
    vals = torch.zeros(layout.batch_size, 1, 1, layout.seq_len, dtype=torch.float64)
    vals[:, 0, 0] = idx + 1
    return (grid_view(vals, layout, image=image, video=video, part=part)[0, 0] - 1).long()


def auc(fractions: np.ndarray, scores: np.ndarray) -> float:
    """Area under a curve on ``[0, 1]`` by the trapezoid rule."""
    return float(np.trapezoid(scores, fractions))


@dataclass
class Curves:
    """Deletion / insertion curves (``scores[s]`` after perturbing / restoring ``fractions[s]`` of the cells)."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    random_deletion: np.ndarray
    random_insertion: np.ndarray

    @property
    def aucs(self) -> dict[str, float]:
        f = self.fractions
        return {"deletion": auc(f, self.deletion), "insertion": auc(f, self.insertion),
                "random_deletion": auc(f, self.random_deletion), "random_insertion": auc(f, self.random_insertion)}


class _Perturber:
    """Scores a batch of cell masks (True = perturbed) in batched forwards."""

    def __init__(self, model, inputs, metric, cells: Tensor, perturb: str, fill: str, image, video, batch_size, sigma):
        self.model, self.inputs, self.metric, self.bs = model, inputs, metric, batch_size
        self.cells, self.perturb = cells, perturb
        layout = _layout_or_none(model, inputs)
        self.layout = layout
        if perturb == "tokens":
            if layout is None:
                raise MethodNotApplicableError("perturb='tokens' needs a token layout; use perturb='pixels' for CLIP / SigLIP")
            clean = _embeds(model, inputs)
            if fill == "zero":
                self.fill = torch.zeros_like(clean)
            elif fill == "mean":
                pos = cells[cells >= 0]
                self.fill = clean[:, pos].mean(1, keepdim=True).expand_as(clean).clone()
            elif fill == "blur":
                other = dict(inputs)
                key = pixel_key(inputs)
                other[key] = pixel_baseline(model, inputs, "blur", key=key, sigma=sigma)
                self.fill = _embeds(model, other)
            else:
                raise ValueError(f"token fill must be zero, mean or blur, got {fill!r}")
        elif perturb == "pixels":
            self.key = pixel_key(inputs)
            self.x = inputs[self.key]
            self.base = pixel_baseline(model, inputs, fill, key=self.key, sigma=sigma)
            if self.x.ndim == 5:
                if layout is None or getattr(layout, "part", None) is None:
                    raise MethodNotApplicableError("a 5-D pixel tensor needs the LLaVA-NeXT / OneVision token layout to map cells onto crops")
                self.video = video  # LLaVA-NeXT-Video / OneVision frames [videos, frames, C, S, S]: a cell is a frame's box
                self.anyres = None if video is not None else (layout, image or 0)
            elif self.x.ndim not in (2, 4):
                raise MethodNotApplicableError(f"pixel perturbation of a {self.x.ndim}-D pixel tensor is not supported; use perturb='tokens'")
        else:
            raise ValueError(f"perturb must be 'tokens' or 'pixels', got {perturb!r}")
        self.image = image or 0

    def _pixels(self, masks: Tensor) -> Tensor:
        out = self.x[None].repeat(masks.shape[0], *[1] * self.x.ndim)
        if self.x.ndim == 2:
            from analyses.positions import pixel_rows

            for r, m in enumerate(masks):
                pos = self.cells[m]
                if pos.numel():
                    _, rows = pixel_rows(self.layout, pos.tolist())
                    out[r, rows] = self.base[rows]
        elif self.x.ndim == 5 and self.anyres is None:
            s = self.x.shape[-1]
            t, gr, gc = masks.shape[1:]
            for r, m in enumerate(masks):
                for f, i, j in m.nonzero().tolist():
                    y0, y1, x0, x1 = i * s // gr, (i + 1) * s // gr, j * s // gc, (j + 1) * s // gc
                    out[r, self.video, f, :, y0:y1, x0:x1] = self.base[self.video, f, :, y0:y1, x0:x1]
        elif self.x.ndim == 5:
            t, gr, gc = masks.shape[1:]
            boxes = anyres_cell_boxes(*self.anyres, (gr, gc))
            for r, m in enumerate(masks):
                for _, i, j in m.nonzero().tolist():
                    for crop, y0, y1, x0, x1 in boxes[i][j]:
                        out[r, self.image, crop, :, y0:y1, x0:x1] = self.base[self.image, crop, :, y0:y1, x0:x1]
        else:
            _, _, h, w = self.x.shape
            t, gr, gc = masks.shape[1:]
            for r, m in enumerate(masks):
                for _, i, j in m.nonzero().tolist():
                    y0, y1, x0, x1 = i * h // gr, (i + 1) * h // gr, j * w // gc, (j + 1) * w // gc
                    out[r, self.image, :, y0:y1, x0:x1] = self.base[self.image, :, y0:y1, x0:x1]
        return out.reshape(-1, *self.x.shape[1:])

    def score(self, masks: Tensor) -> np.ndarray:
        vals = []
        with eval_mode(self.model), torch.no_grad():
            for s in range(0, masks.shape[0], self.bs):
                m = masks[s : s + self.bs]
                tiled = tile_inputs(self.inputs, m.shape[0])
                if self.perturb == "pixels":
                    tiled[self.key] = self._pixels(m)
                    out = self.model(**tiled)
                else:
                    sel = torch.zeros(m.shape[0], self.layout.seq_len, dtype=torch.bool)
                    for r, mm in enumerate(m):
                        sel[r, self.cells[mm]] = True
                    fill = self.fill

                    def put(value, hook, sel=sel, fill=fill):
                        return torch.where(sel[..., None].to(value.device), fill.to(value.dtype), value)

                    out = self.model.run_with_hooks(**tiled, fwd_hooks=[("hook_embed", put)])
                vals.append(self.metric(out).reshape(-1).double().cpu())
        return torch.cat(vals).numpy()


def anyres_cell_boxes(layout: Any, image: int, grid: tuple[int, int]) -> list[list[list[tuple[int, int, int, int, int]]]]:
    """For a ``[rows, cols]`` grid laid uniformly over an any-res image, the pixel boxes of each cell in every crop
    that shows it: ``boxes[i][j] = [(crop, y0, y1, x0, x1), ...]`` in the 5-D pixel tensor's crop coordinates.

    The base crop (0) is the whole image resized to the crop side, so cell (i, j) covers its (i, j) fraction. The
    high-resolution crops (1..) tile the best-resolution canvas in raster order; the image occupies the canvas's
    unpadded box (``item.unpad``, patch units), and the cell's fraction of that box is cut along the crop
    boundaries. Padding is never perturbed. With ``grid`` equal to the LM's any-res token grid (the default
    ``grid_view`` of an attention map), every cell is exactly its grid token's pixel box (``layout.pixel_box``).
    """
    _, it = layout.find_item(image=image)
    s, p = it.tower_size, it.patch_size
    gr, gc = grid
    cr, cc = it.crop_grid if it.crop_grid != (0, 0) else (0, 0)
    top, left, rows, cols = it.unpad
    out = []
    for i in range(gr):
        line = []
        for j in range(gc):
            cell = [(0, i * s // gr, (i + 1) * s // gr, j * s // gc, (j + 1) * s // gc)]
            if cr:
                y0, y1 = top * p + i * rows * p // gr, top * p + (i + 1) * rows * p // gr  # canvas pixels
                x0, x1 = left * p + j * cols * p // gc, left * p + (j + 1) * cols * p // gc
                for a in range(cr):
                    for b in range(cc):
                        ty0, ty1 = max(y0, a * s), min(y1, (a + 1) * s)
                        tx0, tx1 = max(x0, b * s), min(x1, (b + 1) * s)
                        if ty0 < ty1 and tx0 < tx1:
                            cell.append((1 + a * cc + b, ty0 - a * s, ty1 - a * s, tx0 - b * s, tx1 - b * s))
            line.append(cell)
        out.append(line)
    return out


def _embeds(model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
    store: dict[str, Tensor] = {}

    def keep(x, hook):
        store["x"] = x.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(**inputs, fwd_hooks=[("hook_embed", keep)])
    return store["x"]


def _cells(model, inputs, saliency: Tensor, perturb: str, image, video, part) -> tuple[Tensor, Tensor]:
    """(cell ids usable for perturbation, their saliency), flattened in grid order."""
    sal = torch.as_tensor(saliency, dtype=torch.float64)
    if sal.ndim == 2:
        sal = sal[None]
    layout = _layout_or_none(model, inputs)
    if layout is not None and (perturb == "tokens" or inputs[pixel_key(inputs)].ndim == 2):
        pos = grid_positions(layout, image, video, part)
        if tuple(pos.shape) != tuple(sal.shape):
            raise ValueError(f"saliency grid {tuple(sal.shape)} does not match the item's grid {tuple(pos.shape)}")
        return pos, sal
    return torch.arange(sal.numel()).reshape(sal.shape), sal


def deletion_insertion(
    model: nn.Module,
    inputs: Mapping[str, Any],
    metric: Callable[[Any], Tensor],
    saliency: Tensor,
    *,
    perturb: str = "tokens",
    fill: str = "zero",
    image: int | None = 0,
    video: int | None = None,
    part: int | None = None,
    steps: int = 10,
    n_random: int = 2,
    seed: int = 0,
    batch_size: int = 8,
    sigma: float = 10.0,
) -> Curves:
    """Deletion and insertion curves of ``saliency`` (the item's grid), plus the random-order baseline."""
    if image is not None and video is not None:
        image = None
    cells, sal = _cells(model, inputs, saliency, perturb, image, video, part)
    valid = (cells >= 0).reshape(-1)
    n = int(valid.sum())
    if n == 0:
        raise MethodNotApplicableError("the map covers no perturbable cell")
    flat_sal = sal.reshape(-1).clone()
    flat_sal[~valid] = -np.inf
    fractions = np.linspace(0, 1, steps + 1)
    counts = np.round(fractions * n).astype(int)
    per = _Perturber(model, inputs, metric, cells, perturb, fill, image, video, batch_size, sigma)
    if perturb == "tokens" or per.x.ndim == 2:
        per.cells = cells.reshape(-1)

    def masks_for(order: Tensor, insertion: bool) -> Tensor:
        ms = []
        for c in counts:
            m = torch.zeros(sal.numel(), dtype=torch.bool)
            m[order[:c]] = True
            if insertion:
                m = ~m & valid
            ms.append(m if per.perturb == "tokens" or per.x.ndim == 2 else m.reshape(sal.shape))
        return torch.stack(ms)

    order = torch.argsort(flat_sal, descending=True, stable=True)[:n]
    gen = torch.Generator().manual_seed(seed)
    valid_idx = valid.nonzero().flatten()
    rnd = [valid_idx[torch.randperm(n, generator=gen)] for _ in range(n_random)]
    all_masks = [masks_for(order, False), masks_for(order, True)] + [masks_for(o, ins) for o in rnd for ins in (False, True)]
    scores = per.score(torch.cat(all_masks)).reshape(len(all_masks), steps + 1)
    rd = scores[2::2].mean(0) if n_random else np.full(steps + 1, np.nan)
    ri = scores[3::2].mean(0) if n_random else np.full(steps + 1, np.nan)
    return Curves(fractions, scores[0], scores[1], rd, ri)


def region_ablation(
    model: nn.Module,
    inputs: Mapping[str, Any],
    metric: Callable[[Any], Tensor],
    regions: Mapping[str, Sequence[int] | Tensor],
    *,
    fill: str = "zero",
    cumulative: bool = False,
    batch_size: int = 8,
    sigma: float = 10.0,
) -> dict[str, float]:
    """Metric after ablating each named region of positions (``cumulative``: the regions so far, in order),
    with ``"clean"`` the unablated value. Tokens are replaced at ``hook_embed`` as in :func:`deletion_insertion`."""
    names = list(regions)
    layout = _layout_or_none(model, inputs)
    if layout is None:
        raise MethodNotApplicableError("region ablation needs a token layout")
    cells = torch.arange(layout.seq_len)
    per = _Perturber(model, inputs, metric, cells, "tokens", fill, None, None, batch_size, sigma)
    masks = [torch.zeros(layout.seq_len, dtype=torch.bool)]
    acc = torch.zeros(layout.seq_len, dtype=torch.bool)
    for n in names:
        m = torch.zeros(layout.seq_len, dtype=torch.bool)
        m[torch.as_tensor(regions[n], dtype=torch.long)] = True
        acc = acc | m
        masks.append(acc.clone() if cumulative else m)
    vals = per.score(torch.stack(masks))
    return {"clean": float(vals[0]), **{n: float(v) for n, v in zip(names, vals[1:])}}
