"""Triton backend: three kernels (forward with fused key-group statistics, key-major column sums, selected
rows) written with pointer arithmetic and masks only (Triton 3.9 removed block pointers).

The kernel bodies are plain Python functions wrapped on demand: CUDA tensors get a compiled
``triton.JITFunction``, CPU tensors the interpreter's ``InterpretedFunction`` (what ``TRITON_INTERPRET=1``
would give), so one module serves both and importing it never touches a GPU driver. Helpers are inlined
by hand: under the interpreter every helper call costs about as much as a tile op.

Conventions: exp2 domain inside (``qk_scale = scale * log2(e)``), natural-log LSE outside; fp32
statistics; fully masked rows give ``lse = -inf``, output 0; no atomics (the forward writes per-query-block
region partials that the host sums in a fixed order). Not compiled or timed on a GPU yet.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from .mask import ResolvedMask

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _fwd_kernel(
    Q, K, V, O, LSE, KGID, QW, RM, RP, KVLO, KVHI,
    BIDIR, DOC, VALID, QREG, KREG, KOTAB,
    H, HKV, LQ, LK, D, DV, KG, QG, NQB, NKO, OFF, WINDOW, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BKG: tl.constexpr, BQG: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_BIDIR: tl.constexpr, HAS_DOC: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_KO: tl.constexpr, HAS_KG: tl.constexpr, HAS_QW: tl.constexpr,
    STORE_RM: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    qmask = offs_m < LQ
    q = tl.load(Q + (bh * LQ + offs_m[:, None]) * D + offs_d[None, :], mask=qmask[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    pos = offs_m + OFF
    if HAS_BIDIR:
        qb = tl.load(BIDIR + b * LK + pos, mask=qmask, other=-1)
    if HAS_DOC:
        qd = tl.load(DOC + b * LK + pos, mask=qmask, other=-1)
    if HAS_KO:
        qr = tl.load(QREG + b * LK + pos, mask=qmask, other=-1)
    lo = tl.load(KVLO + b * NQB + pid_m)
    hi = tl.load(KVHI + b * NQB + pid_m)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    gacc = tl.zeros([BM, BKG], tl.float32)
    kvbase = (b * HKV + hk) * LK
    for start in range(lo, hi, BN):
        offs_n = start + tl.arange(0, BN)
        nmask = offs_n < hi
        k = tl.load(K + (kvbase + offs_n[:, None]) * D + offs_d[None, :], mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        vis = qmask[:, None] & nmask[None, :]
        if CAUSAL:
            c = offs_n[None, :] <= pos[:, None]
            if HAS_BIDIR:
                kb = tl.load(BIDIR + b * LK + offs_n, mask=nmask, other=-2)
                c = c | ((qb[:, None] == kb[None, :]) & (qb[:, None] >= 0))
            vis = vis & c
        if HAS_WINDOW:
            vis = vis & ((pos[:, None] - offs_n[None, :]) < WINDOW)
        if HAS_DOC:
            kd = tl.load(DOC + b * LK + offs_n, mask=nmask, other=-2)
            vis = vis & (qd[:, None] == kd[None, :])
        if HAS_VALID:
            kv = tl.load(VALID + b * LK + offs_n, mask=nmask, other=0)
            vis = vis & (kv[None, :] != 0)
        if HAS_KO:
            kr = tl.load(KREG + b * LK + offs_n, mask=nmask, other=-1)
            hit = tl.load(KOTAB + tl.maximum(qr, 0)[:, None] * NKO + tl.maximum(kr, 0)[None, :],
                          mask=(qr[:, None] >= 0) & (kr[None, :] >= 0), other=0)
            vis = vis & (hit == 0)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + (kvbase + offs_n[:, None]) * DV + offs_dv[None, :], mask=nmask[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision=PREC)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        if HAS_KG:
            kg = tl.load(KGID + b * LK + offs_n, mask=nmask, other=-1)
            oh = (kg[:, None] == tl.arange(0, BKG)[None, :]).to(tl.float32)
            gacc = gacc * alpha[:, None] + tl.dot(p, oh, input_precision="ieee")
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + (bh * LQ + offs_m[:, None]) * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=qmask[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + bh * LQ + offs_m, lse, mask=qmask)
    if HAS_KG:
        rmass = gacc / l_safe[:, None]
        offs_g = tl.arange(0, BKG)
        if STORE_RM:
            tl.store(RM + (bh * LQ + offs_m[:, None]) * KG + offs_g[None, :], rmass, mask=qmask[:, None] & (offs_g[None, :] < KG))
        if HAS_QW:
            offs_c = tl.arange(0, BQG)
            w = tl.load(QW + (b * LQ + offs_m[:, None]) * QG + offs_c[None, :], mask=qmask[:, None] & (offs_c[None, :] < QG), other=0.0)
            part = tl.dot(tl.trans(w), rmass, input_precision="ieee")  # BQG BKG
            base = (pid_m * tl.num_programs(1) + bh) * QG * KG
            tl.store(RP + base + offs_c[:, None] * KG + offs_g[None, :], part, mask=(offs_c[:, None] < QG) & (offs_g[None, :] < KG))


def _colsum_kernel(
    Q, K, LSE, QW, CS, QLO, QHI,
    BIDIR, DOC, VALID, QREG, KREG, KOTAB,
    H, HKV, LQ, LK, D, QG, NKB, NKO, OFF, WINDOW, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BQG: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_BIDIR: tl.constexpr, HAS_DOC: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_KO: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_c = tl.arange(0, BQG)
    nmask = offs_n < LK
    k = tl.load(K + ((b * HKV + hk) * LK + offs_n[:, None]) * D + offs_d[None, :], mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    if HAS_BIDIR:
        kb = tl.load(BIDIR + b * LK + offs_n, mask=nmask, other=-2)
    if HAS_DOC:
        kd = tl.load(DOC + b * LK + offs_n, mask=nmask, other=-2)
    if HAS_VALID:
        kv = tl.load(VALID + b * LK + offs_n, mask=nmask, other=0)
    if HAS_KO:
        kr = tl.load(KREG + b * LK + offs_n, mask=nmask, other=-1)
    lo = tl.load(QLO + b * NKB + pid_n)
    hi = tl.load(QHI + b * NKB + pid_n)
    acc = tl.zeros([BQG, BN], tl.float32)
    for start in range(lo, hi, BM):
        offs_m = start + tl.arange(0, BM)
        qmask = offs_m < hi
        q = tl.load(Q + (bh * LQ + offs_m[:, None]) * D + offs_d[None, :], mask=qmask[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(LSE + bh * LQ + offs_m, mask=qmask, other=float("-inf"))
        live = lse != float("-inf")
        lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        pos = offs_m + OFF
        vis = (qmask & live)[:, None] & nmask[None, :]
        if CAUSAL:
            c = offs_n[None, :] <= pos[:, None]
            if HAS_BIDIR:
                qb = tl.load(BIDIR + b * LK + pos, mask=qmask, other=-1)
                c = c | ((qb[:, None] == kb[None, :]) & (qb[:, None] >= 0))
            vis = vis & c
        if HAS_WINDOW:
            vis = vis & ((pos[:, None] - offs_n[None, :]) < WINDOW)
        if HAS_DOC:
            qd = tl.load(DOC + b * LK + pos, mask=qmask, other=-1)
            vis = vis & (qd[:, None] == kd[None, :])
        if HAS_VALID:
            vis = vis & (kv[None, :] != 0)
        if HAS_KO:
            qr = tl.load(QREG + b * LK + pos, mask=qmask, other=-1)
            hit = tl.load(KOTAB + tl.maximum(qr, 0)[:, None] * NKO + tl.maximum(kr, 0)[None, :],
                          mask=(qr[:, None] >= 0) & (kr[None, :] >= 0), other=0)
            vis = vis & (hit == 0)
        p = tl.where(vis, tl.exp2(tl.where(vis, s, 0.0) - lse2[:, None]), 0.0)
        w = tl.load(QW + (b * LQ + offs_m[:, None]) * QG + offs_c[None, :], mask=qmask[:, None] & (offs_c[None, :] < QG), other=0.0)
        acc += tl.dot(tl.trans(w), p, input_precision="ieee")
    tl.store(CS + (bh * QG + offs_c[:, None]) * LK + offs_n[None, :], acc, mask=(offs_c[:, None] < QG) & nmask[None, :])


def _rows_kernel(
    Q, K, LSE, ROWS, P, LSEOUT, RLO, RHI,
    BIDIR, DOC, VALID, QREG, KREG, KOTAB,
    H, HKV, LQ, LK, D, S, NSB, NKO, OFF, WINDOW, qk_scale,
    BS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_BIDIR: tl.constexpr, HAS_DOC: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_KO: tl.constexpr, HAS_LSE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HKV)
    offs_s = pid_s * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, BD)
    smask = offs_s < S
    ridx = tl.load(ROWS + b * S + offs_s, mask=smask, other=0)
    q = tl.load(Q + (bh * LQ + ridx[:, None]) * D + offs_d[None, :], mask=smask[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    pos = ridx + OFF
    if HAS_BIDIR:
        qb = tl.load(BIDIR + b * LK + pos, mask=smask, other=-1)
    if HAS_DOC:
        qd = tl.load(DOC + b * LK + pos, mask=smask, other=-1)
    if HAS_KO:
        qr = tl.load(QREG + b * LK + pos, mask=smask, other=-1)
    lo = tl.load(RLO + b * NSB + pid_s)
    hi = tl.load(RHI + b * NSB + pid_s)
    kvbase = (b * HKV + hk) * LK
    if HAS_LSE:
        lse2 = tl.load(LSE + bh * LQ + ridx, mask=smask, other=float("-inf")) * 1.4426950408889634
    else:
        # sweep 1: the rows' own log-sum-exp (online max / sum)
        m_i = tl.full([BS], float("-inf"), tl.float32)
        l_i = tl.zeros([BS], tl.float32)
        for start in range(lo, hi, BN):
            offs_n = start + tl.arange(0, BN)
            nmask = offs_n < hi
            k = tl.load(K + (kvbase + offs_n[:, None]) * D + offs_d[None, :], mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            vis = smask[:, None] & nmask[None, :]
            if CAUSAL:
                c = offs_n[None, :] <= pos[:, None]
                if HAS_BIDIR:
                    kb = tl.load(BIDIR + b * LK + offs_n, mask=nmask, other=-2)
                    c = c | ((qb[:, None] == kb[None, :]) & (qb[:, None] >= 0))
                vis = vis & c
            if HAS_WINDOW:
                vis = vis & ((pos[:, None] - offs_n[None, :]) < WINDOW)
            if HAS_DOC:
                kd = tl.load(DOC + b * LK + offs_n, mask=nmask, other=-2)
                vis = vis & (qd[:, None] == kd[None, :])
            if HAS_VALID:
                kv = tl.load(VALID + b * LK + offs_n, mask=nmask, other=0)
                vis = vis & (kv[None, :] != 0)
            if HAS_KO:
                kr = tl.load(KREG + b * LK + offs_n, mask=nmask, other=-1)
                hit = tl.load(KOTAB + tl.maximum(qr, 0)[:, None] * NKO + tl.maximum(kr, 0)[None, :],
                              mask=(qr[:, None] >= 0) & (kr[None, :] >= 0), other=0)
                vis = vis & (hit == 0)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    # sweep 2: exact probabilities
    live = lse2 != float("-inf")
    lse_safe = tl.where(live, lse2, 0.0)
    for start in range(lo, hi, BN):
        offs_n = start + tl.arange(0, BN)
        nmask = offs_n < hi
        k = tl.load(K + (kvbase + offs_n[:, None]) * D + offs_d[None, :], mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        vis = smask[:, None] & nmask[None, :]
        if CAUSAL:
            c = offs_n[None, :] <= pos[:, None]
            if HAS_BIDIR:
                kb = tl.load(BIDIR + b * LK + offs_n, mask=nmask, other=-2)
                c = c | ((qb[:, None] == kb[None, :]) & (qb[:, None] >= 0))
            vis = vis & c
        if HAS_WINDOW:
            vis = vis & ((pos[:, None] - offs_n[None, :]) < WINDOW)
        if HAS_DOC:
            kd = tl.load(DOC + b * LK + offs_n, mask=nmask, other=-2)
            vis = vis & (qd[:, None] == kd[None, :])
        if HAS_VALID:
            kv = tl.load(VALID + b * LK + offs_n, mask=nmask, other=0)
            vis = vis & (kv[None, :] != 0)
        if HAS_KO:
            kr = tl.load(KREG + b * LK + offs_n, mask=nmask, other=-1)
            hit = tl.load(KOTAB + tl.maximum(qr, 0)[:, None] * NKO + tl.maximum(kr, 0)[None, :],
                          mask=(qr[:, None] >= 0) & (kr[None, :] >= 0), other=0)
            vis = vis & (hit == 0)
        vis = vis & live[:, None]
        p = tl.where(vis, tl.exp2(tl.where(vis, s, 0.0) - lse_safe[:, None]), 0.0)
        tl.store(P + (bh * S + offs_s[:, None]) * LK + offs_n[None, :], p, mask=smask[:, None] & nmask[None, :])
    tl.store(LSEOUT + bh * S + offs_s, lse2 * 0.6931471805599453, mask=smask)


_CACHE: dict[tuple[str, bool], object] = {}


def interpreter_active() -> bool:
    """True when triton was imported in interpreter mode (its own ``@jit`` library functions are interpreted)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def _kernel(name: str, interpret: bool):
    """The named kernel as a compiled JITFunction (CUDA) or an InterpretedFunction (CPU tensors)."""
    key = (name, interpret)
    if key not in _CACHE:
        fn = {"fwd": _fwd_kernel, "colsum": _colsum_kernel, "rows": _rows_kernel}[name]
        if interpret:
            if not interpreter_active():
                raise RuntimeError(
                    "the Triton backend on CPU tensors runs under the Triton interpreter: set TRITON_INTERPRET=1 "
                    "before triton is first imported (or use backend='torch')"
                )
            from triton.runtime.interpreter import InterpretedFunction

            _CACHE[key] = InterpretedFunction(fn)
        else:
            _CACHE[key] = triton.runtime.jit.JITFunction(fn)
    return _CACHE[key]


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (int(n) - 1).bit_length()))


def _mask_args(rm: ResolvedMask, dummy: Tensor) -> tuple[list, dict]:
    ko = rm.ko_table is not None
    args = [
        rm.bidir_ids if rm.bidir_ids is not None else dummy,
        rm.doc_ids if rm.doc_ids is not None else dummy,
        rm.key_valid if rm.key_valid is not None else dummy,
        rm.q_region if ko else dummy,
        rm.k_region if ko else dummy,
        rm.ko_table if ko else dummy,
    ]
    flags = dict(
        CAUSAL=rm.causal,
        HAS_WINDOW=rm.window > 0,
        HAS_BIDIR=rm.bidir_ids is not None and rm.causal,
        HAS_DOC=rm.doc_ids is not None,
        HAS_VALID=rm.key_valid is not None,
        HAS_KO=ko,
    )
    return args, flags


def _prec(x: Tensor) -> tuple[bool, str]:
    """(UPCAST, input_precision): the interpreter multiplies bf16 bit patterns, so upcast tiles there."""
    upcast = x.device.type == "cpu" or x.dtype == torch.float32
    # fp32 tiles: IEEE products (TF32 would cost ~1e-3); half inputs: native MMA (the default "tf32" is a no-op)
    return upcast, "ieee" if upcast else "tf32"


def triton_fwd(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    v: Float[Tensor, "b hkv lk dv"],
    rm: ResolvedMask,
    scale: float,
    kg_ids: Int[Tensor, "b lk"] | None,
    num_kg: int,
    q_w: Float[Tensor, "b lq qg"] | None,
    store_row_mass: bool,
    block_m: int = 64,
    block_n: int = 64,
) -> dict[str, Tensor]:
    """Forward pass: out, lse, and (with key groups) row mass / region mass in the same sweep."""
    b, h, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    dev = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(b, h, lq, dv, dtype=q.dtype, device=dev)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=dev)
    nqb = math.ceil(lq / block_m)
    kvlo, kvhi = rm.block_key_ranges(block_m)
    kvlo, kvhi = kvlo.to(torch.int32).contiguous(), kvhi.to(torch.int32).contiguous()
    dummy = torch.zeros(1, dtype=torch.int32, device=dev)
    has_kg = kg_ids is not None
    has_qw = has_kg and q_w is not None
    kgn = num_kg if has_kg else 1
    qgn = q_w.shape[-1] if has_qw else 1
    rmass = torch.zeros(b, h, lq, kgn, dtype=torch.float32, device=dev) if (has_kg and store_row_mass) else dummy
    parts = torch.zeros(nqb, b, h, qgn, kgn, dtype=torch.float32, device=dev) if has_qw else dummy
    margs, flags = _mask_args(rm, dummy)
    upcast, prec = _prec(q)
    nko = rm.ko_table.shape[1] if rm.ko_table is not None else 1
    kern = _kernel("fwd", dev.type == "cpu")
    kern[(nqb, b * h)](
        q, k, v, out, lse,
        kg_ids if has_kg else dummy, q_w.contiguous() if has_qw else dummy, rmass, parts, kvlo, kvhi,
        *margs,
        h, hkv, lq, lk, d, dv, kgn, qgn, nqb, nko, rm.offset, rm.window, scale * LOG2E,
        BM=block_m, BN=block_n, BD=_p2(d), BDV=_p2(dv), BKG=_p2(kgn), BQG=_p2(qgn),
        HAS_KG=has_kg, HAS_QW=has_qw, STORE_RM=has_kg and store_row_mass, UPCAST=upcast, PREC=prec, **flags,
    )
    res = {"out": out, "lse": lse}
    if has_kg and store_row_mass:
        res["row_mass"] = rmass
    if has_qw:
        res["region"] = parts.sum(0)
    return res


def triton_colsum(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    lse: Float[Tensor, "b h lq"],
    rm: ResolvedMask,
    scale: float,
    q_w: Float[Tensor, "b lq qg"],
    block_m: int = 64,
    block_n: int = 64,
) -> Float[Tensor, "b h qg lk"]:
    """Key-major column pass: ``colsum[b, h, c, j] = sum_i q_w[b, i, c] * P[b, h, i, j]``; no atomics."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dev = q.device
    q, k = q.contiguous(), k.contiguous()
    qgn = q_w.shape[-1]
    cs = torch.empty(b, h, qgn, lk, dtype=torch.float32, device=dev)
    nkb = math.ceil(lk / block_n)
    qlo, qhi = rm.block_query_ranges(block_n, block_m)
    dummy = torch.zeros(1, dtype=torch.int32, device=dev)
    margs, flags = _mask_args(rm, dummy)
    upcast, prec = _prec(q)
    nko = rm.ko_table.shape[1] if rm.ko_table is not None else 1
    kern = _kernel("colsum", dev.type == "cpu")
    kern[(nkb, b * h)](
        q, k, lse.float().contiguous(), q_w.float().contiguous(), cs,
        qlo.to(torch.int32).contiguous(), qhi.to(torch.int32).contiguous(),
        *margs,
        h, hkv, lq, lk, d, qgn, nkb, nko, rm.offset, rm.window, scale * LOG2E,
        BM=block_m, BN=block_n, BD=_p2(d), BQG=_p2(qgn), UPCAST=upcast, PREC=prec, **flags,
    )
    return cs


def triton_rows(
    q: Float[Tensor, "b h lq d"],
    k: Float[Tensor, "b hkv lk d"],
    rows: Int[Tensor, "b s"],
    lse: Float[Tensor, "b h lq"] | None,
    rm: ResolvedMask,
    scale: float,
    block_s: int = 16,
    block_n: int = 64,
) -> tuple[Float[Tensor, "b h s lk"], Float[Tensor, "b h s"]]:
    """Exact probability rows for the selected query indices (two key sweeps when no LSE is given)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    s_n = rows.shape[1]
    dev = q.device
    q, k = q.contiguous(), k.contiguous()
    probs = torch.zeros(b, h, s_n, lk, dtype=torch.float32, device=dev)
    lse_out = torch.empty(b, h, s_n, dtype=torch.float32, device=dev)
    nsb = math.ceil(s_n / block_s)
    row_lo, row_hi = rm.row_key_ranges()
    rl = row_lo.gather(1, rows.long())
    rh = row_hi.gather(1, rows.long())
    pad = nsb * block_s - s_n
    empty = rh <= rl
    blo = torch.nn.functional.pad(rl.masked_fill(empty, lk + 1), (0, pad), value=lk + 1).view(b, nsb, block_s).amin(2)
    bhi = torch.nn.functional.pad(rh.masked_fill(empty, -1), (0, pad), value=-1).view(b, nsb, block_s).amax(2)
    bempty = bhi <= blo
    blo, bhi = blo.masked_fill(bempty, 0), bhi.masked_fill(bempty, 0)
    dummy = torch.zeros(1, dtype=torch.int32, device=dev)
    margs, flags = _mask_args(rm, dummy)
    upcast, prec = _prec(q)
    nko = rm.ko_table.shape[1] if rm.ko_table is not None else 1
    kern = _kernel("rows", dev.type == "cpu")
    kern[(nsb, b * h)](
        q, k, lse.float().contiguous() if lse is not None else dummy, rows.to(torch.int32).contiguous(), probs, lse_out,
        blo.to(torch.int32).contiguous(), bhi.to(torch.int32).contiguous(),
        *margs,
        h, hkv, lq, lk, d, s_n, nsb, nko, rm.offset, rm.window, scale * LOG2E,
        BS=block_s, BN=block_n, BD=_p2(d), HAS_LSE=lse is not None, UPCAST=upcast, PREC=prec, **flags,
    )
    return probs, lse_out
