"""What the image pipelines need from any model family: its inputs for one prompt, single-token answers,
and the answer token's attention to the image pooled to a dataset's own grid.

Everything here goes through public APIs: the family's input builder (``hooked_vlm.cli.input_builder_for``,
the one ``hooked-vlm inspect`` uses), the token layout, and :func:`analyses.attention_maps.attention_map`
(attention-statistics kernels, never an L x L matrix). The dataset grid is mapped onto the model's own
token grid by area (:func:`analyses.attention_maps.pool_grid`, ``mode="mass"``), so no token count is
hard-coded: 10x10 Qwen2.5-VL tokens on a 10x10 dataset grid is the identity; 24x24 LLaVA tokens are
pooled; a token grid coarser than the dataset's is refused (a token would straddle several cells).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from analyses.attention_maps import attention_map, pool_grid
from analyses.pipelines.provenance import atomic_output

__all__ = [
    "AnswerTokenError", "GridMismatchError", "prompt_inputs", "single_token_id", "answer_ids",
    "image_attention_grid", "pooling_note", "cache_path", "save_npz", "load_image", "model_dtype",
]


class AnswerTokenError(ValueError):
    """An answer word is not exactly one token of the model's tokenizer."""


class GridMismatchError(ValueError):
    """The dataset's grid cannot be read from the model's token grid (a token would cover several cells)."""


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's weights (inputs' floating tensors are cast to it)."""
    return next(model.parameters()).dtype


def load_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB (a clear error when it cannot be decoded)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path} ({err}); replace the file with a PNG or JPEG image.") from None


def prompt_inputs(loaded: Any, prompt: str, images: Sequence[Any], device: str | torch.device = "cpu") -> dict[str, Any]:
    """The family's keyword tensors for ``prompt`` (``<image>`` marks where each image goes), on ``device``.

    Uses the input builder ``hooked-vlm inspect`` uses for the model's family, so a checkpoint's own processor
    settings apply; floating tensors (pixels) are cast to the model's dtype.
    """
    from hooked_vlm.cli import INPUT_BUILDERS, InputRequest, input_builder_for
    from hooked_vlm.families.registry import families

    family = loaded.model.cfg.family
    builder = input_builder_for(family)
    if builder is None:
        raise ValueError(f"no input builder for model family {family!r}; register one with "
                         "hooked_vlm.cli.register_input_builder (supported: "
                         + ", ".join(sorted({f.name for f in families()} | set(INPUT_BUILDERS))) + ").")
    request = InputRequest(loaded.tokenizer, prompt, list(images), [], loaded.processor, loaded.checkpoint, loaded.tiny, {})
    dtype = model_dtype(loaded.model)
    out = {}
    for k, v in builder(request).items():
        if isinstance(v, Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def single_token_id(tokenizer: Any, word: str) -> int:
    """The one token id of ``word`` (as written, else with a leading space); AnswerTokenError otherwise."""
    tried = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for text in (word, " " + word):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] != unk:
            return int(ids[0])
        tried.append(tokenizer.convert_ids_to_tokens(ids))
    raise AnswerTokenError(
        f"answer word {word!r} is not one token of this tokenizer (it splits into {tried[0]}, or {tried[1]} after a "
        "space; an unknown word becomes the unknown token); pass answer words that are single tokens "
        "(e.g. --answers Yes No for a chat model)."
    )


def answer_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Single-token ids of several answer words, which must differ."""
    ids = [single_token_id(tokenizer, w) for w in words]
    if len(set(ids)) != len(ids):
        raise AnswerTokenError(f"answer words {list(words)} map to the same token ids {ids}; use distinct words.")
    return ids


def pooling_note(token_grid: tuple[int, int], grid: tuple[int, int]) -> str:
    """How a ``token_grid`` of the model is mapped onto the dataset ``grid`` (GridMismatchError if impossible)."""
    (tr, tc), (gr, gc) = token_grid, grid
    if tr < gr or tc < gc:
        raise GridMismatchError(
            f"the dataset grid is {gr}x{gc} cells but the model turns this image into a {tr}x{tc} token grid, so one "
            "token covers parts of several cells and per-cell attention cannot be measured; use larger images "
            f"(more tokens; e.g. a checkpoint's min_pixels) or a dataset grid of at most {tr}x{tc} cells."
        )
    if (tr, tc) == (gr, gc):
        return f"identity ({tr}x{tc} tokens = {gr}x{gc} cells)"
    return f"area-pooled {tr}x{tc} tokens -> {gr}x{gc} cells (mass preserving)"


def image_attention_grid(model: Any, inputs: Mapping[str, Any], query: Any, grid: tuple[int, int] | None,
                         layers: Sequence[int] | None = None) -> tuple[Float[Tensor, "layers heads qg rows cols"], list[str], str]:
    """Attention of each query group to the first image's cells, per layer and head, on the dataset grid.

    Returns ``(values [layers, heads, groups, rows, cols], group names, pooling note)``; each value is the
    attention mass (a share of the query's attention) on the cell, so a map sums to the image's share.
    ``grid=None`` keeps the model's token grid.
    """
    amap = attention_map(model, inputs, query, layers=layers)
    tokens = amap.grid(image=0)[:, :, :, 0].float()  # layers H QG rows cols (an image has one frame)
    token_grid = (int(tokens.shape[-2]), int(tokens.shape[-1]))
    if grid is None:
        return tokens, amap.queries, pooling_note(token_grid, token_grid)
    note = pooling_note(token_grid, grid)
    pooled = tokens if token_grid == tuple(grid) else pool_grid(tokens, tuple(grid), mode="mass")
    return pooled, amap.queries, note


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def cache_path(output_dir: str | Path, folder: str, case_id: str, suffix: str = ".npz") -> Path:
    """A file name for one case under ``output_dir/folder`` (unsafe characters replaced, a hash keeps it unique)."""
    safe = _UNSAFE.sub("_", case_id)
    if safe != case_id:
        safe += "-" + hashlib.sha256(case_id.encode()).hexdigest()[:8]
    return Path(output_dir) / folder / f"{safe}{suffix}"


def save_npz(path: Path, **arrays: Any) -> Path:
    """Write arrays to ``path`` atomically (a kill never leaves half a cache file)."""
    with atomic_output(path) as tmp:
        np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    return path
