"""What the CIR commands load once per process: the hooked CLIP / SigLIP, its tokenizer and preprocessing, phi."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analyses.pipelines.cir.images import ImagePrep, image_prep
from analyses.pipelines.runner import ModelSpec, load_hooked_model

__all__ = ["CirModel", "load_cir_model", "NotTwoTowerError"]


class NotTwoTowerError(ValueError):
    """The model is not a CLIP / SigLIP with both towers, so it cannot embed images and composed texts."""


@dataclass
class CirModel:
    """The loaded model (``.model`` is what the runner fingerprints), tokenizer, preprocessing and caches."""

    model: Any
    tokenizer: Any
    prep: ImagePrep
    checkpoint: Path | None
    name: str
    cache: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        from analyses.pipelines.provenance import model_fingerprint

        if "fingerprint" not in self.cache:
            self.cache["fingerprint"] = model_fingerprint(self.model)
        return self.cache["fingerprint"]


def load_cir_model(spec: ModelSpec) -> CirModel:
    """A two-tower model by organism / tiny name or checkpoint folder; refuses single-tower and decoder models."""
    loaded = load_hooked_model(spec)
    model = loaded.model.eval()
    if getattr(model, "text", None) is None or getattr(model, "vision", None) is None or not hasattr(model, "encode_text"):
        raise NotTwoTowerError(f"{spec.name} is a {type(model).__name__}; composed retrieval needs a CLIP / SigLIP model with "
                               "both towers (e.g. --model shapes-clip, or a CLIPModel / SiglipModel checkpoint folder)")
    return CirModel(model, loaded.tokenizer, image_prep(model, loaded.checkpoint), loaded.checkpoint, spec.name)
