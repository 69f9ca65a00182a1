"""Qwen3-VL prompts, images and videos -> keyword tensors, without a processor checkpoint.

Pixels are Qwen's (``smart_resize`` to multiples of ``patch_size * merge_size``, bicubic, patchified in merge-block
order) with Qwen3-VL's normalisation (mean = std = 0.5). In a prompt, ``<image>`` becomes
``<|vision_start|> <|image_pad|>*n <|vision_end|>``; ``<video>`` becomes, for each temporal slice ``k``,
``<t_k seconds><|vision_start|> <|video_pad|>*n <|vision_end|>`` with ``t_k`` the mean time of the slice's frames
(``Qwen3VLProcessor._calculate_timestamps``; the given frames are taken as sampled at ``fps``). A prompt without
markers gets its images and videos in front.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hooked_vlm.errors import InputError
from hooked_vlm.families.qwen_vl.preprocess import (
    DEFAULT_VIDEO_FPS,
    MAX_PIXELS,
    MIN_PIXELS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    _as_video_list,
    _special_token,
    qwen_image_inputs,
    qwen_video_inputs,
)

#: Qwen3-VL's image / video normalisation (its preprocessor_config.json).
QWEN3_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
QWEN3_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


def slice_timestamps(n_slices: int, fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal slice: the mean time of its ``temporal_patch_size`` frames, frames at ``fps``."""
    return [(k * temporal_patch_size + (temporal_patch_size - 1) / 2) / fps for k in range(n_slices)]


def video_block(n_slices: int, tokens_per_slice: int, timestamps: Sequence[float], tokens: dict[str, str]) -> str:
    """The text of one video: per slice ``<t seconds>`` + vision start + placeholders + vision end (Qwen3VLProcessor)."""
    return "".join(
        f"<{timestamps[k]:.1f} seconds>" + tokens["vision_start"] + tokens["video"] * tokens_per_slice + tokens["vision_end"]
        for k in range(n_slices)
    )


def build_qwen3_vl_inputs(
    tokenizer: Any,
    prompt: str | Sequence[str],
    images: Sequence[Any] | Any = (),
    videos: Sequence[Any] | Any = (),
    *,
    fps: float | Sequence[float] = DEFAULT_VIDEO_FPS,
    num_frames: int | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    video_min_pixels: int = VIDEO_MIN_PIXELS,
    video_max_pixels: int = VIDEO_MAX_PIXELS,
    patch_size: int = 16,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    padding_side: str = "left",
) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (0 text, 1 image, 2 video), plus ``pixel_values`` /
    ``image_grid_thw`` and ``pixel_values_videos`` / ``video_grid_thw`` for a Qwen3-VL model (real checkpoints:
    ``patch_size=16``; the tiny model: 14). Markers ``<image>`` / ``<video>`` place the items in order."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    images = [images] if not isinstance(images, (list, tuple)) else list(images)
    videos = _as_video_list(videos)
    out: dict[str, Tensor] = {}
    geometry = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                    image_mean=QWEN3_MEAN, image_std=QWEN3_STD)
    if images:
        out.update(qwen_image_inputs(images, min_pixels=min_pixels, max_pixels=max_pixels, **geometry))
    stamps: list[list[float]] = []
    if videos:
        vids = qwen_video_inputs(videos, fps=fps, num_frames=num_frames, min_pixels=video_min_pixels, max_pixels=video_max_pixels, **geometry)
        out["pixel_values_videos"], out["video_grid_thw"] = vids["pixel_values_videos"], vids["video_grid_thw"]
        for (t, _, _), seconds in zip(vids["video_grid_thw"].tolist(), vids["second_per_grid_ts"].tolist()):
            stamps.append(slice_timestamps(t, temporal_patch_size / seconds, temporal_patch_size))
    tokens = {}
    for key, attribute, default, needed in (("image", "image_token", "<|image_pad|>", bool(images)),
                                            ("video", "video_token", "<|video_pad|>", bool(videos)),
                                            ("vision_start", "vision_start_token", "<|vision_start|>", bool(images or videos)),
                                            ("vision_end", "vision_end_token", "<|vision_end|>", bool(images or videos))):
        tokens[key] = _special_token(tokenizer, attribute, default, required=needed)[0]
    per = merge_size**2
    image_blocks = [tokens["vision_start"] + tokens["image"] * (int(g.prod()) // per) + tokens["vision_end"]
                    for g in out.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))]
    video_blocks = [video_block(int(g[0]), int(g[1] * g[2]) // per, s, tokens)
                    for g, s in zip(out.get("video_grid_thw", torch.zeros(0, 3, dtype=torch.long)), stamps)]
    texts = _place(prompts, image_blocks, video_blocks)
    enc = tokenizer(texts, padding=True, padding_side=padding_side, return_tensors="pt")
    ids = enc["input_ids"].long()
    image_id, video_id = tokenizer.convert_tokens_to_ids(tokens["image"]), tokenizer.convert_tokens_to_ids(tokens["video"])
    out.update(input_ids=ids, attention_mask=enc["attention_mask"].long(),
               mm_token_type_ids=(ids == image_id).long() + 2 * (ids == video_id).long())
    return out


def _place(prompts: list[str], image_blocks: list[str], video_blocks: list[str]) -> list[str]:
    """Replace ``<image>`` / ``<video>`` markers (in order over the batch) by the items' blocks."""
    marker = re.compile(r"<image>|<video>")
    found = [m for p in prompts for m in marker.findall(p)]
    if not found and len(prompts) == 1:
        return ["".join(image_blocks) + "".join(video_blocks) + prompts[0]]
    n_image, n_video = found.count("<image>"), found.count("<video>")
    if (n_image, n_video) != (len(image_blocks), len(video_blocks)):
        raise InputError(
            f"the prompt(s) hold {n_image} <image> and {n_video} <video> marker(s) but {len(image_blocks)} image(s) and "
            f"{len(video_blocks)} video(s) were given; put one marker per item, in order"
        )
    images, videos = iter(image_blocks), iter(video_blocks)
    return [marker.sub(lambda m: next(images) if m.group(0) == "<image>" else next(videos), p) for p in prompts]


def cli_input_builder(request: Any) -> dict[str, Tensor]:
    """``hooked-vlm inspect`` inputs for Qwen3-VL: :func:`build_qwen3_vl_inputs` with the checkpoint's patch size
    (tiny model: 14 px patches, small videos)."""
    import json

    kwargs: dict[str, Any] = {}
    if request.checkpoint is not None:
        vision = json.loads((request.checkpoint / "config.json").read_text())["vision_config"]
        kwargs.update(patch_size=vision.get("patch_size", 16), merge_size=vision.get("spatial_merge_size", 2),
                      temporal_patch_size=vision.get("temporal_patch_size", 2))
    else:
        kwargs.update(patch_size=14, video_min_pixels=56 * 56, max_pixels=28 * 28 * 16, video_max_pixels=28 * 28 * 8)
    options = dict(request.options)
    if "min_pixels" in options:
        kwargs["min_pixels"] = kwargs["video_min_pixels"] = options.pop("min_pixels")
    if "max_pixels" in options:
        kwargs["max_pixels"] = kwargs["video_max_pixels"] = options.pop("max_pixels")
    kwargs.update(options)
    return build_qwen3_vl_inputs(request.tokenizer, request.prompt, list(request.images), list(request.videos), **kwargs)


__all__ = ["build_qwen3_vl_inputs", "cli_input_builder", "slice_timestamps", "video_block", "QWEN3_MEAN", "QWEN3_STD"]
