"""Chunked PyTorch backend: exact attention statistics with memory bounded by one tile per head group.

One routine, :func:`chunked_pass`, serves every public function. For each batch row, KV head and block of
queries it computes the scores of the block's query heads (the GQA group, flattened into one matmul)
against the block's key range only (host-side ranges from the MaskSpec), applies the exact mask inside
the tile, and then either normalises the rows itself (the rows are complete, so the softmax is exact in
one pass: out, LSE, row/region mass, column sums and selected rows all come from the same tile) or uses
a given LSE (column sums / rows under a recorded mask). The block height is chosen so the tile
``G x block x keys`` stays under ``tile_elems`` floats; a single query row per tile is the floor, so the
peak is ``max(tile_elems, G * Lk)`` floats plus the outputs. Everything accumulates in fp32 in a fixed
order: deterministic.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .mask import ResolvedMask

NEG_INF = float("-inf")


def default_tile_elems(h: int, g: int, lq: int, lk: int, dv: int) -> int:
    """Tile budget in fp32 elements: room for 64 query rows of a head group against all keys (so K and V are
    streamed once per 64 rows, not per handful), at least 1 Mi, and never more than 1/4 of the output size.

    Measured on one CPU thread (H=7 group, L=16k): 8 rows per tile ran ~2x slower than 64 (K/V streaming).
    """
    return int(min(max(2**20, g * 64 * lk), max(2**16, h * lq * dv // 4)))


def _mask_tile(s: Tensor, rm: ResolvedMask, b: int, qpos: Tensor, lo: int, hi: int, pmin: int, pmax: int) -> None:
    """In place: set invisible scores of tile ``s`` [G, n, hi-lo] to -inf, touching only the columns that
    can be invisible when the mask is pure causal / window arithmetic."""
    if rm.spec.has_tensors():
        vis = rm.visible(b, qpos, lo, hi)
        s.masked_fill_(~vis, NEG_INF)
        return
    if rm.causal:
        a = max(lo, pmin + 1)
        if a < hi:
            vis = rm.visible(b, qpos, a, hi)
            s[..., a - lo :].masked_fill_(~vis, NEG_INF)
    if rm.window > 0:
        c = min(hi, pmax - rm.window + 1)
        if c > lo:
            vis = rm.visible(b, qpos, lo, c)
            s[..., : c - lo].masked_fill_(~vis, NEG_INF)


def _blocks(lo: Tensor, hi: Tensor, cq: int) -> list[tuple[int, int, int, int]]:
    """Split rows into blocks of ``cq``; per block (i0, i1, key lo, key hi) as python ints."""
    n = lo.shape[0]
    out = []
    lo_l, hi_l = lo.tolist(), hi.tolist()
    for i0 in range(0, n, cq):
        i1 = min(n, i0 + cq)
        pairs = [(a, c) for a, c in zip(lo_l[i0:i1], hi_l[i0:i1]) if c > a]
        if pairs:
            out.append((i0, i1, min(p[0] for p in pairs), max(p[1] for p in pairs)))
        else:
            out.append((i0, i1, 0, 0))
    return out


def chunked_pass(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    v: Float[Tensor, "b hkv lk dv"] | None,
    rm: ResolvedMask,
    scale: float,
    *,
    rows: Int[Tensor, "b s"] | None = None,
    lse_in: Float[Tensor, "b h lq"] | None = None,
    kg_onehot: Float[Tensor, "b lk kg"] | None = None,
    region_w: Float[Tensor, "b lq qg"] | None = None,
    colsum_w: Float[Tensor, "b lq cg"] | None = None,
    want_out: bool = False,
    want_row_mass: bool = False,
    want_region: bool = False,
    want_colsum: bool = False,
    want_probs: bool = False,
    tile_elems: int | None = None,
) -> dict[str, Tensor]:
    """One sweep over (batch, KV head, query block) producing the requested statistics.

    ``rows`` selects query indices (``[B, S]``) instead of all ``Lq`` queries; then the per-row outputs
    (``lse``, ``row_mass``, ``probs``) are ``[B, H, S, ...]``. With ``lse_in`` the rows are normalised by the
    given LSE (indexed by query index) instead of their own. ``region_w`` / ``colsum_w`` are dense query
    weights for the region (``W^T P onehot``) and column (``W^T P``) statistics; tiles whose queries all
    have zero weight skip that work.
    """
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    dev = q.device
    dv = v.shape[-1] if v is not None else d
    n_rows = lq if rows is None else rows.shape[1]
    if tile_elems is None:
        tile_elems = default_tile_elems(h, g, n_rows, lk, dv)
    cq = max(1, min(n_rows, tile_elems // max(1, g * lk)))
    f32 = torch.float32
    res: dict[str, Tensor] = {}
    lse = torch.full((b, h, n_rows), NEG_INF, dtype=f32, device=dev)
    res["lse"] = lse
    if want_out:
        res["out"] = torch.zeros(b, h, n_rows, dv, dtype=q.dtype, device=dev)
    kgn = kg_onehot.shape[-1] if kg_onehot is not None else 0
    qgn = region_w.shape[-1] if region_w is not None else 0
    cgn = colsum_w.shape[-1] if colsum_w is not None else 0
    if want_row_mass:
        res["row_mass"] = torch.zeros(b, h, n_rows, kgn, dtype=f32, device=dev)
    if want_region:
        res["region"] = torch.zeros(b, h, qgn, kgn, dtype=f32, device=dev)
    if want_colsum:
        res["colsum"] = torch.zeros(b, h, cgn, lk, dtype=f32, device=dev)
    if want_probs:
        res["probs"] = torch.zeros(b, h, n_rows, lk, dtype=f32, device=dev)
    row_lo, row_hi = rm.row_key_ranges()
    # one score workspace for the whole sweep: the tile is the only L-sized temporary, and reusing it avoids
    # allocator churn (tiles of growing width would otherwise fragment the heap and raise peak RSS)
    work = torch.empty(g * cq * lk, dtype=f32, device=dev)
    for bi in range(b):
        qidx = torch.arange(lq, device=dev) if rows is None else rows[bi].long()
        blocks = _blocks(row_lo[bi, qidx], row_hi[bi, qidx], cq)
        if want_region:
            wr = region_w[bi, qidx].to(f32)  # n qg
            wr_live = (wr != 0).any(1).tolist()
        if want_colsum:
            wc = colsum_w[bi, qidx].to(f32)  # n cg
            wc_live = (wc != 0).any(1).tolist()
        for hk in range(hkv):
            hs = slice(hk * g, (hk + 1) * g)
            kf = k[bi, hk].to(f32)
            vf = v[bi, hk].to(f32) if want_out else None
            for i0, i1, lo, hi in blocks:
                if hi <= lo:
                    continue
                n, m = i1 - i0, hi - lo
                qi = qidx[i0:i1]
                qpos = qi + rm.offset
                qb = q[bi, hs, i0:i1] if rows is None else q[bi, hs][:, qi]
                s = work[: g * n * m].view(g * n, m)
                torch.matmul(qb.reshape(g * n, d).to(f32) * scale, kf[lo:hi].T, out=s)
                s = s.view(g, n, m)
                if rows is None:
                    pmin, pmax = i0 + rm.offset, i1 - 1 + rm.offset
                else:
                    pmin, pmax = int(qpos.min()), int(qpos.max())
                _mask_tile(s, rm, bi, qpos, lo, hi, pmin, pmax)
                # p holds unnormalised weights; ``inv`` [g, n, 1] normalises every product of p afterwards
                # (outputs are n x dv, not n x m: cheaper than a pass over the tile)
                if lse_in is None:
                    mx = s.amax(-1, keepdim=True)
                    mx = torch.where(torch.isinf(mx), torch.zeros((), dtype=f32, device=dev), mx)
                    p = s.sub_(mx).exp_()
                    den = p.sum(-1, keepdim=True)
                    lse[bi, hs, i0:i1] = (mx + den.log()).squeeze(-1)
                    inv = torch.where(den == 0, torch.zeros((), dtype=f32, device=dev), 1.0 / den)
                else:
                    lrow = lse_in[bi, hs][:, qi].to(f32)
                    lse[bi, hs, i0:i1] = lrow
                    lrow = torch.where(torch.isinf(lrow), torch.full((), float("inf"), device=dev), lrow)
                    p = s.sub_(lrow[..., None]).exp_()
                    inv = None
                if want_out:
                    o = torch.matmul(p, vf[lo:hi])
                    res["out"][bi, hs, i0:i1] = (o if inv is None else o.mul_(inv)).to(q.dtype)
                if want_probs:
                    res["probs"][bi, hs, i0:i1, lo:hi] = p if inv is None else p * inv
                region_here = want_region and any(wr_live[i0:i1])
                if want_row_mass or region_here:
                    rmass = torch.matmul(p, kg_onehot[bi, lo:hi].to(f32))  # g n kg
                    if inv is not None:
                        rmass.mul_(inv)
                    if want_row_mass:
                        res["row_mass"][bi, hs, i0:i1] = rmass
                    if region_here:
                        res["region"][bi, hs] += torch.matmul(wr[i0:i1].T, rmass)
                if want_colsum and any(wc_live[i0:i1]):
                    wt = wc[i0:i1].T  # cg n
                    for j in range(g):  # per head: a plain mm, no hidden copy of the tile
                        wj = wt if inv is None else wt * inv[j, :, 0][None, :]
                        res["colsum"][bi, hk * g + j, :, lo:hi] += wj.contiguous() @ p[j]
    return res

