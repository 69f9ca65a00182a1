"""Naive fp64 reference: materialise the full ``[B, H, Lq, Lk]`` probability matrix and read every
statistic off it. Only for tests and tiny inputs; it is the definition the fast paths must match."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .mask import MaskSpec


def naive_probs(
    q: Float[Tensor, "b h lq d"], k: Float[Tensor, "b hkv lk d"], mask: MaskSpec, scale: float | None = None
) -> tuple[Float[Tensor, "b h lq lk"], Float[Tensor, "b h lq"]]:
    """fp64 probabilities (fully masked rows are all zero) and the natural-log LSE (``-inf`` there)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    kk = k.double().repeat_interleave(h // hkv, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    vis = mask.dense(lq, lk, q.device)[:, None]  # B|1 1 Lq Lk
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    p = torch.where(vis, p, torch.zeros((), dtype=p.dtype))
    return p, lse


def _onehot(ids: Tensor, n: int) -> Tensor:
    """[B, L] ids (-1 = none) -> fp64 [B, L, n] one-hot."""
    return torch.nn.functional.one_hot(ids.long().clamp(min=0), n).double() * (ids >= 0)[..., None].double()


def naive_stats(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    v: Float[Tensor, "b hkv lk dv"],
    mask: MaskSpec,
    *,
    scale: float | None = None,
    key_group_ids: Int[Tensor, "b lk"] | None = None,
    q_group_ids: Int[Tensor, "b lq"] | None = None,
    q_weights: Float[Tensor, "b lq qg"] | None = None,
    rows: Int[Tensor, "b s"] | None = None,
) -> dict[str, Tensor]:
    """Every statistic in fp64: out, lse, row_mass, region, colsum, rows (and rows_group_mass)."""
    p, lse = naive_probs(q, k, mask, scale)
    b, h, lq, lk = p.shape
    vv = v.double().repeat_interleave(h // v.shape[1], dim=1)
    res: dict[str, Tensor] = {"out": p @ vv, "lse": lse, "probs": p}
    if q_weights is not None:
        w = q_weights.double().expand(b, -1, -1)
    elif q_group_ids is not None:
        qg = q_group_ids.expand(b, -1)
        w = _onehot(qg, max(1, int(qg.max()) + 1))
    else:
        w = torch.ones(b, lq, 1, dtype=torch.float64)
    res["colsum"] = torch.einsum("bqg,bhqk->bhgk", w, p)
    if key_group_ids is not None:
        kg = key_group_ids.expand(b, -1)
        oh = _onehot(kg, max(1, int(kg.max()) + 1))
        rm = torch.einsum("bhqk,bkg->bhqg", p, oh)
        res["row_mass"] = rm
        res["region"] = torch.einsum("bqc,bhqg->bhcg", w, rm)
    if rows is not None:
        r = rows.expand(b, -1).long()
        pr = torch.gather(p, 2, r[:, None, :, None].expand(-1, h, -1, lk))
        res["rows"] = pr
        if key_group_ids is not None:
            res["rows_group_mass"] = torch.einsum("bhsk,bkg->bhsg", pr, oh)
    return res
