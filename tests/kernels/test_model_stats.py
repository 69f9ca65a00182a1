"""Attention statistics inside the hooked models: every statistic hook equals the same statistic read off
the materialised ``hook_pattern`` / ``hook_attn_scores``, in both towers; the statistics path leaves the
logits unchanged; knockouts remove exactly the requested edges and equal a -inf edit of the scores."""

from __future__ import annotations

import pytest
import torch
from qwen_cases import case

from hooked_vlm.components.attention import STAT_HOOKS, AttnStatsRequest, attn_stats_request
from kernels import Knockout

FAMILY = "tiny-qwen2-vl"


@pytest.fixture(scope="module")
def model():
    from hooked_vlm.tiny import tiny_model

    return tiny_model(FAMILY, seed=0)


def _onehot(ids: torch.Tensor) -> torch.Tensor:
    n = max(1, int(ids.max()) + 1)
    return torch.nn.functional.one_hot(ids.clamp(min=0), n).double() * (ids >= 0)[..., None].double()


def _wanted(name: str) -> bool:
    return name.endswith(STAT_HOOKS) or name.endswith(("hook_pattern", "hook_attn_scores"))


def _check_layer(cache, prefix, req, rows):
    p = cache[f"{prefix}.hook_pattern"].double()  # B H Lq Lk
    scores = cache[f"{prefix}.hook_attn_scores"].double()
    lse_ref = torch.logsumexp(scores, dim=-1)
    lse = cache[f"{prefix}.hook_lse"].double()
    live = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), live)
    assert torch.allclose(lse[live], lse_ref[live], atol=1e-5)
    b = p.shape[0]
    okg = _onehot(req.key_group_ids.expand(b, -1))
    oqg = _onehot(req.q_group_ids.expand(b, -1))
    region_ref = torch.einsum("bqc,bhqk,bkg->bhcg", oqg, p, okg)
    assert torch.allclose(cache[f"{prefix}.hook_region"].double(), region_ref, atol=1e-5)
    ocg = _onehot(req.colsum_q_group_ids.expand(b, -1))
    colsum_ref = torch.einsum("bqc,bhqk->bhck", ocg, p)
    assert torch.allclose(cache[f"{prefix}.hook_colsum"].double(), colsum_ref, atol=1e-5)
    rows_ref = torch.gather(p, 2, rows[:, None, :, None].expand(-1, p.shape[1], -1, p.shape[-1]))
    assert torch.allclose(cache[f"{prefix}.hook_rows"].double(), rows_ref, atol=1e-6)
    assert torch.allclose(cache[f"{prefix}.hook_row_mass"].double(), torch.einsum("bhqk,bkg->bhqg", p, okg), atol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lm_statistics_equal_the_materialised_pattern(model, backend, grad, triton_ok):
    """Also with autograd on: the statistics beside a materialised pattern are computed without a graph (the
    torch backend's ``matmul(out=)`` used to raise there)."""
    assert backend != "triton" or triton_ok
    inputs = case("batch_left", FAMILY)  # two prompts, left padding: fully masked rows included
    lay = model.layout(**inputs)
    rows = lay.last_token()[:, None]
    req = AttnStatsRequest(
        key_group_ids=lay.group_ids("item"),
        q_group_ids=lay.group_ids("kind").clamp(max=3),
        colsum_q_group_ids=lay.group_ids("last"),
        rows=rows,
        row_mass=True,
        backend=backend,
    )
    with torch.set_grad_enabled(grad), attn_stats_request(model, req):
        logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("blocks.") and _wanted(n))
    assert logits.requires_grad == grad
    for i in range(len(model.blocks)):
        _check_layer(cache, f"blocks.{i}.attn", req, rows)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vision_statistics_equal_the_materialised_pattern(model, backend, grad, triton_ok):
    assert backend != "triton" or triton_ok
    inputs = case("two_images", FAMILY)
    lay = model.layout(**inputs)
    n_rows = sum(it.n_patches for it in lay.items)
    item = torch.full((1, n_rows), -1, dtype=torch.long)
    for i, it in enumerate(lay.items):
        bi, idx = lay.vision_rows(image=i)
        item[bi, idx] = i
    req = AttnStatsRequest(key_group_ids=item, q_group_ids=item, colsum_q_group_ids=item,
                           rows=torch.tensor([[0, n_rows - 1]]), row_mass=True, backend=backend)
    with torch.set_grad_enabled(grad), attn_stats_request(model, req, tower="vision"):
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("vision.blocks.") and _wanted(n))
    for j in range(len(model.vision.blocks)):
        _check_layer(cache, f"vision.blocks.{j}.attn", req, req.rows)
        region = cache[f"vision.blocks.{j}.attn.hook_region"][0]  # H QG KG: block-diagonal per image
        assert torch.allclose(region, torch.diag_embed(region.diagonal(dim1=-2, dim2=-1)))


def test_statistics_path_keeps_logits_and_fires_only_in_requested_layers(model):
    inputs = case("image", FAMILY)
    lay = model.layout(**inputs)
    req = AttnStatsRequest(key_group_ids=lay.group_ids("visual"), layers=[1], backend="torch")
    with torch.no_grad():
        clean = model(**inputs)
        with attn_stats_request(model, req):
            logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith(STAT_HOOKS))
    assert torch.allclose(logits, clean, atol=1e-5)
    assert set(cache.keys()) == {"blocks.1.attn.hook_lse", "blocks.1.attn.hook_region"}
    assert all(a.stats_request is None for a in (blk.attn for blk in model.blocks))  # detached after the run


def test_knockout_removes_edges_and_equals_a_scores_edit(model):
    inputs = case("image", FAMILY)
    lay = model.layout(**inputs)
    length = lay.seq_len
    last = lay.last_token()
    q_region = torch.full((1, length), -1)
    q_region[0, last] = 0  # region 0: the last token
    k_region = torch.where(lay.item >= 0, 0, -1)  # region 0: every image token
    ko = Knockout(q_region=q_region, k_region=k_region, table=torch.tensor([[True]]))
    req = AttnStatsRequest(key_group_ids=k_region, q_group_ids=q_region, knockout=ko, layers=[0], backend="torch")
    with torch.no_grad():
        clean = model(**inputs)
        with attn_stats_request(model, req):
            patched, cache = model.run_with_cache(
                **inputs, names_filter=["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_region"])
        visual = (lay.item[0] >= 0)

        def cut(scores, hook):
            scores = scores.clone()
            scores[:, :, last[0], visual] = float("-inf")
            return scores

        edited = model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.attn.hook_attn_scores", cut)])
    pat = cache["blocks.0.attn.hook_pattern"]
    assert (pat[0, :, last[0], visual] == 0).all()
    assert torch.allclose(pat[0, :, last[0]].sum(-1), torch.ones(pat.shape[1]), atol=1e-5)  # renormalised
    assert (cache["blocks.0.attn.hook_region"][0, :, 0, 0] == 0).all()
    assert not torch.allclose(patched, clean, atol=1e-4)
    assert torch.allclose(patched, edited, atol=1e-5)


def test_request_with_wrong_positions_names_the_problem(model):
    inputs = case("image", FAMILY)
    req = AttnStatsRequest(key_group_ids=torch.zeros(1, 3, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError, match="key_group_ids has 3 positions"), torch.no_grad(), attn_stats_request(model, req):
        model(**inputs)
    with pytest.raises(ValueError, match="do not exist"), attn_stats_request(model, AttnStatsRequest(layers=[99])):
        pass


@pytest.mark.slow
def test_run_with_cache_keyword_and_autograd(model):
    """``run_with_cache(attn_stats=...)`` equals the context-manager form, works with gradients enabled,
    and a knockout under autograd still zeroes the blocked edges."""
    from hooked_vlm import AttnStatsRequest as Exported

    inputs = case("image", FAMILY)
    lay = model.layout(**inputs)
    req = Exported(key_group_ids=lay.group_ids("frame"), q_group_ids=lay.group_ids("last"), rows=lay.last_token()[:, None])
    names = ["blocks.1.attn.hook_region", "blocks.1.attn.hook_rows"]
    with torch.no_grad():
        with attn_stats_request(model, req):
            _, ref = model.run_with_cache(**inputs, names_filter=names)
        _, kw = model.run_with_cache(**inputs, names_filter=names, attn_stats=req)
    for n in names:
        assert torch.allclose(ref[n], kw[n], atol=1e-6)
    # gradients enabled: the statistics still come out and the logits still have a graph
    logits, cache = model.run_with_cache(**inputs, names_filter=names, attn_stats=req)
    assert logits.requires_grad
    assert torch.allclose(cache["blocks.1.attn.hook_region"], ref["blocks.1.attn.hook_region"], atol=1e-5)
    vis = lay.group_ids("visual")
    ko = Knockout(q_region=torch.where(lay.group_ids("last") >= 0, 0, -1), k_region=vis, table=torch.ones(1, 1, dtype=torch.bool))
    ko_req = AttnStatsRequest(rows=lay.last_token()[:, None], knockout=ko)
    _, cache = model.run_with_cache(**inputs, names_filter=["blocks.0.attn.hook_rows", "blocks.0.attn.hook_pattern"], attn_stats=ko_req)
    row = cache["blocks.0.attn.hook_rows"][0, :, 0]
    assert torch.equal(row[:, vis[0] >= 0], torch.zeros_like(row[:, vis[0] >= 0]))
    assert torch.allclose(row.sum(-1), torch.ones(row.shape[0]), atol=1e-5)
