"""Metrics on hand-made logits with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from analyses.metrics import (
    answer_logprob,
    answer_prob,
    as_metric,
    kl_divergence,
    logit_diff,
    mc_margin,
    metric_name,
    normalized_recovery,
)


def _logits():
    x = torch.zeros(2, 3, 5)
    x[0, -1] = torch.tensor([1.0, 4.0, 2.0, 0.0, -1.0])
    x[1, -1] = torch.tensor([3.0, 0.0, 0.5, 2.5, 0.0])
    x[1, 0] = torch.tensor([0.0, 0.0, 9.0, 0.0, 0.0])
    return x


def test_logit_diff_shared_and_per_example_ids():
    x = _logits()
    assert torch.allclose(logit_diff(1, 2)(x), torch.tensor([2.0, -0.5]))
    assert torch.allclose(logit_diff(torch.tensor([1, 0]), torch.tensor([2, 3]))(x), torch.tensor([2.0, 0.5]))
    # per-row read-out positions (right padding)
    assert torch.allclose(logit_diff(2, 0, pos=torch.tensor([2, 0]))(x), torch.tensor([1.0, 9.0]))


def test_answer_logprob_and_prob():
    x = _logits()
    lp = answer_logprob(1)(x)
    expect0 = 4.0 - math.log(sum(math.exp(v) for v in [1.0, 4.0, 2.0, 0.0, -1.0]))
    assert lp[0].item() == pytest.approx(expect0, abs=1e-6)
    assert torch.allclose(answer_prob(1)(x), lp.exp())


def test_kl_zero_against_itself_and_positive_otherwise():
    x = _logits()
    assert torch.allclose(kl_divergence(x)(x), torch.zeros(2), atol=1e-7)
    y = x.clone()
    y[:, -1, 0] += 1.0
    kl = kl_divergence(x)(y)
    p = x[:, -1].softmax(-1)
    ref = (p * (p.log() - y[:, -1].log_softmax(-1))).sum(-1)
    assert torch.allclose(kl, ref, atol=1e-6) and (kl > 0).all()


def test_mc_margin_picks_best_other_option():
    x = _logits()
    # choices tokens 0,1,2 ; correct option index 1 (token 1)
    m = mc_margin([0, 1, 2], correct=1)(x)
    assert torch.allclose(m, torch.tensor([4.0 - 2.0, 0.0 - 3.0]))
    m2 = mc_margin(torch.tensor([[0, 1], [3, 4]]), correct=torch.tensor([1, 0]))(x)
    assert torch.allclose(m2, torch.tensor([3.0, 2.5]))
    with pytest.raises(ValueError):
        mc_margin([1], 0)


def test_normalized_recovery_edges():
    assert normalized_recovery(1.0, 1.0, 0.0).item() == 1.0
    assert normalized_recovery(0.0, 1.0, 0.0).item() == 0.0
    assert normalized_recovery(0.25, 2.0, -1.0).item() == pytest.approx(1.25 / 3.0)
    assert math.isnan(normalized_recovery(0.3, 0.5, 0.5).item())


def test_custom_callables_scalar_broadcast_and_bad_shape():
    x = _logits()
    m = as_metric(lambda lg: lg[:, -1, 0], name="first_logit")
    assert m.name == "first_logit" and torch.equal(m(x), torch.tensor([1.0, 3.0]))
    assert torch.equal(as_metric(lambda lg: lg.sum())(x), x.sum().expand(2))
    with pytest.raises(ValueError, match="one value per sequence"):
        as_metric(lambda lg: lg[:, -1])(x)
    assert metric_name(logit_diff(1, 2)).startswith("logit_diff(")
