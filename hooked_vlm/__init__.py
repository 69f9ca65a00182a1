"""hooked_vlm: hooked, Hugging Face-exact reimplementations of vision-language models.

Quick start::

    from hooked_vlm import HookedVLM
    model = HookedVLM.from_pretrained("tiny-qwen2.5-vl")      # a built-in model, tokenizer attached
    logits, cache = model.run_with_cache(**inputs, names_filter="blocks.*.hook_resid_post")

The names below are imported on first use, so ``import hooked_vlm`` (and the ``hooked-vlm`` command's
``--help``) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it (imported lazily by ``__getattr__``)
_EXPORTS = {
    "HookedVLM": "hooked_vlm.model",
    "TokenLayout": "hooked_vlm.layout",
    "AttnStatsRequest": "hooked_vlm.components.attention",
    "attn_stats_request": "hooked_vlm.components.attention",
    "InputError": "hooked_vlm.errors",
    "CheckpointError": "hooked_vlm.errors",
    "UnsupportedModelError": "hooked_vlm.errors",
    "CacheReduction": "hooked_vlm.cache_reduction",  # issue 17
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from hooked_vlm.cache_reduction import CacheReduction
    from hooked_vlm.components.attention import AttnStatsRequest, attn_stats_request
    from hooked_vlm.errors import CheckpointError, InputError, UnsupportedModelError
    from hooked_vlm.layout import TokenLayout
    from hooked_vlm.model import HookedVLM


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hooked_vlm' has no attribute {name!r}")
