"""hooked_vlm model families as remote-key builders (no hub: config + seed, or a local checkpoint).

Two families are registered with :func:`hooked_vlm.nnsight_ext.envoy.register_family`:

``"tiny"``
    ``{"family": "tiny", "config": {"name": "tiny-qwen2-vl", "overrides": {...}}, "seed": 0}``:
    exactly :func:`hooked_vlm.tiny.tiny_model` (its own seeded randomisation included).
``"hf"``
    ``{"family": "hf", "config": {"architecture": "Qwen2VLForConditionalGeneration",
    "hf_config": {...}}, "seed": 0}``: the transformers class built from its config under
    ``torch.manual_seed(seed)`` (transformers' own initialisation), then ``HookedVLM.from_hf``.
    With ``"checkpoint"`` instead of ``"seed"``, the architecture is built and the safetensors file
    written by :func:`hooked_vlm.nnsight_ext.to_nnsight` is loaded into it; this is the key for
    any model whose weights came from elsewhere.

Builders take ``(config, seed)``; ``seed=None`` asks for the architecture only, which is what the
meta build (``scan``, the server's size estimate) and the checkpoint path need.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hooked_vlm.nnsight_ext.envoy import register_family


def _hooked_from_hf_config(architecture: str, hf_config: Any) -> nn.Module:
    """The hooked architecture for a transformers config, without loading weights."""
    from hooked_vlm.loading import model_class_for

    cls = model_class_for(architecture)
    return cls(cls.config_from_hf(hf_config)).eval()


def _hf_config_from_dict(raw: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    raw = dict(raw)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def build_tiny(config: dict[str, Any], seed: int | None) -> nn.Module:
    from hooked_vlm.tiny import TINY_MODELS, tiny_model

    name = config.get("name", "tiny-qwen2-vl")
    overrides = dict(config.get("overrides") or {})
    if seed is not None:
        return tiny_model(name, seed, **overrides)
    config_factory, model_factory = TINY_MODELS[name]
    hf_config = config_factory(**overrides)
    with torch.device("meta"):
        architecture = type(model_factory(hf_config)).__name__
    return _hooked_from_hf_config(architecture, hf_config)


def build_hf(config: dict[str, Any], seed: int | None) -> nn.Module:
    import transformers

    from hooked_vlm.loading import from_hf

    architecture = config["architecture"]
    hf_config = _hf_config_from_dict(config["hf_config"])
    if seed is None:
        return _hooked_from_hf_config(architecture, hf_config)
    hf_model = getattr(transformers, architecture)(hf_config)
    return from_hf(hf_model.eval())


def family_and_config(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """``("hf", {"architecture", "hf_config"})`` for a HookedVLM (what a seed or checkpoint key needs)."""
    from hooked_vlm.model import HookedVLM

    if not isinstance(model, HookedVLM):
        raise TypeError(
            f"cannot derive a remote key for {type(model).__name__}: pass spec=... explicitly or register a family"
        )
    hf_config = model.cfg.hf_config
    if not isinstance(hf_config, dict):
        hf_config = hf_config.to_dict()
    if "model_type" not in hf_config:
        raise ValueError("the model's cfg.hf_config carries no model_type; pass spec=... explicitly")
    return "hf", {"architecture": model.cfg.architecture, "hf_config": _jsonable(hf_config)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


register_family("tiny", build_tiny)
register_family("hf", build_hf)
