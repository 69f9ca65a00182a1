"""Attention output for masks SDPA cannot express on its own, without ever forming an ``[Lq, Lk]`` tensor.

Padding in a batch, sliding windows, bidirectional spans, segments, knockouts and query offsets (suffix
queries against a longer key sequence) all used to build the dense ``[B, Lq, Lk]`` boolean mask of the whole
call (256 MB at 16k, 4 GB at 64k). :func:`masked_attention` picks one of two routes from the
:class:`~kernels.mask.MaskSpec` alone:

* ``"row_slices"``: causal attention whose only extra condition is padding, with each row's real keys one
  contiguous span (left or right padding) and queries aligned with keys. Each batch row is one fused
  ``is_causal`` SDPA call on its real span (plus one unmasked call for right-padding queries, which see every
  real key); padding queries before the span see nothing and output 0, as on the dense path.
* ``"query_chunks"``: everything else. Queries are cut into chunks of at most ``tile_elems // Lk`` rows; each
  chunk attends to the hull ``[lo, hi)`` of the keys any of its queries can see (from
  :meth:`~kernels.mask.ResolvedMask.row_key_ranges`, O(L)) with the chunk's own ``[rows, hi - lo]`` mask from
  :meth:`~kernels.mask.ResolvedMask.visible`. Windows and segments shrink the hull, so they also get cheaper.

Both routes use fused SDPA (flash on CPU and CUDA, grouped-query heads without copying K and V) and give the
dense path's output to fp32 rounding. :func:`route` says which route a mask takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from kernels.mask import MaskSpec, ResolvedMask

#: elements of the largest per-chunk mask on the ``query_chunks`` route (4 Mi booleans: 64 query rows at 64k keys)
TILE_ELEMS = 1 << 22


def route(mask: MaskSpec, lq: int, lk: int) -> str:
    """``"row_slices"`` or ``"query_chunks"``: the route :func:`masked_attention` takes for this mask and shape."""
    only_padding = (
        mask.causal
        and mask.key_valid is not None
        and mask.window == 0
        and mask.bidir_ids is None
        and mask.doc_ids is None
        and mask.knockout is None
        and lq == lk
        and mask.offset(lq, lk) == 0
    )
    return "row_slices" if only_padding and _contiguous_spans(mask.key_valid) is not None else "query_chunks"


def _contiguous_spans(key_valid: Tensor) -> tuple[list[int], list[int]] | None:
    """Per row ``(first, end)`` of the real keys when they form one contiguous span, else None."""
    kv = key_valid.bool()
    pos = torch.arange(kv.shape[1], device=kv.device)
    n = kv.sum(1)
    first = torch.where(kv, pos, kv.shape[1]).amin(1)
    end = torch.where(kv, pos + 1, 0).amax(1)
    if bool(((end - first).clamp(min=0) != n).any()):
        return None
    return first.tolist(), end.tolist()


def masked_attention(
    q: Float[Tensor, "batch q_pos heads d_head"],
    k: Float[Tensor, "batch k_pos kv_heads d_head"],
    v: Float[Tensor, "batch k_pos kv_heads d_head"],
    mask: MaskSpec,
    scale: float,
    tile_elems: int | None = None,
) -> Float[Tensor, "batch q_pos heads d_head"]:
    """Exact attention output under ``mask`` (rows that see no key output 0), never materialising ``[Lq, Lk]``."""
    b, lq, _, _ = q.shape
    lk = k.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # B H L dh
    if route(mask, lq, lk) == "row_slices":
        out = _row_slices(qt, kt, vt, mask, scale)
    else:
        out = _query_chunks(qt, kt, vt, mask.resolve(b, lq, lk, q.device), scale, tile_elems or TILE_ELEMS)
    return out.transpose(1, 2)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False, mask: Tensor | None = None) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[-3] != k.shape[-3]
    )


def _row_slices(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, scale: float) -> Tensor:
    """Padding-only causal attention: one fused causal SDPA per batch row over its real keys."""
    spans = _contiguous_spans(mask.key_valid)
    assert spans is not None
    firsts, ends = spans
    out = torch.zeros_like(q)
    shared = mask.key_valid.shape[0] == 1
    for bi in range(q.shape[0]):
        a, c = (firsts[0], ends[0]) if shared else (firsts[bi], ends[bi])
        if c <= a:
            continue  # no real key: every query of this row sees nothing
        qs, ks, vs = q[bi : bi + 1, :, a:c], k[bi : bi + 1, :, a:c], v[bi : bi + 1, :, a:c]
        out[bi : bi + 1, :, a:c] = _sdpa(qs, ks, vs, scale, causal=c - a > 1)
        if c < q.shape[2]:  # right padding: those queries see every real key (all lie in their past)
            out[bi : bi + 1, :, c:] = _sdpa(q[bi : bi + 1, :, c:], ks, vs, scale)
    return out


def _query_chunks(q: Tensor, k: Tensor, v: Tensor, rm: ResolvedMask, scale: float, tile_elems: int) -> Tensor:
    """Any mask: chunks of queries against their key hull, each with its own small boolean mask."""
    lq, lk = rm.lq, rm.lk
    rows = max(1, min(lq, tile_elems // max(1, lk)))
    lo, hi = rm.row_key_ranges()  # B Lq each
    out = torch.zeros_like(q)
    # masks whose tables are shared across the batch ([1, Lk]) and offsets shared by all rows: one call per chunk
    shared = all(t is None or t.shape[0] == 1 for t in _tables(rm.spec))
    batches = [slice(0, q.shape[0])] if shared else [slice(bi, bi + 1) for bi in range(q.shape[0])]
    for bs in batches:
        b0 = bs.start
        for i0 in range(0, lq, rows):
            i1 = min(lq, i0 + rows)
            k0, k1 = int(lo[b0, i0:i1].min()), int(hi[b0, i0:i1].max())
            if k1 <= k0:
                continue  # no query of this chunk sees any key
            qpos = torch.arange(i0, i1, device=q.device) + rm.offset
            visible = rm.visible(b0, qpos, k0, k1)  # rows x keys of the hull
            dead = ~visible.any(-1, keepdim=True)
            o = _sdpa(q[bs, :, i0:i1], k[bs, :, k0:k1], v[bs, :, k0:k1], scale, mask=visible | dead)
            out[bs, :, i0:i1] = o.masked_fill(dead, 0.0) if bool(dead.any()) else o
    return out


def _tables(mask: MaskSpec) -> list[Tensor | None]:
    ko = mask.knockout
    return [mask.key_valid, mask.bidir_ids, mask.doc_ids] + ([] if ko is None else [ko.q_region, ko.k_region])
