"""Token layouts of prompts whose images are fixed-size runs of one image token (Gemma 3, PaliGemma).

Each image is ``per_image`` consecutive image tokens (a ``side x side`` token grid in raster order), filled with
that image's projected features in sequence order (row-major over the batch), as transformers'
``masked_scatter``. :func:`count_images` checks the token count against the pixels (or ``vision_features=``);
:func:`image_run_positions` places every image and fills the per-position tensors. Every check raises
:class:`InputError` naming the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hooked_vlm.errors import InputError
from hooked_vlm.layout import IMAGE, PAD, SPECIAL, TEXT, VisualItem


def check_square_pixels(pixel_values: Tensor | None, channels: int, image_size: int) -> None:
    """``pixel_values`` must be ``[n_images, channels, image_size, image_size]`` (every image resized to the tower's
    fixed input size, as the SigLIP processors do)."""
    if pixel_values is None:
        return
    want = (channels, image_size, image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
        raise InputError(
            f"pixel_values must be [n_images, {want[0]}, {want[1]}, {want[2]}] (every image resized to the SigLIP "
            f"tower's image_size={image_size}); got {tuple(pixel_values.shape)}"
        )


def count_images(inputs: dict[str, Any], n_tokens: int, per_image: int, image_token_id: int, per_image_name: str,
                 how_to_write: str) -> int:
    """How many images the inputs hold (``pixel_values`` rows, else the tokens ``vision_features=`` fills); raises
    when the image tokens do not come to ``per_image`` per image (``how_to_write``: how a prompt writes one)."""
    pv = inputs.get("pixel_values")
    if pv is not None:
        n_images = pv.shape[0]
    elif inputs.get("vision_features") is not None:
        if n_tokens % per_image:
            raise InputError(f"found {n_tokens} image tokens (id {image_token_id}), not a multiple of {per_image_name}={per_image}")
        n_images = n_tokens // per_image
    else:
        n_images = 0
    if n_tokens != n_images * per_image:
        if n_images == 0:
            raise InputError(
                f"input_ids holds {n_tokens} image tokens (id {image_token_id}) but no pixel_values were given; "
                "pass the images' pixel_values (or remove the image tokens)"
            )
        raise InputError(
            f"found {n_tokens} image tokens (id {image_token_id}) in input_ids but pixel_values holds {n_images} "
            f"image(s) x {per_image_name}={per_image} = {n_images * per_image}; {how_to_write}"
        )
    return n_images


def image_run_positions(
    ids: Tensor, am: Tensor | None, is_image: Tensor, special: Tensor, n_images: int, per_image: int, side: int,
    make_item: Callable[[int, int, int, int], VisualItem], rows_per_image: int, how_to_write: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[VisualItem]]:
    """``kind, item, frame, row, col`` ``[B, L]`` and the items: image ``idx`` is the ``idx``-th run of ``per_image``
    image tokens, a ``side x side`` grid; ``make_item(idx, batch, start, vision_offset)`` builds its item, and each
    image takes ``rows_per_image`` rows of its prompt's vision activations. ``special``: ``[B, L]`` SPECIAL tokens."""
    b, length = ids.shape
    kind = torch.full_like(ids, TEXT, dtype=torch.long)
    kind[special] = SPECIAL
    kind[is_image] = IMAGE
    if am is not None:
        kind = kind.masked_fill(am == 0, PAD)
    item = torch.full_like(kind, -1)
    frame, row, col = item.clone(), item.clone(), item.clone()
    items: list[VisualItem] = []
    flat = is_image.reshape(-1).nonzero().flatten().cpu()
    offsets = [0] * b
    for idx in range(n_images):
        chunk = flat[idx * per_image : (idx + 1) * per_image]
        bi = int(chunk[0]) // length
        pos = chunk - bi * length
        if int(chunk[-1]) // length != bi:
            raise InputError(f"image {idx}'s {per_image} image tokens span two prompts; each prompt needs all of its own image tokens")
        if int(pos[-1] - pos[0]) != per_image - 1:
            raise InputError(
                f"image {idx}'s {per_image} image tokens are not consecutive (positions {int(pos[0])}..{int(pos[-1])} in "
                f"prompt {bi}); {how_to_write}"
            )
        items.append(make_item(idx, bi, int(pos[0]), offsets[bi]))
        offsets[bi] += rows_per_image
        k = torch.arange(per_image)
        pos = pos.to(ids.device)
        item[bi, pos] = idx
        frame[bi, pos] = 0
        row[bi, pos] = (k // side).to(ids.device)
        col[bi, pos] = (k % side).to(ids.device)
    return kind, item, frame, row, col, items


__all__ = ["check_square_pixels", "count_images", "image_run_positions"]
