"""MLP variants with TransformerLens hook names.

`hook_pre` is the (gate) pre-activation, `hook_pre_linear` the up projection of a gated MLP, and
`hook_post` what enters the output projection.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU (Llama, Qwen) or GeGLU (Gemma)."""

    def __init__(self, d_model: int, d_mlp: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.act = ACT2FN[act]
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        pre = self.hook_pre(self.gate_proj(x))
        pre_linear = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(self.act(pre) * pre_linear))

    # TransformerLens GatedMLP names: hook_pre = x @ W_gate, hook_pre_linear = x @ W_in + b_in, out = post @ W_out + b_out.
    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.gate_proj.weight.T

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.up_proj.weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.down_proj.weight.T

    @property
    def b_in(self) -> Float[Tensor, "d_mlp"]:
        return _bias(self.up_proj)

    @property
    def b_out(self) -> Float[Tensor, "d_model"]:
        return _bias(self.down_proj)


def _bias(linear: nn.Linear) -> Tensor:
    """A linear layer's bias, or zeros of its output width when it has none (TransformerLens always has one)."""
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``: the ViT / CLIP / LLaVA-projector shape."""

    def __init__(self, d_model: int, d_mlp: int, act: str, bias: bool = True, d_out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_mlp, bias=bias)
        self.fc2 = nn.Linear(d_mlp, d_out or d_model, bias=bias)
        self.act = ACT2FN[act]
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_out"]:
        return self.fc2(self.hook_post(self.act(self.hook_pre(self.fc1(x)))))

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.fc1.weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_out"]:
        return self.fc2.weight.T

    @property
    def b_in(self) -> Float[Tensor, "d_mlp"]:
        return _bias(self.fc1)

    @property
    def b_out(self) -> Float[Tensor, "d_out"]:
        return _bias(self.fc2)
