"""MaskSpec: the tile view and the host-side ranges agree with the dense definition; validation and
fingerprints behave."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import Knockout, MaskSpec


def _composite(b=2, lk=96, lq=80):
    pos = torch.arange(lk)
    bidir = torch.where((pos >= 20) & (pos < 40), 0, -1)[None].repeat(b, 1)
    bidir[1] = torch.where((pos >= 50) & (pos < 60), 3, -1)
    doc = (pos >= 70).long()[None].repeat(b, 1)
    valid = torch.ones(b, lk, dtype=torch.bool)
    valid[1, :10] = False
    ko = Knockout(q_region=(pos >= 60).long()[None], k_region=pos.div(30, rounding_mode="floor")[None],
                  table=torch.tensor([[False, False, False, False], [True, False, False, True]]))
    return MaskSpec(causal=True, window=33, key_valid=valid, bidir_ids=bidir, doc_ids=doc, knockout=ko)


def test_tile_view_and_ranges_match_dense():
    b, lq, lk = 2, 80, 96
    spec = _composite(b, lk, lq)
    dense = spec.dense(lq, lk).expand(b, -1, -1)
    rm = spec.resolve(b, lq, lk, "cpu")
    qpos = torch.arange(lq) + rm.offset
    for bi in range(b):
        assert torch.equal(rm.visible(bi, qpos, 0, lk), dense[bi])
        assert torch.equal(rm.visible(bi, qpos[5:40], 17, 61), dense[bi, 5:40, 17:61])
    lo, hi = rm.row_key_ranges()
    j = torch.arange(lk)
    inside = (j[None, None] >= lo[..., None]) & (j[None, None] < hi[..., None])
    assert not (dense & ~inside).any(), "row ranges must contain every visible key"
    assert (hi > lo).sum() == dense.any(-1).sum(), "a row is empty in the ranges iff it sees nothing"
    blo, bhi = rm.block_key_ranges(16)
    for qb in range(blo.shape[1]):
        rows = dense[:, qb * 16 : (qb + 1) * 16]
        cols = rows.any(1)  # B Lk
        ok = (j[None] >= blo[:, qb, None]) & (j[None] < bhi[:, qb, None])
        assert not (cols & ~ok).any()
    qlo, qhi = rm.block_query_ranges(block_k=32, block_q=16)
    i = torch.arange(lq)
    for kb in range(qlo.shape[1]):
        seen_by = dense[:, :, kb * 32 : (kb + 1) * 32].any(2)  # B Lq
        ok = (i[None] >= qlo[:, kb, None]) & (i[None] < qhi[:, kb, None])
        assert not (seen_by & ~ok).any()
        assert (qlo[:, kb] % 16 == 0).all()


def test_knockout_by_query_index_equals_by_position():
    lq, lk = 30, 50
    qr = torch.arange(lq).div(10, rounding_mode="floor")[None]
    qr_abs = torch.cat([torch.full((1, lk - lq), -1), qr], dim=1)
    kr = torch.arange(lk).div(25, rounding_mode="floor")[None]
    table = torch.tensor([[True, False], [False, True], [True, True]])
    a = MaskSpec(causal=True, knockout=Knockout(qr, kr, table))
    b = MaskSpec(causal=True, knockout=Knockout(qr_abs, kr, table))
    assert torch.equal(a.dense(lq, lk), b.dense(lq, lk))
    ra, rb = a.resolve(1, lq, lk, "cpu"), b.resolve(1, lq, lk, "cpu")
    assert torch.equal(ra.q_region, rb.q_region)
    assert torch.equal(ra.visible(0, torch.arange(lq) + 20, 0, lk), a.dense(lq, lk)[0])


@pytest.mark.parametrize(
    "spec, msg",
    [
        (MaskSpec(window=-1), "window"),
        (MaskSpec(key_valid=torch.ones(1, 7, dtype=torch.bool)), "key_valid"),
        (MaskSpec(key_valid=torch.ones(1, 10, dtype=torch.long)), "bool"),
        (MaskSpec(doc_ids=torch.zeros(1, 10)), "integer"),
        (MaskSpec(q_offset=5), "q_offset"),
        (MaskSpec(knockout=Knockout(torch.zeros(1, 10, dtype=torch.long), torch.full((1, 10), 4), torch.ones(1, 2, dtype=torch.bool))), "k_region"),
    ],
)
def test_validation_names_the_problem(spec, msg):
    with pytest.raises(ValueError, match=msg):
        spec.validate(batch=1, lq=8, lk=10)


def test_fingerprint_tracks_content():
    ids = torch.tensor([[0, 0, 1, 1]])
    a = MaskSpec(causal=False, doc_ids=ids)
    assert a.fingerprint() == MaskSpec(causal=False, doc_ids=ids.clone()).fingerprint()
    assert a.fingerprint() != MaskSpec(causal=False, doc_ids=torch.tensor([[0, 1, 1, 1]])).fingerprint()
    assert a.fingerprint() != MaskSpec(causal=True, doc_ids=ids).fingerprint()
    assert MaskSpec().fingerprint() != MaskSpec(window=4).fingerprint()
    base = MaskSpec(causal=True)
    base.fingerprint()  # cache it, then derive a different spec from it
    assert dataclasses.replace(base, window=4).fingerprint() == MaskSpec(window=4).fingerprint()


def test_knockout_blocks_exactly_the_table_edges_by_brute_force():
    """Every (query, key) pair, checked by a loop: blocked iff both lie in a region and table[qr, kr]; positions
    in no region (-1) are never blocked, even though region 0's row of the table is all True."""
    q_region = torch.tensor([[0, -1, 1, 0, -1, 1]])
    k_region = torch.tensor([[-1, 0, 0, 1, -1, 1]])
    table = torch.tensor([[True, True], [False, True]])
    ko = Knockout(q_region=q_region, k_region=k_region, table=table)
    idx = torch.arange(6)
    blocked = ko.blocked(idx, idx)[0]
    for i in range(6):
        for j in range(6):
            qr, kr = int(q_region[0, i]), int(k_region[0, j])
            want = qr >= 0 and kr >= 0 and bool(table[qr, kr])
            assert bool(blocked[i, j]) == want, (i, j)
    dense = MaskSpec(causal=False, knockout=ko).dense(6, 6)[0]
    assert torch.equal(dense, ~blocked)
