"""Pixels for a CLIP / SigLIP model: an image file resized to the tower's size and normalised as its processor does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, UInt8
from PIL import Image
from torch import Tensor

__all__ = ["ImagePrep", "image_prep", "read_image"]

CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
SIGLIP_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class ImagePrep:
    """Resize to ``size`` x ``size`` (bicubic, no crop, so a map maps back by a plain resize) and normalise."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: UInt8[np.ndarray, "h w 3"]) -> Float[Tensor, "1 3 size size"]:
        pil = Image.fromarray(image)
        if pil.size != (self.size, self.size):
            pil = pil.resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        mean = torch.tensor(self.mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[None, :, None, None]
        return (x - mean) / std


def image_prep(model: Any, checkpoint: Path | None) -> ImagePrep:
    """The preprocessing of a two-tower model: its tower size, and the checkpoint's mean / std (else the family's)."""
    mean, std = SIGLIP_NORM if model.cfg.family == "siglip" else CLIP_NORM
    config = checkpoint / "preprocessor_config.json" if checkpoint is not None else None
    if config is not None and config.is_file():
        raw = json.loads(config.read_text())
        mean, std = tuple(raw.get("image_mean", mean)), tuple(raw.get("image_std", std))
    return ImagePrep(int(model.vision.spec.image_size), tuple(mean), tuple(std))


def read_image(path: str | Path) -> UInt8[np.ndarray, "h w 3"]:
    """An image file as RGB uint8; a missing or undecodable file raises with the path and the fix."""
    from hooked_vlm.inputs import load_image

    return load_image(str(path))
