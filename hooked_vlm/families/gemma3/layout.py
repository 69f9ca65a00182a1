"""Gemma 3 / MedGemma inputs: validation, token layout and bidirectional image blocks (the prompt builder: ``preprocess``).

A Gemma 3 prompt shows each image as ``<start_of_image> <image>*mm_tokens_per_image <end_of_image>``
(the processor also surrounds it with blank lines). ``pixel_values`` is ``[n_images, 3, S, S]`` with every
image resized to the SigLIP tower's ``image_size``; image tokens are filled with the pooled image
features in sequence order (row-major over the batch), exactly as transformers' ``masked_scatter``.

``token_type_ids`` (1 at image tokens) decides which positions attend to each other bidirectionally:
each run of consecutive 1s is one block (``get_block_sequence_ids_for_mask`` in transformers). When it is
not given and the prompt holds images, it is derived from the image token id (what the processor
would have produced) and a warning says so. Every check raises :class:`InputError` naming the fix.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_vlm.errors import InputError
from hooked_vlm.input_checks import check_float_pixels, check_token_inputs
from hooked_vlm.families.image_runs import check_square_pixels, count_images, image_run_positions
from hooked_vlm.layout import TokenLayout, VisualItem

if TYPE_CHECKING:
    from hooked_vlm.families.gemma3.model import HookedGemma3


def check_common_inputs(model: "HookedGemma3", inputs: dict[str, Any], past: int = 0) -> None:
    """Types, devices and shapes shared by prefill and decode (``past`` cached positions).

    ``token_type_ids`` is checked at prefill only: transformers drops it at decode steps too.
    """
    check_token_inputs(model, inputs, past, per_position=() if past else ("token_type_ids",),
                       how_to_build="hooked_vlm.families.gemma3_inputs.build_gemma3_inputs or the HF processor")
    check_float_pixels(inputs, ("pixel_values",))
    check_square_pixels(inputs.get("pixel_values"), model.vision_spec.num_channels, model.vision_spec.image_size)


def block_ids_from_token_types(token_type_ids: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Bidirectional block id per position: each run of consecutive ``token_type_ids == 1`` is one block
    (numbered from 0 in each row), -1 elsewhere. Same rule as transformers' Gemma 3 mask."""
    is_image = token_type_ids == 1
    prev = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~prev
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, torch.full_like(token_type_ids, -1, dtype=torch.long))


def resolve_token_type_ids(model: "HookedGemma3", inputs: dict[str, Any], is_image: Tensor) -> Tensor:
    """The token types to build the bidirectional blocks from: the given ``token_type_ids`` (checked against
    the image tokens) or, when absent, derived from ``input_ids == image_token_id``."""
    tt = inputs.get("token_type_ids")
    am = inputs.get("attention_mask")
    derived = is_image.long()
    if tt is None:
        if bool(is_image.any()) and model.bidirectional_images and not getattr(model, "_warned_token_types", False):
            warnings.warn(
                f"token_type_ids was not given; derived it from the image token id {model.token_ids['image_token_id']} "
                "(1 at image tokens, as Gemma3Processor returns), so each image attends to itself bidirectionally. "
                "transformers' Gemma3 called without token_type_ids attends causally inside images; set "
                "model.bidirectional_images = False to reproduce that.",
                stacklevel=4,
            )
            model._warned_token_types = True
        return derived
    tt = tt.long()
    bad_values = ~((tt == 0) | (tt == 1))
    if bool(bad_values.any()):
        b, p = bad_values.nonzero()[0].tolist()
        raise InputError(f"token_type_ids must hold 0 (text) and 1 (image) only; found {int(tt[b, p])} at (batch, pos) = ({b}, {p})")
    disagree = tt != derived
    if am is not None:
        disagree &= am.bool()
    if bool(disagree.any()):
        b, p = disagree.nonzero()[0].tolist()
        raise InputError(
            f"token_type_ids disagrees with input_ids at (batch, pos) = ({b}, {p}): it must be 1 exactly at the image "
            f"tokens (id {model.token_ids['image_token_id']}) and 0 elsewhere. Omit it and hooked_vlm derives it from the "
            "ids; for causal attention inside images (transformers without token_type_ids) set "
            "model.bidirectional_images = False"
        )
    return tt


def build_gemma3_layout(model: "HookedGemma3", inputs: dict[str, Any]) -> TokenLayout:
    """Validate the multimodal inputs and describe every position.

    Each image is one :class:`VisualItem` whose ``grid_thw`` is SigLIP's patch grid ``(1, P, P)`` and whose
    ``merge`` is the average-pool kernel, so ``merged_grid`` is the ``(1, T, T)`` token grid
    (``T**2 = mm_tokens_per_image``) and ``cell_pixels`` the side of the pixel square one token covers.
    ``pixel_offset`` is the image's index in ``pixel_values``; ``vision_offset`` its first patch in its
    prompt's row of the batch-first vision activations. ``meta`` holds ``token_type_ids`` and
    ``bidir_ids`` (the bidirectional block of each position, -1 for none).
    """
    check_common_inputs(model, inputs)
    spec = model.vision_spec
    tok = model.token_ids
    ids: Tensor = inputs["input_ids"]
    am: Tensor | None = inputs.get("attention_mask")
    per_image = spec.tokens_per_image
    is_image = ids == tok["image_token_id"]
    n_images = count_images(
        inputs, int(is_image.sum()), per_image, tok["image_token_id"], "mm_tokens_per_image",
        f"each image needs exactly {per_image} consecutive image tokens between <start_of_image> (id {tok['boi_token_id']}) "
        f"and <end_of_image> (id {tok['eoi_token_id']}); build the prompt with build_gemma3_inputs or Gemma3Processor",
    )
    n = spec.patches_per_side

    def make_item(idx: int, bi: int, start: int, vision_offset: int) -> VisualItem:
        return VisualItem("image", idx, bi, start, (1, n, n), spec.pool_kernel, spec.patch_size, 1, vision_offset, idx)

    special = (ids == tok["boi_token_id"]) | (ids == tok["eoi_token_id"])
    kind, item, frame, row, col, items = image_run_positions(
        ids, am, is_image, special, n_images, per_image, spec.tokens_per_side, make_item, spec.n_patches,
        f"write each image as <start_of_image> + {per_image} image tokens + <end_of_image>",
    )
    token_types = resolve_token_type_ids(model, inputs, is_image)
    bidir = block_ids_from_token_types(token_types)
    meta = {"token_type_ids": token_types, "bidir_ids": bidir, "n_images": n_images}
    return TokenLayout(ids, kind, item, frame, row, col, items, None, None, am, meta)


def vision_row_index(layout: TokenLayout, n_per_image: int) -> tuple[Int[Tensor, "batch n"], Tensor]:
    """For each prompt row, the (image, index-within-image) of each slot of a batch-first per-prompt
    activation with ``n_per_image`` slots per image: ``(image [B, n] (-1 = padding), slot [B, n])``."""
    b = layout.batch_size
    per_row: list[list[VisualItem]] = [[] for _ in range(b)]
    for it in layout.items:
        per_row[it.batch].append(it)
    n_max = max([len(r) for r in per_row] + [0]) * n_per_image
    image = torch.full((b, max(n_max, 1)), -1, dtype=torch.long)
    slot = torch.zeros((b, max(n_max, 1)), dtype=torch.long)
    for bi, row in enumerate(per_row):
        for j, it in enumerate(sorted(row, key=lambda x: x.start)):
            image[bi, j * n_per_image : (j + 1) * n_per_image] = it.index
            slot[bi, j * n_per_image : (j + 1) * n_per_image] = torch.arange(n_per_image)
    return image, slot


__all__ = [
    "build_gemma3_layout",
    "block_ids_from_token_types",
    "resolve_token_type_ids",
    "check_common_inputs",
    "vision_row_index",
]
