"""Drive a grid of cells through a :class:`~analyses.variants.VariantRunner`, resumably.

Shared by every sweep (activation patching, path patching, tracing, knockout): skip cells already in
the :class:`~analyses.results_store.CellStore`, evaluate the rest in batches, write each finished
batch atomically before starting the next, and show a progress bar. Killing the process loses at
most the batch in flight; rerunning with the same configuration computes only what is missing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .results_store import CellStore
from .variants import ForwardPlan, VariantRunner, VisionReusePlan, seq_len_of

__all__ = ["SweepOptions", "run_cells", "fingerprint_inputs", "fingerprint_model", "open_store", "default_plan",
           "reduced_cache_run", "seq_len_of"]

PlanArg = Callable[[Mapping[str, Any], int], ForwardPlan] | None | str


def default_plan(model: Any) -> Callable[[Mapping[str, Any], int], ForwardPlan] | None:
    """How to batch forwards so the vision tower runs once per input.

    A model's own ``vision_reuse_plan`` wins; models with ``encode_vision`` (the hooked VLMs) get a
    :class:`~analyses.variants.VisionReusePlan`; otherwise None (inputs are simply repeated).
    """
    fn = getattr(model, "vision_reuse_plan", None)
    if callable(fn):
        return fn
    if callable(getattr(model, "encode_vision", None)):
        return VisionReusePlan(model)
    return None


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs (not what it measures): one object shared by activation patching, path patching,
    causal tracing and attention knockout.

    * ``batch_size``: variants per forward; ``plan``: how a batch is built (``"auto"``: the vision tower runs
      once per input, see :func:`default_plan`; None: repeat every input; or a callable);
    * ``prefix_reuse``: compute only the positions after the first edited one against a cached prefix
      (``"auto"``: when the model says a prefix is reusable, ``HookedVLM.can_reuse_prefix``);
    * ``layer_skip``: run the layers below the first edited one once (``"auto"``: on for hooked_vlm models);
    * ``store``: a directory (or :class:`CellStore`) to write finished cells to and resume from;
    * ``progress``: show a progress bar;
    * ``max_positions``: memory-aware batching: the most positions (rows x computed positions per row) one
      batched forward may hold (``"auto"``: one plain forward's worth, the base input's positions, at least 4096; None: only
      ``batch_size`` limits a batch). Variants whose edits start late (short suffixes) then share a forward,
      full-length ones run alone, so a long video's sweep peaks near one forward's memory.
    """

    batch_size: int = 16
    plan: PlanArg = "auto"
    prefix_reuse: bool | str = "auto"
    layer_skip: bool | str = "auto"
    store: str | os.PathLike | CellStore | None = None
    progress: bool = True
    max_positions: int | str | None = "auto"

    def runner(self, model: Any, inputs: Mapping[str, Any], metric: Any = None) -> VariantRunner:
        """The :class:`VariantRunner` these options describe, for ``inputs`` (``metric``: the sweep's metric; one
        that reads only the last position lets the base run keep only that position's logits)."""
        plan = default_plan(model) if self.plan == "auto" else self.plan
        return VariantRunner(model, inputs, self.batch_size, plan=plan, prefix_reuse=self.prefix_reuse,  # type: ignore[arg-type]
                             layer_skip=self.layer_skip, max_positions=self.max_positions,
                             last_logits_only=getattr(metric, "reads", "all") == "last")

    def open_store(self, config: Mapping[str, Any] | Callable[[], Mapping[str, Any]], key_columns: Sequence[str]) -> CellStore | None:
        return open_store(self.store, config, key_columns)

    @classmethod
    def resolve(cls, options: "SweepOptions | None", **keywords: Any) -> "SweepOptions":
        """``options`` when given (it replaces the individual keywords), else the options the keywords name."""
        if options is not None:
            if not isinstance(options, SweepOptions):
                raise TypeError(f"options must be a SweepOptions, got {type(options).__name__}")
            return options
        return cls(**keywords)


@torch.no_grad()
def reduced_cache_run(
    model: Any, inputs: Mapping[str, Any], names_filter: Callable[[str], bool], kept: Tensor | None, last_only: bool
) -> tuple[Tensor, Any]:
    """A sweep's reference run (clean / source): logits and the cached hooks it patches from.

    With ``kept`` (sorted positions; hooked_vlm models) only those language-model positions are stored, reduced at
    hook time (:class:`~hooked_vlm.cache_reduction.CacheReduction`), so a long video's cache holds the patched
    spans, not ``L x d`` per hook; with ``last_only`` only the last position is unembedded (no ``[B, L, vocab]``).
    """
    kw: dict[str, Any] = {}
    if kept is not None:
        from hooked_vlm.cache_reduction import CacheReduction

        kw["reduction"] = CacheReduction(positions=kept)
    if last_only:
        resid, cache = model.run_with_cache(**inputs, names_filter=names_filter, return_type="resid", **kw)
        return model.unembed(resid[:, -1:]), cache
    return model.run_with_cache(**inputs, names_filter=names_filter, **kw)


def fingerprint_inputs(inputs: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex) of every tensor input's name, dtype, shape and bytes: resumes check it."""
    h = hashlib.sha256()
    for k in sorted(inputs):
        v = inputs[k]
        h.update(k.encode())
        if isinstance(v, Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:16]


def fingerprint_model(model: torch.nn.Module) -> str:
    """Class, parameter count and a sample of every parameter, hashed: catches a different checkpoint."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    n = 0
    for name, p in model.named_parameters():
        n += p.numel()
        sample = p.detach().reshape(-1)[:32].float().cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    h.update(str(n).encode())
    return h.hexdigest()[:16]


def open_store(
    store: str | os.PathLike | CellStore | None,
    config: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    key_columns: Sequence[str],
) -> CellStore | None:
    """A :class:`CellStore` for ``store`` (a directory path), or ``store`` itself, or None.

    ``config`` may be a callable, evaluated only when a store is opened (fingerprinting a large
    model's weights is then skipped for in-memory sweeps).
    """
    if store is None or isinstance(store, CellStore):
        return store
    return CellStore(store, config() if callable(config) else config, key_columns)


def run_cells(
    cells: Sequence[dict[str, Any]],
    evaluate: Callable[[Sequence[dict[str, Any]]], list[dict[str, Any]]],
    store: CellStore | None,
    batch_size: int,
    progress: bool = True,
    desc: str = "cells",
    order_key: Callable[[dict[str, Any]], Any] | None = None,
) -> pd.DataFrame:
    """Evaluate ``cells`` (dicts holding at least the store's key columns) in batches.

    ``evaluate(batch)`` returns one record per cell (the cell's fields plus results). With a store,
    finished cells are skipped and each batch is appended atomically as soon as it is done; the
    returned frame is then the store's full content in the order of ``cells``. ``order_key`` changes
    the evaluation order (e.g. by position, so batches share prefixes); the result order does not
    change.
    """
    todo = [c for c in cells if store is None or not store.is_done(c)]
    if order_key is not None:
        todo = sorted(todo, key=order_key)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=desc, disable=not progress, leave=False)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            out = evaluate(batch)
            if store is not None:
                store.append(out)
            else:
                records.extend(out)
            bar.update(len(batch))
    finally:
        bar.close()
    if store is None:
        if order_key is not None:
            rank = {id(c): i for i, c in enumerate(cells)}
            pairs = sorted(zip(todo, records), key=lambda cr: rank[id(cr[0])])
            records = [r for _, r in pairs]
        return pd.DataFrame(records)
    frame = store.load()
    order = {store.key_of(c): i for i, c in enumerate(cells)}
    rank = [order.get(store.key_of(r), len(order)) for r in frame.to_dict("records")]
    return frame.assign(_rank=rank).sort_values("_rank").drop(columns="_rank").reset_index(drop=True)
