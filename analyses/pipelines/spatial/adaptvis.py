"""AdaptVis-style attention scaling: multiply the attention logits on image keys by a factor in chosen layers.

Scores are ``scale * q . k``, so multiplying the (post-rotary) keys at image positions by ``factor`` multiplies
exactly those logits by ``factor`` (rotary is a rotation, applied before this hook, so it commutes with the
scaling). Done as a forward hook on ``blocks.{i}.attn.hook_rot_k``: the fast path and the attention-statistics
kernels keep working, and no L x L matrix is built. ``factor < 1`` flattens the attention over the image,
``factor > 1`` sharpens it. The confidence-gated variant picks the factor from the unscaled answer's
confidence: ``low`` below ``threshold`` (an uncertain answer: spread the attention), ``high`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["image_key_mask", "key_scaling_hooks", "gated_factor"]


def image_key_mask(model: Any, inputs: Mapping[str, Any]) -> Bool[Tensor, "batch pos"]:
    """True at the positions of image tokens (from the token layout)."""
    from hooked_vlm.layout import IMAGE

    return model.layout(**inputs).kind == IMAGE


def key_scaling_hooks(model: Any, inputs: Mapping[str, Any], factor: float, layers: Sequence[int] | None = None) -> list[tuple[str, Any]]:
    """Forward hooks (for ``model.hooks(fwd_hooks=...)``) scaling the image keys by ``factor`` in ``layers`` (default: all)."""
    n_layers = model.cfg.n_layers
    chosen = list(range(n_layers)) if layers is None else [l + n_layers if l < 0 else l for l in layers]
    bad = [l for l in chosen if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"--adapt-layers {bad} do not exist: the language model has {n_layers} layers (0..{n_layers - 1})")
    mask = image_key_mask(model, inputs)

    def scale(k: Float[Tensor, "batch pos kv_heads d_head"], hook: Any = None) -> Tensor:
        m = mask.to(k.device)[:, :, None, None]
        return torch.where(m, k * factor, k)

    return [(f"blocks.{l}.attn.hook_rot_k", scale) for l in chosen]


def gated_factor(confidence: float, threshold: float, low: float, high: float) -> float:
    """The factor of the confidence-gated variant: ``low`` when ``confidence < threshold``, else ``high``."""
    return low if confidence < threshold else high
