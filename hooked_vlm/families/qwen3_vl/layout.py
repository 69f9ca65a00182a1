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
from hooked_vlm.families.qwen_vl import layout as qwen_layout
from hooked_vlm.layout import TokenLayout

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
    qwen_layout.check_common_inputs(model, inputs, past, how_to_build=HOW_TO_BUILD)


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
    ids: Tensor = inputs["input_ids"]
    am: Tensor | None = inputs.get("attention_mask")
    if inputs.get("vision_features") is not None and all(inputs.get(k) is None for k in ("pixel_values", "pixel_values_videos")):
        raise InputError(DEEPSTACK_NEEDS_PIXELS)
    igrid, vgrid = qwen_layout.check_grids(inputs, spec)
    mm = qwen_layout.token_types(ids, am, inputs.get("mm_token_type_ids"), model.token_ids)
    kind, item, frame, row, col, items = qwen_layout.place_items(model, ids, am, mm, igrid, vgrid, HOW_TO_BUILD,
                                                                 check_slices=_check_runs)
    position_ids, deltas = None, None
    if igrid is not None or vgrid is not None:
        position_ids, deltas = qwen_layout.mrope_position_ids(ids, mm, igrid, split_video_grids(vgrid), am, spec.merge,
                                                              rule="transformers-5.23")
    return TokenLayout(ids, kind, item, frame, row, col, items, position_ids, deltas, am)


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
