"""Build hooked models from transformers models or Hugging Face checkpoint folders.

Weights are read with safetensors (or ``torch.load(weights_only=True)`` for ``.bin`` files); no pickled
code ever runs. Architectures are looked up in a registry that each family module extends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hooked_vlm.errors import CheckpointError, UnsupportedModelError
from hooked_vlm.model import HookedVLM

_REGISTRY: dict[str, type[HookedVLM]] = {}


def register(cls: type[HookedVLM]) -> type[HookedVLM]:
    """Register a HookedVLM subclass for each of its ``hf_architectures`` (also keyed by model_type)."""
    for arch in cls.hf_architectures:
        _REGISTRY[arch] = cls
    return cls


def supported_architectures() -> list[str]:
    _ensure_families()
    return sorted(_REGISTRY)


def _ensure_families() -> None:
    import hooked_vlm.families.qwen_vl as qwen

    register(qwen.HookedQwenVL)
    for mod in ("llava", "gemma3", "clip"):
        try:
            __import__(f"hooked_vlm.families.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"hooked_vlm.families.{mod}":
                raise


def model_class_for(architecture: str) -> type[HookedVLM]:
    _ensure_families()
    if architecture not in _REGISTRY:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported by hooked_vlm; supported: {supported_architectures()}"
        )
    return _REGISTRY[architecture]


def build(architecture: str, hf_config: Any, state_dict: dict[str, Tensor], dtype: torch.dtype | None, device: Any) -> HookedVLM:
    """Instantiate the hooked class for ``architecture`` and load Hugging Face-named weights into it."""
    cls = model_class_for(architecture)
    # Classes serving several architectures whose configs look alike (CLIPVisionModel vs ...WithProjection)
    # take the architecture name too.
    takes_arch = getattr(cls, "config_takes_architecture", False)
    cfg = cls.config_from_hf(hf_config, architecture) if takes_arch else cls.config_from_hf(hf_config)
    with torch.device("meta"):
        model = cls(cfg)
    ours = cls.convert_hf_state_dict(hf_config, state_dict)
    missing = set(model.state_dict()) - set(ours)
    unexpected = set(ours) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not fit {cls.__name__}: missing {sorted(missing)[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(ours, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.weight
    if dtype is not None:
        model = model.to(dtype)
        cfg.dtype = dtype
    if device is not None:
        model = model.to(device)
        cfg.device = str(device)
    return model.eval()


def from_hf(hf_model: nn.Module, dtype: torch.dtype | None = None, device: Any = None) -> HookedVLM:
    """Hooked twin of an in-memory transformers model, with the same weights."""
    arch = type(hf_model).__name__
    sd = hf_model.state_dict()
    if device is None:
        device = next(hf_model.parameters()).device
    if dtype is None:
        dtype = next(hf_model.parameters()).dtype
    return build(arch, hf_model.config, sd, dtype, device)


def from_pretrained(path_or_id: str | os.PathLike, dtype: torch.dtype | None = None, device: Any = None) -> HookedVLM:
    """Load a Hugging Face-layout checkpoint: a local folder, or a hub id when a hub is reachable."""
    path = Path(path_or_id)
    organism = _shipped_organism(str(path_or_id)) if not path.exists() else None
    if organism is not None:
        path = organism
    elif not path.exists():
        path = _download(str(path_or_id))
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass a checkpoint folder holding config.json and *.safetensors")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json; a Hugging Face checkpoint folder needs config.json beside its weights")
    raw = json.loads(cfg_file.read_text())
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else _arch_from_model_type(raw.get("model_type"))
    model_class_for(arch)  # unsupported architectures fail before any weights are read
    sd = read_weights(path)
    # A family may read its own config.json dialect (e.g. original LLaVA checkpoints): cls.hf_config_from_checkpoint.
    from_checkpoint = getattr(model_class_for(arch), "hf_config_from_checkpoint", None)
    hf_config = from_checkpoint(raw, sd) if from_checkpoint is not None else _hf_config(raw)
    model = build(arch, hf_config, sd, dtype, device)
    if organism is not None:  # shipped organisms come with their word-level tokenizer
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(path)
    return model


def _shipped_organism(name: str) -> Path | None:
    """Checkpoint folder of a shipped model organism called ``name`` (hooked_vlm.organisms), else None."""
    from hooked_vlm.organisms import ORGANISMS, checkpoint_dir, is_trained

    if name not in ORGANISMS:
        return None
    if not is_trained(name):
        raise CheckpointError(f"organism {name!r} has no shipped checkpoint; train it with `hooked-vlm organisms train {name}`")
    return checkpoint_dir(name)


def _arch_from_model_type(model_type: str | None) -> str:
    _ensure_families()
    guesses = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
    guesses["gemma3"] = "Gemma3ForConditionalGeneration"
    if model_type in guesses:
        return guesses[model_type]
    raise UnsupportedModelError(f"config.json names no architectures and model_type {model_type!r} is not supported; supported: {supported_architectures()}")


def _hf_config(raw: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(**raw)


def read_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder: safetensors (sharded or not), else ``.bin`` with weights_only=True."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        sd: dict[str, Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    bins = sorted(path.glob("*.bin"))
    if bins:
        sd = {}
        for f in bins:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        return sd
    raise CheckpointError(f"{path} holds no weights (*.safetensors or *.bin); save the model with save_pretrained into this folder")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # offline, unknown repo, no hub reachable
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and could not be fetched from the hub ({type(e).__name__}: {e}); "
            "pass a local checkpoint folder"
        ) from e
