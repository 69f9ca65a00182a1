"""Deprecated module path: moved to ``hooked_vlm.families.qwen_vl.layout`` and ``.preprocess`` (an alias for one release)."""

from typing import Any


def __getattr__(name: str) -> Any:
    import importlib

    for sub in ("layout", "preprocess"):
        module = importlib.import_module(f"hooked_vlm.families.qwen_vl.{sub}")
        if name in vars(module):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
