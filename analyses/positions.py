"""Named position groups from a token layout, for sweeps over frames, images, grid cells and text.

Sweeps take ``positions={name: [sequence positions]}``; these helpers build such mappings from
``model.layout(**inputs)`` (:class:`hooked_vlm.layout.TokenLayout`) so nothing hard-codes a token
count. Group names are readable and stable (``"image0"``, ``"video0/frame2"``, ``"image0/r1c3"``,
``"text0"``, ``"last"``), which keeps result tables and resumable stores self-describing.

Also: :func:`pixel_rows` maps visual positions to the rows of the processor's packed
pixel input they were computed from (for pixel-space corruption in causal tracing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["layout_groups", "pixel_rows"]

_TEXT, _SPECIAL = 0, 3


def _runs(mask: Tensor) -> list[tuple[int, int]]:
    """Maximal runs ``[start, stop)`` of True in a 1-D bool tensor."""
    out, start = [], None
    for i, v in enumerate(mask.tolist()):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return out


def layout_groups(
    layout: Any,
    by: Literal["item", "frame", "cell", "text", "token", "visual"] | Sequence[str] = "item",
    batch: int = 0,
    include_last: bool = True,
) -> dict[str, list[int]]:
    """Position groups of prompt ``batch``.

    ``by`` (one or a list, merged in order):

    * ``"item"``: each image / video (``image0``, ``video0``);
    * ``"frame"``: each temporal slice of each video (``video0/frame1``), images as one group;
    * ``"cell"``: each merged-grid cell of each image or video frame (``image0/r2c3``,
      ``video0/f1/r0c2``);
    * ``"visual"``: all visual tokens as one group;
    * ``"text"``: each maximal run of text tokens (``text0``, ``text1``, ...; special tokens such as
      ``<|vision_start|>`` are not text);
    * ``"token"``: every non-padding position alone (named by its index).

    ``include_last`` adds ``"last"`` (the last non-padding token).
    """
    kinds = [by] if isinstance(by, str) else list(by)
    groups: dict[str, list[int]] = {}
    item, frame, row, col = (t[batch] for t in (layout.item, layout.frame, layout.row, layout.col))
    kind = layout.kind[batch]
    for k in kinds:
        if k == "item" or k == "frame":
            for item_id, it in enumerate(layout.items):
                if it.batch != batch:
                    continue
                sel = item == item_id
                name = f"{it.kind}{it.index}"
                if k == "frame" and it.kind == "video":
                    for f in range(it.merged_grid[0]):
                        groups[f"{name}/frame{f}"] = (sel & (frame == f)).nonzero().flatten().tolist()
                else:
                    groups[name] = sel.nonzero().flatten().tolist()
        elif k == "cell":
            for item_id, it in enumerate(layout.items):
                if it.batch != batch:
                    continue
                name = f"{it.kind}{it.index}"
                for p in (item == item_id).nonzero().flatten().tolist():
                    f, r, c = int(frame[p]), int(row[p]), int(col[p])
                    key = f"{name}/r{r}c{c}" if it.kind == "image" else f"{name}/f{f}/r{r}c{c}"
                    groups.setdefault(key, []).append(p)
        elif k == "visual":
            groups["visual"] = (item >= 0).nonzero().flatten().tolist()
        elif k == "text":
            for i, (s, e) in enumerate(_runs(kind == _TEXT)):
                groups[f"text{i}"] = list(range(s, e))
        elif k == "token":
            valid = layout.attention_mask[batch].bool() if layout.attention_mask is not None else torch.ones_like(kind, dtype=torch.bool)
            for p in valid.nonzero().flatten().tolist():
                groups[str(p)] = [p]
        else:
            raise ValueError(f"unknown grouping {k!r}; use item, frame, cell, visual, text or token")
    if include_last:
        groups["last"] = [int(layout.last_token(batch))]
    return {n: g for n, g in groups.items() if g}


def pixel_rows(layout: Any, positions: Sequence[int] | Tensor, batch: int = 0) -> tuple[str, Int[Tensor, "n"]]:
    """Rows of the packed pixel tensor that the visual tokens at ``positions`` were computed from.

    Qwen processors pack each image (video) as ``t * h * w`` patch rows in merge-block order: merged
    token (slice f, row r, col c) of an item covers rows ``offset + f*h*w + (r*(w/m) + c)*m*m + k`` for
    ``k < m*m``. Returns ``(key, rows)`` with ``key`` the keyword input holding those items' pixels
    (``layout.pixel_input(kind)``, from the family's input schema); all positions must belong to items of one kind.
    """
    pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    keys, rows = set(), []
    for p in pos.tolist():
        item_id = int(layout.item[batch, p])
        if item_id < 0:
            raise ValueError(f"position {p} is not a visual token")
        it = layout.items[item_id]
        t, h, w = it.grid_thw
        m = it.merge
        f, r, c = int(layout.frame[batch, p]), int(layout.row[batch, p]), int(layout.col[batch, p])
        first = it.pixel_offset + f * h * w + (r * (w // m) + c) * m * m
        rows.extend(range(first, first + m * m))
        keys.add(layout.pixel_input(it.kind))
    if len(keys) != 1:
        raise ValueError("positions mix image and video tokens; corrupt them in two calls")
    return keys.pop(), torch.tensor(rows, dtype=torch.long)
