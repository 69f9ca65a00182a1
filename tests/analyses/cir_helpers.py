"""Shared fixtures of the CIR tests: the shapes-clip organism, its images and tiny random two-tower checkpoint folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def shape_mask(image: np.ndarray) -> np.ndarray:
    """Pixels of the (single) shape: everything that is not the organism's light background."""
    from hooked_vlm.organisms.shapes_clip import BACKGROUND

    return np.any(np.abs(image.astype(int) - np.array(BACKGROUND)) > 30, axis=-1)


from analyses.pipelines.cir.validate import shape_ratio as mass_ratio  # noqa: E402  (mass share / area share)


def save_tiny_two_tower(folder: Path, name: str, seed: int = 0) -> Path:
    """A tiny random CLIP / SigLIP checkpoint folder (model + tokenizer) with a random phi of matching width."""
    from hooked_vlm.organisms.shapes_clip import Phi, save_phi
    from hooked_vlm.tiny import tiny_hf_model
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    hf = tiny_hf_model(name, seed=seed)
    hf.save_pretrained(folder)
    build_tiny_tokenizer(add_bos=True, add_eos=True).save_pretrained(folder)
    cfg = hf.config
    d_image = cfg.projection_dim if hasattr(cfg, "projection_dim") and name == "tiny-clip" else cfg.vision_config.hidden_size
    torch.manual_seed(seed)
    save_phi(Phi(d_image, 32, cfg.text_config.hidden_size), folder)
    return folder


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    """``n`` random RGB images of ``size`` px in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img_{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names
