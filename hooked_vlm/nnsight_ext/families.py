"""hooked_vlm model families as nnsight remote-key builders (filled in once the model package lands)."""

from __future__ import annotations

from typing import Any

from torch import nn


def family_and_config(model: nn.Module) -> tuple[str, dict[str, Any]]:
    raise NotImplementedError(f"no remote family known for {type(model).__name__}")
