"""Public attention-statistics API and backend dispatch.

All functions take the model's post-RoPE ``q [B, H, Lq, D]`` and ``k, v [B, Hkv, Lk, D]`` (``H % Hkv == 0``,
GQA), a :class:`~kernels.mask.MaskSpec`, and return fp32 statistics; the softmax scale defaults to
``D ** -0.5``. Group ids are integer ``[B, L]`` (or ``[L]``), ``-1`` = in no group; with no query groups,
all queries form one group.

Backends (``backend=`` argument, else ``HOOKED_VLM_ATTN_BACKEND=triton|torch|naive``, else automatic):
``triton`` for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` (the interpreter runs the same
kernels); ``torch`` (chunked, memory bounded by one tile per head group) otherwise; ``naive`` is the fp64
materialising reference. Importing this module imports neither triton nor a GPU driver. ``"sdpa"`` (accepted by
:func:`attn_stats` for output + LSE only, :func:`attn_out_lse`, :func:`colsum_with_lse` and :func:`weighted_colsum`)
uses torch's fused kernels where the mask is plain causal or absent, and the automatic backend elsewhere.

Every LSE returned here remembers the mask fingerprint, scale and shapes that produced it; reusing it in
:func:`attn_colsum` / :func:`attn_rows` under anything else raises :class:`~kernels.mask.MaskMismatchError`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .mask import MaskMismatchError, MaskSpec, ResolvedMask

Backend = Literal["triton", "torch", "naive"]
ENV_VAR = "HOOKED_VLM_ATTN_BACKEND"
_LSE_TAG = "_hooked_vlm_lse_origin"


# ---------------------------------------------------------------------------------------------- dispatch
def triton_available() -> bool:
    """Whether the triton package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(x: Tensor, backend: str | None = None) -> Backend:
    """Pick the backend for tensor ``x``: argument, then ``$HOOKED_VLM_ATTN_BACKEND``, then automatic."""
    choice = backend or os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if choice not in ("auto", "triton", "torch", "naive"):
        raise ValueError(f"unknown attention backend {choice!r}; use one of triton, torch, naive (or unset {ENV_VAR})")
    if choice == "auto":
        if triton_available() and (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
            return "triton"
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not installed; pip install hooked-vlm[triton]")
        if x.device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"backend 'triton' runs on CUDA tensors (or CPU under the interpreter), got {x.device}")
    return choice  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- inputs
def _check_qk(q: Tensor, k: Tensor, v: Tensor | None = None) -> None:
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q must be [B, H, Lq, D] and k [B, Hkv, Lk, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if v is not None and (v.ndim != 4 or v.shape[:3] != k.shape[:3]):
        raise ValueError(f"v {tuple(v.shape)} must be [B, Hkv, Lk, Dv] matching k {tuple(k.shape)}")


def _ids(ids: Tensor | None, b: int, n: int, name: str, device: torch.device) -> Tensor | None:
    """Integer ids [B, n] or [n] -> int32 [B, n] contiguous."""
    if ids is None:
        return None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] not in (1, b) or ids.shape[1] != n:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}; it must be [B, {n}] or [{n}] (int, -1 = no group)")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer group ids, got {ids.dtype}")
    return ids.to(device=device, dtype=torch.int32).expand(b, -1).contiguous()


def _num_groups(ids: Tensor) -> int:
    return max(1, int(ids.max()) + 1) if ids.numel() else 1


def _onehot(ids: Tensor, n: int) -> Float[Tensor, "b l n"]:
    """int32 [B, L] ids -> fp32 one-hot [B, L, n] (rows of -1 are zero)."""
    return torch.nn.functional.one_hot(ids.long().clamp(min=0), n).float() * (ids >= 0)[..., None].float()


def _query_weights(q_group_ids: Tensor | None, q_weights: Tensor | None, b: int, lq: int, dev: torch.device) -> Tensor:
    """Dense fp32 query weights [B, Lq, QG]: explicit weights, one-hot query groups, or all ones (QG = 1)."""
    if q_weights is not None and q_group_ids is not None:
        raise ValueError("pass either q_group_ids or q_weights, not both")
    if q_weights is not None:
        w = q_weights[None] if q_weights.ndim == 2 else q_weights
        if w.ndim != 3 or w.shape[0] not in (1, b) or w.shape[1] != lq:
            raise ValueError(f"q_weights has shape {tuple(q_weights.shape)}; it must be [B, {lq}, QG] or [{lq}, QG]")
        return w.to(device=dev, dtype=torch.float32).expand(b, -1, -1).contiguous()
    if q_group_ids is not None:
        ids = _ids(q_group_ids, b, lq, "q_group_ids", dev)
        return _onehot(ids, _num_groups(ids))
    return torch.ones(b, lq, 1, dtype=torch.float32, device=dev)


def _tag_lse(lse: Tensor, mask: MaskSpec, scale: float, lq: int, lk: int) -> Tensor:
    setattr(lse, _LSE_TAG, (mask.fingerprint(), float(scale), lq, lk))
    return lse


def _check_lse(lse: Tensor, mask: MaskSpec, scale: float, q: Tensor, lk: int) -> None:
    b, h, lq = q.shape[:3]
    if tuple(lse.shape) != (b, h, lq):
        raise ValueError(f"lse has shape {tuple(lse.shape)}; it must be [B, H, Lq] = [{b}, {h}, {lq}]")
    origin = getattr(lse, _LSE_TAG, None)
    if origin is None:
        return  # an external LSE (e.g. FlashAttention's softmax_lse): trusted, cannot be checked
    fp, sc, olq, olk = origin
    if fp != mask.fingerprint() or (olq, olk) != (lq, lk):
        raise MaskMismatchError(
            "this LSE was computed under a different MaskSpec (or sequence lengths) than the one passed now; "
            "rows would no longer sum to 1. Pass the same MaskSpec (knockouts included) to every pass, or recompute "
            "the LSE with attn_fwd under the new mask."
        )
    if abs(sc - scale) > 1e-12 * max(1.0, abs(scale)):
        raise MaskMismatchError(f"this LSE was computed with scale {sc}, but scale {scale} was passed now")


def _setup(q: Tensor, k: Tensor, mask: MaskSpec, scale: float | None) -> tuple[ResolvedMask, float]:
    rm = mask.resolve(q.shape[0], q.shape[2], k.shape[2], q.device)
    return rm, (q.shape[-1] ** -0.5 if scale is None else float(scale))


def _group_mass(probs: Tensor, kg: Tensor, n: int) -> Float[Tensor, "b h s kg"]:
    """Sum probability rows [B, H, S, Lk] by key group (ids -1 dropped) -> [B, H, S, n]."""
    b, h, s, lk = probs.shape
    idx = kg.long().masked_fill(kg < 0, n)[:, None, None, :].expand(b, h, s, lk)
    out = torch.zeros(b, h, s, n + 1, dtype=torch.float32, device=probs.device)
    return out.scatter_add_(3, idx, probs.float())[..., :n]


def _reduce_heads(x: Tensor, heads: str, hkv: int) -> Tensor:
    if heads == "per_head":
        return x
    if heads == "mean":
        return x.mean(1, keepdim=True)
    if heads == "sum_gqa_group":
        b, h = x.shape[:2]
        return x.reshape(b, hkv, h // hkv, *x.shape[2:]).sum(2)
    raise ValueError(f"heads must be 'per_head', 'mean' or 'sum_gqa_group', got {heads!r}")


# ---------------------------------------------------------------------------------------------- public API
def attn_fwd(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    v: Float[Tensor, "b hkv lk dv"],
    mask: MaskSpec,
    key_group_ids: Int[Tensor, "b lk"] | None = None,
    q_group_ids: Int[Tensor, "b lq"] | None = None,
    return_row_mass: bool = False,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[Float[Tensor, "b h lq dv"], Float[Tensor, "b h lq"], dict[str, Tensor]]:
    """Attention output and row log-sum-exp in one pass, plus key-group statistics riding along.

    Returns ``(out, lse, extras)``: ``out`` in q's dtype, ``lse`` fp32 natural log (``-inf`` for fully masked
    rows, whose output is 0). With ``key_group_ids``, ``extras["region"] [B, H, QG, KG]`` is the attention
    mass from each query group to each key group, and with ``return_row_mass`` also
    ``extras["row_mass"] [B, H, Lq, KG]``.
    """
    _check_qk(q, k, v)
    rm, sc = _setup(q, k, mask, scale)
    be = resolve_backend(q, backend)
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    kg = _ids(key_group_ids, b, lk, "key_group_ids", q.device)
    w = _query_weights(q_group_ids, None, b, lq, q.device) if kg is not None else None
    extras: dict[str, Tensor] = {}
    if be == "triton":
        from .triton_kernels import triton_fwd

        r = triton_fwd(q, k, v, rm, sc, kg, _num_groups(kg) if kg is not None else 0, w, return_row_mass)
        out, lse = r["out"], r["lse"]
        extras = {n: r[n] for n in ("region", "row_mass") if n in r}
    elif be == "torch":
        from .torch_chunked import chunked_pass

        r = chunked_pass(
            q, k, v, rm, sc,
            kg_onehot=_onehot(kg, _num_groups(kg)) if kg is not None else None, region_w=w,
            want_out=True, want_row_mass=kg is not None and return_row_mass, want_region=kg is not None,
        )
        out, lse = r["out"], r["lse"]
        extras = {n: r[n] for n in ("region", "row_mass") if n in r}
    else:
        from .reference import naive_stats

        r = naive_stats(q, k, v, mask, scale=sc, key_group_ids=kg, q_weights=w)
        out, lse = r["out"].to(q.dtype), r["lse"].float()
        if kg is not None:
            extras["region"] = r["region"].float()
            if return_row_mass:
                extras["row_mass"] = r["row_mass"].float()
    return out, _tag_lse(lse, mask, sc, lq, lk), extras


def attn_colsum(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    lse: Float[Tensor, "b h lq"],
    mask: MaskSpec,
    q_group_ids: Int[Tensor, "b lq"] | None = None,
    q_weights: Float[Tensor, "b lq qg"] | None = None,
    *,
    heads: str = "per_head",
    scale: float | None = None,
    backend: str | None = None,
) -> Float[Tensor, "b h qg lk"]:
    """Attention received per key, ``colsum[b, h, c, j] = sum_i W[b, i, c] P[b, h, i, j]``, key-major.

    ``W`` is the one-hot of ``q_group_ids`` (QG groups), dense ``q_weights`` (e.g. a rollout vector: one
    exact rollout step), or all ones (QG = 1). Deterministic (no atomics), fp32. ``heads`` = ``per_head``
    (default), ``mean`` over heads, or ``sum_gqa_group`` (sum over the query heads sharing a KV head).
    """
    _check_qk(q, k)
    rm, sc = _setup(q, k, mask, scale)
    _check_lse(lse, mask, sc, q, k.shape[2])
    be = resolve_backend(q, backend)
    b, h, lq, _ = q.shape
    w = _query_weights(q_group_ids, q_weights, b, lq, q.device)
    if be == "triton":
        from .triton_kernels import triton_colsum

        cs = triton_colsum(q, k, lse, rm, sc, w)
    elif be == "torch":
        from .torch_chunked import chunked_pass

        cs = chunked_pass(q, k, None, rm, sc, lse_in=lse, colsum_w=w, want_colsum=True)["colsum"]
    else:
        from .reference import naive_probs

        p, _ = naive_probs(q, k, mask, sc)
        cs = torch.einsum("bqg,bhqk->bhgk", w.double(), p).float()
    return _reduce_heads(cs, heads, k.shape[1])


def attn_rows(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    rows: Int[Tensor, "b s"],
    mask: MaskSpec,
    lse: Float[Tensor, "b h lq"] | None = None,
    key_group_ids: Int[Tensor, "b lk"] | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[Float[Tensor, "b h s lk"], Float[Tensor, "b h s kg"] | None]:
    """Exact probability rows for selected query indices ``rows`` (``[B, S]`` or ``[S]``), fp32.

    Without ``lse`` the rows compute their own normaliser (two sweeps over the keys, cost S x Lk x D).
    Returns ``(probs [B, H, S, Lk], group_mass [B, H, S, KG] or None)``.
    """
    _check_qk(q, k)
    rm, sc = _setup(q, k, mask, scale)
    if lse is not None:
        _check_lse(lse, mask, sc, q, k.shape[2])
    be = resolve_backend(q, backend)
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    r = rows[None] if rows.ndim == 1 else rows
    if r.ndim != 2 or r.shape[0] not in (1, b):
        raise ValueError(f"rows has shape {tuple(rows.shape)}; it must be [B, S] or [S] query indices")
    r = r.to(device=q.device, dtype=torch.long).expand(b, -1).contiguous()
    if r.numel() and (int(r.min()) < 0 or int(r.max()) >= lq):
        raise ValueError(f"rows must be query indices in [0, {lq}), got [{int(r.min())}, {int(r.max())}]")
    kg = _ids(key_group_ids, b, lk, "key_group_ids", q.device)
    if be == "triton":
        from .triton_kernels import triton_rows

        probs, _ = triton_rows(q, k, r, lse, rm, sc)
    elif be == "torch":
        from .torch_chunked import chunked_pass

        probs = chunked_pass(q, k, None, rm, sc, rows=r, lse_in=lse, want_probs=True)["probs"]
    else:
        from .reference import naive_probs

        p, _ = naive_probs(q, k, mask, sc)
        probs = torch.gather(p, 2, r[:, None, :, None].expand(-1, h, -1, lk)).float()
    gm = _group_mass(probs, kg, _num_groups(kg)) if kg is not None else None
    return probs, gm


def region_mass(colsum: Float[Tensor, "b h qg lk"], key_group_ids: Int[Tensor, "b lk"]) -> Float[Tensor, "b h qg kg"]:
    """Sum per-key received attention into key groups (any number of groups: frames, grid cells, spans)."""
    b, h, c, lk = colsum.shape
    kg = _ids(key_group_ids, b, lk, "key_group_ids", colsum.device)
    return _group_mass(colsum, kg, _num_groups(kg))


@dataclass
class AttnStats:
    """Everything one attention call can report. Absent statistics are None."""

    out: Float[Tensor, "b h lq dv"]
    lse: Float[Tensor, "b h lq"]
    region: Float[Tensor, "b h qg kg"] | None = None
    row_mass: Float[Tensor, "b h lq kg"] | None = None
    colsum: Float[Tensor, "b h qg lk"] | None = None
    rows: Float[Tensor, "b h s lk"] | None = None
    rows_group_mass: Float[Tensor, "b h s kg"] | None = None


def attn_stats(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    v: Float[Tensor, "b hkv lk dv"],
    mask: MaskSpec,
    *,
    key_group_ids: Int[Tensor, "b lk"] | None = None,
    q_group_ids: Int[Tensor, "b lq"] | None = None,
    colsum_q_group_ids: Int[Tensor, "b lq"] | None = None,
    colsum_q_weights: Float[Tensor, "b lq qg"] | None = None,
    colsum: bool = False,
    rows: Int[Tensor, "b s"] | None = None,
    return_row_mass: bool = False,
    scale: float | None = None,
    backend: str | None = None,
) -> AttnStats:
    """Output, LSE and any requested statistics with as few passes as the backend allows.

    The torch backend does it all in one sweep (each query block's rows are complete, so column sums and
    selected rows come from the same normalised tile); Triton runs forward, then the column and row kernels
    with the forward's LSE. ``q_group_ids`` groups queries for ``region``; ``colsum_q_group_ids`` /
    ``colsum_q_weights`` for ``colsum`` (enabled by either, or ``colsum=True`` for all queries).
    """
    want_colsum = colsum or colsum_q_group_ids is not None or colsum_q_weights is not None
    if backend == "sdpa":  # output + LSE only (e.g. recorded for a later column pass): the fused kernel where it applies
        if key_group_ids is None and not want_colsum and rows is None:
            out, lse = attn_out_lse(q, k, v, mask, scale=scale, backend="sdpa")
            return AttnStats(out=out, lse=lse)
        backend = None
    be = resolve_backend(q, backend)
    if be != "torch":
        out, lse, ex = attn_fwd(q, k, v, mask, key_group_ids, q_group_ids, return_row_mass, scale=scale, backend=be)
        st = AttnStats(out=out, lse=lse, region=ex.get("region"), row_mass=ex.get("row_mass"))
        if want_colsum:
            st.colsum = attn_colsum(q, k, lse, mask, colsum_q_group_ids, colsum_q_weights, scale=scale, backend=be)
        if rows is not None:
            st.rows, st.rows_group_mass = attn_rows(q, k, rows, mask, lse, key_group_ids, scale=scale, backend=be)
        return st
    from .torch_chunked import chunked_pass

    _check_qk(q, k, v)
    rm, sc = _setup(q, k, mask, scale)
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    kg = _ids(key_group_ids, b, lk, "key_group_ids", q.device)
    w_region = _query_weights(q_group_ids, None, b, lq, q.device) if kg is not None else None
    w_col = _query_weights(colsum_q_group_ids, colsum_q_weights, b, lq, q.device) if want_colsum else None
    kg_oh = _onehot(kg, _num_groups(kg)) if kg is not None else None
    r = chunked_pass(
        q, k, v, rm, sc, kg_onehot=kg_oh, region_w=w_region, colsum_w=w_col,
        want_out=True, want_row_mass=kg is not None and return_row_mass,
        want_region=kg is not None, want_colsum=want_colsum,
    )
    st = AttnStats(out=r["out"], lse=_tag_lse(r["lse"], mask, sc, lq, lk), row_mass=r.get("row_mass"))
    st.region, st.colsum = r.get("region"), r.get("colsum")
    if rows is not None:
        st.rows, st.rows_group_mass = attn_rows(q, k, rows, mask, st.lse, key_group_ids, scale=sc, backend="torch")
    return st


def _sdpa_colsum_applies(q: Tensor, k: Tensor, mask: MaskSpec, n_cols: int) -> bool:
    """Whether torch's fused SDPA backward can give ``W^T P`` exactly (plain causal or unmasked, one-hot width fits)."""
    lq, lk, d = q.shape[2], k.shape[2], q.shape[-1]
    return mask.is_plain_causal() and (not mask.causal or (lq == lk and mask.offset(lq, lk) == 0)) and n_cols <= d and q.dtype == k.dtype


def weighted_colsum(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    mask: MaskSpec,
    q_weights: Float[Tensor, "b lq qg"],
    *,
    heads: str = "per_head",
    scale: float | None = None,
    backend: str | None = None,
) -> Float[Tensor, "b h qg lk"]:
    """``colsum[b, h, c, j] = sum_i W[b, i, c] P[b, h, i, j]`` without a precomputed LSE: one rollout step.

    Plain causal (``Lq == Lk``) and unmasked attention use torch's fused SDPA kernels (``backend="sdpa"``, the
    default there; see :func:`sdpa_colsum`: two flash forwards on CPU, the value gradient elsewhere), in O(L)
    memory. Any other mask (padding, windows, bidirectional spans, segments, knockouts) computes the LSE with
    :func:`attn_fwd` and then runs :func:`attn_colsum`.
    """
    _check_qk(q, k)
    b, h, lq, d = q.shape
    w = _query_weights(None, q_weights, b, lq, q.device)
    sc = d**-0.5 if scale is None else float(scale)
    if backend not in (None, "sdpa") or not _sdpa_colsum_applies(q, k, mask, w.shape[-1]):
        if backend == "sdpa":
            raise ValueError(
                "backend='sdpa' needs a plain causal (Lq == Lk) or unmasked MaskSpec and at most head_dim query "
                "groups; use backend=None to fall back to the LSE + column pass"
            )
        _, lse, _ = attn_fwd(q, k, k, mask, scale=sc, backend=backend)
        return attn_colsum(q, k, lse, mask, q_weights=w, heads=heads, scale=sc, backend=backend)
    rep = h // k.shape[1]
    kk = k.detach().repeat_interleave(rep, dim=1) if rep > 1 else k.detach()
    cs = sdpa_colsum(q.detach(), kk, w, mask.causal and lq > 1, sc)
    return _reduce_heads(cs, heads, k.shape[1])


_FLASH_CPU = "_scaled_dot_product_flash_attention_for_cpu"


def sdpa_colsum(
    q: Float[Tensor, "b h l d"], k: Float[Tensor, "b h l d"], w: Float[Tensor, "b l qg"], causal: bool, scale: float,
    method: str = "auto",
) -> Float[Tensor, "b h qg l"]:
    """``W^T P`` for plain causal / unmasked attention with torch's fused kernels (k already expanded to H heads).

    ``method="lse"`` (CPU default): two flash forwards. The first gives every row's LSE; the second swaps roles (keys
    attend to queries, sequence reversed so that causality is again lower-triangular) with the bias
    ``log w_i - lse_i`` folded into an extra head dimension, and its LSE is ``log sum_i w_i P_ij``. It needs
    aten's ``_scaled_dot_product_flash_attention_for_cpu`` (private: it returns the LSE). ``method="dv"`` (other
    devices, or when that op is missing): the value gradient of one SDPA call, ``dV = P^T dO`` with ``dO = W``.
    """
    have_lse = q.device.type == "cpu" and hasattr(torch.ops.aten, _FLASH_CPU)
    if method == "auto":
        method = "lse" if have_lse else "dv"
    if method == "lse":
        op = getattr(torch.ops.aten, _FLASH_CPU)
        _, lse = op(q, k, torch.zeros_like(q[..., :1]).expand_as(q).contiguous(), 0.0, causal, scale=scale)[:2]
        ones = torch.ones_like(k[..., :1])
        keys_as_q = torch.cat([k, ones], -1)
        outs = []
        for c in range(w.shape[-1]):
            bias = torch.log(w[..., c].to(lse.dtype).clamp_min(1e-30))[:, None, :] - lse  # B H L
            q_as_k = torch.cat([q * scale, bias[..., None].to(q.dtype)], -1)
            if causal:
                kq, qk = keys_as_q.flip(2).contiguous(), q_as_k.flip(2).contiguous()
            else:
                kq, qk = keys_as_q.contiguous(), q_as_k.contiguous()
            _, lse2 = op(kq, qk, torch.zeros_like(kq), 0.0, causal, scale=1.0)[:2]
            outs.append((lse2.flip(2) if causal else lse2).float().exp())
        return torch.stack(outs, 2)
    if method != "dv":
        raise ValueError(f"method must be 'auto', 'lse' or 'dv', got {method!r}")
    with torch.enable_grad():
        v = torch.zeros_like(k, dtype=torch.float32 if k.dtype == torch.float64 else k.dtype, requires_grad=True)
        out = torch.nn.functional.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, is_causal=causal, scale=scale)
        d_out = torch.zeros_like(out)
        d_out[..., : w.shape[-1]] = w[:, None].to(out.dtype)
        (dv,) = torch.autograd.grad(out, v, d_out)
    return dv[..., : w.shape[-1]].transpose(2, 3).float()


# ---------------------------------------------------------------------------------------------- SDPA routes with an LSE
# Added for issue 12 (rollout at long length): the forward records each row's LSE at the cost of the plain fused
# forward, and the column pass then needs one fused forward per layer (was two).
def sdpa_plain(q: Tensor, k: Tensor, mask: MaskSpec) -> bool:
    """Whether ``mask`` is exactly SDPA's ``is_causal`` (square, no offset) or no mask at all."""
    lq, lk = q.shape[2], k.shape[2]
    return mask.is_plain_causal() and (not mask.causal or (lq == lk and mask.offset(lq, lk) == 0))


def sdpa_out_lse(
    q: Float[Tensor, "b h l d"], k: Float[Tensor, "b hkv l d"], v: Float[Tensor, "b hkv l dv"], causal: bool, scale: float
) -> tuple[Float[Tensor, "b h l dv"], Float[Tensor, "b h l"]] | None:
    """Attention output and fp32 row LSE from one fused CPU flash forward, or None where that kernel is unavailable.

    The output is bit-identical to ``F.scaled_dot_product_attention`` on CPU (the same kernel). The op that also
    returns the LSE, aten's ``_scaled_dot_product_flash_attention_for_cpu``, is private; no public CPU path returns
    the LSE at this cost, so the caller falls back to :func:`attn_fwd` (Triton on CUDA, chunked torch) on None.
    """
    op = getattr(torch.ops.aten, _FLASH_CPU, None)
    if op is None or q.device.type != "cpu" or v.shape[-1] != q.shape[-1] or not (q.dtype == k.dtype == v.dtype):
        return None
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out, lse = op(q, k, v, 0.0, causal and q.shape[2] > 1, scale=scale)[:2]
    return out, lse.float()


def sdpa_colsum_from_lse(
    q: Float[Tensor, "b h l d"], k: Float[Tensor, "b h l d"], lse: Float[Tensor, "b h l"], w: Float[Tensor, "b l qg"],
    causal: bool, scale: float, method: str = "auto",
) -> Float[Tensor, "b h qg l"]:
    """``W^T P`` from a known row LSE with ONE public fused SDPA forward (k already expanded to H heads).

    Roles are swapped: every key ``j`` becomes a query that attends to the original queries ``i`` over the reversed
    sequence (so causality is again SDPA's top-left triangle), and one sentinel key of score 0 and value
    ``e_sentinel`` is visible to every row; the softmax normaliser ``Z_j`` then cancels in ``out_c / out_sent``.

    * ``method="values"`` (head dim unchanged, the forward's own cost): scores ``s_ij``, values ``W_ic e^{-lse_i}``,
      so ``out_c / out_sent = sum_i e^{s_ij - lse_i} W_ic``. Used when every live LSE lies in [-60, 60] and their
      range is under 50 (then no term that matters leaves fp32's range); up to ``head_dim - 1`` groups per pass.
    * ``method="bias"`` (one extra head dimension carries ``-lse_i``): scores ``log P_ij <= 0``, values ``W``;
      exact for any LSE; up to ``head_dim`` groups per pass.

    ``"auto"`` picks ``values`` when its range condition holds, else ``bias``. More groups are chunked.
    """
    b, h, l, d = q.shape
    dt = torch.float32 if q.dtype == torch.float64 else q.dtype
    live = torch.isfinite(lse)
    if method == "auto":
        lv = lse[live]
        ok = lv.numel() == 0 or (float(lv.abs().max()) < 60 and float(lv.max() - lv.min()) < 50)
        method = "values" if ok else "bias"
    if method == "values":
        e, per = d, d - 1
        rows_t = k.to(dt)
        keys_t = q.to(dt) * scale
        row_scale = torch.where(live, torch.exp(-lse.clamp(-80, 80)), torch.zeros_like(lse)).to(dt)  # B H L
    elif method == "bias":
        e, per = d + 1, d
        lse_f = torch.where(live, lse, torch.full_like(lse, float("inf")))  # dead rows: P = 0
        rows_t = torch.cat([k.to(dt), torch.ones_like(k[..., :1], dtype=dt)], -1)
        keys_t = torch.cat([q.to(dt) * scale, (-lse_f).clamp(min=-1e30).to(dt)[..., None]], -1)
        row_scale = None
    else:
        raise ValueError(f"method must be 'auto', 'values' or 'bias', got {method!r}")
    if causal:
        rows_t, keys_t = rows_t.flip(2), keys_t.flip(2)
    zero = torch.zeros(b, h, 1, e, dtype=dt, device=q.device)
    rows_t = torch.cat([zero, rows_t], 2)  # a dummy row 0: row r + 1 sees keys 0 .. r + 1 (top-left causal)
    keys_t = torch.cat([zero, keys_t], 2)  # the sentinel key: score 0 for every row
    qg = w.shape[-1]
    outs = []
    for c0 in range(0, qg, per):
        wc = w[..., c0 : c0 + per].to(dt)  # B L g
        g = wc.shape[-1]
        vals = torch.zeros(b, h, l + 1, e, dtype=dt, device=q.device)
        body = wc[:, None].expand(b, h, l, g)
        if row_scale is not None:
            body = body * row_scale[..., None]
        vals[:, :, 1:, :g] = body.flip(2) if causal else body
        vals[:, :, 0, g] = 1
        out = torch.nn.functional.scaled_dot_product_attention(rows_t, keys_t, vals, is_causal=causal, scale=1.0)[:, :, 1:]
        cs = out[..., :g].float() / out[..., g : g + 1].float()  # B H L g
        outs.append(cs.flip(2) if causal else cs)
    return torch.cat(outs, -1).transpose(2, 3)


def colsum_with_lse(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    lse: Float[Tensor, "b h lq"],
    mask: MaskSpec,
    q_weights: Float[Tensor, "b lq qg"],
    *,
    heads: str = "per_head",
    scale: float | None = None,
    backend: str | None = None,
) -> Float[Tensor, "b h qg lk"]:
    """``W^T P`` given the rows' LSE (e.g. recorded during the model's forward, ``hook_lse``): one pass.

    Plain causal (square) or unmasked layers use :func:`sdpa_colsum_from_lse` (public SDPA, ``backend=None`` or
    ``"sdpa"``); every other mask, or another ``backend``, the column kernels (:func:`attn_colsum`).
    """
    _check_qk(q, k)
    b, h, lq, d = q.shape
    sc = d**-0.5 if scale is None else float(scale)
    _check_lse(lse, mask, sc, q, k.shape[2])
    w = _query_weights(None, q_weights, b, lq, q.device)
    if backend in (None, "sdpa") and sdpa_plain(q, k, mask):
        rep = h // k.shape[1]
        kk = k.detach().repeat_interleave(rep, dim=1) if rep > 1 else k.detach()
        cs = sdpa_colsum_from_lse(q.detach(), kk, lse, w, mask.causal and lq > 1, sc)
        return _reduce_heads(cs, heads, k.shape[1])
    if backend == "sdpa":
        raise ValueError("backend='sdpa' needs a plain causal (Lq == Lk) or unmasked MaskSpec; use backend=None")
    return attn_colsum(q, k, lse, mask, q_weights=w, heads=heads, scale=sc, backend=backend)


def attn_out_lse(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    v: Float[Tensor, "b hkv lk dv"],
    mask: MaskSpec,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[Float[Tensor, "b h lq dv"], Float[Tensor, "b h lq"]]:
    """Output and tagged row LSE: the fused CPU flash kernel for plain masks (``backend`` None / ``"sdpa"``), else
    :func:`attn_fwd` (Triton on CUDA, chunked torch)."""
    _check_qk(q, k, v)
    sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend in (None, "sdpa") and sdpa_plain(q, k, mask):
        r = sdpa_out_lse(q, k, v, mask.causal, sc)
        if r is not None:
            return r[0], _tag_lse(r[1], mask, sc, q.shape[2], k.shape[2])
    out, lse, _ = attn_fwd(q, k, v, mask, scale=sc, backend=None if backend == "sdpa" else backend)
    return out, lse
