"""Clean-into-counterfactual ``resid_pre`` patching of one entry: the clean run once, only patched positions cached.

:func:`analyses.patching.activation_patching` reruns the clean input and caches every layer's whole
``resid_pre`` for each counterfactual. A video entry has one clean clip and several counterfactuals, so here:

* :func:`clean_run` runs the clean clip once per entry and keeps, per layer, only the positions some token slice
  patches (``run_with_cache(..., reduction=CacheReduction(positions=...))``, streamed to ``disk_dir`` when given),
  plus the next-token logits (the final normalised residual at the last position, unembedded: no ``[L, vocab]``);
* :func:`patch_counterfactual` runs each counterfactual once as the base of a
  :class:`~analyses.variants.VariantRunner` (its vision tower once, its key/value cache reused for every cell's
  unchanged prefix, the layers below a cell's layer run once per batch), then the cells layer by layer, groups in
  order of their first position, so a batch shares one layer and a long prefix.

Positions before the first visual token are dropped from every group: the clean and counterfactual prompts hold
the same text there and a causal model cannot see the clip from them, so their states are equal in both runs and
patching them changes nothing. A group left empty (a ``text`` slice holding only that prefix) is a no-op cell:
its patched margin is the counterfactual margin, with no forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.metrics import normalized_recovery
from analyses.patching import check_compatible_inputs
from analyses.sweep import SweepOptions
from analyses.variants import Edit

__all__ = ["CleanRun", "clean_run", "patch_counterfactual", "patched_positions"]

Hooks = Sequence[tuple[str, Callable]]


@dataclass
class CleanRun:
    """The clean clip's next-token logits and its ``resid_pre`` at ``positions`` (sorted) for every layer."""

    logits: Float[Tensor, "vocab"]
    resid_pre: dict[int, Float[Tensor, "1 n_kept d_model"]]
    positions: list[int]
    seq_len: int

    def layer_values(self, layer: int) -> Float[Tensor, "1 pos d_model"]:
        """Layer ``layer``'s clean ``resid_pre`` shaped like the whole activation (kept positions filled)."""
        kept = self.resid_pre[layer]
        if self.positions == list(range(self.seq_len)):
            return kept
        full = torch.zeros(kept.shape[0], self.seq_len, *kept.shape[2:], dtype=kept.dtype, device=kept.device)
        full[:, self.positions] = kept
        return full


def patched_positions(groups: Mapping[str, Sequence[int]], first_visual: int) -> dict[str, list[int]]:
    """Each group without the positions before the first visual token (equal in clean and counterfactual runs)."""
    return {name: [int(p) for p in pos if p >= first_visual] for name, pos in groups.items()}


def _hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _hooks_context(model: Any, hooks: Hooks) -> Any:
    return model.hooks(fwd_hooks=list(hooks)) if hooks else nullcontext()


@torch.no_grad()
def clean_run(model: Any, inputs: Mapping[str, Any], groups: Mapping[str, Sequence[int]], layers: Sequence[int],
              extra_hooks: Hooks = (), disk_dir: str | Path | None = None) -> CleanRun:
    """One clean forward: next-token logits and ``resid_pre`` of ``layers`` at the union of ``groups``' positions.

    ``extra_hooks`` ride along (e.g. the representation summaries); when any is given every block computes
    every position, otherwise the final block computes only the last one (``final_positions=1``).
    """
    from hooked_vlm.cache_reduction import CacheReduction

    seq_len = int(inputs["input_ids"].shape[1])
    positions = sorted({p for pos in groups.values() for p in pos})
    names = [_hook(layer) for layer in layers]
    reduction = CacheReduction(positions=torch.tensor(positions, dtype=torch.long), disk_dir=disk_dir)
    last_only = {} if extra_hooks else {"final_positions": 1}
    with _hooks_context(model, extra_hooks):
        resid, cache = model.run_with_cache(**inputs, names_filter=names, reduction=reduction, return_type="resid", **last_only)
    logits = model.unembed(resid[:, -1:])[0, -1].float()
    return CleanRun(logits, {layer: cache[_hook(layer)] for layer in layers}, positions, seq_len)


@torch.no_grad()
def patch_counterfactual(
    model: Any, clean: CleanRun, cf_inputs: Mapping[str, Any], groups: Mapping[str, Sequence[int]], metric: Any,
    batch_size: int, clean_inputs: Mapping[str, Any] | None = None, extra_hooks: Hooks = (),
) -> tuple[Float[Tensor, "vocab"], list[dict[str, Any]]]:
    """The counterfactual's next-token logits and one row per (layer, group): patched margin and recovery.

    ``groups`` are the patched positions (see :func:`patched_positions`); every one must be among
    ``clean.positions``. ``extra_hooks`` fire during the counterfactual's own (unedited) forward.
    """
    if clean_inputs is not None:
        check_compatible_inputs(model, clean_inputs, cf_inputs)
    kept = set(clean.positions)
    for name, pos in groups.items():
        if not kept.issuperset(pos):
            raise ValueError(f"group {name!r} patches positions the clean run did not cache; pass the same groups to clean_run")
    with _hooks_context(model, extra_hooks):
        runner = SweepOptions(batch_size=batch_size, progress=False).runner(model, cf_inputs)
        cf_full = runner.base_logits()
    cf_logits = cf_full[0, -1].float()
    clean_value = float(metric(clean.logits[None, None]))
    cf_value = float(metric(cf_logits[None, None]))
    order = sorted(groups, key=lambda g: (min(groups[g]) if groups[g] else -1, g))
    rows: list[dict[str, Any]] = []
    for layer in sorted(clean.resid_pre):
        value = clean.layer_values(layer)
        live = [g for g in order if groups[g]]
        variants = [[Edit(_hook(layer), value, positions=torch.tensor(groups[g], dtype=torch.long), pos_axis=1)] for g in live]
        results = dict(zip(live, runner.run(variants, metric)[0][:, 0].tolist())) if variants else {}
        for g in order:
            patched = results.get(g, cf_value)  # an empty group patches nothing: the counterfactual's own margin
            rows.append({"layer": layer, "group": g, "patched": patched,
                         "recovery": float(normalized_recovery(patched, clean_value, cf_value))})
    return cf_logits, rows
