"""CLIP / SigLIP preprocessing: images -> ``pixel_values`` with the family's PIL image processor (no torchvision)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pixel_inputs(images: list[Any], model: Any, checkpoint: Path | None) -> Any:
    """``pixel_values [n, 3, S, S]`` from transformers' PIL image processor of the family (CLIP: resize the short
    side + centre crop; SigLIP: resize), at the tower's image size; the checkpoint's settings when it has them."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    from hooked_vlm.inputs import load_image

    config = checkpoint / "preprocessor_config.json" if checkpoint is not None else None
    settings = json.loads(config.read_text()) if config is not None and config.is_file() else {}
    settings.pop("image_processor_type", None)
    hf = model.cfg.hf_config
    size = int(hf["vision_config"]["image_size"] if "vision_config" in hf else hf["image_size"])
    if model.cfg.family == "clip":
        settings.setdefault("size", {"shortest_edge": size})
        settings.setdefault("crop_size", {"height": size, "width": size})
        processor = CLIPImageProcessorPil(**settings)
    else:
        settings.setdefault("size", {"height": size, "width": size})
        processor = SiglipImageProcessorPil(**settings)
    pil = [Image.fromarray(load_image(image)).convert("RGB") for image in images]
    return processor(images=pil, return_tensors="pt")["pixel_values"]


__all__ = ["pixel_inputs"]
