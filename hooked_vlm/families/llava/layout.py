"""Inputs of the LLaVA family: validation, any-resolution geometry, and the token layout.

Everything about *where* a visual token comes from is computed here from the config and the inputs
(``pixel_values`` shape, ``image_sizes``, ``image_grid_pinpoints``, the tower's patch grid, the feature
strategy); nothing hard-codes a count such as 576. The numbers follow transformers 5.23
(``select_best_resolution``, ``unpad_image``, ``pack_image_features``, ``apply_pooling``, the NeXT-Video pooler).

Vision-tower rows: the tower runs on one *row per crop or frame*: every image's crops in image order
(base crop first, then the high-resolution crops in raster order of the crop grid), then every video's frames
in video order. :class:`LlavaItem` records each item's first row (``row_offset``) and row count (``n_rows``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_vlm.errors import InputError
from hooked_vlm.input_checks import check_float_pixels, check_token_inputs
# ``LlavaLayout.part`` codes (where a visual token's feature comes from) are the generic ones of hooked_vlm.layout
from hooked_vlm.layout import BASE, CLS, FRAME, GRID, IMAGE, NEWLINE, PAD, PART_NAMES, TEXT, VIDEO, TokenLayout, VisualItem

if TYPE_CHECKING:
    from hooked_vlm.families.llava.model import HookedLlava



@dataclass(frozen=True)
class LlavaGeometry:
    """The shape facts of one LLaVA model that decide token counts (all read from the HF config)."""

    variant: str  # "llava" | "llava_next" | "llava_onevision" | "llava_next_video"
    image_size: int  # tower input side (px)
    patch_size: int
    has_cls: bool  # the tower prepends a CLS token (CLIP yes, SigLIP no)
    strategy: str  # "default" drops CLS, "full" keeps every token
    pinpoints: tuple[tuple[int, int], ...] = ()
    max_crops_anyres: int | None = None  # OneVision "anyres_max_N" -> N
    video_pool: str = ""  # "" | "bilinear_after" (OneVision) | "average" / "max" / "conv" (NeXT-Video, before projector)
    pool_stride: int = 2

    @property
    def side(self) -> int:
        """Patches per side of one crop."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        """Feature tokens one crop yields after the select strategy (CLS kept only with ``"full"``)."""
        return self.side**2 + int(self.has_cls) - (1 if self.strategy == "default" else 0)

    @property
    def anyres(self) -> bool:
        return self.variant != "llava"

    @property
    def newline(self) -> bool:
        return self.variant != "llava"

    def with_strategy(self, strategy: str) -> "LlavaGeometry":
        return replace(self, strategy=strategy)

    # ----- any-resolution -----------------------------------------------------------------------------
    def best_resolution(self, image_size: tuple[int, int]) -> tuple[int, int]:
        from transformers.image_processing_utils import select_best_resolution

        return tuple(select_best_resolution(list(image_size), [list(p) for p in self.pinpoints]))  # type: ignore[return-value]

    def crop_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of high-resolution crops for an original (height, width)."""
        bh, bw = self.best_resolution(image_size)
        return bh // self.image_size, bw // self.image_size

    def n_crops(self, image_size: tuple[int, int]) -> int:
        """Tower rows of one any-resolution image: the crop grid plus the base crop (as HF's ``image_size_to_num_patches``)."""
        bh, bw = self.best_resolution(image_size)
        return len(range(0, bh, self.image_size)) * len(range(0, bw, self.image_size)) + 1

    def unpadded(self, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, rows, cols) of the unpadded region of the combined crop grid (patch units)."""
        oh, ow = int(image_size[0]), int(image_size[1])
        nh, nw = self.crop_grid((oh, ow))
        ch, cw = nh * self.side, nw * self.side
        if ow / oh > cw / ch:
            new_h = int(round(oh * (cw / ow), 7))
            pad = (ch - new_h) // 2
            return pad, 0, ch - 2 * pad, cw
        new_w = int(round(ow * (ch / oh), 7))
        pad = (cw - new_w) // 2
        return 0, pad, ch, cw - 2 * pad

    def interpolated(self, rows: int, cols: int) -> tuple[int, int] | None:
        """OneVision ``anyres_max_N``: the bilinear target size when the unpadded grid is too large, else None."""
        if self.max_crops_anyres is None:
            return None
        ratio = math.sqrt(rows * cols / (self.max_crops_anyres * self.side**2))
        if ratio > 1.1:
            return int(rows // ratio), int(cols // ratio)
        return None

    def video_grid(self) -> tuple[int, int]:
        """Per-frame token grid of a video."""
        s = self.side
        if self.video_pool == "bilinear_after":
            return math.ceil(s / 2), math.ceil(s / 2)
        if self.video_pool:
            return s // self.pool_stride, s // self.pool_stride
        return s, s

    def video_tokens(self, frames: int) -> int:
        gh, gw = self.video_grid()
        return frames * gh * gw + (1 if self.video_pool == "bilinear_after" else 0)


def geometry_from_config(d: dict[str, Any], strategy: str | None = None) -> LlavaGeometry:
    """:class:`LlavaGeometry` of a transformers LLaVA config (``config.to_dict()``), no model needed."""
    variant = d["model_type"]
    v = d["vision_config"]
    strategy = strategy or d.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise InputError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    pool = {"llava_onevision": "bilinear_after", "llava_next_video": d.get("spatial_pool_mode", "average")}.get(variant, "")
    return LlavaGeometry(
        variant=variant,
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        has_cls=str(v.get("model_type", "")) in ("clip_vision_model", "dinov2"),
        strategy=strategy,
        pinpoints=tuple(tuple(p) for p in d.get("image_grid_pinpoints") or ()),
        max_crops_anyres=parse_anyres_max(d.get("vision_aspect_ratio")) if variant == "llava_onevision" else None,
        video_pool=pool,
        pool_stride=int(d.get("spatial_pool_stride", 2)),
    )


def parse_anyres_max(value: str | None) -> int | None:
    """``"anyres_max_9"`` -> 9; None / other strings -> None."""
    if not value:
        return None
    m = re.fullmatch(r"anyres_max_(\d+)", value)
    if m is None:
        raise NotImplementedError(f"vision_aspect_ratio {value!r} is not supported (only 'anyres_max_N')")
    return int(m.group(1))


@dataclass(frozen=True)
class LlavaItem(VisualItem):
    """One image or video of a LLaVA prompt batch.

    ``grid_thw`` is ``(1, h, w)`` (images: the base crop's patch grid) or ``(frames, gh, gw)`` (videos: the
    per-frame token grid after pooling); ``merge`` is 1. The extra fields describe the crops.
    """

    n_rows: int = 1  # tower rows (crops or frames)
    row_offset: int = 0  # first tower row
    image_size: tuple[int, int] | None = None  # original (height, width) for any-resolution images
    crop_grid: tuple[int, int] = (0, 0)  # (rows, cols) of high-resolution crops; (0, 0) = base crop only
    unpad: tuple[int, int, int, int] = (0, 0, 0, 0)  # (top, left, rows, cols) of the unpadded grid (patch units)
    grid_size: tuple[int, int] = (0, 0)  # (rows, cols) of the grid tokens the LM sees (after interpolation)
    base_tokens: int = 0  # tokens of the base crop (incl. CLS with "full")
    total_tokens: int = 0
    tower_size: int = 0  # crop / frame side in pixels (the tower's image_size)

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of one crop or frame as the tower sees it."""
        return self.tower_size, self.tower_size

    @property
    def cell_pixels(self) -> int:
        """Pixels per token cell: a patch for images (base crop); a pooled cell for video frames (rounded)."""
        return self.tower_size // self.grid_thw[1] if self.kind == "video" else self.patch_size

    @property
    def merged_grid(self) -> tuple[int, int, int]:
        return self.grid_thw

    @property
    def n_tokens(self) -> int:
        return self.total_tokens

    @property
    def n_patches(self) -> int:
        return self.n_rows


@dataclass
class LlavaLayout(TokenLayout):
    """:class:`TokenLayout` plus the LLaVA crop structure.

    Extra per-position tensors ``[B, L]``: ``part`` (:data:`BASE`, :data:`GRID`, :data:`NEWLINE`, :data:`CLS`,
    :data:`FRAME`; -1 elsewhere) and ``crop`` (0 = base crop, k >= 1 = high-resolution crop k in raster order of
    the crop grid; -1 for newline / video / non-visual tokens). ``row`` / ``col``: base tokens -> the base crop's
    patch grid; grid tokens -> the unpadded (OneVision: possibly interpolated) grid the LM sees; newline tokens
    -> (grid row, -1); video tokens -> the per-frame token grid, with ``frame``.
    """

    part: Int[Tensor, "batch pos"] | None = None
    crop: Int[Tensor, "batch pos"] | None = None
    geometry: LlavaGeometry | None = None

    def positions(self, image: int | None = None, video: int | None = None, frame: int | None = None,
                  part: int | None = None) -> Int[Tensor, "n"]:
        """Positions of an image / video (optionally one frame, or one part: BASE, GRID, NEWLINE, CLS)."""
        item_id, it = self.find_item(image, video)
        sel = self.item[it.batch] == item_id
        if frame is not None:
            if not 0 <= frame < it.grid_thw[0]:
                raise IndexError(f"frame {frame} out of range: {it.kind} {it.index} has {it.grid_thw[0]} frames")
            sel = sel & (self.frame[it.batch] == frame)
        if part is not None:
            sel = sel & (self.part[it.batch] == part)
        return sel.nonzero().flatten()

    def cell(self, row: int, col: int, image: int | None = None, video: int | None = None, frame: int = 0,
             part: int | None = None) -> int:
        """Position of a token by grid cell: images -> the base crop's (row, col) (``part=GRID``: the any-res grid);
        videos -> (row, col) of ``frame``."""
        item_id, it = self.find_item(image, video)
        if it.kind == "video":
            part, grid = FRAME, it.grid_thw[1:]
            if not 0 <= frame < it.grid_thw[0]:
                raise IndexError(f"frame {frame} out of range: video {it.index} has {it.grid_thw[0]} frames, numbered 0..{it.grid_thw[0] - 1}")
        else:
            part = BASE if part is None else part
            grid = it.grid_thw[1:] if part == BASE else it.grid_size
        if not (0 <= row < grid[0] and 0 <= col < grid[1]):
            raise IndexError(f"cell ({row}, {col}) outside the {grid[0]}x{grid[1]} grid of {it.kind} {it.index}")
        b = it.batch
        sel = (self.item[b] == item_id) & (self.part[b] == part) & (self.row[b] == row) & (self.col[b] == col)
        if it.kind == "video":
            sel = sel & (self.frame[b] == frame)
        return int(sel.nonzero().flatten()[0])

    def pixel_box(self, batch: int, pos: int) -> tuple[int, int, int, int] | None:
        """(y0, x0, y1, x1) a visual token covers: base tokens -> pixels of the resized base crop; grid tokens ->
        pixels of the best-resolution canvas (crops side by side, padding included; scaled when interpolated);
        video tokens -> pixels of the frame. None for text, newline and CLS tokens."""
        item_id = int(self.item[batch, pos])
        part = int(self.part[batch, pos]) if self.part is not None else -1
        if item_id < 0 or part in (NEWLINE, CLS, -1):
            return None
        it = self.items[item_id]
        r, c = int(self.row[batch, pos]), int(self.col[batch, pos])
        p = it.patch_size
        if part == BASE:
            return r * p, c * p, (r + 1) * p, (c + 1) * p
        if part == FRAME:
            side = self.geometry.side if self.geometry else it.grid_thw[1]
            sy, sx = side * p / it.grid_thw[1], side * p / it.grid_thw[2]
            return int(r * sy), int(c * sx), int(math.ceil((r + 1) * sy)), int(math.ceil((c + 1) * sx))
        top, left, rows, cols = it.unpad
        sy, sx = rows / it.grid_size[0], cols / it.grid_size[1]
        return (int((top + r * sy) * p), int((left + c * sx) * p),
                int(math.ceil((top + (r + 1) * sy) * p)), int(math.ceil((left + (c + 1) * sx) * p)))

    def box(self, y0: int, x0: int, y1: int, x1: int, image: int | None = None, video: int | None = None) -> Int[Tensor, "n"]:
        """Positions of visual tokens whose pixel box (see :meth:`pixel_box`) overlaps [y0, y1) x [x0, x1)."""
        item_id, it = self.find_item(image, video)
        out = []
        for pos in (self.item[it.batch] == item_id).nonzero().flatten().tolist():
            bx = self.pixel_box(it.batch, pos)
            if bx is not None and bx[0] < y1 and bx[2] > y0 and bx[1] < x1 and bx[3] > x0:
                out.append(pos)
        return torch.tensor(out, dtype=torch.long)

    def group_ids(self, by: str) -> Int[Tensor, "batch pos"]:
        """As :meth:`TokenLayout.group_ids`, plus ``"crop"`` (one group per (item, crop); newline tokens none) and
        ``"part"`` (the part code). ``"cell"`` numbers base-crop cells ``row * w + col`` (video: per-frame cells)."""
        visual = self.item >= 0
        out = torch.full_like(self.kind, -1)
        if by == "crop":
            n = max([it.crop_grid[0] * it.crop_grid[1] + 1 for it in self.items] + [1])
            return torch.where(visual & (self.crop >= 0), self.item * n + self.crop, out)
        if by == "part":
            return self.part.clone()
        if by == "cell":
            widths = torch.tensor([it.grid_thw[2] for it in self.items] + [0], dtype=torch.long)
            ok = visual & ((self.part == BASE) | (self.part == FRAME))
            return torch.where(ok, self.row * widths[self.item.clamp(min=0)] + self.col, out)
        if by == "frame":
            offsets, total = [], 0
            for it in self.items:
                offsets.append(total)
                total += it.grid_thw[0] if it.kind == "video" else 1
            off = torch.tensor(offsets + [0], dtype=torch.long)
            return torch.where(visual & (self.frame >= 0), off[self.item.clamp(min=0)] + self.frame, out)
        return super().group_ids(by)  # type: ignore[arg-type]

    # ----- any-res views ---------------------------------------------------------------------------------
    def default_part(self, image: int | None = None, video: int | None = None) -> int:
        """The part a grid view of an item shows by default: the stitched any-res grid when the item has one, a
        video's frames, else the base crop."""
        item_id, it = self.find_item(image, video)
        parts = set(self.part[it.batch][self.item[it.batch] == item_id].tolist())
        return GRID if GRID in parts else (FRAME if FRAME in parts else BASE)

    def n_crops(self, image: int = 0) -> int:
        """High-resolution crops of an any-res image (0: only the base crop)."""
        _, it = self.find_item(image=image)
        return it.crop_grid[0] * it.crop_grid[1]

    def stitch_crops(self, crops: Tensor, image: int = 0, in_pixels: bool = False) -> Tensor:
        """An any-res image's high-resolution crops ``[crops, side, side, ...]`` (raster order of the crop grid)
        pasted side by side into ``[rows, cols, ...]`` and cut to the unpadded box its grid tokens cover
        (``in_pixels``: the sides are pixels, else patches)."""
        _, it = self.find_item(image=image)
        cr, cc = it.crop_grid
        if crops.shape[0] < cr * cc:
            raise ValueError(f"image {image} has {cr}x{cc} crops; got {crops.shape[0]}")
        side, rest = crops.shape[1], crops.shape[3:]
        canvas = crops[: cr * cc].reshape(cr, cc, side, side, *rest).transpose(1, 2).reshape(cr * side, cc * side, *rest)
        top, left, rows, cols = it.unpad
        u = it.patch_size if in_pixels else 1
        return canvas[top * u : (top + rows) * u, left * u : (left + cols) * u]

    # ----- vision tower rows -----------------------------------------------------------------------------
    def tower_rows(self, image: int | None = None, video: int | None = None) -> Int[Tensor, "n"]:
        """All tower rows (crops: base first, then the crop grid in raster order; or frames) of an item."""
        _, it = self.find_item(image, video)
        return torch.arange(it.row_offset, it.row_offset + it.n_rows)

    def vision_rows(self, image: int | None = None, video: int | None = None, frame: int | None = None,
                    crop: int | None = None) -> tuple[int, Int[Tensor, "n"]]:
        """(tower row, patch indices) of one crop (default: the base crop) or video frame, in the batch-first vision
        activations ``[rows, N, ...]``: same contract as :meth:`TokenLayout.vision_rows` (``act[row, idx]`` are the
        patches in raster order; CLIP's ``[CLS]`` at index 0 is skipped)."""
        _, it = self.find_item(image, video)
        k = frame if frame is not None else (crop or 0)
        if not 0 <= k < it.n_rows:
            raise IndexError(f"{it.kind} {it.index} has {it.n_rows} tower rows ({'frames' if it.kind == 'video' else 'crops'}); got {k}")
        g = self.geometry
        prefix = 1 if g.has_cls else 0
        return it.row_offset + k, torch.arange(prefix, prefix + g.side**2)

    def vision_grid(self, activation: Tensor, image: int | None = None, video: int | None = None,
                    crop: int = 0, frame: int | None = None) -> Tensor:  # type: ignore[override]
        """A tower activation ``[rows, N, ...]`` -> the ``[side, side, ...]`` patch grid of one crop (or frame)."""
        row, idx = self.vision_rows(image, video, frame=frame, crop=crop)
        side = self.geometry.side
        return activation[row, idx].reshape(side, side, *activation.shape[2:])

    def summary(self) -> str:
        lines = [super().summary()]
        for i, it in enumerate(self.items):
            if it.kind == "image":
                desc = f"image {it.index}: {it.n_rows} tower row(s) from {it.row_offset}, base {it.grid_thw[1]}x{it.grid_thw[2]}"
                if it.crop_grid != (0, 0):
                    desc += (f", {it.crop_grid[0]}x{it.crop_grid[1]} crops for original {it.image_size}, unpadded "
                             f"{it.unpad[2]}x{it.unpad[3]} at ({it.unpad[0]}, {it.unpad[1]}), LM grid "
                             f"{it.grid_size[0]}x{it.grid_size[1]} + {it.grid_size[0]} newlines")
            else:
                desc = f"video {it.index}: {it.n_rows} frames of {it.grid_thw[1]}x{it.grid_thw[2]} tokens, rows from {it.row_offset}"
            lines.append(f"  item {i} ({it.n_tokens} tokens): {desc}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
def check_common_inputs(model: "HookedLlava", inputs: dict[str, Any], past: int = 0) -> None:
    """Types, devices and shapes shared by prefill and decode."""
    check_token_inputs(model, inputs, past,
                       how_to_build="the LLaVA processor's input_ids, with the image token repeated per feature")
    check_float_pixels(inputs, ("pixel_values", "pixel_values_videos"))


def _as_sizes(image_sizes: Any, n: int) -> list[tuple[int, int]]:
    sizes = torch.as_tensor(image_sizes).reshape(-1, 2).tolist()
    if len(sizes) != n:
        raise InputError(f"image_sizes has {len(sizes)} rows but pixel_values holds {n} images; give one (height, width) per image")
    return [(int(h), int(w)) for h, w in sizes]


def derive_image_sizes(geom: LlavaGeometry, counts: list[int], n_crops: list[int] | None) -> list[tuple[int, int]]:
    """An original (height, width) per image that reproduces each image's placeholder count (and crop count).

    Any size with the same best resolution, unpadding and interpolation gives bit-identical features, so a
    *representative* size is enough. Raises :class:`InputError` when no size (or several that disagree on the
    layout) fits.
    """
    out = []
    for idx, count in enumerate(counts):
        found: dict[tuple, tuple[int, int]] = {}
        for bh, bw in geom.pinpoints:
            for oh, ow in _candidate_sizes(bh, bw, geom):
                if geom.best_resolution((oh, ow)) != (bh, bw):
                    continue
                if n_crops is not None and n_crops[idx] and geom.n_crops((oh, ow)) != n_crops[idx]:
                    continue
                if image_tokens(geom, (oh, ow)) == count:
                    key = (geom.crop_grid((oh, ow)), geom.unpadded((oh, ow)))
                    found.setdefault(key, (oh, ow))
        if len(found) != 1:
            why = "no image size gives" if not found else f"{len(found)} different crop layouts give"
            raise InputError(
                f"image_sizes is required for any-resolution images and could not be derived for image {idx}: {why} "
                f"{count} placeholder tokens with pinpoints {list(geom.pinpoints)}; pass image_sizes (the processor's "
                "[n_images, 2] original (height, width))"
            )
        out.append(next(iter(found.values())))
    return out


def _candidate_sizes(bh: int, bw: int, geom: LlavaGeometry) -> list[tuple[int, int]]:
    """Representative original sizes for the canvas ``bh x bw``: every unpadded row (or column) count at the canvas
    aspect ratio, at a few scales (the best resolution depends on the size, the unpadding on the aspect ratio)."""
    side = geom.side
    ch, cw = (bh // geom.image_size) * side, (bw // geom.image_size) * side
    shapes = [(rows * bh / ch, float(bw)) for rows in range(1, ch + 1)] + [(float(bh), cols * bw / cw) for cols in range(1, cw + 1)]
    sizes = []
    for scale in (0.3, 0.5, 0.7, 0.85, 1.0, 1.5):
        for h, w in shapes:
            sizes.append((max(1, round(h * scale)), max(1, round(w * scale))))
    return list(dict.fromkeys(sizes))


def image_tokens(geom: LlavaGeometry, image_size: tuple[int, int] | None, anyres: bool = True) -> int:
    """Placeholder tokens of one image: base crop (+ the any-res grid and its newlines, or one newline)."""
    base = geom.tokens_per_crop
    if not geom.anyres:
        return base
    if not anyres or image_size is None:
        return base + 1
    _, _, rows, cols = geom.unpadded(image_size)
    target = geom.interpolated(rows, cols)
    if target is not None:
        rows, cols = target
    return base + rows * (cols + 1)


def build_llava_layout(model: "HookedLlava", inputs: dict[str, Any]) -> LlavaLayout:
    """Validate the multimodal inputs and describe every position (HF's 1-D positions need no layout)."""
    check_common_inputs(model, inputs)
    geom = model.geometry(inputs.get("vision_feature_select_strategy"))
    ids: Tensor = inputs["input_ids"]
    am: Tensor | None = inputs.get("attention_mask")
    img_id, vid_id = model.image_token_id, model.video_token_id
    pv, pvv = inputs.get("pixel_values"), inputs.get("pixel_values_videos")
    feats = inputs.get("vision_features")
    b, length = ids.shape

    is_img = ids == img_id
    is_vid = (ids == vid_id) if vid_id is not None else torch.zeros_like(is_img)
    if am is not None:
        is_img, is_vid = is_img & am.bool(), is_vid & am.bool()

    # ----- images: counts per image ---------------------------------------------------------------
    image_specs: list[dict[str, Any]] = []
    if pv is not None:
        image_specs = _image_specs(model, geom, inputs, is_img)
    elif int(is_img.sum()) and feats is None:
        raise InputError(
            f"input_ids holds {int(is_img.sum())} image placeholder tokens (id {img_id}) but no pixel_values were given; "
            "pass the processor's pixel_values (or remove the placeholders)"
        )
    video_specs: list[dict[str, Any]] = []
    if pvv is not None:
        if vid_id is None or not geom.video_pool:
            raise InputError(f"{type(model).__name__} ({model.cfg.architecture}) takes no videos; pass pixel_values only")
        if pvv.dim() != 5:
            raise InputError(f"pixel_values_videos must be [n_videos, frames, 3, {geom.image_size}, {geom.image_size}]; got {tuple(pvv.shape)}")
        _check_pixels("pixel_values_videos", pvv, geom)
        for _ in range(pvv.shape[0]):
            video_specs.append(dict(kind="video", frames=pvv.shape[1], tokens=geom.video_tokens(pvv.shape[1])))
    elif int(is_vid.sum()) and feats is None:
        raise InputError(
            f"input_ids holds {int(is_vid.sum())} video placeholder tokens (id {vid_id}) but no pixel_values_videos were given"
        )
    if feats is not None and pv is None and pvv is None:
        raise InputError("vision_features needs the pixel inputs (or at least their shapes) to place them; pass pixel_values / image_sizes too")

    kind = torch.where(is_img, IMAGE, torch.where(is_vid, VIDEO, TEXT))
    if am is not None:
        kind = kind.masked_fill(am == 0, PAD)
    item = torch.full_like(kind, -1)
    frame, row, col, part, crop = (item.clone() for _ in range(5))
    items: list[LlavaItem] = []
    tower_row = 0
    all_specs = image_specs + video_specs
    rows_of = []
    for spec in all_specs:
        rows_of.append(tower_row)
        tower_row += spec["rows"] if spec["kind"] == "image" else spec["frames"]
    for code, specs, mask, label, tok in ((IMAGE, image_specs, is_img, "image", img_id), (VIDEO, video_specs, is_vid, "video", vid_id)):
        flat = mask.reshape(-1).nonzero().flatten()
        needed = sum(s["tokens"] for s in specs)
        if flat.numel() != needed:
            per = ", ".join(str(s["tokens"]) for s in specs)
            raise InputError(
                f"found {flat.numel()} {label} placeholder tokens (id {tok}) in input_ids but the {len(specs)} {label}(s) "
                f"need {needed} ({per}); build the prompt with the model's processor or repeat the placeholder that many "
                f"times per {label} (hooked_vlm.families.llava_inputs.expand_placeholders)"
            )
        cursor = 0
        for idx, s in enumerate(specs):
            n = s["tokens"]
            fp = flat[cursor : cursor + n]
            bi = int(fp[0]) // length
            if int(fp[-1]) // length != bi:
                raise InputError(f"{label} {idx}'s {n} placeholder tokens span two prompts; each prompt needs all of its own placeholders")
            pos = fp - bi * length
            it_id = len(items)
            item[bi, pos] = it_id
            offset = rows_of[idx if code == IMAGE else len(image_specs) + idx]
            items.append(_fill_item(geom, s, label, idx, bi, int(pos[0]), offset, pos, frame, row, col, part, crop))
            cursor += n
    return LlavaLayout(ids, kind, item, frame, row, col, items, None, None, am, {"tower_rows": tower_row}, part, crop, geom)


def _check_pixels(name: str, t: Tensor, geom: LlavaGeometry) -> None:
    if tuple(t.shape[-3:]) != (3, geom.image_size, geom.image_size):
        raise InputError(
            f"{name} crops must be 3 x {geom.image_size} x {geom.image_size} (the tower's image_size); got "
            f"{tuple(t.shape[-3:])}; preprocess with this model's image processor"
        )


def _image_specs(model: "HookedLlava", geom: LlavaGeometry, inputs: dict[str, Any], is_img: Tensor) -> list[dict[str, Any]]:
    pv: Tensor = inputs["pixel_values"]
    _check_pixels("pixel_values", pv, geom)
    if not geom.anyres:
        if pv.dim() != 4:
            raise InputError(f"pixel_values must be [n_images, 3, {geom.image_size}, {geom.image_size}] for LLaVA-1.5; got {tuple(pv.shape)}")
        if inputs.get("image_sizes") is not None:
            raise InputError("image_sizes is for any-resolution models (LLaVA-NeXT / OneVision); LLaVA-1.5 images are single crops")
        return [dict(kind="image", rows=1, size=None, anyres=False, tokens=geom.tokens_per_crop) for _ in range(pv.shape[0])]
    concatenated = pv.dim() == 4  # transformers also takes every image's crops concatenated: [total_crops, 3, S, S]
    if concatenated and inputs.get("image_sizes") is None:
        raise InputError(
            f"pixel_values is 4-D {tuple(pv.shape)} (crops of all images concatenated), which needs image_sizes to split "
            f"it; pass image_sizes or the processor's 5-D [n_images, max_crops, 3, {geom.image_size}, {geom.image_size}]"
        )
    if pv.dim() not in (4, 5):
        raise InputError(f"pixel_values must be 5-D [n_images, max_crops, 3, H, W] (or 4-D concatenated crops); got {tuple(pv.shape)}")
    n = len(torch.as_tensor(inputs["image_sizes"]).reshape(-1, 2)) if concatenated else pv.shape[0]
    patching = [True] * n
    bni = inputs.get("batch_num_images")
    if bni is not None:
        if model.cfg.hf_config.get("model_type") != "llava_onevision":
            raise InputError("batch_num_images is a LLaVA-OneVision input")
        counts = torch.as_tensor(bni).flatten().tolist()
        if sum(counts) != n:
            raise InputError(f"batch_num_images sums to {sum(counts)} but pixel_values holds {n} images")
        patching = [c == 1 for c in counts for _ in range(c)]
    sizes_in = inputs.get("image_sizes")
    if sizes_in is None:
        sizes = _derive_sizes(geom, pv, is_img, patching)
    else:
        sizes = _as_sizes(sizes_in, n)
    specs = []
    for i, (size, anyres) in enumerate(zip(sizes, patching)):
        rows = geom.n_crops(size) if anyres else 1
        if anyres and not concatenated and rows > pv.shape[1]:
            raise InputError(
                f"image {i} of original size {size} needs {rows} crops (best resolution {geom.best_resolution(size)} + base) "
                f"but pixel_values has only {pv.shape[1]} per image; image_sizes and pixel_values come from different images"
            )
        if anyres and geom.tokens_per_crop != geom.side**2:
            raise InputError(
                f"any-resolution packing needs {geom.side}x{geom.side} tokens per crop but the '{geom.strategy}' strategy "
                f"keeps {geom.tokens_per_crop} (CLS); transformers cannot pack this either; use 'default' with a CLS tower"
            )
        specs.append(dict(kind="image", rows=rows, size=size, anyres=anyres, tokens=image_tokens(geom, size, anyres)))
    if concatenated and sum(sp["rows"] for sp in specs) != pv.shape[0]:
        raise InputError(
            f"pixel_values holds {pv.shape[0]} concatenated crops but image_sizes implies "
            f"{sum(sp['rows'] for sp in specs)} ({', '.join(str(sp['rows']) for sp in specs)} per image, base crop included)"
        )
    return specs


def _derive_sizes(geom: LlavaGeometry, pv: Tensor, is_img: Tensor, patching: list[bool]) -> list[tuple[int, int]]:
    """Derive image sizes from the placeholder runs when each image is its own run (else raise)."""
    runs: list[int] = []
    for b in range(is_img.shape[0]):
        m = is_img[b].tolist()
        i = 0
        while i < len(m):
            if m[i]:
                j = i
                while j < len(m) and m[j]:
                    j += 1
                runs.append(j - i)
                i = j
            else:
                i += 1
    if len(runs) != pv.shape[0]:
        raise InputError(
            f"image_sizes is required for any-resolution models: it was not given and the {pv.shape[0]} images cannot be "
            f"matched to the {len(runs)} placeholder runs in input_ids to derive it; pass image_sizes (the processor's "
            "[n_images, 2] original (height, width))"
        )
    nonzero = [(int((pv[i].flatten(1).abs().sum(-1) > 0).sum())) for i in range(pv.shape[0])]
    sizes: list[tuple[int, int]] = []
    for i, (count, anyres) in enumerate(zip(runs, patching)):
        if not anyres:
            sizes.append((geom.image_size, geom.image_size))
            continue
        sizes.extend(derive_image_sizes(geom, [count], [nonzero[i]]))
    return sizes


def _fill_item(geom: LlavaGeometry, s: dict[str, Any], label: str, idx: int, bi: int, start: int, row_offset: int,
               pos: Tensor, frame: Tensor, row: Tensor, col: Tensor, part: Tensor, crop: Tensor) -> LlavaItem:
    n = s["tokens"]
    side = geom.side
    dev = pos.device
    if label == "video":
        gh, gw = geom.video_grid()
        f = s["frames"]
        k = torch.arange(f * gh * gw, device=dev)
        body = pos[: f * gh * gw]
        frame[bi, body] = k // (gh * gw)
        row[bi, body] = (k % (gh * gw)) // gw
        col[bi, body] = k % gw
        part[bi, body] = FRAME
        if n > f * gh * gw:  # OneVision's trailing newline
            part[bi, pos[-1]] = NEWLINE
        return LlavaItem("video", idx, bi, start, (f, gh, gw), 1, geom.patch_size, 1, 0, row_offset, None,
                         n_rows=f, row_offset=row_offset, total_tokens=n, tower_size=geom.image_size)
    base = geom.tokens_per_crop
    bpos = pos[:base]
    if base > side * side:  # CLS kept ("full" with CLIP)
        part[bi, bpos[0]] = CLS
        bpos = bpos[1:]
    k = torch.arange(side * side, device=dev)[side * side - bpos.numel() :]  # SigLIP + "default" drops the first patch
    part[bi, bpos] = BASE
    crop[bi, bpos] = 0
    row[bi, bpos] = k // side
    col[bi, bpos] = k % side
    if base > side * side:
        crop[bi, pos[0]] = 0
    grid = (0, 0)
    unpad = (0, 0, 0, 0)
    cg = (0, 0)
    rest = pos[base:]
    if s.get("anyres") and geom.anyres:
        cg = geom.crop_grid(s["size"])
        unpad = geom.unpadded(s["size"])
        top, left, rows, cols = unpad
        target = geom.interpolated(rows, cols)
        grid = target if target is not None else (rows, cols)
        gr, gc = grid
        rr = torch.arange(gr, device=dev)[:, None].expand(gr, gc + 1).reshape(-1)
        cc = torch.arange(gc + 1, device=dev)[None].expand(gr, gc + 1).reshape(-1)
        is_nl = cc == gc
        row[bi, rest] = rr
        col[bi, rest] = torch.where(is_nl, -1, cc)
        part[bi, rest] = torch.where(is_nl, NEWLINE, GRID)
        if target is None:
            cr = (rr + top) // side
            ccrop = (cc + left) // side
            crop[bi, rest] = torch.where(is_nl, -1, 1 + cr * cg[1] + ccrop)
    elif geom.newline and rest.numel():
        part[bi, rest] = NEWLINE
    return LlavaItem("image", idx, bi, start, (1, side, side), 1, geom.patch_size, 1, 0, row_offset, None,
                     n_rows=s["rows"], row_offset=row_offset, image_size=s.get("size"), crop_grid=cg, unpad=unpad,
                     grid_size=grid, base_tokens=base, total_tokens=n, tower_size=geom.image_size)


__all__ = [
    "LlavaGeometry",
    "LlavaItem",
    "LlavaLayout",
    "build_llava_layout",
    "check_common_inputs",
    "derive_image_sizes",
    "image_tokens",
    "geometry_from_config",
    "parse_anyres_max",
    "BASE",
    "GRID",
    "NEWLINE",
    "CLS",
    "FRAME",
    "PART_NAMES",
]
