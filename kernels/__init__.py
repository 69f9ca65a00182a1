"""Attention statistics without the L x L matrix.

Row log-sum-exp, region mass, attention received per key (column sums, exact rollout steps) and exact
probability rows, for causal / windowed / bidirectional / block-diagonal / knocked-out masks, GQA and any
length, from a Triton backend (CUDA, or CPU under the interpreter), a chunked PyTorch backend and an fp64
reference. Importing this package touches no GPU driver and does not import triton.

Note: Hugging Face's optional ``kernels`` distribution uses the same import name; the two cannot share
one environment. Ours is distributed as ``hooked-vlm``.
"""

from .api import (
    ENV_VAR,
    AttnStats,
    attn_colsum,
    attn_fwd,
    attn_out_lse,
    attn_rows,
    attn_stats,
    colsum_with_lse,
    region_mass,
    resolve_backend,
    weighted_colsum,
)
from .mask import Knockout, MaskMismatchError, MaskSpec, ResolvedMask

__all__ = [
    "ENV_VAR",
    "AttnStats",
    "Knockout",
    "MaskMismatchError",
    "MaskSpec",
    "ResolvedMask",
    "attn_colsum",
    "attn_fwd",
    "attn_out_lse",
    "attn_rows",
    "attn_stats",
    "colsum_with_lse",
    "region_mass",
    "resolve_backend",
    "weighted_colsum",
]
