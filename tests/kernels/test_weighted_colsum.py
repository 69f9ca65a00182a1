"""weighted_colsum (one rollout step W^T P without a precomputed LSE) against the fp64 reference, every route."""

from __future__ import annotations

import pytest
import torch

from kernels import Knockout, MaskSpec, weighted_colsum
from kernels.api import sdpa_colsum
from kernels.reference import naive_stats


def _qkw(b, h, hkv, l, d, qg, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, l, d, generator=g) * 1.5
    k = torch.randn(b, hkv, l, d, generator=g) * 1.5
    w = torch.rand(b, l, qg, generator=g)
    return q, k, w


def _ref(q, k, mask, w):
    v = torch.zeros(k.shape[0], k.shape[1], k.shape[2], 1)
    return naive_stats(q, k, v, mask, q_weights=w)["colsum"]


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_route_equals_reference(causal):
    q, k, w = _qkw(2, 4, 2, 70, 32, 3)
    mask = MaskSpec(causal=causal)
    got = weighted_colsum(q, k, mask, w, backend="sdpa")
    torch.testing.assert_close(got.double(), _ref(q, k, mask, w), atol=1e-5, rtol=1e-5)
    mean = weighted_colsum(q, k, mask, w, heads="mean")
    torch.testing.assert_close(mean.double(), _ref(q, k, mask, w).mean(1, keepdim=True), atol=1e-5, rtol=1e-5)
    kk = k.repeat_interleave(2, dim=1)
    for method in ("lse", "dv"):  # both fused-kernel tricks, whichever the device picks
        got = sdpa_colsum(q, kk, w, causal, 32**-0.5, method=method)
        torch.testing.assert_close(got.double(), _ref(q, k, mask, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [None, "torch", "triton"])
def test_masked_routes_fall_back_to_lse_and_column_pass(backend, triton_ok):
    """Windows + bidirectional spans + padding + a knockout cannot go through SDPA; the LSE route handles them."""
    if backend == "triton" and not triton_ok:
        pytest.skip("triton interpreter unavailable in this process (see conftest)")
    q, k, w = _qkw(1, 4, 1, 65, 32, 2, seed=1)
    bidir = torch.full((1, 65), -1)
    bidir[0, 20:40] = 0
    valid = torch.ones(1, 65, dtype=torch.bool)
    valid[0, :3] = False
    ko = Knockout(torch.zeros(1, 65, dtype=torch.long), (torch.arange(65) // 30)[None], torch.tensor([[False, True, False]]))
    mask = MaskSpec(causal=True, window=16, bidir_ids=bidir, key_valid=valid, knockout=ko)
    got = weighted_colsum(q, k, mask, w, backend=backend)
    torch.testing.assert_close(got.double(), _ref(q, k, mask, w), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend='sdpa' needs a plain causal"):
        weighted_colsum(q, k, mask, w, backend="sdpa")


# ------------------------------------------------------------------ issue 12: LSE recorded in the forward, one column pass
@pytest.mark.parametrize("causal", [True, False])
def test_colsum_with_lse_equals_reference_one_public_sdpa_pass(causal):
    """W^T P from a known LSE (public SDPA, sentinel-key ratio) == fp64 reference, GQA, more groups than head_dim."""
    from kernels import attn_out_lse, colsum_with_lse

    q, k, w = _qkw(2, 4, 2, 70, 16, 20, seed=3)  # 20 groups > head_dim 16: two chunks
    v = torch.randn(2, 2, 70, 16, generator=torch.Generator().manual_seed(4))
    mask = MaskSpec(causal=causal)
    out, lse = attn_out_lse(q, k, v, mask)
    ref = naive_stats(q, k, v, mask, q_weights=w)
    torch.testing.assert_close(out.double(), ref["out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref["lse"], atol=1e-5, rtol=1e-6)
    got = colsum_with_lse(q, k, lse, mask, w)
    torch.testing.assert_close(got.double(), ref["colsum"], atol=1e-5, rtol=1e-5)
    mean = colsum_with_lse(q, k, lse, mask, w, heads="mean")
    torch.testing.assert_close(mean.double(), ref["colsum"].mean(1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_out_lse_output_is_bit_identical_to_sdpa_and_tiny_columns_keep_relative_precision():
    """The recorded forward is the plain forward (same kernel); sharp rows give colsum entries ~1e-30 that stay exact."""
    from kernels import attn_out_lse, colsum_with_lse

    q, k, _ = _qkw(1, 2, 2, 40, 16, 1, seed=5)
    q = q * 4  # very peaked rows: most P_ij underflow far below 1e-6
    v = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(6))
    mask = MaskSpec(causal=True)
    out, lse = attn_out_lse(q, k, v, mask)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    w = torch.zeros(1, 40, 1)
    w[0, -1] = 1  # the last row only
    got = colsum_with_lse(q, k, lse, mask, w)[0, :, 0].double()
    want = naive_stats(q, k, v, mask, q_weights=w)["colsum"][0, :, 0]
    small = (want > 1e-30) & (want < 1e-6)
    assert bool(small.any())
    torch.testing.assert_close(got[small], want[small], rtol=1e-4, atol=0)


def test_attn_stats_sdpa_records_the_lse_and_masked_layers_fall_back():
    """attn_stats(backend='sdpa') gives out + a tagged LSE; a windowed / padded mask takes the kernels' route."""
    from kernels import MaskMismatchError, attn_stats, colsum_with_lse

    q, k, w = _qkw(1, 4, 2, 65, 32, 2, seed=7)
    v = torch.randn(1, 2, 65, 32, generator=torch.Generator().manual_seed(8))
    valid = torch.ones(1, 65, dtype=torch.bool)
    valid[0, :3] = False
    for mask in (MaskSpec(causal=True), MaskSpec(causal=True, window=16, key_valid=valid)):
        st = attn_stats(q, k, v, mask, backend="sdpa")
        ref = naive_stats(q, k, v, mask, q_weights=w)
        torch.testing.assert_close(st.out.double(), ref["out"], atol=1e-5, rtol=1e-5)
        live = torch.isfinite(ref["lse"])
        torch.testing.assert_close(st.lse.double()[live], ref["lse"][live], atol=1e-5, rtol=1e-6)
        got = colsum_with_lse(q, k, st.lse, mask, w)
        torch.testing.assert_close(got.double(), ref["colsum"], atol=2e-5, rtol=1e-5)
    with pytest.raises(MaskMismatchError, match="different MaskSpec"):
        colsum_with_lse(q, k, st.lse, MaskSpec(causal=True), w)


@pytest.mark.parametrize("method", ["values", "bias"])
@pytest.mark.parametrize("causal", [True, False])
def test_both_sentinel_methods_equal_reference(method, causal):
    """'values' (W e^{-lse} as values, head dim unchanged) and 'bias' (-lse in an extra dimension) == fp64 reference."""
    from kernels import attn_out_lse
    from kernels.api import sdpa_colsum_from_lse

    q, k, w = _qkw(1, 4, 4, 50, 16, 17, seed=9)  # 17 groups: two chunks under either method
    mask = MaskSpec(causal=causal)
    _, lse = attn_out_lse(q, k, k, mask)
    got = sdpa_colsum_from_lse(q, k, lse, w, causal, 16**-0.5, method=method)
    torch.testing.assert_close(got.double(), _ref(q, k, mask, w), atol=1e-5, rtol=1e-5)


def test_auto_method_switches_to_bias_when_the_lse_range_is_wide():
    """Logits of ~+-100 put LSEs outside the range where scaled values stay in fp32; 'auto' must still be exact."""
    from kernels import attn_out_lse
    from kernels.api import sdpa_colsum_from_lse

    q, k, w = _qkw(1, 2, 2, 40, 16, 1, seed=10)
    q = q * 12
    mask = MaskSpec(causal=True)
    _, lse = attn_out_lse(q, k, k, mask)
    assert float(lse.max() - lse.min()) > 50
    want = _ref(q, k, mask, w)
    torch.testing.assert_close(sdpa_colsum_from_lse(q, k, lse, w, True, 0.25).double(), want, atol=1e-5, rtol=1e-4)
    wrong = sdpa_colsum_from_lse(q, k, lse, w, True, 0.25, method="values").double()
    assert not torch.allclose(wrong, want, atol=1e-5, rtol=1e-4)  # why the range check exists
