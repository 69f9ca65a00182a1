"""Attention rollout (Abnar & Zuidema 2020) and gradient rollout, materialised at small L or as a row vector.

Per layer the fused attention ``A`` (heads fused: mean / max / min; optional discard of the smallest
entries) becomes ``A~ = r I + (1 - r) A`` (``r = residual``, 0.5 in the paper) with every row renormalised to
sum to 1 (``keepdim`` sums: the axis vit-explain got wrong, its issue #16); rollout is ``A~_L ... A~_1``.

At long lengths only rows are needed: from the query rows ``v`` (one-hot, or a group mean) the rollout is
propagated downward, ``v_l = v_{l+1} A~_l = r v_{l+1} + (1 - r) v_{l+1} A_l``, and ``v A_l`` with ``A_l`` the
head mean is a weighted column sum of the layer's attention (:func:`kernels.weighted_colsum`; exact rows while
``v`` is still supported on a few query positions, i.e. at the top layer). Nothing
``L x L`` is formed; memory is the captured q and k of every layer plus O(H L) per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from analyses.attention_maps import (
    AttentionMap,
    LayerQK,
    MethodNotApplicableError,
    QuerySpec,
    _layout_or_none,
    _resolve_layers,
    attention_modules,
    capture_qk,
    eval_mode,
    query_weights,
    run_through,
    weighted_attention,
)


def fuse_attention(attn: Float[Tensor, "h q k"], head_fusion: str = "mean", discard_ratio: float = 0.0) -> Tensor:
    """Heads fused (``mean`` / ``max`` / ``min``), then the smallest ``discard_ratio`` of entries zeroed (diagonal kept)."""
    if head_fusion == "mean":
        a = attn.mean(0)
    elif head_fusion == "max":
        a = attn.amax(0)
    elif head_fusion == "min":
        a = attn.amin(0)
    else:
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    if discard_ratio:
        if not 0 <= discard_ratio < 1:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
        flat = a.flatten().clone()
        n_drop = int(flat.numel() * discard_ratio)
        drop = flat.topk(n_drop, largest=False).indices
        eye = torch.eye(a.shape[0], a.shape[1], dtype=torch.bool).flatten()
        drop = drop[~eye[drop]]
        flat[drop] = 0
        a = flat.reshape(a.shape)
    return a


def rollout_matrix(
    attentions: Sequence[Tensor] | Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: float = 0.5,
) -> Float[Tensor, "q k"]:
    """Materialised rollout from per-layer attention ``[H, L, L]`` (bottom layer first): ``A~_L ... A~_1``."""
    result = None
    for attn in attentions:
        a = fuse_attention(torch.as_tensor(attn, dtype=torch.float64), head_fusion, discard_ratio)
        a = residual * torch.eye(a.shape[0], dtype=a.dtype) + (1 - residual) * a
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("rollout needs at least one layer of attention")
    return result


def gradient_rollout_matrix(
    attentions: Sequence[Tensor], gradients: Sequence[Tensor], discard_ratio: float = 0.0, residual: float = 0.5
) -> Float[Tensor, "q k"]:
    """Gradient rollout: per layer the fused map is ``mean_h ReLU(A_h * dA_h)`` (Chefer et al.), then as rollout."""
    fused = [(torch.as_tensor(a, dtype=torch.float64) * torch.as_tensor(g, dtype=torch.float64)).clamp(min=0)
             for a, g in zip(attentions, gradients)]
    return rollout_matrix(fused, "mean", discard_ratio, residual)


@dataclass
class Rollout:
    """Rollout rows ``values [B, QG, L]`` (each row sums to 1) from each query group, over the tower's positions."""

    values: Float[Tensor, "b qg l"]
    queries: list[str]
    tower: str
    layers: list[int]
    layout: Any = None
    attention: Any = None  # the query groups' AttentionMap from the same forward (``with_map=True``)

    def grid(self, image: int | None = None, video: int | None = None, part: int | None = None) -> Tensor:
        """One item's cells ``[QG, frames, rows, cols]`` (see :func:`analyses.attention_maps.grid_view`)."""
        from analyses.attention_maps import grid_view

        return grid_view(self.values[:, None], self.layout, image=image, video=video, part=part, tower=self.tower)[0]


def rollout(
    model: nn.Module,
    inputs: Mapping[str, Any],
    query: QuerySpec = "last",
    *,
    tower: str = "lm",
    layers: Sequence[int] | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: float = 0.5,
    method: str = "rows",
    backend: str | None = None,
    with_map: bool = False,
) -> Rollout:
    """Rollout rows from a query set, for the language model or a vision / text tower.

    ``method="rows"`` (default): the row-vector propagation on the kernels (any length; head mean only).
    ``method="materialize"``: caches every ``hook_pattern`` (O(H L^2) per layer; small L), and supports
    ``head_fusion="max"|"min"`` and ``discard_ratio``. ``layers`` are the layers rolled through (default all).
    ``with_map=True`` (rows method) also returns the query groups' per-layer, per-head attention map from the same
    forward as ``Rollout.attention`` (an :class:`~analyses.attention_maps.AttentionMap`).
    """
    attns = attention_modules(model, tower)
    chosen = sorted(_resolve_layers(layers, len(attns), tower))
    layout = _layout_or_none(model, inputs)
    if method == "materialize":
        return _rollout_materialized(model, inputs, query, tower, chosen, head_fusion, discard_ratio, residual, layout)
    if method != "rows":
        raise ValueError(f"method must be 'rows' or 'materialize', got {method!r}")
    if head_fusion != "mean" or discard_ratio:
        raise MethodNotApplicableError(
            "the row-vector rollout fuses heads by their mean (a weighted column sum); max / min fusion and "
            "discard_ratio act on whole L x L matrices: use method='materialize' at small L"
        )
    captured: dict[int, LayerQK] = {}
    with eval_mode(model), torch.no_grad(), capture_qk(model, lambda s: captured.__setitem__(s.layer, s), tower, chosen,
                                                               record_lse=tower == "lm"):
        run_through(model, inputs, tower, chosen)
    top = captured[chosen[-1]]
    b, _, lq, _ = top.q.shape
    w, names = query_weights(query, layout if tower == "lm" else None, lq, b)
    v = w.to(top.q.device).float()  # B L QG
    maps: dict[int, Tensor] = {}
    for i in reversed(chosen):
        s = captured.pop(i)
        if with_map:
            maps[i] = weighted_attention(s, w.to(s.q.device), backend=backend).cpu()
        # the top step starts from the query rows (exact rows, S x L); below, v is dense (one column pass)
        va = weighted_attention(s, v, heads="mean", backend=backend)[:, 0]  # B QG L
        v = residual * v + (1 - residual) * va.transpose(1, 2)
    amap = AttentionMap(torch.stack([maps[i] for i in chosen]), chosen, names, tower, layout) if with_map else None
    return Rollout(v.transpose(1, 2).cpu(), names, tower, chosen, layout, amap)


def _patterns(model: nn.Module, inputs: Mapping[str, Any], tower: str, chosen: list[int],
              metric: Callable[[Tensor], Tensor] | None = None) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Materialised ``hook_pattern [B, H, L, L]`` of the chosen layers (and their gradients under ``metric``)."""
    prefix = {"lm": "", "vision": "vision.", "text": "text."}[tower]
    pats: dict[int, Tensor] = {}
    grads: dict[int, Tensor] = {}

    def keep(i):
        def fn(pattern, hook):
            if metric is not None:
                pattern.retain_grad()
            pats[i] = pattern
            return pattern
        return fn

    hooks = [(f"{prefix}blocks.{i}.attn.hook_pattern", keep(i)) for i in chosen]
    with eval_mode(model), torch.set_grad_enabled(metric is not None):
        out = model.run_with_hooks(**inputs, fwd_hooks=hooks)
        if metric is not None:
            metric(out).sum().backward()
            grads = {i: p.grad.detach() for i, p in pats.items()}
    return {i: p.detach() for i, p in pats.items()}, grads


def _rollout_materialized(model, inputs, query, tower, chosen, head_fusion, discard_ratio, residual, layout) -> Rollout:
    pats, _ = _patterns(model, inputs, tower, chosen)
    b, _, lq, _ = pats[chosen[0]].shape
    w, names = query_weights(query, layout if tower == "lm" else None, lq, b)
    rows = []
    for bi in range(b):
        r = rollout_matrix([pats[i][bi] for i in chosen], head_fusion, discard_ratio, residual)
        rows.append(w[bi].double().T @ r)
    return Rollout(torch.stack(rows).float(), names, tower, chosen, layout)


def gradient_rollout(
    model: nn.Module,
    inputs: Mapping[str, Any],
    metric: Callable[[Tensor], Tensor],
    query: QuerySpec = "last",
    *,
    tower: str = "lm",
    layers: Sequence[int] | None = None,
    discard_ratio: float = 0.0,
    residual: float = 0.5,
) -> Rollout:
    """Gradient rollout (attention x ReLU-gradient of ``metric``, head mean) from a query set; materialises patterns."""
    attns = attention_modules(model, tower)
    chosen = sorted(_resolve_layers(layers, len(attns), tower))
    layout = _layout_or_none(model, inputs)
    pats, grads = _patterns(model, inputs, tower, chosen, metric)
    b, _, lq, _ = pats[chosen[0]].shape
    w, names = query_weights(query, layout if tower == "lm" else None, lq, b)
    rows = []
    for bi in range(b):
        r = gradient_rollout_matrix([pats[i][bi] for i in chosen], [grads[i][bi] for i in chosen], discard_ratio, residual)
        rows.append(w[bi].double().T @ r)
    return Rollout(torch.stack(rows).float(), names, tower, chosen, layout)
