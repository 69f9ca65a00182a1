"""One pre-norm transformer block (language model or vision tower) with residual hook points.

Optional post-sublayer norms give Gemma's four-norm layout. Residual accounting is exact:
``resid_post = resid_pre + attn_out + mlp_out``.
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attention import Attention, KVCache
from kernels.mask import MaskSpec


class TransformerBlock(nn.Module):
    def __init__(
        self,
        ln1: nn.Module,
        attn: Attention,
        ln2: nn.Module,
        mlp: nn.Module,
        ln1_post: nn.Module | None = None,
        ln2_post: nn.Module | None = None,
    ):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp
        self.ln1_post, self.ln2_post = ln1_post, ln2_post
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        cos: Tensor | None,
        sin: Tensor | None,
        mask: MaskSpec,
        cache: KVCache | None = None,
        last_queries: int | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``last_queries=n`` computes only the last n positions' outputs (keys and values still come from
        every position): exact for whatever reads only those positions, e.g. the final block of a sweep
        whose metric reads the last token."""
        resid = self.hook_resid_pre(resid)
        normed = self.ln1(resid)
        if last_queries is not None:
            attn_out = self.attn(normed, cos, sin, mask, cache, last_queries=last_queries)
            resid = resid[:, -last_queries:]
        else:
            attn_out = self.attn(normed, cos, sin, mask, cache)
        if self.ln1_post is not None:
            attn_out = self.ln1_post(attn_out)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(attn_out))
        mlp_out = self.mlp(self.ln2(resid))
        if self.ln2_post is not None:
            mlp_out = self.ln2_post(mlp_out)
        return self.hook_resid_post(resid + self.hook_mlp_out(mlp_out))
