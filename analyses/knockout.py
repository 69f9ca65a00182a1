"""Attention-knockout sweeps: remove attention edges between token groups over windows of layers.

A knockout removes the edges "query group Q may attend to key group K" by setting those pre-softmax
scores to ``-inf`` (``blocks.{l}.attn.hook_attn_scores``), so the post-softmax weight on every blocked
edge is exactly 0 and the remaining weights renormalise -- the correct way, unlike writing ``False``
into an additive float mask (which means "attend"). A sweep evaluates every (edge set, layer window)
cell, batched, and reports the metric and its change from the unablated run.

Example: does the answer read the image directly, and where? ::

    edges = {"image->last": (layout.last_token(), layout.positions(image=0))}
    res = knockout_sweep(model, inputs, metric, edges, window=3)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .metrics import as_metric
from .results_store import CellStore
from .sites import available_layers, get_site
from .sweep import fingerprint_inputs, fingerprint_model, open_store, run_cells
from .variants import Edit, ForwardPlan, VariantRunner, knockout_mask

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
    mask = knockout_mask(q, k, length)
    causal_visible = torch.tril(torch.ones(length, length, dtype=torch.bool))
    left = causal_visible & ~mask
    empty = (~left.any(-1)) & mask.any(-1)
    if empty.any():
        raise ValueError(
            f"knockout would block every visible key of query positions {empty.nonzero().flatten().tolist()}"
        )
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
) -> pd.DataFrame:
    """Block each named edge set over each layer window and record the metric.

    Args:
        edges: ``{name: (query positions, key positions)}``, e.g. from the token layout
            (``(layout.last_token(), layout.positions(image=0))``). Positions are shared by the batch.
        window / windows: sliding windows of ``window`` layers (every ``stride``), or explicit
            ``(first, last)`` inclusive windows. Default: each layer alone.
        heads: restrict the knockout to these heads (default all).

    Returns a DataFrame with ``edges, first_layer, last_layer, value, base_value, effect`` (``effect =
    value - base_value``).
    """
    from .patching import default_plan

    metric = as_metric(metric)
    site = get_site("attn_scores")
    n_layers_avail = available_layers(model.hook_dict, site)
    if not n_layers_avail:
        raise KeyError("model has no blocks.{l}.attn.hook_attn_scores hooks; knockout needs pre-softmax scores")
    n_layers = max(n_layers_avail) + 1
    if windows is None:
        windows = layer_windows(n_layers, window or 1, stride)
    length = _seq_len(inputs)
    with torch.no_grad():
        base_value = float(metric(model(**inputs)).float().mean())
    edge_idx = {name: (_as_index(q) % length, _as_index(k) % length) for name, (q, k) in edges.items()}
    cells = [{"edges": name, "first_layer": int(a), "last_layer": int(b)} for name in edges for a, b in windows]
    config = {
        "analysis": "attention_knockout",
        "edges": {n: [q.tolist(), k.tolist()] for n, (q, k) in edge_idx.items()},
        "windows": [list(w) for w in windows],
        "heads": None if heads is None else list(heads),
        "metric": metric.name,
        "inputs": fingerprint_inputs(inputs),
        "model": fingerprint_model(model),
    }
    cell_store = open_store(store, config, KNOCKOUT_KEYS)
    runner = VariantRunner(model, inputs, batch_size, plan=default_plan(model) if plan == "auto" else plan)

    def evaluate(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
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


def _seq_len(inputs: Mapping[str, Any]) -> int:
    for key in ("input_ids", "input", "tokens", "attention_mask"):
        v = inputs.get(key)
        if isinstance(v, Tensor):
            return v.shape[1]
    raise ValueError("cannot tell the sequence length: pass input_ids")
