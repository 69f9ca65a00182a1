"""Public capability queries, the knockout context, the attention path dispatch, schema-driven batching and the
sweeps' options object (what analyses and nnsight read instead of private state or family input keys)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses.metrics import logit_diff
from analyses.patching import activation_patching
from analyses.sweep import SweepOptions
from hooked_vlm.components.attention import FAST, PATTERN, STATS, STATS_BESIDE_FAST, attention_path
from hooked_vlm.components.attn_stats import AttnStatsRequest, attn_stats_request
from hooked_vlm.families.registry import InputSchema
from hooked_vlm.families.qwen_vl.preprocess import build_qwen_inputs
from hooked_vlm.nnsight_ext import batch_inputs
from hooked_vlm.tiny import tiny_model
from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer
from kernels.mask import Knockout
from helpers import gemma_cases


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("tiny-qwen2-vl")


@pytest.fixture(scope="module")
def qwen_inputs():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(56, 56, 3), dtype=np.uint8)
    return build_qwen_inputs(build_tiny_tokenizer(), "<image> what is the red circle", [image])


def test_prefix_reuse_follows_the_masks():
    gemma = tiny_model("tiny-gemma3")
    # Gemma 3's image tokens see each other both ways (transformers' token_type_ids blocks): no prefix reuse
    image = gemma_cases.CASES["image"]()
    assert not gemma.can_reuse_prefix(**image)
    assert "not purely causal" in gemma.prefix_reuse_problem(**image)
    # without images every mask is plain causal
    assert gemma.can_reuse_prefix(**gemma_cases.CASES["text"]())
    gemma.bidirectional_images = False
    try:
        assert gemma.can_reuse_prefix(**image)
    finally:
        gemma.bidirectional_images = True


def test_qwen_prefix_is_reusable_and_capabilities_are_declared(qwen, qwen_inputs):
    assert qwen.can_reuse_prefix(**qwen_inputs) and qwen.prefix_reuse_problem(**qwen_inputs) is None
    assert qwen.supports_kv_cache and qwen.blocks_broadcast_batch and qwen.supports_mask_knockout


def test_knockout_context_equals_minus_inf_scores_and_restores_state(qwen, qwen_inputs):
    lay = qwen.layout(**qwen_inputs)
    length = qwen_inputs["input_ids"].shape[1]
    image = (lay.item[0] >= 0).nonzero().flatten()
    q = torch.full((1, length), -1)
    q[0, -1] = 0
    k = torch.full((1, length), -1)
    k[0, image] = 0
    layers = [0, 1]
    with torch.no_grad(), qwen.knockout(Knockout(q, k, torch.ones(1, 1, dtype=torch.bool)), layers=layers):
        knocked = qwen(**qwen_inputs)
    assert all(blk.attn.run is None for blk in qwen.blocks)

    def block(scores, hook):  # the independent route: -inf on the blocked edges before the softmax
        scores = scores.clone()
        scores[:, :, length - 1, image] = float("-inf")
        return scores

    with torch.no_grad():
        expected = qwen.run_with_hooks(**qwen_inputs, fwd_hooks=[(f"blocks.{l}.attn.hook_attn_scores", block) for l in layers])
        plain = qwen(**qwen_inputs)
    torch.testing.assert_close(knocked, expected, rtol=1e-5, atol=1e-5)
    assert (knocked[0, -1] - plain[0, -1]).abs().max() > 1e-3  # the edit matters


def test_knockout_and_statistics_compose(qwen, qwen_inputs):
    length = qwen_inputs["input_ids"].shape[1]
    q = torch.zeros(1, length, dtype=torch.long)
    k = torch.full((1, length), -1)
    k[0, 0] = 0  # nobody may attend to position 0 (except where that leaves no key: rows then give 0)
    ko = Knockout(q, k, torch.ones(1, 1, dtype=torch.bool))
    req = AttnStatsRequest(rows=torch.tensor([[length - 1]]))
    with torch.no_grad(), qwen.knockout(ko, layers=[1]), attn_stats_request(qwen, req):
        _, cache = qwen.run_with_cache(**qwen_inputs, names_filter=lambda n: n.endswith("hook_rows"))
    rows = cache["blocks.1.attn.hook_rows"][0, :, 0]  # H Lk: the last query's probabilities under the knockout
    assert float(rows[:, 0].abs().max()) == 0.0
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[0]), rtol=1e-5, atol=1e-5)
    assert float(cache["blocks.0.attn.hook_rows"][0, :, 0, 0].min()) > 0  # layer 0 is not knocked out
    assert all(blk.attn.run is None for blk in qwen.blocks)


def test_attention_path_dispatch():
    req = AttnStatsRequest()
    assert attention_path(True, None, False) == PATTERN
    assert attention_path(True, req, True) == PATTERN
    assert attention_path(False, None, True) == FAST
    assert attention_path(False, req, False) == STATS
    assert attention_path(False, req, True) == STATS_BESIDE_FAST


def test_batch_inputs_pads_the_schemas_sequence_inputs():
    schema = InputSchema(per_sequence=("input_ids", "attention_mask", "my_types"), pad_values=(("my_types", 7),))
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "my_types": torch.tensor([[1, 1, 1]]), "extra": torch.tensor([[1.0, 2.0]])}
    b = {"input_ids": torch.tensor([[8]]), "my_types": torch.tensor([[0]]), "extra": torch.tensor([[3.0, 4.0]])}
    merged = batch_inputs([a, b], pad_token_id=2, schema=schema)
    assert merged["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert merged["my_types"].tolist() == [[1, 1, 1], [7, 7, 0]]
    assert merged["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert merged["extra"].tolist() == [[1.0, 2.0], [3.0, 4.0]]  # not a sequence input: rows concatenated


def test_sweep_options_object_equals_the_keywords(qwen, qwen_inputs, tmp_path):
    corrupt = dict(qwen_inputs, input_ids=qwen_inputs["input_ids"].clone())
    corrupt["input_ids"][0, -2] = 7
    metric = logit_diff(3, 4)
    kw = activation_patching(qwen, qwen_inputs, corrupt, metric, sites=["resid_pre"], layers=[0, 1], positions="each",
                             batch_size=4, progress=False, prefix_reuse=False)
    opts = SweepOptions(batch_size=4, progress=False, prefix_reuse=False, store=tmp_path / "cells")
    via = activation_patching(qwen, qwen_inputs, corrupt, metric, sites=["resid_pre"], layers=[0, 1], positions="each",
                              options=opts)
    np.testing.assert_allclose(via.frame["value"].to_numpy(), kw.frame["value"].to_numpy(), rtol=1e-6, atol=1e-6)
    assert (tmp_path / "cells").exists()  # the options' store was used
    with pytest.raises(TypeError, match="options must be a SweepOptions"):
        activation_patching(qwen, qwen_inputs, corrupt, metric, options={"batch_size": 4})
