"""Triton (interpreter) vs chunked torch vs the fp64 naive reference, across mask families, GQA, ragged
lengths, odd head dims and dtypes; plus the properties every statistic must satisfy."""

from __future__ import annotations

import pytest
import torch

from kernels import Knockout, MaskMismatchError, MaskSpec, attn_colsum, attn_fwd, attn_rows, attn_stats, region_mass
from kernels.reference import naive_stats
from kernels.torch_chunked import chunked_pass

BACKENDS = ["torch", "triton"]


def _inputs(b, h, hkv, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g) * 1.5
    k = torch.randn(b, hkv, lk, d, generator=g) * 1.5
    v = torch.randn(b, hkv, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _stats(backend, q, k, v, mask, kg, qg, rows):
    out, lse, ex = attn_fwd(q, k, v, mask, kg, qg, return_row_mass=True, backend=backend)
    cs = attn_colsum(q, k, lse, mask, qg, backend=backend)
    pr, gm = attn_rows(q, k, rows, mask, key_group_ids=kg, backend=backend)
    pr2, _ = attn_rows(q, k, rows, mask, lse=lse, backend=backend)
    return dict(out=out, lse=lse, region=ex["region"], row_mass=ex["row_mass"], colsum=cs, rows=pr,
                rows_lse=pr2, rows_group_mass=gm)


def _check(got, ref, tol_out=2e-5, tol_p=2e-5):
    live = torch.isfinite(ref["lse"])
    assert torch.equal(torch.isfinite(got["lse"]), live), "fully masked rows must have lse = -inf, others finite"
    assert torch.allclose(got["lse"][live].double(), ref["lse"][live], atol=tol_p * 10, rtol=0)
    assert not torch.isnan(got["out"]).any()
    assert torch.allclose(got["out"].double(), ref["out"], atol=tol_out, rtol=0)
    assert (got["out"][~live] == 0).all()
    for name in ("row_mass", "rows", "rows_group_mass"):
        assert torch.allclose(got[name].double(), ref[name], atol=tol_p, rtol=0), name
    assert torch.allclose(got["rows_lse"].double(), ref["rows"], atol=tol_p, rtol=0)
    # sums over up to L rows: relative tolerance
    for name in ("region", "colsum"):
        assert torch.allclose(got[name].double(), ref[name], atol=tol_p * 10, rtol=1e-5), name


def _ids(b, n, ngroups, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, ngroups, (b, n), generator=gen)


CASES = {
    # name: (b, h, hkv, lq, lk, d, mask factory)
    "causal_gqa_d80_ragged": (1, 4, 2, 300, 300, 80, lambda b, lq, lk: MaskSpec(causal=True)),
    "noncausal_vit_d72_segments": (
        2, 4, 4, 200, 200, 72,
        lambda b, lq, lk: MaskSpec(causal=False, doc_ids=torch.arange(lk).div(70, rounding_mode="floor")[None].repeat(b, 1)),
    ),
    "gemma_window_bidir_mqa": (
        1, 4, 1, 260, 260, 32,
        lambda b, lq, lk: MaskSpec(
            causal=True, window=64,
            bidir_ids=torch.where((torch.arange(lk) >= 100) & (torch.arange(lk) < 180), 0, -1)[None],
        ),
    ),
    "suffix_queries_padding": (
        2, 4, 2, 77, 300, 32,
        lambda b, lq, lk: MaskSpec(causal=True, key_valid=torch.stack([torch.ones(lk, dtype=torch.bool),
                                                                          torch.arange(lk) >= 240])),
    ),
    "knockout_text_to_frames": (
        1, 2, 1, 260, 260, 32,
        lambda b, lq, lk: MaskSpec(
            causal=True,
            knockout=Knockout(
                q_region=torch.where(torch.arange(lk) >= 200, 0, torch.arange(lk).div(50, rounding_mode="floor") + 1)[None],
                k_region=torch.where(torch.arange(lk) >= 200, -1, torch.arange(lk).div(50, rounding_mode="floor"))[None],
                table=torch.tensor([[False, False, True, True], [False] * 4, [False] * 4, [False] * 4, [False, True, False, False]]),
            ),
        ),
    ),
    "window_only_arithmetic": (1, 2, 1, 200, 200, 16, lambda b, lq, lk: MaskSpec(causal=True, window=37)),
    "tiny_L1": (1, 2, 1, 1, 1, 16, lambda b, lq, lk: MaskSpec(causal=True)),
    "tiny_L17_noncausal": (1, 2, 2, 17, 17, 16, lambda b, lq, lk: MaskSpec(causal=False)),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_fp64_reference(case, backend, triton_ok):
    assert backend != "triton" or triton_ok
    b, h, hkv, lq, lk, d, mk = CASES[case]
    q, k, v = _inputs(b, h, hkv, lq, lk, d)
    mask = mk(b, lq, lk)
    kg = _ids(b, lk, 5, 1)
    qg = _ids(b, lq, 3, 2)
    rows = torch.tensor(sorted({0, lq // 2, lq - 1}))
    ref = naive_stats(q, k, v, mask, key_group_ids=kg, q_group_ids=qg, rows=rows[None].expand(b, -1))
    got = _stats(backend, q, k, v, mask, kg, qg, rows)
    _check(got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fp32_statistics(dtype, backend, triton_ok):
    assert backend != "triton" or triton_ok
    q, k, v = _inputs(1, 4, 2, 130, 130, 32, dtype=dtype)
    mask = MaskSpec(causal=True)
    kg = _ids(1, 130, 4, 3)
    out, lse, ex = attn_fwd(q, k, v, mask, kg, return_row_mass=True, backend=backend)
    ref = naive_stats(q, k, v, mask, key_group_ids=kg)  # fp64 from the same (rounded) inputs
    assert out.dtype == dtype and lse.dtype == torch.float32 and ex["row_mass"].dtype == torch.float32
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one output ulp (the interpreter truncates casts)
    assert torch.allclose(out.double(), ref["out"], atol=1e-4, rtol=1.01 * ulp)
    assert torch.allclose(lse.double(), ref["lse"], atol=1e-5, rtol=0)
    assert torch.allclose(ex["row_mass"].double(), ref["row_mass"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties_rows_sum_to_one_and_colsum_mass(backend, triton_ok):
    assert backend != "triton" or triton_ok
    b, h, lq, lk = 2, 4, 90, 150
    q, k, v = _inputs(b, h, 2, lq, lk, 32)
    valid = torch.ones(b, lk, dtype=torch.bool)
    valid[1, :70] = False  # left padding in row 1: its first queries see nothing
    mask = MaskSpec(causal=True, window=50, key_valid=valid)
    out, lse, _ = attn_fwd(q, k, v, mask, backend=backend)
    live = torch.isfinite(lse)
    assert (~live).any() and live.any()
    assert not torch.isnan(out).any() and (out[~live] == 0).all()
    cs = attn_colsum(q, k, lse, mask, backend=backend)  # [B, H, 1, Lk]
    assert torch.allclose(cs.sum((2, 3)), live.sum(2).float(), atol=1e-3)
    assert (cs[1, :, :, :70] == 0).all()  # padding keys receive nothing
    probs, _ = attn_rows(q, k, torch.arange(lq), mask, lse=lse, backend=backend)
    assert torch.allclose(probs.sum(-1), live.float(), atol=1e-5)
    # region from the forward equals the column sums summed by key group
    kg = _ids(b, lk, 6, 7)
    qg = _ids(b, lq, 3, 8)
    _, lse2, ex = attn_fwd(q, k, v, mask, kg, qg, backend=backend)
    cs_g = attn_colsum(q, k, lse2, mask, qg, backend=backend)
    assert torch.allclose(ex["region"], region_mass(cs_g, kg), atol=1e-4)


def test_knockout_removes_exactly_the_listed_edges():
    lk = 120
    q, k, v = _inputs(1, 2, 1, lk, lk, 16)
    frames = torch.arange(lk).div(30, rounding_mode="floor")  # 4 frames of 30 tokens
    qreg = torch.where(torch.arange(lk) >= 90, 1, 0)[None]  # region 1 = last frame's queries
    ko = Knockout(q_region=qreg, k_region=frames[None], table=torch.tensor([[False] * 4, [False, True, False, False]]))
    clean = MaskSpec(causal=True)
    patched = MaskSpec(causal=True, knockout=ko)
    kg = frames[None]
    qg = qreg
    for backend in ("torch", "naive"):
        _, _, ex0 = attn_fwd(q, k, v, clean, kg, qg, backend=backend)
        _, _, ex1 = attn_fwd(q, k, v, patched, kg, qg, backend=backend)
        assert ex0["region"][0, :, 1, 1].min() > 0.01  # there was mass to remove
        assert (ex1["region"][0, :, 1, 1] == 0).all()  # exactly zero after the knockout
        assert torch.allclose(ex1["region"][0, :, 0], ex0["region"][0, :, 0])  # other queries untouched


def test_lse_reuse_under_a_different_mask_raises():
    q, k, v = _inputs(1, 2, 1, 40, 40, 16)
    m1 = MaskSpec(causal=True)
    m2 = MaskSpec(causal=True, window=8)
    _, lse, _ = attn_fwd(q, k, v, m1, backend="torch")
    attn_colsum(q, k, lse, MaskSpec(causal=True), backend="torch")  # an equal spec is fine
    with pytest.raises(MaskMismatchError):
        attn_colsum(q, k, lse, m2, backend="torch")
    with pytest.raises(MaskMismatchError):
        attn_rows(q, k, torch.tensor([3]), m2, lse=lse, backend="torch")
    with pytest.raises(MaskMismatchError):
        attn_colsum(q, k, lse, m1, scale=0.1, backend="torch")


def test_dense_query_weights_give_exact_rollout_step():
    q, k, v = _inputs(1, 4, 2, 64, 64, 16)
    mask = MaskSpec(causal=True)
    w = torch.rand(64, 2, generator=torch.Generator().manual_seed(3))
    _, lse, _ = attn_fwd(q, k, v, mask, backend="torch")
    got = attn_colsum(q, k, lse, mask, q_weights=w, backend="torch")
    ref = naive_stats(q, k, v, mask, q_weights=w[None])["colsum"]
    assert torch.allclose(got.double(), ref, atol=1e-5)
    mean = attn_colsum(q, k, lse, mask, q_weights=w, heads="mean", backend="torch")
    assert torch.allclose(mean[:, 0], got.mean(1), atol=1e-6)
    grp = attn_colsum(q, k, lse, mask, q_weights=w, heads="sum_gqa_group", backend="torch")
    assert grp.shape == (1, 2, 2, 64) and torch.allclose(grp[:, 1], got[:, 2:].sum(1), atol=1e-5)


def test_chunked_tile_budget_bounds_block_and_keeps_results():
    """A tiny tile budget forces one query row per tile; results must not change."""
    q, k, v = _inputs(1, 4, 2, 70, 70, 16)
    mask = MaskSpec(causal=True, window=20)
    rm = mask.resolve(1, 70, 70, "cpu")
    w = torch.ones(1, 70, 1)
    big = chunked_pass(q, k, v, rm, 0.25, colsum_w=w, want_out=True, want_colsum=True)
    small = chunked_pass(q, k, v, rm, 0.25, colsum_w=w, want_out=True, want_colsum=True, tile_elems=1)
    for n in ("out", "lse", "colsum"):
        assert torch.allclose(big[n], small[n], atol=1e-6), n


def test_attn_stats_one_sweep_matches_separate_calls():
    q, k, v = _inputs(1, 4, 2, 100, 100, 16)
    mask = MaskSpec(causal=True)
    kg = _ids(1, 100, 4, 5)
    qg = _ids(1, 100, 2, 6)
    st = attn_stats(q, k, v, mask, key_group_ids=kg, q_group_ids=qg, colsum_q_group_ids=qg,
                    rows=torch.tensor([99]), backend="torch")
    ref = naive_stats(q, k, v, mask, key_group_ids=kg, q_group_ids=qg, rows=torch.tensor([[99]]))
    assert torch.allclose(st.region.double(), ref["region"], atol=1e-5)
    assert torch.allclose(st.colsum.double(), ref["colsum"], atol=1e-5)
    assert torch.allclose(st.rows.double(), ref["rows"], atol=1e-6)
    assert torch.allclose(st.rows_group_mass.double(), ref["rows_group_mass"], atol=1e-6)
    attn_colsum(q, k, st.lse, mask, backend="torch")  # the sweep's LSE carries the mask record
