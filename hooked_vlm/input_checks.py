"""Checks every family applies to its keyword inputs: token ids, devices, per-position shapes.

Each raises :class:`InputError` naming the problem and the fix; family modules add their own
multimodal checks (grids, image sizes, token types) on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
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
    vocab = getattr(getattr(model, "embed", None), "num_embeddings", None)
    if vocab is not None and ids.numel() and ids.device.type != "meta":
        outside = ids[(ids < 0) | (ids >= vocab)]
        if outside.numel():  # placeholder ids may lie outside the vocabulary (replaced by visual features)
            outside = outside[~torch.isin(outside, torch.tensor(sorted(_placeholder_ids(model)), dtype=outside.dtype, device=outside.device))]
        if outside.numel():
            bad = int(outside[0])
            raise InputError(
                f"input_ids holds token id {bad} but this model's vocabulary has {vocab} ids (0..{vocab - 1}); "
                "tokenize with this model's own tokenizer / processor (a different model's tokenizer gives other ids)"
            )
    return ids


def _placeholder_ids(model: nn.Module) -> set[int]:
    """The family's image / video / vision-marker token ids (they may lie outside the text vocabulary)."""
    ids: set[int] = set()
    for name in ("token_ids", "image_token_id", "video_token_id"):
        try:
            value = getattr(model, name, None)
        except (KeyError, AttributeError):
            continue
        for v in (value.values() if isinstance(value, dict) else [value]):
            if isinstance(v, int):
                ids.add(v)
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


def check_vision_features(feats: Any, batch: int, tokens_per_row: Sequence[int], d_model: int) -> None:
    """``vision_features`` must be ``[batch, >= visual tokens of each prompt, d_model]``, as ``vision.hook_out``
    and ``encode_vision`` return them for the same inputs."""
    need = max(tokens_per_row, default=0)
    ok = isinstance(feats, Tensor) and feats.dim() == 3 and feats.shape[0] == batch and feats.shape[2] == d_model
    short = [b for b, n in enumerate(tokens_per_row) if ok and feats.shape[1] < n]
    if not ok or short:
        got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise InputError(
            f"vision_features must be [{batch}, >= {need}, {d_model}] (one row per prompt, one vector per visual token, "
            f"the language model's width) but got {got}"
            + (f"; prompt(s) {short} have more visual tokens than their row holds" if short else "")
            + "; pass what encode_vision(**inputs) or the cache's vision.hook_out returns for these same inputs"
        )
