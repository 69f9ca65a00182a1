"""The GPU tier (``@pytest.mark.cuda``): kernel numerics in bf16 / fp16 against the fp64 reference, the masked
attention routes and the model statistics on a CUDA device, and a 64k memory smoke test.

On a machine without CUDA every test here is skipped with that reason. The compiled-Triton tests also need the
interpreter off, which ``tests/conftest.py`` forces on for the CPU suite: ``scripts/gpu_check.sh`` runs this file
with ``--noconftest`` (and ``TRITON_INTERPRET`` unset), so they run compiled there.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels import Knockout, MaskSpec, attn_colsum, attn_fwd
from kernels.reference import naive_probs, naive_stats

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run scripts/gpu_check.sh on a GPU machine"),
]
compiled_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="the Triton interpreter is on (tests/conftest.py forces it); scripts/gpu_check.sh runs this file compiled",
)
DEV = "cuda"


def _qkv(b, h, hkv, lq, lk, d, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    return make(b, h, lq, d), make(b, hkv, lk, d), make(b, hkv, lk, d)


def _masks(lk):
    kv = torch.ones(2, lk, dtype=torch.bool, device=DEV)
    kv[1, :100] = False
    bidir = torch.full((1, lk), -1, device=DEV)
    bidir[0, 300:500] = 0
    reg = (torch.arange(lk, device=DEV) // 256)[None]
    ko = Knockout(reg, reg, torch.eye(int(reg.max()) + 1, dtype=torch.bool, device=DEV).roll(1, 1))
    return {
        "causal": MaskSpec(causal=True),
        "padding": MaskSpec(causal=True, key_valid=kv),
        "window_bidir": MaskSpec(causal=True, window=128, bidir_ids=bidir),
        "knockout": MaskSpec(causal=True, knockout=ko),
    }


@compiled_triton
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("mask_name", ["causal", "padding", "window_bidir", "knockout"])
def test_triton_low_precision_against_fp64(dtype, atol, mask_name):
    lk = 1024
    q, k, v = _qkv(2, 8, 2, lk, lk, 64, dtype)
    mask = _masks(lk)[mask_name]
    out, lse, _ = attn_fwd(q, k, v, mask, backend="triton")
    ref = naive_stats(q, k, v, mask)
    live = torch.isfinite(ref["lse"])
    assert (out.double() - ref["out"]).abs().max().item() <= atol
    assert (lse.double()[live] - ref["lse"][live]).abs().max().item() <= 1e-3
    cs = attn_colsum(q, k, lse, mask, backend="triton")
    p, _ = naive_probs(q, k, mask)
    assert (cs.double() - p.sum(2, keepdim=True)).abs().max().item() <= 5e-3 * max(1.0, lk / 256)


@pytest.mark.parametrize("mask_name", ["padding", "window_bidir", "knockout"])
def test_masked_attention_on_gpu_matches_fp64(mask_name):
    from hooked_vlm.components.masked_attention import masked_attention

    torch.backends.cuda.matmul.allow_tf32 = False
    lk = 1024
    q, k, v = _qkv(2, 8, 2, lk, lk, 64, torch.float32)
    mask = _masks(lk)[mask_name]
    got = masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, 64**-0.5, tile_elems=256 * lk)
    ref = naive_stats(q, k, v, mask)["out"].transpose(1, 2)
    assert (got.double() - ref).abs().max().item() <= 1e-5


def test_model_statistics_on_gpu_match_cpu():
    from hooked_vlm.components.attention import AttnStatsRequest, attn_stats_request
    from hooked_vlm.tiny import tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = tiny_model("tiny-qwen2-vl")
    gpu = tiny_model("tiny-qwen2-vl").to(DEV)
    ids = torch.randint(3, 90, (2, 300), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :40] = 0
    groups = (torch.arange(300) // 50)[None].expand(2, -1)
    results = []
    for model, dev in ((cpu, "cpu"), (gpu, DEV)):
        req = AttnStatsRequest(key_group_ids=groups.to(dev), colsum=True)
        with torch.no_grad(), attn_stats_request(model, req):
            logits, cache = model.run_with_cache(input_ids=ids.to(dev), attention_mask=am.to(dev),
                                                 names_filter=["blocks.*.attn.hook_region", "blocks.*.attn.hook_colsum"])
        results.append((logits.cpu(), {n: t.cpu() for n, t in cache.items()}))
    (lc, cc), (lg, cg) = results
    assert (lc - lg).abs().max().item() <= 1e-4
    for name in cc:
        assert (cc[name] - cg[name]).abs().max().item() <= 1e-4, name


def test_64k_padded_attention_stays_linear_in_memory():
    from hooked_vlm.components.masked_attention import masked_attention

    lk = 65536
    q, k, v = (t.transpose(1, 2) for t in _qkv(2, 8, 2, lk, lk, 64, torch.bfloat16))
    kv = torch.ones(2, lk, dtype=torch.bool, device=DEV)
    kv[1, :1000] = False
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = masked_attention(q, k, v, MaskSpec(causal=True, key_valid=kv), 64**-0.5)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # a dense [B, Lq, Lk] bool mask alone would be 8 GiB; allow the output plus one row's workspace
    assert extra < 4 * out.numel() * out.element_size()
    assert out[1, :1000].abs().max().item() == 0.0
