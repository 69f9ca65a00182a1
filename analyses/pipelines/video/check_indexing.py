"""``hooked-vlm video check-indexing``: do frame spans land on the right tokens, for each video family?

For each model, a random clip and spans of input frames: the positions :func:`.spans.frame_span_tokens`
maps a span to are compared with the positions whose embedding entering the language model
(``hook_embed``) changes when only the pixels of those frames change. The vision towers of these families
see each temporal slice on its own, so the two sets must be equal; a mapping that ignored the temporal patch
size or the 2x2 merge (the original scripts' bug) would point at the wrong tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .model_io import VideoModel, build_inputs
from .spans import frame_span_tokens

__all__ = ["DEFAULT_MODELS", "DEFAULT_SPANS", "check_model", "check_indexing"]

DEFAULT_MODELS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava-onevision", "tiny-llava-next-video")
DEFAULT_SPANS = ((0, 2), (2, 4), (3, 5), (1, 2), (6, 8))
PROMPT = "<video> what moves in the video ?"


def _embed(vm: VideoModel, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        _, cache = vm.model.run_with_cache(**inputs, names_filter=lambda n: n == "hook_embed")
    return cache["hook_embed"][0].float()


def check_model(vm: VideoModel, name: str, spans: Sequence[tuple[int, int]] = DEFAULT_SPANS, n_frames: int = 8,
                size: int = 56, seed: int = 0) -> list[dict[str, Any]]:
    """One row per span: mapped slices and positions, the positions the pixel change reached, and whether they agree."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(n_frames, size, size, 3), dtype=np.uint8)
    inputs = build_inputs(vm, PROMPT, frames, 2.0, "cpu", torch.float32)
    layout = vm.model.layout(**inputs)
    base = _embed(vm, inputs)
    rows = []
    for start, stop in spans:
        positions, slices = frame_span_tokens(layout, start, stop, n_frames)
        edited = frames.copy()
        edited[start:stop] = 255 - edited[start:stop]
        changed = ((_embed(vm, build_inputs(vm, PROMPT, edited, 2.0, "cpu", torch.float32)) - base).abs().amax(-1) > 1e-5)
        reached = changed.nonzero().flatten().tolist()
        item = layout.videos()[0]
        rows.append({"model": name, "family": vm.model.cfg.family, "span": f"{start}:{stop}", "temporal_patch_size": int(item.temporal_patch_size),
                     "tokens_per_slice": int(item.merged_grid[1] * item.merged_grid[2]), "slices": slices,
                     "n_positions": len(positions), "first": positions[0] if positions else None, "last": positions[-1] if positions else None,
                     "n_changed": len(reached), "match": positions == reached})
    return rows


def check_indexing(models: Sequence[str] = DEFAULT_MODELS, spans: Sequence[tuple[int, int]] = DEFAULT_SPANS, seed: int = 0) -> list[dict[str, Any]]:
    """:func:`check_model` for each model name (built-in tiny models, organisms or checkpoint folders)."""
    from analyses.pipelines.runner import ModelSpec

    from .model_io import load_video_model

    rows = []
    for name in models:
        vm = load_video_model(ModelSpec(name, seed=seed))
        rows.extend(check_model(vm, name, spans, seed=seed))
    return rows
