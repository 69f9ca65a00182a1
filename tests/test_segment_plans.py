"""Block-diagonal segment plans are per-model state (one cache shared by a model's attention layers, none shared
between models or kept past a mask's life), and a plan lists each segment's flat positions exactly."""

from __future__ import annotations

import gc

import torch

from hooked_vlm.components.attention import Attention, SegmentPlans, segment_plan
from kernels.mask import MaskSpec


def test_a_plan_groups_every_segment_by_length_and_is_cached_per_mask():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, -1, 2, 2]])
    mask = MaskSpec(causal=False, doc_ids=doc)
    plans = SegmentPlans()
    plan = segment_plan(mask, plans)
    got = sorted(tuple(sorted(seg.tolist())) for group in plan for seg in group)
    want = sorted(  # brute force: flat positions b * L + i of each (row, id)
        tuple(b * 6 + i for i in range(6) if int(doc[b, i]) == d) for b in range(2) for d in set(doc[b].tolist())
    )
    assert got == want
    assert all(len({seg.numel() for seg in group}) == 1 for group in plan)
    assert segment_plan(mask, plans) is plan and len(plans) == 1
    assert segment_plan(mask) is not plan  # uncached without a model's cache
    del mask, plan
    gc.collect()
    assert len(plans) == 0  # dropped with its mask


def test_each_model_has_one_cache_shared_by_its_layers():
    from hooked_vlm.tiny import tiny_model

    a, b = tiny_model("tiny-qwen2-vl"), tiny_model("tiny-qwen2-vl")
    caches_a = {id(m.segment_plans) for m in a.modules() if isinstance(m, Attention)}
    caches_b = {id(m.segment_plans) for m in b.modules() if isinstance(m, Attention)}
    assert len(caches_a) == 1 and len(caches_b) == 1 and caches_a != caches_b
