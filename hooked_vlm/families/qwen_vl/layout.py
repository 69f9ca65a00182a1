"""Validation of Qwen-VL keyword inputs, their token layout and M-RoPE position ids.

Every check raises :class:`InputError` naming what is wrong and how to fix it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_vlm.errors import InputError
from hooked_vlm.input_checks import check_float_pixels, check_token_inputs
from hooked_vlm.layout import IMAGE, KIND_NAMES, PAD, SPECIAL, TEXT, VIDEO, TokenLayout, VisualItem

if TYPE_CHECKING:
    from hooked_vlm.families.qwen_vl.model import HookedQwenVL


HOW_TO_BUILD = "hooked_vlm.inputs.build_qwen_inputs or the HF processor"


def check_common_inputs(model: "HookedQwenVL", inputs: dict[str, Any], past: int = 0, how_to_build: str = HOW_TO_BUILD) -> None:
    """Types, devices and batch shapes shared by prefill and decode (``past`` cached positions)."""
    check_token_inputs(model, inputs, past, per_position=("mm_token_type_ids",), how_to_build=how_to_build)
    check_float_pixels(inputs, ("pixel_values", "pixel_values_videos"))


def check_grids(inputs: dict[str, Any], spec: Any) -> tuple[Tensor | None, Tensor | None]:
    """``(image_grid_thw, video_grid_thw)``, each checked against its pixel rows; a grid is needed to place
    ``vision_features=``."""
    igrid, vgrid = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
    _check_grid("image_grid_thw", igrid, inputs.get("pixel_values"), "pixel_values", spec)
    _check_grid("video_grid_thw", vgrid, inputs.get("pixel_values_videos"), "pixel_values_videos", spec)
    if inputs.get("vision_features") is not None and igrid is None and vgrid is None:
        raise InputError("vision_features needs image_grid_thw / video_grid_thw to place them")
    return igrid, vgrid


def token_types(ids: Tensor, am: Tensor | None, given: Tensor | None, tok: dict[str, int]) -> Tensor:
    """``mm_token_type_ids`` (0 text, 1 image, 2 video): derived from the placeholder ids, checked against ``given``;
    padding positions are text."""
    derived = torch.zeros_like(ids, dtype=torch.long)
    derived[ids == tok["image_token_id"]] = IMAGE
    derived[ids == tok["video_token_id"]] = VIDEO
    if given is not None and not torch.equal(given.long(), derived):
        bad = (given.long() != derived).nonzero()[0].tolist()
        raise InputError(
            f"mm_token_type_ids disagrees with input_ids at (batch, pos) = {tuple(bad)}: it must be 1 exactly at image "
            f"tokens (id {tok['image_token_id']}) and 2 at video tokens (id {tok['video_token_id']}); omit it and "
            "hooked_vlm derives it from the ids"
        )
    return derived if am is None else derived.masked_fill(am == 0, TEXT)


def place_items(
    model: Any, ids: Tensor, am: Tensor | None, mm: Tensor, igrid: Tensor | None, vgrid: Tensor | None,
    how_to_build: str, seconds: list[float] | None = None, check_slices: Callable[[Tensor, str, int], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[VisualItem]]:
    """Per-position ``kind, item, frame, row, col`` and the :class:`VisualItem` list of a Qwen-style prompt: each
    image / video is ``t*h*w / merge^2`` placeholders in slice-major, raster order (``check_slices(pos [t, per
    slice], label, index)`` checks where each slice's placeholders stand); ``seconds``: per video."""
    spec, tok = model.vision_spec, model.token_ids
    b, length = ids.shape
    kind = torch.where(mm == IMAGE, IMAGE, torch.where(mm == VIDEO, VIDEO, TEXT))
    special = (ids == tok["vision_start_token_id"]) | (ids == tok["vision_end_token_id"])
    kind = torch.where(special, torch.full_like(kind, SPECIAL), kind)
    if am is not None:
        kind = kind.masked_fill(am == 0, PAD)
    item = torch.full_like(kind, -1)
    frame, row, col = item.clone(), item.clone(), item.clone()
    items: list[VisualItem] = []
    for code, grid, label in ((IMAGE, igrid, "image"), (VIDEO, vgrid, "video")):
        flat = (mm == code).reshape(-1).nonzero().flatten()
        grids = [] if grid is None else [tuple(int(x) for x in g) for g in grid.tolist()]
        needed = sum(t * h * w // spec.merge**2 for t, h, w in grids)
        pad_id = tok["image_token_id" if code == IMAGE else "video_token_id"]
        if flat.numel() != needed:
            raise InputError(
                f"found {flat.numel()} {label} placeholder tokens (id {pad_id}) in input_ids but {label}_grid_thw implies "
                f"{needed} (= sum of t*h*w / {spec.merge}^2 over {len(grids)} {label}(s)); build the prompt with "
                f"{how_to_build}, which repeats the placeholder exactly that many times per {label}"
            )
        cursor, pix = 0, 0
        for idx, (t, h, w) in enumerate(grids):
            per_slice = h * w // spec.merge**2
            n = t * per_slice
            flat_pos = flat[cursor : cursor + n]
            bi = int(flat_pos[0]) // length
            pos = flat_pos - bi * length
            if int(flat_pos[-1]) // length != bi:
                raise InputError(f"{label} {idx}'s {n} placeholder tokens span two prompts; each prompt needs all of its own placeholders")
            if check_slices is not None:
                check_slices(pos.view(t, per_slice), label, idx)
            sec = seconds[idx] if (code == VIDEO and seconds is not None) else None
            items.append(
                VisualItem(label, idx, bi, int(pos[0]), (t, h, w), spec.merge, spec.patch_size, spec.temporal_patch_size, 0, pix, sec)
            )
            gw = w // spec.merge
            k = torch.arange(n)
            pos = pos.to(ids.device)
            item[bi, pos] = len(items) - 1
            frame[bi, pos] = (k // per_slice).to(ids.device)
            row[bi, pos] = ((k % per_slice) // gw).to(ids.device)
            col[bi, pos] = (k % gw).to(ids.device)
            cursor += n
            pix += t * h * w
    return kind, item, frame, row, col, _with_vision_offsets(items, b, item)


def _check_grid(name: str, grid: Tensor | None, pixels: Tensor | None, pixel_name: str, spec) -> None:
    if (grid is None) != (pixels is None):
        have, missing = (name, pixel_name) if pixels is None else (pixel_name, name)
        raise InputError(f"{have} was given without {missing}; pass both (the processor returns them together) or neither")
    if grid is None or pixels is None:
        return
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise InputError(f"{name} must be [n, 3] rows of (t, h, w) patch counts; got shape {tuple(grid.shape)}")
    for i, (t, h, w) in enumerate(grid.tolist()):
        if h % spec.merge or w % spec.merge:
            raise InputError(
                f"{name}[{i}] = ({t}, {h}, {w}): h and w must be multiples of spatial_merge_size={spec.merge}; "
                f"resize the image to multiples of {spec.merge * spec.patch_size} px (hooked_vlm.inputs.smart_resize)"
            )
    rows = int(grid.prod(-1).sum())
    if pixels.dim() != 2 or pixels.shape[0] != rows:
        raise InputError(
            f"{pixel_name} has {pixels.shape[0] if pixels.dim() else '?'} rows but {name} implies {rows} "
            f"(= sum of t*h*w); the pixels and the grid come from different images or a different patch size"
        )
    if pixels.shape[1] != spec.patch_dim:
        raise InputError(
            f"{pixel_name} rows have {pixels.shape[1]} values but this model expects {spec.patch_dim} "
            f"(= channels {spec.in_channels} x temporal {spec.temporal_patch_size} x {spec.patch_size}x{spec.patch_size})"
        )


def build_qwen_layout(model: "HookedQwenVL", inputs: dict[str, Any]) -> TokenLayout:
    """Validate the multimodal inputs and describe every position (with HF's M-RoPE ids)."""
    check_common_inputs(model, inputs)
    spec = model.vision_spec
    tok = model.token_ids
    ids: Tensor = inputs["input_ids"]
    am: Tensor | None = inputs.get("attention_mask")
    igrid, vgrid = check_grids(inputs, spec)
    spgt = inputs.get("second_per_grid_ts")
    if spgt is not None:
        spgt = torch.as_tensor(spgt).flatten()
        n_videos = 0 if vgrid is None else vgrid.shape[0]
        if spgt.numel() != n_videos:
            raise InputError(
                f"second_per_grid_ts has {spgt.numel()} entries but there are {n_videos} videos; "
                "give one value per video (temporal_patch_size / fps)"
            )

    mm = token_types(ids, am, inputs.get("mm_token_type_ids"), tok)
    seconds = None if spgt is None else [float(x) for x in spgt]
    kind, item, frame, row, col, items = place_items(model, ids, am, mm, igrid, vgrid, HOW_TO_BUILD, seconds=seconds)

    position_ids, deltas = None, None
    if igrid is not None or vgrid is not None:
        position_ids, deltas = mrope_position_ids(
            ids, mm, igrid, vgrid, am, spec.merge, spgt,
            spec.tokens_per_second if spec.version == "2.5" else None, rule=model.rope_rule,
        )
    return TokenLayout(ids, kind, item, frame, row, col, items, position_ids, deltas, am)


def _with_vision_offsets(items: list[VisualItem], batch: int, item_map: Tensor) -> list[VisualItem]:
    """Fill each item's first row in its prompt's vision batch row (items ordered by position)."""
    from dataclasses import replace

    offsets = [0] * batch
    out = list(items)
    for i in sorted(range(len(items)), key=lambda j: (items[j].batch, items[j].start)):
        it = items[i]
        out[i] = replace(it, vision_offset=offsets[it.batch])
        offsets[it.batch] += it.n_patches
    return out


def mrope_position_ids(
    input_ids: Int[Tensor, "batch pos"],
    mm_token_type_ids: Int[Tensor, "batch pos"],
    image_grid_thw: Tensor | None,
    video_grid_thw: Tensor | None,
    attention_mask: Tensor | None,
    spatial_merge_size: int,
    second_per_grid_ts: Tensor | None = None,
    tokens_per_second: float | None = None,
    rule: Literal["transformers-5.23", "official"] = "transformers-5.23",
) -> tuple[Int[Tensor, "3 batch pos"], Int[Tensor, "batch"]]:
    """Qwen M-RoPE position ids and rope deltas, exactly as transformers 5.23 ``get_rope_index``.

    Runs of equal ``mm_token_type_ids`` are walked in order; a text run of n takes ``cur..cur+n-1``
    on all three axes; a vision run at ``s = cur`` takes T = s + scaled slice index, H = s + row,
    W = s + col. ``rule="transformers-5.23"`` then continues at ``s + max(h', w')``; ``rule="official"``
    (transformers 4.x / the Qwen reference code) continues at ``max(all ids of the run) + 1``. They
    differ only when scaled video time exceeds the spatial extent. Padding positions get 0.
    """
    b, length = input_ids.shape
    pos = torch.zeros(3, b, length, dtype=torch.long, device=input_ids.device)
    grids = {
        IMAGE: iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(()),
        VIDEO: iter(video_grid_thw.tolist()) if video_grid_thw is not None else iter(()),
    }
    seconds = iter(second_per_grid_ts.tolist()) if second_per_grid_ts is not None else None
    deltas = []
    for bi in range(b):
        valid = attention_mask[bi].bool() if attention_mask is not None else torch.ones(length, dtype=torch.bool)
        types = mm_token_type_ids[bi][valid.to(mm_token_type_ids.device)].tolist()
        chunks, cur = [], 0
        for key, grp in itertools.groupby(types):
            n = len(list(grp))
            if key == TEXT:
                chunks.append(torch.arange(n).expand(3, -1) + cur)
                cur += n
                continue
            try:
                t, h, w = next(grids[key])
            except StopIteration:
                raise ValueError(
                    f"prompt {bi} has more {KIND_NAMES[key]} placeholder runs than grids in "
                    f"{'image' if key == IMAGE else 'video'}_grid_thw"
                ) from None
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            interval = 1.0
            if key == VIDEO and tokens_per_second is not None:
                sec = next(seconds) if seconds is not None else 1.0
                interval = tokens_per_second * sec
            tt = (torch.arange(t) * interval).long()
            tt, hh, ww = torch.meshgrid(tt, torch.arange(gh), torch.arange(gw), indexing="ij")
            ids = torch.stack([tt.flatten() + cur, hh.flatten() + cur, ww.flatten() + cur])
            chunks.append(ids)
            cur = cur + max(gh, gw) if rule == "transformers-5.23" else int(ids.max()) + 1
        flat = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
        pos[:, bi, valid.to(pos.device)] = flat.to(pos.device)
        n_valid = int(valid.sum())
        deltas.append((int(flat.max()) + 1 if flat.numel() else 0) - n_valid)
    return pos, torch.tensor(deltas, dtype=torch.long, device=input_ids.device)
