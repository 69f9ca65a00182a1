"""Rotary position embeddings: 1-D RoPE, Qwen's multimodal M-RoPE, and the 2-D vision RoPE.

Every function returns ``cos, sin`` of shape ``[B, L, head_dim]`` so attention applies them the same way.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def inverse_frequencies(dim: int, theta: float) -> Float[Tensor, "half"]:
    """Standard RoPE inverse frequencies for a rotary width ``dim`` (always real CPU memory, even under
    a ``torch.device("meta")`` construction context)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos heads d_head"],
    cos: Float[Tensor, "batch pos d_head"],
    sin: Float[Tensor, "batch pos d_head"],
    in_fp32: bool = False,
) -> Float[Tensor, "batch pos heads d_head"]:
    """Rotate ``x``; ``in_fp32`` computes in fp32 and casts back (Qwen vision), otherwise in x's dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if in_fp32:
        xf = x.float()
        return (xf * cos.float() + rotate_half(xf) * sin.float()).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def rope_cos_sin(
    position_ids: Int[Tensor, "batch pos"], inv_freq: Tensor, attention_scaling: float = 1.0
) -> tuple[Float[Tensor, "batch pos d_head"], Float[Tensor, "batch pos d_head"]]:
    """1-D RoPE (Llama, Mistral, Qwen2, Gemma) in fp32."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def mrope_cos_sin(
    position_ids: Int[Tensor, "3 batch pos"], inv_freq: Tensor, mrope_section: list[int]
) -> tuple[Float[Tensor, "batch pos d_head"], Float[Tensor, "batch pos d_head"]]:
    """Qwen2-VL M-RoPE: frequency chunk i takes its angle from position axis i % 3 (T, H, W).

    Sections are contiguous (not interleaved), then duplicated as in standard RoPE.
    """
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # 3 B L half
    chunks = freqs.split(list(mrope_section), dim=-1)
    mixed = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # B L half
    emb = torch.cat((mixed, mixed), dim=-1)
    return emb.cos(), emb.sin()


def vision_2d_cos_sin(
    hw_ids: Int[Tensor, "batch n 2"], inv_freq: Tensor
) -> tuple[Float[Tensor, "batch n d_head"], Float[Tensor, "batch n d_head"]]:
    """Qwen vision 2-D RoPE: half the rotary width encodes the patch row, half the column."""
    freqs = hw_ids[..., None].float() * inv_freq.to(hw_ids.device)  # B N 2 quarter
    hw = torch.cat([freqs[..., 0, :], freqs[..., 1, :]], dim=-1)
    emb = torch.cat((hw, hw), dim=-1)
    return emb.cos(), emb.sin()
