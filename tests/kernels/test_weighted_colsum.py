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
