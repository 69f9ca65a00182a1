"""Build hooked models from transformers models or Hugging Face checkpoint folders.

Weights are read with safetensors (or ``torch.load(weights_only=True)`` for ``.bin`` files); no pickled
code ever runs. Architectures are looked up in a registry that each family module extends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooked_vlm.errors import CheckpointError, UnsupportedModelError

if TYPE_CHECKING:  # torch and the model classes load when a model is built, not when names are listed
    import torch
    from torch import Tensor, nn

    from hooked_vlm.model import HookedVLM

_REGISTRY: dict[str, type[HookedVLM]] = {}

def _architecture_modules() -> dict[str, str]:
    from hooked_vlm.families.registry import families

    return {arch: fam.module for fam in families() for arch in fam.architectures}


#: Hugging Face architecture -> the module of the class that reimplements it, read from the families'
#: registrations (``hooked_vlm.families.<family>.FAMILY``) without importing torch.
ARCHITECTURE_MODULES: dict[str, str] = _architecture_modules()


# ----- built-in models -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltinModel:
    """A model known by name (no download): what it is, and how to build it with its tokenizer attached."""

    name: str
    description: str
    load: Callable[..., Any]  # (seed, dtype, device) -> model with .tokenizer set


def _load_tiny(name: str) -> Callable[..., Any]:
    def load(seed: int = 0, dtype: Any = None, device: Any = None) -> Any:
        from hooked_vlm import tiny
        from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

        model = tiny.tiny_model(name, seed=seed)
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        model.tokenizer = build_tiny_tokenizer()
        model._hooked_vlm_spec = {"family": "tiny", "config": {"name": name}, "seed": seed}  # to_nnsight(): remote identity
        return model

    return load


def builtin_models() -> dict[str, BuiltinModel]:
    """Every built-in model name -> :class:`BuiltinModel`: the one resolver of built-in names.

    ``HookedVLM.from_pretrained(name)``, ``hooked-vlm inspect --model name`` and ``hooked-vlm models``
    all read this table; it imports no torch (listing stays instant). Today: the random-weight tiny
    models of ``hooked_vlm.tiny`` with the tiny word-level tokenizer.
    """
    from hooked_vlm import tiny
    from hooked_vlm.organisms import ORGANISMS, is_trained

    models = {
        name: BuiltinModel(name, f"random-weight tiny {name.removeprefix('tiny-')} model (tests and examples)", _load_tiny(name))
        for name in sorted(tiny.TINY_MODELS)
    }
    for name in ORGANISMS:
        models[name] = BuiltinModel(name, _organism_description(name), _load_organism(name))
    return models


def _organism_description(name: str) -> str:
    """``organism: held-out accuracy per task`` from the shipped ``organism.json`` (read as JSON: no torch)."""
    from hooked_vlm.organisms import checkpoint_dir, is_trained

    if not is_trained(name):
        return f"model organism, not shipped: `hooked-vlm organisms train {name}`"
    meta_file = checkpoint_dir(name) / "organism.json"
    accuracy = json.loads(meta_file.read_text()).get("accuracy", {}) if meta_file.is_file() else {}
    scores = ", ".join(f"{task} {v['accuracy']:.2f}" for task, v in accuracy.items())
    return f"model organism, held-out accuracy: {scores or 'not measured'}"


def _load_organism(name: str) -> Callable[..., Any]:
    def load(seed: int = 0, dtype: Any = None, device: Any = None) -> Any:
        """A shipped organism's checkpoint (``seed`` is ignored: its weights are trained) with its tokenizer."""
        from hooked_vlm.organisms import checkpoint_dir, is_trained

        if not is_trained(name):
            raise CheckpointError(f"organism {name!r} has no shipped checkpoint; train it with `hooked-vlm organisms train {name}`")
        return from_pretrained(checkpoint_dir(name), dtype=dtype, device=device)

    return load


def register(cls: type[HookedVLM]) -> type[HookedVLM]:
    """Register an extra HookedVLM subclass for each of its ``hf_architectures`` (for classes outside
    ``hooked_vlm.families``; a family folder registers through its ``FAMILY`` object instead)."""
    for arch in cls.hf_architectures:
        _REGISTRY[arch] = cls
    return cls


def supported_architectures() -> list[str]:
    """Architecture names checkpoints may have (read from the family registrations; no torch import)."""
    return sorted(set(ARCHITECTURE_MODULES) | set(_REGISTRY))


def model_class_for(architecture: str) -> type[HookedVLM]:
    """The hooked class for a Hugging Face architecture name (from its family's registration)."""
    from hooked_vlm.families.registry import family_for_architecture

    if architecture in _REGISTRY:
        return _REGISTRY[architecture]
    return family_for_architecture(architecture).load_class()


def build(architecture: str, hf_config: Any, state_dict: dict[str, Tensor], dtype: torch.dtype | None, device: Any) -> HookedVLM:
    """Instantiate the hooked class for ``architecture`` and load Hugging Face-named weights into it."""
    import torch

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
    expected = model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(ours[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(ours) if tuple(ours[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} weight(s) have the wrong shape for {cls.__name__} built from this config: {wrong[:4]}"
            f"{'...' if len(wrong) > 4 else ''}; the weights and config.json come from different models (re-save both "
            "with save_pretrained, or fix the config's sizes)"
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
    from transformers import PreTrainedModel

    if not isinstance(hf_model, PreTrainedModel):
        raise UnsupportedModelError(
            f"from_hf expects an in-memory transformers model (a PreTrainedModel such as "
            f"Qwen2VLForConditionalGeneration; supported: {', '.join(supported_architectures())}), "
            f"got {type(hf_model).__module__}.{type(hf_model).__qualname__}; for a checkpoint folder use from_pretrained"
        )
    arch = type(hf_model).__name__
    if isinstance(dtype, str):
        dtype = _dtype_from_name(dtype)
    sd = hf_model.state_dict()
    if device is None:
        device = next(hf_model.parameters()).device
    if dtype is None:
        dtype = next(hf_model.parameters()).dtype
    return build(arch, hf_model.config, sd, dtype, device)


def _dtype_from_name(name: str) -> torch.dtype:
    """``"float16"`` / ``"bfloat16"`` / ``"float32"`` (also ``"torch.float16"``, ``"fp16"``, ``"bf16"``) -> torch dtype."""
    import torch

    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    key = name.removeprefix("torch.")
    key = aliases.get(key, key)
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={name!r} is not a floating torch dtype; pass torch.float32 / torch.bfloat16 / torch.float16 "
                         "or one of their names ('float32', 'bfloat16', 'float16')")
    return dtype


def from_pretrained(path_or_id: str | os.PathLike, dtype: torch.dtype | None = None, device: Any = None, seed: int = 0) -> HookedVLM:
    """A built-in model by name (see :func:`builtin_models`; ``seed`` picks its random weights), a local
    Hugging Face-layout checkpoint folder, or a hub id when a hub is reachable; the tokenizer is attached
    (``model.tokenizer``) when the built-in or the folder has one."""
    if isinstance(dtype, str):
        dtype = _dtype_from_name(dtype)
    builtin = builtin_models().get(str(path_or_id))
    if builtin is not None and not Path(path_or_id).exists():
        return builtin.load(seed=seed, dtype=dtype, device=device)
    path = Path(path_or_id)
    if not path.exists():
        if str(path_or_id).startswith(("tiny-", "tiny_")):
            raise CheckpointError(f"no built-in model {str(path_or_id)!r}; built-in: {', '.join(builtin_models())}")
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
    tokenizer = _folder_tokenizer(path)
    if tokenizer is not None and hasattr(model, "set_tokenizer"):
        model.set_tokenizer(tokenizer)
    return model


def _folder_tokenizer(path: Path) -> Any:
    """The checkpoint folder's tokenizer, or None when it ships none (weights-only folders)."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _arch_from_model_type(model_type: str | None) -> str:
    from hooked_vlm.families.registry import architecture_for_model_type

    arch = architecture_for_model_type(model_type)
    if arch is not None:
        return arch
    raise UnsupportedModelError(f"config.json names no architectures and model_type {model_type!r} is not supported; supported: {supported_architectures()}")


def _hf_config(raw: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(**raw)


def read_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder: safetensors (sharded or not), else ``.bin`` with weights_only=True."""
    import torch
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
