"""Qwen2-VL / Qwen2.5-VL preprocessing without torchvision (the family's input builder lives here too).

Turns images (path, PIL image, numpy array, torch tensor) and videos (a frame array, a list of
frame images, a folder of frames or an animated image file) into the keyword tensors the
Hugging Face Qwen2-VL / Qwen2.5-VL models take, and builds prompt ids with the right number of
placeholder tokens. Why by hand: transformers' default image processors and every video processor
need torchvision, which does not import with the CPU build of torch; the ``*Pil`` image processor
works, and this module reproduces it exactly (``torch.equal``) so researchers can move between
HF and hooked_vlm without re-preparing data.

Exactness
    * Images: bit-identical to ``Qwen2VLImageProcessorPil`` (PIL bicubic resize to the
      ``smart_resize`` size, ``x * (1/255)`` in float64 cast to float32, then ``(x - mean) / std``
      in float32, then the merge-block patchify).
    * Videos: the layout and normalisation of HF's ``Qwen2VLVideoProcessor`` (fused
      ``(x - 255 mean) / (255 std)`` in float32, temporal padding by repeating the last frame,
      rows in merge-block order within each temporal slice). Frames already at their
      ``smart_resize`` size give exactly what HF gives; frames that need resizing are resized with
      PIL bicubic, where HF uses torchvision's antialiased bicubic (a few uint8 levels apart).

Prompt convention (``build_qwen_inputs``)
    * ``<image>`` / ``<video>`` markers are replaced by
      ``<|vision_start|>`` + placeholder x N + ``<|vision_end|>``.
    * A bare ``<|image_pad|>`` / ``<|video_pad|>`` (what Qwen chat templates emit, already inside
      ``<|vision_start|>...<|vision_end|>``) is expanded in place to N copies, as the HF processor does.
    * A single prompt with no marker at all gets every image, then every video, as vision blocks in
      front of its text.
    * The i-th image marker (counted across the whole batch, left to right) takes ``images[i]``;
      likewise for videos. N is ``t * h * w / merge_size**2`` from the item's grid.
"""


from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from jaxtyping import Float, Int, UInt8
from PIL import Image
from torch import Tensor

from hooked_vlm.errors import InputError
from hooked_vlm.inputs import _IMAGE_SUFFIXES, ImageLike, VideoLike, load_image, load_video

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "MIN_PIXELS",
    "MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "VIDEO_MAX_PIXELS",
    "DEFAULT_VIDEO_FPS",
    "QwenImageInputs",
    "QwenVideoInputs",
    "QwenInputs",
    "smart_resize",
    "load_image",
    "load_video",
    "patchify_image",
    "patchify_video",
    "qwen_image_inputs",
    "qwen_video_inputs",
    "qwen_processing_kwargs",
    "build_qwen_inputs",
    "cli_input_builder",
]


# OpenAI CLIP statistics, the Qwen2-VL processor defaults (``transformers.image_utils.OPENAI_CLIP_*``).
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# ``Qwen2VLImageProcessorPil`` defaults (size shortest_edge / longest_edge).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
# ``Qwen2VLVideoProcessor`` defaults: videos get a larger floor and a smaller ceiling per frame.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 28 * 28 * 768
# Frames per second assumed for a frame array when none is given (qwen-vl-utils' sampling rate).
DEFAULT_VIDEO_FPS = 2.0



class QwenImageInputs(TypedDict):
    """What ``Qwen2VLImageProcessorPil`` returns: patch rows of all images, and one grid per image."""

    pixel_values: Float[Tensor, "patches dim"]
    image_grid_thw: Int[Tensor, "images 3"]


class QwenVideoInputs(TypedDict):
    """What HF's Qwen video path returns (``second_per_grid_ts`` from the Qwen2.5-VL processor)."""

    pixel_values_videos: Float[Tensor, "patches dim"]
    video_grid_thw: Int[Tensor, "videos 3"]
    second_per_grid_ts: Float[Tensor, "videos"]


class QwenInputs(TypedDict, total=False):
    """The model keywords ``build_qwen_inputs`` returns; vision keys only for the modalities given."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    mm_token_type_ids: Int[Tensor, "batch pos"]
    pixel_values: Float[Tensor, "patches dim"]
    image_grid_thw: Int[Tensor, "images 3"]
    pixel_values_videos: Float[Tensor, "patches dim"]
    video_grid_thw: Int[Tensor, "videos 3"]
    second_per_grid_ts: Float[Tensor, "videos"]


# --------------------------------------------------------------------------------------------
# smart_resize: the Qwen rule that picks the processed size of an image or frame
# --------------------------------------------------------------------------------------------
def _smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Qwen's resize rule: both sides multiples of ``factor``, area within [min, max], aspect kept.

    Used only when transformers' own ``smart_resize`` cannot be imported.
    """
    if max(height, width) / min(height, width) > 200:
        raise InputError(
            f"Image aspect ratio {max(height, width) / min(height, width):.1f} exceeds Qwen's limit of 200; "
            "crop or pad the image first."
        )
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * grow / factor) * factor
        new_w = math.ceil(width * grow / factor) * factor
    return new_h, new_w


try:  # the PIL module of qwen2_vl does not import torchvision (the default one does)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
except ImportError:  # pragma: no cover - depends on the installed transformers
    smart_resize = _smart_resize


# --------------------------------------------------------------------------------------------
# Patchify: (normalised) pixels -> Qwen rows in merge-block order
# --------------------------------------------------------------------------------------------
def patchify_image(
    image: Float[Tensor, "C H W"], patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
) -> Float[Tensor, "patches dim"]:
    """Rows of one image in Qwen's merge-block order, the frame repeated along time.

    Row ``4k + 2 ih + iw`` (merge 2) is patch ``(2 (k // gw') + ih, 2 (k % gw') + iw)`` with
    ``gw' = W / (patch_size merge_size)``; rows 4k..4k+3 form merged token k. ``dim = C tps p p``.
    """
    channels, height, width = image.shape
    p, m = patch_size, merge_size
    gh, gw = height // p, width // p
    if gh * p != height or gw * p != width or gh % m or gw % m:
        raise InputError(f"Image size {height}x{width} is not a multiple of patch_size*merge_size = {p * m}.")
    x = image.reshape(channels, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    return x.reshape(gh * gw, channels * temporal_patch_size * p * p)


def patchify_video(
    frames: Float[Tensor, "T C H W"], patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
) -> tuple[Float[Tensor, "patches dim"], tuple[int, int, int]]:
    """Rows of one video in Qwen's order (temporal slice, merge block, row, column) and its grid.

    ``T`` is padded to a multiple of ``temporal_patch_size`` by repeating the last frame; frames
    ``tps t .. tps t + tps - 1`` share temporal slice ``t``. Returns ``(rows, (gt, gh, gw))``.
    """
    if pad := -frames.shape[0] % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    num_frames, channels, height, width = frames.shape
    p, m, tps = patch_size, merge_size, temporal_patch_size
    gt, gh, gw = num_frames // tps, height // p, width // p
    if gh * p != height or gw * p != width or gh % m or gw % m:
        raise InputError(f"Frame size {height}x{width} is not a multiple of patch_size*merge_size = {p * m}.")
    x = frames.reshape(gt, tps, channels, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, channels * tps * p * p), (gt, gh, gw)


# --------------------------------------------------------------------------------------------
# Processor equivalents
# --------------------------------------------------------------------------------------------
def _resize_bicubic(pixels: UInt8[np.ndarray, "H W 3"], height: int, width: int) -> UInt8[np.ndarray, "H W 3"]:
    """PIL bicubic resize, the call ``Qwen2VLImageProcessorPil`` makes (``reducing_gap=None``)."""
    resized = Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(resized)


def qwen_image_inputs(
    images: ImageLike | Sequence[ImageLike],
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    image_mean: Sequence[float] = IMAGE_MEAN,
    image_std: Sequence[float] = IMAGE_STD,
) -> QwenImageInputs:
    """``pixel_values`` (N, 3 tps p p) float32 and ``image_grid_thw`` (n, 3) int64 for images.

    Bit-identical to ``Qwen2VLImageProcessorPil(min_pixels=..., max_pixels=...)(images=...,
    return_tensors="pt")``: each image is resized (PIL bicubic) to ``smart_resize(h, w,
    patch_size * merge_size, min_pixels, max_pixels)``, rescaled by 1/255 in float64, cast to
    float32, normalised, and patchified; images are concatenated along rows.
    """
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, Tensor)):
        images = [images]
    if len(images) == 0:
        raise InputError("qwen_image_inputs got no images.")
    mean = np.asarray(image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(image_std, dtype=np.float32)[:, None, None]
    rows, grids = [], []
    for image in images:
        pixels = load_image(image)
        height, width = smart_resize(
            pixels.shape[0], pixels.shape[1], factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels
        )
        pixels = _resize_bicubic(pixels, height, width)
        chw = (np.moveaxis(pixels, -1, 0).astype(np.float64) * (1 / 255)).astype(np.float32)
        chw = (chw - mean) / std
        rows.append(patchify_image(torch.from_numpy(chw), patch_size, merge_size, temporal_patch_size))
        grids.append([1, height // patch_size, width // patch_size])
    return {"pixel_values": torch.cat(rows), "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}


def _is_frame(item: Any) -> bool:
    """Whether ``item`` is one frame (not a whole video): a PIL image, a 2-D/3-D array, an image file."""
    if isinstance(item, Image.Image):
        return True
    if isinstance(item, (np.ndarray, Tensor)):
        return item.ndim in (2, 3)
    if isinstance(item, (str, os.PathLike)):
        return Path(item).suffix.lower() in _IMAGE_SUFFIXES - {".gif", ".webp", ".tif", ".tiff"}
    return False


def _as_video_list(videos: Any) -> list:
    """A list of videos from one video or many; a flat list of frames is one video."""
    if isinstance(videos, (str, os.PathLike, np.ndarray, Tensor)):
        return [videos]
    videos = list(videos)
    if videos and all(_is_frame(item) for item in videos):
        return [videos]
    return videos


def _sample_indices(total: int, num_frames: int, temporal_patch_size: int) -> list[int]:
    """Uniform frame indices as HF's ``Qwen2VLVideoProcessor.sample_frames(num_frames=...)`` picks them."""
    num = round(num_frames / temporal_patch_size) * temporal_patch_size
    if num <= 0 or num > total:
        raise InputError(
            f"Cannot sample {num} frames (num_frames={num_frames} rounded to a multiple of {temporal_patch_size}) "
            f"from a video of {total} frames; choose num_frames between {temporal_patch_size} and {total}."
        )
    return torch.arange(0, total, total / num).int().tolist()


def qwen_video_inputs(
    videos: VideoLike | Sequence[VideoLike],
    *,
    fps: float | Sequence[float] = DEFAULT_VIDEO_FPS,
    num_frames: int | None = None,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    image_mean: Sequence[float] = IMAGE_MEAN,
    image_std: Sequence[float] = IMAGE_STD,
) -> QwenVideoInputs:
    """``pixel_values_videos``, ``video_grid_thw`` (n, 3) and ``second_per_grid_ts`` (n,) for videos.

    ``videos`` is one video or a list of videos (see ``load_video``); a flat list of frames (PIL
    images, 2-D/3-D arrays, still-image files) is one video. ``fps`` is the frame rate of the frames
    as given (one value or one per video); ``second_per_grid_ts = temporal_patch_size / fps``
    (Qwen2.5-VL's temporal position scale). ``num_frames`` subsamples uniformly as HF does, and the
    effective fps shrinks accordingly. Frames are resized to ``smart_resize`` of the frame size
    with the *video* pixel limits (HF's video defaults), normalised with HF's fused
    ``(x - 255 mean) / (255 std)``, padded to a multiple of ``temporal_patch_size`` by repeating
    the last frame, and patchified with rows ordered (temporal slice, merge block, row, column).
    """
    videos = _as_video_list(videos)
    if len(videos) == 0:
        raise InputError("qwen_video_inputs got no videos.")
    fps_list = [float(fps)] * len(videos) if isinstance(fps, (int, float)) else [float(f) for f in fps]
    if len(fps_list) != len(videos):
        raise InputError(f"Got {len(fps_list)} fps values for {len(videos)} videos; pass one fps or one per video.")
    if any(f <= 0 for f in fps_list):
        raise InputError(f"fps must be positive, got {fps_list}.")
    # HF fuses rescale into normalisation: mean * (1 / rescale_factor), in float32.
    mean = (torch.tensor(list(image_mean)) * (1.0 / (1 / 255))).view(-1, 1, 1)
    std = (torch.tensor(list(image_std)) * (1.0 / (1 / 255))).view(-1, 1, 1)
    rows, grids, seconds = [], [], []
    for video, video_fps in zip(videos, fps_list):
        frames = load_video(video)
        total = frames.shape[0]
        if num_frames is not None:
            indices = _sample_indices(total, num_frames, temporal_patch_size)
            frames = frames[indices]
            video_fps = video_fps * len(indices) / total
        height, width = smart_resize(
            frames.shape[1], frames.shape[2], factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels
        )
        if (height, width) != frames.shape[1:3]:
            frames = np.stack([_resize_bicubic(frame, height, width) for frame in frames])
        tchw = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(torch.float32)
        video_rows, grid = patchify_video((tchw - mean) / std, patch_size, merge_size, temporal_patch_size)
        rows.append(video_rows)
        grids.append(list(grid))
        seconds.append(temporal_patch_size / video_fps)
    return {
        "pixel_values_videos": torch.cat(rows),
        "video_grid_thw": torch.tensor(grids, dtype=torch.int64),
        "second_per_grid_ts": torch.tensor(seconds, dtype=torch.float32),
    }


def qwen_processing_kwargs(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """``build_qwen_inputs`` keyword arguments read from a checkpoint folder's processor configs.

    Real checkpoints ship ``preprocessor_config.json`` (and sometimes
    ``video_preprocessor_config.json``); without torchvision their ``AutoProcessor`` cannot be
    built, but the hand path reproduces its image half exactly from these settings. Both the old
    (``min_pixels`` / ``max_pixels``) and new (``size: {shortest_edge, longest_edge}``) spellings are
    read; settings a file does not give keep their defaults.
    """
    import json

    folder = Path(checkpoint)
    image_file = folder / "preprocessor_config.json"
    if not image_file.is_file():
        raise FileNotFoundError(
            f"No preprocessor_config.json in '{folder}'. Pass a checkpoint folder that has one, or call "
            "build_qwen_inputs with explicit min_pixels / max_pixels / image_mean / image_std."
        )

    def read(path: Path) -> dict[str, Any]:
        config = json.loads(path.read_text())
        size = config.get("size") or {}
        out = {
            "min_pixels": config.get("min_pixels", size.get("shortest_edge")),
            "max_pixels": config.get("max_pixels", size.get("longest_edge")),
            "patch_size": config.get("patch_size"),
            "merge_size": config.get("merge_size"),
            "temporal_patch_size": config.get("temporal_patch_size"),
            "image_mean": tuple(config["image_mean"]) if "image_mean" in config else None,
            "image_std": tuple(config["image_std"]) if "image_std" in config else None,
        }
        return {k: v for k, v in out.items() if v is not None}

    kwargs = read(image_file)
    video_file = folder / "video_preprocessor_config.json"
    video = read(video_file) if video_file.is_file() else kwargs  # older checkpoints: one file for both
    for key in ("min_pixels", "max_pixels"):
        if key in video:
            kwargs[f"video_{key}"] = video[key]
    return kwargs


# --------------------------------------------------------------------------------------------
# Prompt ids
# --------------------------------------------------------------------------------------------
def _special_token(tokenizer: Any, attribute: str, default: str, required: bool = True) -> tuple[str, int]:
    """(text, id) of a special token the tokenizer must know as one piece; id -1 if absent and not required."""
    text = getattr(tokenizer, attribute, None) or default
    token_id = tokenizer.convert_tokens_to_ids(text)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        if not required:
            return text, -1
        raise InputError(
            f"The tokenizer has no '{text}' token ({attribute}). Use the model's own tokenizer or processor, "
            f"or a tokenizer with extra_special_tokens={{'{attribute}': '{default}'}}."
        )
    return text, int(token_id)


def _expand_prompts(
    prompts: list[str],
    image_counts: list[int],
    video_counts: list[int],
    tokens: dict[str, str],
) -> list[str]:
    """Replace markers by vision blocks with the right number of placeholders (see module docstring)."""
    image_pad, video_pad = tokens["image"], tokens["video"]
    start, end = tokens["vision_start"], tokens["vision_end"]
    pattern = re.compile("|".join(re.escape(t) for t in ("<image>", "<video>", image_pad, video_pad)))
    markers = [pattern.findall(p) for p in prompts]
    n_image = sum(m in ("<image>", image_pad) for found in markers for m in found)
    n_video = sum(m in ("<video>", video_pad) for found in markers for m in found)
    if n_image == 0 and n_video == 0 and len(prompts) == 1 and (image_counts or video_counts):
        blocks = "".join("<image>" for _ in image_counts) + "".join("<video>" for _ in video_counts)
        prompts = [blocks + prompts[0]]
        n_image, n_video = len(image_counts), len(video_counts)
    if n_image != len(image_counts) or n_video != len(video_counts):
        raise InputError(
            f"The prompt(s) hold {n_image} image marker(s) and {n_video} video marker(s) but {len(image_counts)} "
            f"image(s) and {len(video_counts)} video(s) were given. Put one '<image>' (or '{image_pad}') per image and "
            f"one '<video>' (or '{video_pad}') per video in the prompt, in order"
            + (", or give a single prompt with no markers to place all of them first." if len(prompts) == 1 else ".")
        )
    images_left, videos_left = iter(image_counts), iter(video_counts)

    def replace(match: re.Match) -> str:
        marker = match.group(0)
        if marker == "<image>":
            return start + image_pad * next(images_left) + end
        if marker == "<video>":
            return start + video_pad * next(videos_left) + end
        if marker == image_pad:
            return image_pad * next(images_left)
        return video_pad * next(videos_left)

    return [pattern.sub(replace, p) for p in prompts]


def _to_processor_prompts(prompts: list[str], n_images: int, n_videos: int, processor: Any) -> list[str]:
    """Our marker convention in the HF processor's: ``<image>`` -> start + one placeholder + end."""
    tokens = {
        "image": getattr(processor, "image_token", "<|image_pad|>"),
        "video": getattr(processor, "video_token", "<|video_pad|>"),
        "vision_start": getattr(processor.tokenizer, "vision_start_token", None) or "<|vision_start|>",
        "vision_end": getattr(processor.tokenizer, "vision_end_token", None) or "<|vision_end|>",
    }
    return _expand_prompts(prompts, [1] * n_images, [1] * n_videos, tokens)


def build_qwen_inputs(
    tokenizer: Any,
    prompt: str | Sequence[str],
    images: Sequence[ImageLike] | ImageLike = (),
    videos: Sequence[VideoLike] | VideoLike = (),
    *,
    processor: Any = None,
    padding_side: str | None = None,
    add_special_tokens: bool = True,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    video_min_pixels: int = VIDEO_MIN_PIXELS,
    video_max_pixels: int = VIDEO_MAX_PIXELS,
    fps: float | Sequence[float] = DEFAULT_VIDEO_FPS,
    num_frames: int | None = None,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    image_mean: Sequence[float] = IMAGE_MEAN,
    image_std: Sequence[float] = IMAGE_STD,
) -> QwenInputs:
    """The keyword tensors a Qwen2-VL / Qwen2.5-VL model takes, for one prompt or a batch.

    Returns ``input_ids`` and ``attention_mask`` (B, L) int64, ``mm_token_type_ids`` (B, L)
    (0 text, 1 image, 2 video), plus ``pixel_values`` / ``image_grid_thw`` when images are given
    and ``pixel_values_videos`` / ``video_grid_thw`` / ``second_per_grid_ts`` when videos are.
    Markers follow the module docstring's convention; a batch is padded on ``padding_side``
    (default: the tokenizer's). ``videos`` is one video or a list of videos, as in
    ``qwen_video_inputs`` (a flat list of frames is one video).

    With ``processor=`` (a real HF Qwen processor, as real checkpoints ship), the prompt markers
    are translated to the processor's convention and the processor does everything; tokenizer
    and the pixel/patch arguments are then ignored in favour of the processor's own settings.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise InputError("build_qwen_inputs got no prompt.")
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, Tensor)):
        images = [images]
    images, videos = list(images), _as_video_list(videos)
    if processor is not None:
        return _build_with_processor(processor, prompts, images, videos, padding_side, add_special_tokens)

    outputs: dict[str, Tensor] = {}
    image_counts: list[int] = []
    video_counts: list[int] = []
    if images:
        outputs.update(
            qwen_image_inputs(
                images, min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=merge_size,
                temporal_patch_size=temporal_patch_size, image_mean=image_mean, image_std=image_std,
            )
        )
        image_counts = (outputs["image_grid_thw"].prod(-1) // merge_size**2).tolist()
    if videos:
        outputs.update(
            qwen_video_inputs(
                videos, fps=fps, num_frames=num_frames, min_pixels=video_min_pixels, max_pixels=video_max_pixels,
                patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                image_mean=image_mean, image_std=image_std,
            )
        )
        video_counts = (outputs["video_grid_thw"].prod(-1) // merge_size**2).tolist()

    # Only the tokens a prompt needs must exist: an image-only tokenizer works for images.
    image_text, image_id = _special_token(tokenizer, "image_token", "<|image_pad|>", required=bool(images))
    video_text, video_id = _special_token(tokenizer, "video_token", "<|video_pad|>", required=bool(videos))
    start_text, _ = _special_token(tokenizer, "vision_start_token", "<|vision_start|>", required=bool(images or videos))
    end_text, _ = _special_token(tokenizer, "vision_end_token", "<|vision_end|>", required=bool(images or videos))
    tokens = {"image": image_text, "video": video_text, "vision_start": start_text, "vision_end": end_text}
    texts = _expand_prompts(prompts, image_counts, video_counts, tokens)

    encoded = tokenizer(
        texts, padding=True, padding_side=padding_side or tokenizer.padding_side, truncation=False,
        add_special_tokens=add_special_tokens, return_tensors="pt",
    )
    input_ids = encoded["input_ids"].to(torch.int64)
    found = (int((input_ids == image_id).sum()), int((input_ids == video_id).sum()))
    if found != (sum(image_counts), sum(video_counts)):
        raise InputError(
            f"After tokenisation the ids hold {found[0]} image and {found[1]} video placeholders, expected "
            f"{sum(image_counts)} and {sum(video_counts)}: the tokenizer must keep '{image_text}' / '{video_text}' "
            "as single special tokens, and the prompt text must not contain them already expanded."
        )
    mm_token_type_ids = torch.zeros_like(input_ids)
    mm_token_type_ids[input_ids == image_id] = 1
    mm_token_type_ids[input_ids == video_id] = 2
    return {
        "input_ids": input_ids,
        "attention_mask": encoded["attention_mask"].to(torch.int64),
        "mm_token_type_ids": mm_token_type_ids,
        **outputs,
    }


def _build_with_processor(
    processor: Any,
    prompts: list[str],
    images: list[ImageLike],
    videos: list[VideoLike],
    padding_side: str | None,
    add_special_tokens: bool,
) -> dict[str, Tensor]:
    """Delegate to a real HF processor after translating our prompt markers."""
    texts = _to_processor_prompts(prompts, len(images), len(videos), processor)
    kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
    kwargs["add_special_tokens"] = add_special_tokens
    if padding_side is not None:
        kwargs["padding_side"] = padding_side
    if images:
        kwargs["images"] = [Image.fromarray(load_image(image)) for image in images]
    if videos:
        kwargs["videos"] = [load_video(video) for video in videos]
    result = dict(processor(**kwargs))
    if "mm_token_type_ids" not in result:
        ids = result["input_ids"]
        mm = torch.zeros_like(ids)
        mm[ids == processor.image_token_id] = 1
        if getattr(processor, "video_token_id", None) is not None:
            mm[ids == processor.video_token_id] = 2
        result["mm_token_type_ids"] = mm
    return result


def cli_input_builder(request: Any) -> dict[str, Tensor]:
    """``hooked-vlm inspect`` inputs (the family's input builder): the checkpoint's processor if it could be
    built, else the exact hand path of :func:`build_qwen_inputs`."""
    kwargs: dict[str, Any] = {}
    if request.checkpoint is not None and (request.checkpoint / "preprocessor_config.json").is_file():
        kwargs.update(qwen_processing_kwargs(request.checkpoint))
    if request.tiny:  # keep tiny-model videos tiny: no upsizing to HF's 128-token floor
        kwargs["video_min_pixels"] = 56 * 56
    options = dict(request.options)
    if "min_pixels" in options:
        kwargs["min_pixels"] = kwargs["video_min_pixels"] = options.pop("min_pixels")
    if "max_pixels" in options:
        kwargs["max_pixels"] = kwargs["video_max_pixels"] = options.pop("max_pixels")
    kwargs.update(options)  # fps, num_frames
    return build_qwen_inputs(request.tokenizer, request.prompt, request.images, request.videos, processor=request.processor, **kwargs)
