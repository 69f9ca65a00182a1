"""A tiny TransformerLens-style hooked transformer for exercising the nnsight / NDIF route quickly.

Not a vision-language model: a few-hundred-parameter stand-in with the same conventions as
:class:`hooked_vlm.model.HookedVLM` (``HookPoint`` submodules named ``blocks.{i}.hook_resid_post``,
batch-first activations, ``model(input_ids=..., attention_mask=...)`` returns logits). It is
registered as the ``"toy"`` family, so the remote path can be tested and benchmarked in seconds
and independently of any real family.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

TOY_DEFAULTS: dict[str, Any] = {"d_vocab": 64, "d_model": 32, "n_heads": 2, "n_layers": 2, "d_mlp": 64}


class _ToyAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def forward(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.d_head).unbind(2)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.d_head**0.5
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        pattern = self.hook_pattern(scores.softmax(-1))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        return self.out(z.reshape(B, L, -1))


class _ToyBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = _ToyAttention(d_model, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, resid: Tensor, attention_mask: Tensor | None) -> Tensor:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid), attention_mask)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))


class ToyHookedModel(HookedRootModule):
    """``model(input_ids=[B, L], attention_mask=[B, L] | None) -> logits [B, L, d_vocab]``."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        self.config = {**TOY_DEFAULTS, **(config or {})}
        c = self.config
        self.embed = nn.Embedding(c["d_vocab"], c["d_model"])
        self.pos_embed = nn.Embedding(64, c["d_model"])
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(_ToyBlock(c["d_model"], c["n_heads"], c["d_mlp"]) for _ in range(c["n_layers"]))
        self.ln_final = nn.LayerNorm(c["d_model"])
        self.unembed = nn.Linear(c["d_model"], c["d_vocab"], bias=False)
        self.setup()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        resid = self.hook_embed(self.embed(input_ids) + self.pos_embed(positions)[None])
        for block in self.blocks:
            resid = block(resid, attention_mask)
        return self.unembed(self.ln_final(resid))


def build_toy(config: dict[str, Any]) -> ToyHookedModel:
    return ToyHookedModel(config)
