"""Validation of Qwen3-VL keyword inputs, their token layout and (transformers 5.24) M-RoPE position ids.

An image is one run of ``t*h*w / merge^2`` placeholders between ``<|vision_start|>`` and ``<|vision_end|>``. A
video of ``t`` temporal slices is ``t`` such runs, each preceded by its timestamp text (``<0.5 seconds>``), so
its placeholders are not contiguous: each slice is its own run for the position ids (``get_rope_index`` splits
``video_grid_thw`` into ``t`` grids of one slice). Every check raises :class:`InputError` naming the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hooked_vlm.errors import InputError
from hooked_vlm.families.qwen_vl.layout import _check_grid, _with_vision_offsets, mrope_position_ids
from hooked_vlm.input_checks import check_float_pixels, check_token_inputs
from hooked_vlm.layout import IMAGE, PAD, SPECIAL, TEXT, VIDEO, TokenLayout, VisualItem

if TYPE_CHECKING:
    from hooked_vlm.families.qwen3_vl.model import HookedQwen3VL

DEEPSTACK_NEEDS_PIXELS = (
    "Qwen3-VL adds DeepStack features of the vision tower to the first language-model blocks, so vision_features= "
    "(which replaces vision.hook_out) needs the pixel inputs as well; pass pixel_values / pixel_values_videos and their "
    "grids with it (edit blocks.{k}.hook_deepstack to change the DeepStack part)"
)
HOW_TO_BUILD = "hooked_vlm.families.qwen3_vl.preprocess.build_qwen3_vl_inputs or Qwen3VLProcessor"


def check_common_inputs(model: "HookedQwen3VL", inputs: dict[str, Any], past: int = 0) -> None:
    """Types, devices and batch shapes shared by prefill and decode (``past`` cached positions)."""
    check_token_inputs(model, inputs, past, per_position=("mm_token_type_ids",), how_to_build=HOW_TO_BUILD)
    check_float_pixels(inputs, ("pixel_values", "pixel_values_videos"))


def split_video_grids(video_grid_thw: Tensor | None) -> Tensor | None:
    """``(t, h, w)`` per video -> ``t`` rows of ``(1, h, w)``: one grid per temporal slice (transformers' rule)."""
    if video_grid_thw is None:
        return None
    grids = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0).clone()
    grids[:, 0] = 1
    return grids


def build_qwen3_vl_layout(model: "HookedQwen3VL", inputs: dict[str, Any]) -> TokenLayout:
    """Validate the multimodal inputs and describe every position, with transformers' M-RoPE ids.

    Each image / video is one :class:`VisualItem` (a video's ``frame`` is its temporal slice; its slices' tokens
    are separated by timestamps, so use :meth:`TokenLayout.positions` / ``cell`` rather than offsets from
    ``start``). ``mm_token_type_ids`` is derived from the ids when absent and checked when given.
    """
    check_common_inputs(model, inputs)
    spec = model.vision_spec
    tok = model.token_ids
    ids: Tensor = inputs["input_ids"]
    am: Tensor | None = inputs.get("attention_mask")
    igrid, vgrid = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
    if inputs.get("vision_features") is not None and all(inputs.get(k) is None for k in ("pixel_values", "pixel_values_videos")):
        raise InputError(DEEPSTACK_NEEDS_PIXELS)
    _check_grid("image_grid_thw", igrid, inputs.get("pixel_values"), "pixel_values", spec)
    _check_grid("video_grid_thw", vgrid, inputs.get("pixel_values_videos"), "pixel_values_videos", spec)
    if inputs.get("vision_features") is not None and igrid is None and vgrid is None:
        raise InputError("vision_features needs image_grid_thw / video_grid_thw to place them")
    mm = _token_types(ids, am, inputs.get("mm_token_type_ids"), tok)
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
                f"{needed} (= sum of t*h*w / {spec.merge}^2 over {len(grids)} {label}(s)); build the prompt with {HOW_TO_BUILD}"
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
            _check_runs(pos.view(t, per_slice), label, idx)
            items.append(VisualItem(label, idx, bi, int(pos[0]), (t, h, w), spec.merge, spec.patch_size, spec.temporal_patch_size, 0, pix))
            gw = w // spec.merge
            k = torch.arange(n)
            pos = pos.to(ids.device)
            item[bi, pos] = len(items) - 1
            frame[bi, pos] = (k // per_slice).to(ids.device)
            row[bi, pos] = ((k % per_slice) // gw).to(ids.device)
            col[bi, pos] = (k % gw).to(ids.device)
            cursor += n
            pix += t * h * w
    items = _with_vision_offsets(items, b, item)
    position_ids, deltas = None, None
    if igrid is not None or vgrid is not None:
        position_ids, deltas = mrope_position_ids(ids, mm, igrid, split_video_grids(vgrid), am, spec.merge, rule="transformers-5.23")
    return TokenLayout(ids, kind, item, frame, row, col, items, position_ids, deltas, am)


def _token_types(ids: Tensor, am: Tensor | None, given: Tensor | None, tok: dict[str, int]) -> Tensor:
    """``mm_token_type_ids`` (0 text, 1 image, 2 video): derived from the placeholder ids, checked against ``given``."""
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


def _check_runs(pos: Tensor, label: str, idx: int) -> None:
    """Each temporal slice's placeholders are one run, and consecutive slices are separate runs (a timestamp and
    the vision start / end tokens lie between them), as transformers' position rule needs."""
    for f in range(pos.shape[0]):
        if int(pos[f, -1] - pos[f, 0]) != pos.shape[1] - 1:
            raise InputError(f"{label} {idx} slice {f}'s placeholders are not consecutive; build the prompt with {HOW_TO_BUILD}")
        if f and int(pos[f, 0]) == int(pos[f - 1, -1]) + 1:
            raise InputError(
                f"{label} {idx}: slices {f - 1} and {f} are one run of placeholders; Qwen3-VL writes each slice as "
                f"'<t seconds><|vision_start|> placeholders <|vision_end|>' (build the prompt with {HOW_TO_BUILD})"
            )


__all__ = ["build_qwen3_vl_layout", "check_common_inputs", "split_video_grids", "HOW_TO_BUILD"]
