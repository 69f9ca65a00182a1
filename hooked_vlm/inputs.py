"""Loading images and videos for every family: anything image-like -> an RGB uint8 array.

``load_image`` accepts a path, PIL image, numpy array or torch tensor; ``load_video`` a frame array, a list of
frame images, a folder of frames or an animated image file. The family preprocessors
(``hooked_vlm.families.<family>.preprocess``) start from these arrays.

The Qwen2-VL / Qwen2.5-VL preprocessing that used to live here moved to
:mod:`hooked_vlm.families.qwen_vl.preprocess`; its names (``build_qwen_inputs``, ``qwen_image_inputs``, ...)
stay importable from here for one release.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from jaxtyping import UInt8
from PIL import Image, ImageSequence, UnidentifiedImageError
from torch import Tensor

from hooked_vlm.errors import InputError

__all__ = ["ImageLike", "VideoLike", "load_image", "load_video"]

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, Tensor]
VideoLike = Union[str, os.PathLike, np.ndarray, Tensor, Sequence[ImageLike]]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


# --------------------------------------------------------------------------------------------
# Loading: anything image-like -> uint8 HWC RGB array
# --------------------------------------------------------------------------------------------
def _pil_to_rgb(image: Image.Image) -> UInt8[np.ndarray, "H W 3"]:
    """RGB array of a PIL image; transparency is composited onto white, as HF's processors do."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def _open_image_file(path: str | os.PathLike) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"Image file not found: '{path}'. Pass an existing image path, a PIL image, a numpy array or a tensor."
        )
    if path.is_dir():
        raise IsADirectoryError(f"'{path}' is a folder, not an image; a folder of frames is accepted as a *video*.")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(
            f"Cannot read '{path}' as an image ({err}). Use a format Pillow reads (PNG, JPEG, BMP, GIF, WebP, TIFF)."
        ) from err
    return image


def _array_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 copy of an image array; float arrays must hold [0, 1] values or integers in [0, 255]."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        raise TypeError(f"{what} is a boolean array; convert it to uint8 (0..255) or float (0..1) first.")
    if array.size == 0:
        raise InputError(f"{what} is empty (shape {tuple(array.shape)}).")
    values = array.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    integral = np.issubdtype(array.dtype, np.integer) or (np.allclose(values, np.round(values)) and hi > 1.0)
    if integral:
        if lo < 0 or hi > 255:
            raise InputError(f"{what} has integer values in [{lo:g}, {hi:g}]; expected 0..255.")
        return np.round(values).astype(np.uint8)
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"{what} is a float array with values in [{lo:.4g}, {hi:.4g}]; expected raw pixels in [0, 1] "
            "(or integers in [0, 255]). Already-normalised pixel_values should be passed to the model directly."
        )
    # Round, not truncate: a float image made as uint8 / 255 gives back exactly the uint8 image.
    return np.round(values * 255.0).astype(np.uint8)


def _to_hwc_rgb(array: np.ndarray, what: str) -> UInt8[np.ndarray, "H W 3"]:
    """HWC RGB uint8 from a 2-D (grey) or 3-D (HWC or CHW, 1/3/4 channels) array."""
    if array.ndim == 2:
        return np.repeat(_array_to_uint8(array, what)[:, :, None], 3, axis=-1)
    if array.ndim != 3:
        raise InputError(
            f"{what} has shape {tuple(array.shape)}; expected (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4. "
            "For a video pass it to qwen_video_inputs / videos=."
        )
    # Channel axis: first when both ends could be channels (HF's rule), else whichever end fits.
    if array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    elif array.shape[-1] not in (1, 3, 4):
        raise InputError(
            f"{what} has shape {tuple(array.shape)}: no axis of size 1, 3 or 4 at either end to use as channels."
        )
    array = _array_to_uint8(array, what)
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:  # composite onto white, rounding as HF's numpy path does
        alpha = array[..., 3:4] / 255.0
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def load_image(image: ImageLike) -> UInt8[np.ndarray, "H W 3"]:
    """Load one image as an RGB uint8 array of shape (H, W, 3).

    Accepts a file path, a PIL image, a numpy array or a torch tensor. Arrays may be (H, W),
    (H, W, C) or (C, H, W) with 1, 3 or 4 channels (alpha is composited onto white), uint8 or
    float in [0, 1] (rounded to the nearest uint8 level; HF's processor would instead rescale a
    float image twice unless told ``do_rescale=False``).
    """
    if isinstance(image, (str, os.PathLike)):
        return _pil_to_rgb(_open_image_file(image))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, Tensor):
        tensor = image.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return _to_hwc_rgb(tensor.numpy(), "image tensor")
    if isinstance(image, np.ndarray):
        return _to_hwc_rgb(image, "image array")
    raise TypeError(
        f"Unsupported image type {type(image).__name__}; pass a path, a PIL image, a numpy array or a torch tensor."
    )


def _frames_from_file(path: Path) -> list[np.ndarray]:
    """Frames of an animated image (GIF, APNG, WebP, TIFF) or a single still image."""
    try:
        with Image.open(path) as container:
            return [_pil_to_rgb(frame.copy()) for frame in ImageSequence.Iterator(container)]
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(
            f"Cannot decode '{path}' as video frames ({err}). Video containers such as .mp4 need a decoder "
            "hooked_vlm does not bundle: extract the frames first (e.g. `ffmpeg -i in.mp4 -r 2 frames/%04d.png`) "
            "and pass the folder, a list of frame files, or a (T, H, W, 3) uint8 array."
        ) from err


def load_video(video: VideoLike) -> UInt8[np.ndarray, "T H W 3"]:
    """Load one video as an RGB uint8 array of shape (T, H, W, 3).

    Accepts a (T, H, W, C) or (T, C, H, W) array or tensor (channels last when the last axis has
    size 1, 3 or 4), a list of image-likes (paths, PIL images, arrays) of equal size, a folder of
    frame images (sorted by name), or an animated image file (GIF, APNG, WebP, TIFF).
    """
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if not path.exists():
            raise FileNotFoundError(
                f"Video not found: '{path}'. Pass a folder of frames, a list of frame files, an animated GIF, "
                "or a (T, H, W, 3) uint8 array."
            )
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"Folder '{path}' holds no image files ({', '.join(sorted(_IMAGE_SUFFIXES))}).")
            frames = [load_image(p) for p in files]
        else:
            frames = _frames_from_file(path)
    elif isinstance(video, (np.ndarray, Tensor)):
        array = video.detach().cpu() if isinstance(video, Tensor) else video
        if isinstance(array, Tensor):
            array = (array.float() if array.is_floating_point() else array).numpy()
        if array.ndim != 4:
            raise InputError(
                f"Video array has shape {tuple(array.shape)}; expected (T, H, W, C) or (T, C, H, W). "
                "A single image goes to images=, a list of frames may also be passed as a Python list."
            )
        if array.shape[-1] not in (1, 3, 4):
            if array.shape[1] not in (1, 3, 4):
                raise InputError(
                    f"Video array has shape {tuple(array.shape)}: neither axis 1 nor axis 3 has 1, 3 or 4 channels."
                )
            array = np.moveaxis(array, 1, -1)
        frames = [_to_hwc_rgb(frame, f"video frame {t}") for t, frame in enumerate(array)]
    elif isinstance(video, Sequence) and not isinstance(video, (str, bytes)):
        frames = [load_image(frame) for frame in video]
    else:
        raise TypeError(
            f"Unsupported video type {type(video).__name__}; pass a (T, H, W, 3) array or tensor, a list of frames, "
            "a folder of frames or an animated image file."
        )
    if not frames:
        raise InputError("Video has no frames.")
    sizes = {frame.shape for frame in frames}
    if len(sizes) != 1:
        raise InputError(f"Video frames differ in size {sorted(sizes)}; resize them to one size first.")
    return np.stack(frames)


#: Qwen preprocessing names that lived in this module (deprecated here; import them from the family).
_MOVED_TO_QWEN = (
    "IMAGE_MEAN", "IMAGE_STD", "MIN_PIXELS", "MAX_PIXELS", "VIDEO_MIN_PIXELS", "VIDEO_MAX_PIXELS", "DEFAULT_VIDEO_FPS",
    "QwenImageInputs", "QwenVideoInputs", "QwenInputs", "smart_resize", "patchify_image", "patchify_video",
    "qwen_image_inputs", "qwen_video_inputs", "qwen_processing_kwargs", "build_qwen_inputs",
)


def __getattr__(name: str) -> Any:
    """Deprecated aliases: the Qwen preprocessing now lives in :mod:`hooked_vlm.families.qwen_vl.preprocess`."""
    if name in _MOVED_TO_QWEN or name.startswith("_") and not name.startswith("__"):
        import importlib

        module = importlib.import_module("hooked_vlm.families.qwen_vl.preprocess")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'hooked_vlm.inputs' has no attribute {name!r}")
