"""Attention-knockout sweeps: remove attention edges between token groups over windows of layers.

A knockout removes the edges "query group Q may attend to key group K" before the softmax, so the
weight on every blocked edge is exactly 0 and the remaining weights renormalise -- the correct way,
unlike writing ``False`` into an additive float mask (which means "attend"). Two exact methods:

* ``"mask"`` (default on hooked_vlm models): a :class:`kernels.mask.Knockout` added to the layers'
  ``MaskSpec`` through ``model.knockout`` (``hooked_vlm.components.attn_stats.knockout``); no ``L x L`` matrix is
  materialised, so it scales to long videos. Each row of a batched forward gets its own edge set
  (per-row region ids), so many cells still share one forward.
* ``"scores"``: edit ``blocks.{l}.attn.hook_attn_scores`` to ``-inf`` on the blocked edges (any model
  whose score hook takes effect; materialises the scores).

A sweep evaluates every (edge set, layer window) cell, batched, and reports the metric and its change
from the unablated run.

Example: does the answer read the image directly, and where? ::

    edges = {"image->last": (layout.last_token(), layout.positions(image=0))}
    res = knockout_sweep(model, inputs, metric, edges, window=3)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .metrics import as_metric
from .results_store import CellStore
from .sites import available_layers, get_site
from .sweep import SweepOptions, fingerprint_inputs, fingerprint_model, open_store, run_cells, seq_len_of
from .variants import Edit, ForwardPlan, VariantRunner, is_hooked_vlm, knockout_mask

__all__ = ["knockout_sweep", "knockout_edits", "layer_windows", "KNOCKOUT_KEYS"]

KNOCKOUT_KEYS = ("edges", "first_layer", "last_layer")
EdgeSpec = tuple[Sequence[int] | Int[Tensor, "q"] | int, Sequence[int] | Int[Tensor, "k"]]


def layer_windows(n_layers: int, window: int, stride: int = 1) -> list[tuple[int, int]]:
    """Windows ``(first, last)`` (inclusive) of ``window`` consecutive layers, every ``stride`` layers."""
    if not 1 <= window <= n_layers:
        raise ValueError(f"window must be in 1..{n_layers}, got {window}")
    return [(s, s + window - 1) for s in range(0, n_layers - window + 1, stride)]


def _as_index(x: Any) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    return t.reshape(-1)


def _check_keys_left(q: Tensor, k: Tensor, length: int) -> None:
    """Raise if some query would lose every key it can see (causal), in O(|q| + |k|) memory (issue 17: no L x L).

    Query ``p`` sees keys ``0..p``; it loses all of them iff every one of those ``p + 1`` keys is blocked.
    """
    blocked = torch.unique(k % length)  # sorted
    qs = torch.unique(q % length)
    n_blocked_upto = torch.searchsorted(blocked, qs, right=True)
    empty = qs[n_blocked_upto == qs + 1]
    if empty.numel():
        raise ValueError(f"knockout would block every visible key of query positions {empty.tolist()}")


def _checked_mask(q: Tensor, k: Tensor, length: int) -> Tensor:
    """The ``[L, L]`` blocked-edge mask (score-edit method only); raises if some query would lose every key it can see."""
    _check_keys_left(q, k, length)
    return knockout_mask(q, k, length)


def knockout_edits(
    queries: Sequence[int] | Tensor | int,
    keys: Sequence[int] | Tensor,
    layers: Sequence[int],
    length: int,
    heads: Sequence[int] | None = None,
) -> list[Edit]:
    """Edits blocking ``queries -> keys`` at each of ``layers`` (all heads unless ``heads``).

    Raises if a query would lose every key it can see (its softmax would be undefined); a query's own
    position is never blocked implicitly, so pass it in ``keys`` only if you mean it.
    """
    q, k = _as_index(queries) % length, _as_index(keys) % length
    mask = _checked_mask(q, k, length)
    site = get_site("attn_scores")
    h = None if heads is None else torch.as_tensor(list(heads), dtype=torch.long)
    return [Edit(site.hook_name(l), mask, heads=h, head_axis=1, mode="block") for l in layers]


def knockout_sweep(
    model: Any,
    inputs: Mapping[str, Any],
    metric: Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, "batch"]],
    edges: Mapping[str, EdgeSpec],
    window: int | None = None,
    windows: Sequence[tuple[int, int]] | None = None,
    stride: int = 1,
    heads: Sequence[int] | None = None,
    batch_size: int = 8,
    store: str | os.PathLike | CellStore | None = None,
    progress: bool = True,
    plan: Callable[[Mapping[str, Any], int], ForwardPlan] | None | str = "auto",
    prefix_reuse: bool | str = "auto",
    method: Literal["auto", "mask", "scores"] = "auto",
    options: SweepOptions | None = None,
) -> pd.DataFrame:
    """Block each named edge set over each layer window and record the metric.

    Args:
        edges: ``{name: (query positions, key positions)}``, e.g. from the token layout
            (``(layout.last_token(), layout.positions(image=0))``). Positions are shared by the batch.
        window / windows: sliding windows of ``window`` layers (every ``stride``), or explicit
            ``(first, last)`` inclusive windows. Default: each layer alone.
        heads: restrict the knockout to these heads (default all; needs ``method="scores"``).
        options: a :class:`~analyses.sweep.SweepOptions` (how the sweep runs); when given it replaces
            ``batch_size`` / ``store`` / ``progress`` / ``plan`` / ``prefix_reuse`` (/ ``layer_skip``).
        method: ``"mask"`` (MaskSpec knockout, no L x L), ``"scores"`` (score-hook edit) or ``"auto"``
            (mask when the model supports it and no ``heads`` are given).

    Returns a DataFrame with ``edges, first_layer, last_layer, value, base_value, effect`` (``effect =
    value - base_value``).
    """
    opts = SweepOptions.resolve(options, batch_size=batch_size, store=store, progress=progress, plan=plan, prefix_reuse=prefix_reuse)
    batch_size, store, progress, plan, prefix_reuse = opts.batch_size, opts.store, opts.progress, opts.plan, opts.prefix_reuse
    metric = as_metric(metric)
    site = get_site("attn_scores")
    n_layers_avail = available_layers(model.hook_dict, site)
    if not n_layers_avail:
        raise KeyError("model has no blocks.{l}.attn.hook_attn_scores hooks; knockout needs pre-softmax scores")
    n_layers = max(n_layers_avail) + 1
    if windows is None:
        windows = layer_windows(n_layers, window or 1, stride)
    length = seq_len_of(inputs)
    edge_idx = {name: (_as_index(q) % length, _as_index(k) % length) for name, (q, k) in edges.items()}
    for qi, ki in edge_idx.values():
        _check_keys_left(qi, ki, length)
    cells = [{"edges": name, "first_layer": int(a), "last_layer": int(b)} for name in edges for a, b in windows]
    config = lambda: {  # noqa: E731 -- hashing inputs/model only when a store is used
        "analysis": "attention_knockout",
        "edges": {n: [q.tolist(), k.tolist()] for n, (q, k) in edge_idx.items()},
        "windows": [list(w) for w in windows],
        "heads": None if heads is None else list(heads),
        "metric": metric.name,
        "inputs": fingerprint_inputs(inputs),
        "model": fingerprint_model(model),
    }
    cell_store = open_store(store, config, KNOCKOUT_KEYS)
    runner = opts.runner(model, inputs, metric)
    base_value = float(metric(runner.base_logits()).float().mean())

    use_mask = method == "mask" or (method == "auto" and heads is None and _mask_knockout_available(model))
    if use_mask and heads is not None:
        raise ValueError("a MaskSpec knockout blocks all heads; use method='scores' to restrict it to heads")

    def evaluate(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if use_mask:
            values = _evaluate_with_mask(model, runner, metric, batch, edge_idx, length)
        else:
            variants = [
                knockout_edits(*edge_idx[c["edges"]], range(c["first_layer"], c["last_layer"] + 1), length, heads)
                for c in batch
            ]
            values, _ = runner.run(variants, metric)
        assert values is not None
        return [
            dict(c, value=float(v.mean()), base_value=base_value, effect=float(v.mean()) - base_value)
            for c, v in zip(batch, values)
        ]

    return run_cells(cells, evaluate, cell_store, batch_size, progress, desc="attention knockout")


def _mask_knockout_available(model: Any) -> bool:
    """The model can knock out attention edges by mask (``model.knockout``), a public capability."""
    return is_hooked_vlm(model) and model.supports_mask_knockout


def _evaluate_with_mask(
    model: Any,
    runner: VariantRunner,
    metric: Callable[[Tensor], Tensor],
    batch: Sequence[dict[str, Any]],
    edge_idx: Mapping[str, tuple[Tensor, Tensor]],
    length: int,
) -> Tensor:
    """Cells sharing a layer window run together; each batch row carries its own edge set."""
    from kernels.mask import Knockout

    b = runner.base_batch
    out = torch.empty(len(batch), b)
    by_window: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(batch):
        by_window.setdefault((c["first_layer"], c["last_layer"]), []).append(i)
    for (first, last), idx in by_window.items():
        names = [batch[i]["edges"] for i in idx]

        def context(start: int, count: int, names: list[str] = names, first: int = first, last: int = last):
            device = runner.inputs["input_ids"].device
            q = torch.full((count * b, length), -1, dtype=torch.long, device=device)
            k = torch.full((count * b, length), -1, dtype=torch.long, device=device)
            for r in range(count):
                qi, ki = edge_idx[names[start + r]]
                rows = slice(r * b, (r + 1) * b)
                q[rows, qi] = r
                k[rows, ki] = r
            ko = Knockout(q, k, torch.eye(count, dtype=torch.bool, device=device))
            return model.knockout(ko, layers=range(first, last + 1))

        # a knockout changes only its queries' rows: positions before the earliest query come from the prefix cache
        first_query = min(int(edge_idx[n][0].min()) for n in names)
        values, _ = runner.run([[] for _ in idx], metric, context=context, first_position=first_query)
        assert values is not None
        out[idx] = values
    return out
