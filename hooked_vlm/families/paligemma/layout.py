"""PaliGemma inputs: validation, token layout and the prefix-LM block.

A PaliGemma prompt is ``<image>*N_1 ... <image>*N_k <bos> prompt \\n [answer <eos>]``: each image is
``(image_size / patch_size)**2`` consecutive image tokens, filled with that image's projected patches in
sequence order (row-major over the batch), as transformers' ``masked_scatter``. ``token_type_ids`` is 0 on
the prefix (images, ``<bos>``, prompt) and 1 on the answer; the prefix attends to itself bidirectionally.
Every check raises :class:`InputError` naming the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_vlm.errors import InputError
from hooked_vlm.input_checks import check_float_pixels, check_token_inputs
from hooked_vlm.families.image_runs import check_square_pixels, count_images, image_run_positions
from hooked_vlm.layout import TokenLayout, VisualItem

if TYPE_CHECKING:
    from hooked_vlm.families.paligemma.model import HookedPaliGemma

HOW_TO_BUILD = "hooked_vlm.families.paligemma.preprocess.build_paligemma_inputs or PaliGemmaProcessor"


def check_common_inputs(model: "HookedPaliGemma", inputs: dict[str, Any], past: int = 0) -> None:
    """Types, devices and shapes shared by prefill and decode (``past`` cached positions); ``token_type_ids``
    is read at prefill only (transformers ignores it at decode steps too)."""
    check_token_inputs(model, inputs, past, per_position=() if past else ("token_type_ids",), how_to_build=HOW_TO_BUILD)
    check_float_pixels(inputs, ("pixel_values",))
    check_square_pixels(inputs.get("pixel_values"), model.vision_spec.in_channels, model.vision_spec.image_size)
    tt = inputs.get("token_type_ids")
    if tt is not None and past == 0:
        bad = ~((tt == 0) | (tt == 1))
        if bool(bad.any()):
            b, p = bad.nonzero()[0].tolist()
            raise InputError(f"token_type_ids must hold 0 (prefix: image + prompt) and 1 (answer) only; found {int(tt[b, p])} at (batch, pos) = ({b}, {p})")


def prefix_block_ids(token_type_ids: Tensor | None) -> Int[Tensor, "batch pos"] | None:
    """The prefix-LM block: 0 where ``token_type_ids == 0`` (one bidirectional block per row), -1 on the answer;
    None without token types (causal everywhere), exactly transformers' ``block_sequence_ids``."""
    if token_type_ids is None:
        return None
    return torch.where(token_type_ids == 0, 0, -1).long()


def build_paligemma_layout(model: "HookedPaliGemma", inputs: dict[str, Any]) -> TokenLayout:
    """Validate the multimodal inputs and describe every position.

    Each image is one :class:`VisualItem` whose ``grid_thw`` is SigLIP's patch grid ``(1, P, P)`` with ``merge``
    1 (one token per 14 px patch); ``pixel_offset`` is its index in ``pixel_values``, ``vision_offset`` its first
    row in its prompt's row of ``vision.hook_out``. ``<bos>`` is SPECIAL. ``meta`` holds ``token_type_ids`` (or
    None) and ``bidir_ids`` (the prefix block, see :func:`prefix_block_ids`).
    """
    check_common_inputs(model, inputs)
    spec = model.vision_spec
    tok = model.token_ids
    ids: Tensor = inputs["input_ids"]
    am: Tensor | None = inputs.get("attention_mask")
    per_image = model.tokens_per_image
    is_image = ids == tok["image_token_id"]
    n_images = count_images(
        inputs, int(is_image.sum()), per_image, tok["image_token_id"], "(image_size / patch_size)**2",
        f"each image needs exactly {per_image} consecutive image tokens before <bos>; build the prompt with {HOW_TO_BUILD}",
    )
    side = spec.grid

    def make_item(idx: int, bi: int, start: int, vision_offset: int) -> VisualItem:
        return VisualItem("image", idx, bi, start, (1, side, side), 1, spec.patch_size, 1, vision_offset, idx)

    kind, item, frame, row, col, items = image_run_positions(
        ids, am, is_image, ids == tok["bos_token_id"], n_images, per_image, side, make_item, per_image,
        f"write each image as {per_image} image tokens in a row ({HOW_TO_BUILD})",
    )
    tt = inputs.get("token_type_ids")
    meta = {"token_type_ids": tt, "bidir_ids": prefix_block_ids(tt), "n_images": n_images}
    return TokenLayout(ids, kind, item, frame, row, col, items, None, None, am, meta)


__all__ = ["build_paligemma_layout", "check_common_inputs", "prefix_block_ids"]
