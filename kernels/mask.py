"""MaskSpec: one description of which keys each query may see, shared by every attention pass.

The hooked models build a MaskSpec per attention call (causal LM with padding, block-diagonal vision
segments, Gemma 3 sliding windows with bidirectional image spans) and the statistics kernels consume the
same object, so an LSE computed under one mask can never be silently reused under another: every LSE the
kernels return carries the mask's fingerprint, and a later pass under a different mask raises
:class:`MaskMismatchError`.

Besides the dense reference (:meth:`MaskSpec.dense`), this module gives the fast paths what they need
without ever building an ``Lq x Lk`` matrix:

* :meth:`MaskSpec.resolve` -> :class:`ResolvedMask`: per-position int32 tables broadcast to the batch
  (what the Triton kernels read), plus :meth:`ResolvedMask.visible` for a rectangle of queries x keys
  (what the chunked torch path uses one tile at a time);
* per-row / per-block key ranges and per-key-block query ranges (a FlexAttention-like block mask),
  computed in O(L) on the host, so kernels skip tiles that no query can see.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Int
from torch import Tensor


class MaskMismatchError(ValueError):
    """A statistic was asked for under a different mask (or scale) than the LSE it reuses."""


@dataclass(frozen=True, eq=False)
class Knockout:
    """Remove every edge from query region A to key region B where ``table[A, B]`` is True.

    Region ids are per position (``-1`` = in no region); the table is ``[NQ, NK]`` bool.
    ``q_region`` is indexed by query index when it has ``Lq`` columns, or by absolute position when it has
    ``Lk`` columns (the two coincide in a prefill, where ``Lq == Lk``).
    """

    q_region: Int[Tensor, "batch q"]
    k_region: Int[Tensor, "batch k"]
    table: Bool[Tensor, "nq nk"]

    def blocked(self, q_index: Tensor, k_index: Tensor) -> Bool[Tensor, "batch q k"]:
        """Boolean [B, q, k] of removed edges for the given query and key positions."""
        qr = self.q_region[:, q_index]  # B q
        kr = self.k_region[:, k_index]  # B k
        nq, nk = self.table.shape
        valid = (qr[:, :, None] >= 0) & (kr[:, None, :] >= 0)
        qi = qr.clamp(min=0, max=nq - 1)[:, :, None].expand(-1, -1, kr.shape[1])
        ki = kr.clamp(min=0, max=nk - 1)[:, None, :].expand(-1, qr.shape[1], -1)
        return valid & self.table.to(qr.device)[qi, ki]


def _tensor_digest(t: Tensor | None) -> str:
    if t is None:
        return "-"
    c = t.detach().to("cpu").contiguous()
    h = hashlib.sha1(str((tuple(c.shape), str(c.dtype))).encode())
    h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Which keys a query sees. Query ``i`` sits at key position ``q_offset + i`` (default ``Lk - Lq``).

    A key ``j`` is visible from query position ``p`` iff all of:
      * ``key_valid[b, j]`` (padding keys are never visible);
      * causal: ``j <= p``, or both lie in the same bidirectional span (``bidir_ids >= 0`` and equal);
      * window (if > 0): ``p - j < window`` (bounds the past only, as Gemma 3's sliding layers);
      * doc_ids (if given): same segment (block-diagonal attention: Qwen vision images / slices / windows);
      * the edge is not removed by ``knockout``.

    Per-position tensors are ``[B, Lk]`` (or ``[1, Lk]``, broadcast over the batch) and indexed by absolute
    position, so queries read them at ``q_offset + i``.
    """

    causal: bool = True
    window: int = 0
    key_valid: Bool[Tensor, "batch k"] | None = None
    bidir_ids: Int[Tensor, "batch k"] | None = None
    doc_ids: Int[Tensor, "batch k"] | None = None
    knockout: Knockout | None = None
    q_offset: int | None = None
    # cached fingerprint; init=False so dataclasses.replace() starts a fresh cache for the new spec
    _fp: list = field(default_factory=list, init=False, repr=False, compare=False)

    def offset(self, lq: int, lk: int) -> int:
        return lk - lq if self.q_offset is None else self.q_offset

    def is_plain_causal(self) -> bool:
        """True when sdpa's ``is_causal`` (or nothing) expresses this mask exactly."""
        return (
            self.window == 0
            and self.key_valid is None
            and self.bidir_ids is None
            and self.doc_ids is None
            and self.knockout is None
        )

    def has_tensors(self) -> bool:
        """True when visibility depends on per-position tables (not only on causal / window arithmetic)."""
        return any(t is not None for t in (self.key_valid, self.bidir_ids, self.doc_ids, self.knockout))

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """A content hash of the whole mask (flags, offset and every table), computed once and cached.

        Two specs with equal fingerprints describe the same visibility; an LSE records the fingerprint
        of the spec that produced it (see :func:`kernels.api.attn_fwd`).
        """
        if not self._fp:
            ko = self.knockout
            parts = [
                f"causal={self.causal}",
                f"window={self.window}",
                f"q_offset={self.q_offset}",
                _tensor_digest(self.key_valid),
                _tensor_digest(self.bidir_ids),
                _tensor_digest(self.doc_ids),
                "-" if ko is None else ",".join(_tensor_digest(t) for t in (ko.q_region, ko.k_region, ko.table)),
            ]
            self._fp.append(hashlib.sha1("|".join(parts).encode()).hexdigest()[:20])
        return self._fp[0]

    # ------------------------------------------------------------------ validation
    def validate(self, batch: int, lq: int, lk: int) -> None:
        """Check every field against an attention call of ``batch`` x ``lq`` queries x ``lk`` keys.

        Raises ``ValueError`` naming the field, the shape it has and the shape it needs.
        """
        if self.window < 0:
            raise ValueError(f"MaskSpec.window must be >= 0 (0 = no window), got {self.window}")
        off = self.offset(lq, lk)
        positional = self.causal or self.window > 0 or self.bidir_ids is not None or self.doc_ids is not None
        if positional and (off < 0 or off + lq > lk):
            raise ValueError(
                f"MaskSpec: queries sit at positions [q_offset, q_offset + Lq) = [{off}, {off + lq}), which must lie "
                f"inside the {lk} keys; pass q_offset in [0, {lk - lq}] (default Lk - Lq, queries as a suffix)"
            )
        for name in ("key_valid", "bidir_ids", "doc_ids"):
            t = getattr(self, name)
            if t is None:
                continue
            if t.ndim != 2 or t.shape[0] not in (1, batch) or t.shape[1] != lk:
                raise ValueError(
                    f"MaskSpec.{name} has shape {tuple(t.shape)}; it must be [B, Lk] = [{batch}, {lk}] "
                    f"(or [1, {lk}] to share one layout across the batch), indexed by absolute key position"
                )
            if name == "key_valid" and t.dtype != torch.bool:
                raise ValueError(f"MaskSpec.key_valid must be bool (True = real key), got {t.dtype}")
            if name != "key_valid" and (t.dtype.is_floating_point or t.dtype == torch.bool):
                raise ValueError(f"MaskSpec.{name} must hold integer ids, got {t.dtype}")
        ko = self.knockout
        if ko is not None:
            if ko.table.ndim != 2 or ko.table.dtype != torch.bool:
                raise ValueError(f"Knockout.table must be a 2-D bool [NQ, NK] table, got {ko.table.dtype} {tuple(ko.table.shape)}")
            if ko.q_region.ndim != 2 or ko.q_region.shape[0] not in (1, batch) or ko.q_region.shape[1] not in (lq, lk):
                raise ValueError(
                    f"Knockout.q_region has shape {tuple(ko.q_region.shape)}; it must be [B, Lq] = [{batch}, {lq}] "
                    f"(by query index) or [B, Lk] = [{batch}, {lk}] (by absolute position)"
                )
            if ko.k_region.ndim != 2 or ko.k_region.shape[0] not in (1, batch) or ko.k_region.shape[1] != lk:
                raise ValueError(f"Knockout.k_region has shape {tuple(ko.k_region.shape)}; it must be [B, Lk] = [{batch}, {lk}]")
            nq, nk = ko.table.shape
            for nm, reg, n in (("q_region", ko.q_region, nq), ("k_region", ko.k_region, nk)):
                if reg.numel() and int(reg.max()) >= n:
                    raise ValueError(f"Knockout.{nm} holds id {int(reg.max())} but the table has only {n} rows/cols along it")

    # ------------------------------------------------------------------ dense reference
    def dense(self, lq: int, lk: int, device: torch.device | str | None = None) -> Bool[Tensor, "b q k"]:
        """Materialise the visibility mask (True = visible) as ``[B or 1, Lq, Lk]``.

        Used by the materialising pattern path and the reference implementation; the fast paths never
        call it at long lengths.
        """
        if device is None:
            for t in (self.key_valid, self.bidir_ids, self.doc_ids):
                if t is not None:
                    device = t.device
                    break
        off = self.offset(lq, lk)
        qpos = torch.arange(lq, device=device) + off
        kpos = torch.arange(lk, device=device)
        vis = torch.ones(1, lq, lk, dtype=torch.bool, device=device)
        if self.causal:
            causal = (kpos[None, :] <= qpos[:, None])[None]
            if self.bidir_ids is not None:
                qb = self.bidir_ids[:, qpos]
                kb = self.bidir_ids[:, :lk]
                same = (qb[:, :, None] == kb[:, None, :]) & (qb[:, :, None] >= 0)
                causal = causal | same
            vis = vis & causal
        if self.window > 0:
            vis = vis & ((qpos[:, None] - kpos[None, :]) < self.window)[None]
        if self.doc_ids is not None:
            qd = self.doc_ids[:, qpos]
            kd = self.doc_ids[:, :lk]
            vis = vis & (qd[:, :, None] == kd[:, None, :])
        if self.key_valid is not None:
            vis = vis & self.key_valid[:, None, :lk]
        if self.knockout is not None:
            qidx = qpos if self.knockout.q_region.shape[1] == lk else torch.arange(lq, device=device)
            vis = vis & ~self.knockout.blocked(qidx, kpos)
        return vis

    # ------------------------------------------------------------------ fast-path views
    def resolve(self, batch: int, lq: int, lk: int, device: torch.device | str) -> "ResolvedMask":
        """Validate, then lay every table out as contiguous int32 ``[B, Lk]`` by absolute position."""
        self.validate(batch, lq, lk)
        dev = torch.device(device)

        def ids(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=dev, dtype=torch.int32).expand(batch, -1).contiguous()

        ko = self.knockout
        q_region = k_region = table = None
        if ko is not None:
            off = self.offset(lq, lk)
            qr = ko.q_region.to(device=dev, dtype=torch.int32).expand(batch, -1)
            if qr.shape[1] != lk:  # by query index -> by absolute position
                full = torch.full((batch, lk), -1, dtype=torch.int32, device=dev)
                full[:, off : off + lq] = qr
                qr = full
            q_region, k_region = qr.contiguous(), ids(ko.k_region)
            table = ko.table.to(device=dev, dtype=torch.int32).contiguous()
        return ResolvedMask(
            spec=self,
            batch=batch,
            lq=lq,
            lk=lk,
            offset=self.offset(lq, lk),
            causal=self.causal,
            window=int(self.window),
            key_valid=ids(self.key_valid),
            bidir_ids=ids(self.bidir_ids),
            doc_ids=ids(self.doc_ids),
            q_region=q_region,
            k_region=k_region,
            ko_table=table,
        )


def _span_bounds(ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per position: (first, last) index of the positions sharing its id, and the shifted id. ``ids`` [B, L]."""
    b, l = ids.shape
    shifted = (ids - ids.min(dim=1, keepdim=True).values).long()
    n = int(shifted.max()) + 1 if shifted.numel() else 1
    pos = torch.arange(l, device=ids.device).expand(b, -1)
    first = torch.full((b, n), l, dtype=torch.long, device=ids.device).scatter_reduce(1, shifted, pos, "amin")
    last = torch.full((b, n), -1, dtype=torch.long, device=ids.device).scatter_reduce(1, shifted, pos, "amax")
    return first.gather(1, shifted), last.gather(1, shifted), shifted


@dataclass(frozen=True, eq=False)
class ResolvedMask:
    """A :class:`MaskSpec` bound to one call's shapes and device: int32 tables ``[B, Lk]`` by absolute position."""

    spec: MaskSpec
    batch: int
    lq: int
    lk: int
    offset: int
    causal: bool
    window: int
    key_valid: Tensor | None
    bidir_ids: Tensor | None
    doc_ids: Tensor | None
    q_region: Tensor | None
    k_region: Tensor | None
    ko_table: Tensor | None

    def visible(self, b: int, qpos: Int[Tensor, "n"], k0: int, k1: int) -> Bool[Tensor, "n m"]:
        """Visibility of keys ``[k0, k1)`` from absolute query positions ``qpos`` in batch row ``b``."""
        kpos = torch.arange(k0, k1, device=qpos.device)
        vis = torch.ones(qpos.shape[0], k1 - k0, dtype=torch.bool, device=qpos.device)
        if self.causal:
            c = kpos[None, :] <= qpos[:, None]
            if self.bidir_ids is not None:
                qb = self.bidir_ids[b, qpos]
                c |= (qb[:, None] == self.bidir_ids[b, k0:k1][None, :]) & (qb[:, None] >= 0)
            vis &= c
        if self.window > 0:
            vis &= (qpos[:, None] - kpos[None, :]) < self.window
        if self.doc_ids is not None:
            vis &= self.doc_ids[b, qpos][:, None] == self.doc_ids[b, k0:k1][None, :]
        if self.key_valid is not None:
            vis &= self.key_valid[b, k0:k1][None, :].bool()
        if self.ko_table is not None:
            qr = self.q_region[b, qpos]
            kr = self.k_region[b, k0:k1]
            nq, nk = self.ko_table.shape
            hit = self.ko_table[qr.clamp(0, nq - 1).long()[:, None], kr.clamp(0, nk - 1).long()[None, :]].bool()
            vis &= ~(hit & (qr[:, None] >= 0) & (kr[None, :] >= 0))
        return vis

    def row_key_ranges(self) -> tuple[Int[Tensor, "batch q"], Int[Tensor, "batch q"]]:
        """Per query a key range ``[lo, hi)`` containing every key it can see (empty rows: ``lo == hi == 0``).

        A superset (hull) computed in O(L): causal / window bounds, bidirectional span ends, segment hulls,
        and the hull of valid keys; the exact mask is applied inside each tile.
        """
        b, lq, lk = self.batch, self.lq, self.lk
        dev = (self.key_valid if self.key_valid is not None else self.bidir_ids if self.bidir_ids is not None else self.doc_ids)
        dev = dev.device if dev is not None else torch.device("cpu")
        p = (torch.arange(lq, device=dev) + self.offset).expand(b, -1)
        lo = torch.zeros(b, lq, dtype=torch.long, device=dev)
        hi = torch.full((b, lq), lk, dtype=torch.long, device=dev)
        if self.causal:
            hi = (p + 1).clamp(max=lk)
            if self.bidir_ids is not None:
                _, last, _ = _span_bounds(self.bidir_ids)
                in_span = self.bidir_ids.gather(1, p) >= 0
                hi = torch.where(in_span, torch.maximum(hi, last.gather(1, p) + 1), hi)
        if self.window > 0:
            lo = torch.maximum(lo, p - self.window + 1)
        if self.doc_ids is not None:
            first, last, _ = _span_bounds(self.doc_ids)
            lo = torch.maximum(lo, first.gather(1, p))
            hi = torch.minimum(hi, last.gather(1, p) + 1)
        if self.key_valid is not None:
            kv = self.key_valid.bool()
            pos = torch.arange(lk, device=dev)
            first_v = torch.where(kv, pos, lk).amin(1, keepdim=True)
            last_v = torch.where(kv, pos, -1).amax(1, keepdim=True)
            lo = torch.maximum(lo, first_v)
            hi = torch.minimum(hi, last_v + 1)
        lo = lo.clamp(0, lk)
        hi = hi.clamp(0, lk)
        empty = hi <= lo
        return lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)

    def block_key_ranges(self, block_q: int, lo: Tensor | None = None, hi: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Key range ``[lo, hi)`` per block of ``block_q`` queries: ``[B, cdiv(Lq, block_q)]`` each."""
        if lo is None or hi is None:
            lo, hi = self.row_key_ranges()
        b, lq = lo.shape
        nb = math.ceil(lq / block_q) if lq else 0
        pad = nb * block_q - lq
        empty = hi <= lo
        lo_p = torch.nn.functional.pad(lo.masked_fill(empty, self.lk + 1), (0, pad), value=self.lk + 1)
        hi_p = torch.nn.functional.pad(hi.masked_fill(empty, -1), (0, pad), value=-1)
        blo = lo_p.view(b, nb, block_q).amin(2)
        bhi = hi_p.view(b, nb, block_q).amax(2)
        bempty = bhi <= blo
        return blo.masked_fill(bempty, 0), bhi.masked_fill(bempty, 0)

    def block_query_ranges(self, block_k: int, block_q: int) -> tuple[Tensor, Tensor]:
        """Per block of ``block_k`` keys, a query range ``[lo, hi)`` (multiple of ``block_q`` at the start)
        containing every query that can see any of its keys: ``[B, cdiv(Lk, block_k)]`` each."""
        blo, bhi = self.block_key_ranges(block_q)  # B NQB
        nkb = math.ceil(self.lk / block_k) if self.lk else 0
        k0 = torch.arange(nkb, device=blo.device) * block_k
        k1 = (k0 + block_k).clamp(max=self.lk)
        inter = (blo[:, None, :] < k1[None, :, None]) & (bhi[:, None, :] > k0[None, :, None]) & (bhi > blo)[:, None, :]
        anyq = inter.any(2)
        nqb = blo.shape[1]
        first = inter.float().argmax(2)
        last = nqb - 1 - inter.flip(2).float().argmax(2)
        qlo = (first * block_q).masked_fill(~anyq, 0)
        qhi = ((last + 1) * block_q).clamp(max=self.lq).masked_fill(~anyq, 0)
        return qlo, qhi
