"""Tiny random-weight models for tests, examples and the CLI: real transformers classes, CPU-sized.

Vocabulary convention (see ``hooked_vlm.tiny_tokenizer``): 0 bos, 1 eos, 2 pad, 3..95 words,
98/99 Gemma image begin/end, 100 image placeholder, 101 video placeholder, 102/103 vision start/end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported where weights are made, so listing the names stays cheap
    import torch

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SPECIAL_IDS = dict(image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)


#: name -> (config factory, HF model factory), built from every family's registration (``Family.tiny_models``);
#: ``register_tiny`` adds others at run time.
TINY_MODELS: dict[str, tuple[Callable[..., Any], Callable[[Any], Any]]] = {}


def register_tiny(name: str, config_factory: Callable[..., Any], model_factory: Callable[[Any], Any]) -> None:
    TINY_MODELS[name] = (config_factory, model_factory)


def _resolve(target: str) -> Any:
    import importlib

    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _lazy_config(target: str) -> Callable[..., Any]:
    """A config factory that imports the family's tiny module on first call (listing names stays cheap)."""

    def make(*args: Any, **overrides: Any) -> Any:
        return _resolve(target)(*args, **overrides)

    make.__name__ = target.rpartition(":")[2]
    make.__qualname__ = make.__name__
    return make


def _hf_class(name: str) -> Callable[[Any], Any]:
    """Instantiate ``transformers.<name>`` from a config."""

    def make(config) -> Any:
        import transformers

        return getattr(transformers, name)(config)

    return make


def _register_family_tiny_models() -> None:
    from hooked_vlm.families.registry import families

    for fam in families():
        for tiny in fam.tiny_models:
            register_tiny(tiny.name, _lazy_config(tiny.config), _hf_class(tiny.hf_class))


_register_family_tiny_models()

#: Config factories that lived here; they moved to ``hooked_vlm.families.<family>.tiny`` (kept as aliases).
_MOVED = {
    "qwen2_vl_config": "hooked_vlm.families.qwen_vl.tiny", "qwen2_5_vl_config": "hooked_vlm.families.qwen_vl.tiny",
    "gemma3_config": "hooked_vlm.families.gemma3.tiny",
    "llava_config": "hooked_vlm.families.llava.tiny", "llava_next_config": "hooked_vlm.families.llava.tiny",
    "llava_onevision_config": "hooked_vlm.families.llava.tiny", "llava_next_video_config": "hooked_vlm.families.llava.tiny",
    "llava_dinov2_config": "hooked_vlm.families.llava.tiny", "LLAVA_TEXT": "hooked_vlm.families.llava.tiny",
    "clip_config": "hooked_vlm.families.clip.tiny", "siglip_config": "hooked_vlm.families.clip.tiny",
    "TWO_TOWER": "hooked_vlm.families.clip.tiny", "TWO_TOWER_TEXT": "hooked_vlm.families.clip.tiny",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return _resolve(f"{_MOVED[name]}:{name}")
    raise AttributeError(f"module 'hooked_vlm.tiny' has no attribute {name!r}")


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter from N(0, std) (norm weights around 1) so no path is trivially zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if ("norm" in name or "ln_" in name) and p.dim() == 1 and not name.endswith("bias"):
                p.copy_(1.0 + noise if float(p.detach().abs().mean()) > 0.5 else noise)
            else:
                p.copy_(noise * (4 if p.dim() == 1 else 1))
    return model


def tiny_hf_model(name: str = "tiny-qwen2-vl", seed: int = 0, attn_implementation: str = "eager", **config_overrides: Any):
    """A random-weight transformers model of the named tiny family, in eval mode, fp32."""
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; available: {sorted(TINY_MODELS)}")
    import torch

    config_factory, model_factory = TINY_MODELS[name]
    cfg = config_factory(**config_overrides)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_factory(cfg)
    randomize_(model, seed)
    return model.eval()


def tiny_model(name: str = "tiny-qwen2-vl", seed: int = 0, **config_overrides: Any):
    """The hooked twin of :func:`tiny_hf_model` (same weights)."""
    from hooked_vlm.loading import from_hf

    return from_hf(tiny_hf_model(name, seed, **config_overrides))
