"""Gemma 2's logit soft-capping ``c * tanh(x / c)``: on attention scores (before the mask) and on the final logits.

SDPA and the attention-statistics kernels compute ``softmax(q k^T)`` directly, so a soft-capped attention layer
materialises its scores (an eager path, as transformers' Gemma 2, which also refuses SDPA). Everything else
(hooks, masks, KV cache, edits of the scores or the pattern) is the shared :class:`Attention`'s.
"""

from __future__ import annotations

import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attention import Attention, AttnStatsRequest
from hooked_vlm.model import Unembed
from kernels.mask import MaskSpec


def softcap(x: Tensor, cap: float) -> Tensor:
    """``cap * tanh(x / cap)``: smooth clipping of logits to ``(-cap, cap)``."""
    return torch.tanh(x / cap) * cap


class SoftcapAttention(Attention):
    """:class:`Attention` whose scores are soft-capped (``softcap`` = c, None = off) before the mask and softmax.

    ``hook_attn_scores`` holds the capped, masked scores (TransformerLens's Gemma 2 convention).
    """

    def __init__(self, *args, softcap: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.softcap = None if softcap is None else float(softcap)

    def _scores(self, q: Tensor, k: Tensor, mask: MaskSpec) -> Float[Tensor, "batch head q k"]:
        """Scaled, soft-capped, masked scores (``-inf`` where the mask hides a key)."""
        scores = einsum(q, self._expand_kv(k), "b q h d, b k h d -> b h q k") * self.scale
        if self.softcap is not None:
            scores = softcap(scores, self.softcap)
        visible = mask.dense(q.shape[1], k.shape[1], q.device)[:, None]
        return scores.masked_fill(~visible, float("-inf"))

    def _fast_path(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec) -> Tensor:
        if self.softcap is None:
            return super()._fast_path(q, k, v, mask)
        pattern = torch.nan_to_num(torch.softmax(self._scores(q, k, mask).float(), dim=-1), nan=0.0).to(q.dtype)
        return einsum(pattern, self._expand_kv(v), "b h q k, b k h d -> b q h d")

    def _pattern_path(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec) -> Tensor:
        if self.softcap is None:
            return super()._pattern_path(q, k, v, mask)
        scores = self.hook_attn_scores(self._scores(q, k, mask))
        pattern = self.hook_pattern(torch.nan_to_num(torch.softmax(scores.float(), dim=-1), nan=0.0).to(q.dtype))
        return einsum(pattern, self._expand_kv(v), "b h q k, b k h d -> b q h d")

    def _stats_path(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, req: AttnStatsRequest) -> Tensor:
        if self.softcap is None:
            return super()._stats_path(q, k, v, mask, req)
        raise NotImplementedError(
            f"layer {self.layer_index} soft-caps its attention logits (c = {self.softcap}); the attention-statistics "
            "kernels compute softmax(q k^T) without the cap. Cache blocks.{i}.attn.hook_pattern instead (exact here)"
        )


class SoftcapUnembed(Unembed):
    """The unembedding followed by final-logit soft-capping; ``hook_pre_softcap [B, L, V]`` holds ``W_U x``
    and ``hook_out`` the capped logits."""

    def __init__(self, d_model: int, d_vocab: int, cap: float):
        super().__init__(d_model, d_vocab)
        self.cap = cap
        self.hook_pre_softcap = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        raw = self.hook_pre_softcap(torch.nn.functional.linear(self.hook_in(x), self.weight))
        return self.hook_out(softcap(raw, self.cap))


__all__ = ["SoftcapAttention", "SoftcapUnembed", "softcap"]
