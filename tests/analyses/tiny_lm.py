"""A tiny hooked multimodal LM for testing the analyses without the real models.

A causal transformer with grouped-query attention, RMSNorm and a SiLU MLP, plus a toy "vision tower"
(two blocks over ``pixel_values [B, N, d_pix]``) whose output ``vision.hook_out`` replaces the
embeddings of image placeholder tokens. Hook names follow the hooked_vlm / TransformerLens scheme, so
every analysis can be exercised on CPU in milliseconds. Random weights, seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

IMG = 3  # placeholder token id for image positions


@dataclass
class TinyConfig:
    n_layers: int = 3
    d_model: int = 32
    n_heads: int = 4
    n_key_value_heads: int = 2
    d_head: int = 8
    d_mlp: int = 64
    d_vocab: int = 40
    d_pix: int = 12
    n_vision_layers: int = 2
    seed: int = 0
    device: str = "cpu"


class _Attn(nn.Module):
    def __init__(self, cfg: TinyConfig, causal: bool = True) -> None:
        super().__init__()
        d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
        self.h, self.kv, self.dh, self.causal = h, kv, dh, causal
        self.W_Q = nn.Linear(d, h * dh)
        self.W_K = nn.Linear(d, kv * dh)
        self.W_V = nn.Linear(d, kv * dh)
        self.W_O = nn.Linear(h * dh, d, bias=False)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        b, l, _ = x.shape
        q = self.hook_q(self.W_Q(x).view(b, l, self.h, self.dh))
        k = self.hook_k(self.W_K(x).view(b, l, self.kv, self.dh))
        v = self.hook_v(self.W_V(x).view(b, l, self.kv, self.dh))
        rep = self.h // self.kv
        kk = k.repeat_interleave(rep, dim=2)
        vv = v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / self.dh**0.5
        mask = torch.ones(l, l, dtype=torch.bool, device=x.device)
        if self.causal:
            mask = torch.tril(mask)
        mask = mask[None, None]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, :].bool()
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(scores.softmax(-1).nan_to_num(0.0))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, vv))
        return self.W_O(z.reshape(b, l, self.h * self.dh))


class _Block(nn.Module):
    def __init__(self, cfg: TinyConfig, causal: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.RMSNorm(cfg.d_model)
        self.ln2 = nn.RMSNorm(cfg.d_model)
        self.attn = _Attn(cfg, causal)
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model)
        for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            setattr(self, n, HookPoint())

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x), key_valid)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.down(F.silu(self.up(self.ln2(x))))))


class _Vision(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.d_pix, cfg.d_model)
        self.hook_patch_embed = HookPoint()
        self.blocks = nn.ModuleList([_Block(cfg, causal=False) for _ in range(cfg.n_vision_layers)])
        self.hook_out = HookPoint()
        self.calls = 0

    def forward(self, pixel_values: torch.Tensor, batch: int) -> torch.Tensor:
        """Packed ``[B*N, d_pix]`` rows (as Qwen's processor packs them) -> batch-first ``[B, N, d]``."""
        self.calls += batch
        x = self.hook_patch_embed(self.proj(pixel_values.reshape(batch, -1, pixel_values.shape[-1])))
        for blk in self.blocks:
            x = blk(x)
        return self.hook_out(x)


class TinyHookedLM(HookedRootModule):
    """``forward(input_ids, attention_mask=None, pixel_values=None, vision_features=None) -> logits``.

    ``pixel_values [B*N, d_pix]`` (packed, row-major by prompt) fill the ``N`` positions holding
    :data:`IMG` in each row; ``vision_features [B, N, d]`` (from :meth:`encode_vision`) skip the tower.
    """

    def __init__(self, cfg: TinyConfig | None = None, **kw: Any) -> None:
        super().__init__()
        self.cfg = cfg or TinyConfig(**kw)
        torch.manual_seed(self.cfg.seed)
        c = self.cfg
        self.embed = nn.Embedding(c.d_vocab, c.d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([_Block(c) for _ in range(c.n_layers)])
        self.vision = _Vision(c)
        self.ln_final = nn.RMSNorm(c.d_model)
        self.unembed = nn.Linear(c.d_model, c.d_vocab)
        self.setup()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        if vision_features is None and pixel_values is not None:
            vision_features = self.vision(pixel_values, input_ids.shape[0])
        if vision_features is not None:
            is_img = (input_ids == IMG)
            x = x.clone()
            x[is_img] = vision_features.reshape(-1, x.shape[-1]).to(x.dtype)
        x = self.hook_embed(x)
        for blk in self.blocks:
            x = blk(x, attention_mask)
        return self.unembed(self.ln_final(x))

    def encode_vision(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, **_: Any) -> torch.Tensor:
        """Only the vision tower: features to pass back as ``vision_features=``."""
        return self.vision(pixel_values, input_ids.shape[0])


def make_inputs(
    cfg: TinyConfig, length: int = 10, n_img: int = 4, img_start: int = 2, batch: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random tokens with ``n_img`` image placeholders at ``img_start`` and random pixel rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.d_vocab, (batch, length), generator=g)
    ids[:, img_start : img_start + n_img] = IMG
    pix = torch.randn(batch * n_img, cfg.d_pix, generator=g)
    return {"input_ids": ids, "pixel_values": pix}
