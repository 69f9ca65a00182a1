"""RMSNorm and LayerNorm with TransformerLens's `hook_scale` / `hook_normalized` points.

`hook_scale` is the divisor (`normalized = x / scale`), `hook_normalized` the result before the learned
weight, as in TransformerLens, so `ActivationCache.apply_ln_to_stack` works unchanged.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32.

    ``offset=1.0`` gives Gemma's ``(1 + w)`` scaling (weight applied in fp32, cast afterwards);
    ``offset=0.0`` gives Llama/Qwen's ``w * normalized.to(dtype)``.
    """

    def __init__(self, d: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.w = nn.Parameter(torch.zeros(d) if offset else torch.ones(d))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        dtype = x.dtype
        xf = x.float()
        scale = self.hook_scale((xf.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized(xf / scale)
        if self.offset:
            return (normalized * (self.offset + self.w.float())).to(dtype)
        return self.w * normalized.to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm (mean-centred, variance-scaled, affine), exposing the same hooks as RMSNorm."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        dtype = x.dtype
        xf = x.float()
        centred = xf - xf.mean(-1, keepdim=True)
        scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized(centred / scale)
        return (normalized * self.w.float() + self.b.float()).to(dtype)
