"""Checks every family applies to its keyword inputs: token ids, devices, per-position shapes.

Each raises :class:`InputError` naming the problem and the fix; family modules add their own
multimodal checks (grids, image sizes, token types) on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from hooked_vlm.errors import InputError


def check_token_inputs(
    model: nn.Module,
    inputs: dict[str, Any],
    past: int = 0,
    per_position: Sequence[str] = (),
    how_to_build: str = "the model's HF processor",
) -> Tensor:
    """Validate ``input_ids`` (2-D integer), that every tensor sits on the model's device, that
    ``attention_mask`` covers the ``past`` cached positions plus the new ones, and that each name in
    ``per_position`` has one entry per new position. Returns ``input_ids``."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise InputError(f"input_ids is required (build it with {how_to_build})")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise InputError(f"input_ids must be a [batch, seq] integer tensor; got {type(ids).__name__} {tuple(getattr(ids, 'shape', ()))}")
    if ids.dtype.is_floating_point:
        raise InputError(f"input_ids must be integer token ids, got dtype {ids.dtype}; pass input_ids.long()")
    device = next(model.parameters()).device
    for name, t in inputs.items():
        if isinstance(t, Tensor) and t.device != device:
            raise InputError(
                f"{name} is on {t.device} but the model is on {device}; move the inputs with "
                f"{{k: v.to('{device}') for k, v in inputs.items()}} or the model with model.to('{t.device}')"
            )
    for name, extra in [("attention_mask", past)] + [(n, 0) for n in per_position]:
        t = inputs.get(name)
        want = (ids.shape[0], ids.shape[1] + extra)
        if t is not None and tuple(t.shape) != want:
            raise InputError(
                f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(ids.shape)}"
                + (f" after {past} cached positions" if extra else "")
                + f"; expected {want} (same batch, one entry per position)"
            )
    return ids


def check_float_pixels(inputs: dict[str, Any], names: Sequence[str]) -> None:
    """Pixel tensors must be floating (normalised), not raw uint8 images."""
    for name in names:
        t = inputs.get(name)
        if t is not None and (not isinstance(t, Tensor) or not t.dtype.is_floating_point):
            raise InputError(
                f"{name} must be a floating tensor of normalised pixels, got {getattr(t, 'dtype', type(t).__name__)}; "
                "did you pass raw uint8 pixels? Preprocess with hooked_vlm.inputs or the HF image processor"
            )
