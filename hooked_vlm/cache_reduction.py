"""Cache reductions applied at hook time, so a long-video cache costs what the user asked for, not L x d per hook.

``model.run_with_cache(..., reduction=CacheReduction(...))`` stores, for every cached language-model hook with a
position axis, only

* chosen positions (``positions``: ``[P]`` shared by the batch or ``[B, P]`` per row, e.g. the last token or a
  frame's positions from the token layout), or
* one vector per group (``group_ids`` ``[B, L]`` from ``model.layout(**inputs).group_ids("frame")`` / ``"cell"``
  / ``"item"``; ``-1`` = not stored), reduced by ``"mean"`` or ``"sum"``; each row's groups fill slots
  ``0..n-1`` in increasing id order (``cache.group_labels [B, n]`` says which id each slot holds);

then optionally downcasts (``dtype``), moves to ``device`` (``"cpu"`` offloads a GPU run) and streams each
hook to ``disk_dir`` (one file per hook, written atomically and memory-mapped back, so it costs page cache,
not resident memory). Each reduction happens inside the hook, before the next layer runs: the full
activation is never kept. Vision-tower hooks (whose axis is patches, not sequence positions) and group
statistics without a position axis (``hook_region``, ``hook_colsum``, ``hook_rows``) are stored whole, with the
same dtype / device / disk treatment.

The returned :class:`ReducedActivationCache` is TransformerLens's ``ActivationCache``: linear methods
(``stack_activation``, ``decompose_resid``, ``accumulated_resid``, ``stack_head_results``, ...) work on reduced
caches, and their ``pos_slice`` indexes the kept positions / groups. Layer-norm-applying methods
(``apply_ln=True``, ``logit_attrs``, ``apply_ln_to_stack``) raise :class:`CacheReductionError` on group-reduced
caches: the mean of normalised vectors is not the normalised mean.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_vlm.atomic_files import atomic_output
from hooked_vlm.hook_management import _POSITION_DIM, HookedActivationCache, expand_hook_names

REDUCE_OPS = ("mean", "sum")


class CacheReductionError(ValueError):
    """A reduction that does not fit the run, or a cache method that a reduced cache cannot answer."""


@dataclass(frozen=True, eq=False)
class CacheReduction:
    """What ``run_with_cache`` keeps of each cached activation (see the module docstring)."""

    positions: Int[Tensor, "*batch n_kept"] | Sequence[int] | None = None
    group_ids: Int[Tensor, "batch pos"] | None = None
    reduce: str = "mean"
    dtype: torch.dtype | None = None
    device: str | torch.device | None = None
    disk_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if self.positions is not None and self.group_ids is not None:
            raise CacheReductionError(
                "CacheReduction takes positions or group_ids, not both; to keep some groups only, set the other "
                "positions' group id to -1"
            )
        if self.reduce not in REDUCE_OPS:
            raise CacheReductionError(f"CacheReduction.reduce must be one of {REDUCE_OPS}, got {self.reduce!r}")
        g = self.group_ids
        if g is not None and (not isinstance(g, Tensor) or g.ndim != 2 or g.dtype.is_floating_point or g.dtype == torch.bool):
            raise CacheReductionError(
                "CacheReduction.group_ids must be an integer tensor [B, L] (e.g. model.layout(**inputs).group_ids('frame')), "
                f"got {type(g).__name__} {getattr(g, 'dtype', '')} {tuple(getattr(g, 'shape', ()))}"
            )
        p = self.positions
        if isinstance(p, Tensor) and (p.ndim not in (1, 2) or p.dtype.is_floating_point or p.dtype == torch.bool):
            raise CacheReductionError(
                "CacheReduction.positions must be integer indices [P] or [B, P] (for a boolean selection use "
                f"mask.nonzero() per row, or group_ids); got {p.dtype} {tuple(p.shape)}"
            )

    @property
    def by_group(self) -> bool:
        return self.group_ids is not None

    def reduces_positions(self, name: str, act: Tensor) -> bool:
        """Whether this hook's activation has a language-model position axis that the reduction applies to."""
        dim = position_dim(name)
        return (self.positions is not None or self.group_ids is not None) and dim is not None and act.dim() > dim

    def apply(self, name: str, act: Tensor) -> Tensor:
        """The reduced, cast and moved (not yet stored) copy of one hook's activation."""
        act = act.detach()
        if self.reduces_positions(name, act):
            dim = position_dim(name)
            assert dim is not None
            act = self._select(name, act, dim) if self.positions is not None else self._group(name, act, dim)
        if self.dtype is not None:
            act = act.to(self.dtype)
        if self.device is not None:
            act = act.to(self.device)
        return act

    def _select(self, name: str, act: Tensor, dim: int) -> Tensor:
        pos = torch.as_tensor(self.positions, dtype=torch.long, device=act.device)
        n = act.shape[dim]
        if pos.numel() and (int(pos.max()) >= n or int(pos.min()) < -n):
            raise CacheReductionError(
                f"CacheReduction.positions holds {int(pos.max()) if int(pos.max()) >= n else int(pos.min())} but {name} "
                f"has {n} positions (final_positions or a decoding step shortens the last blocks)"
            )
        pos = pos % n
        if pos.ndim == 1:
            return act.index_select(dim, pos)
        if pos.shape[0] != act.shape[0]:
            raise CacheReductionError(f"CacheReduction.positions is [B, P] with B={pos.shape[0]}, but {name} has batch {act.shape[0]}")
        moved = act.movedim(dim, 1)
        idx = pos.view(*pos.shape, *([1] * (moved.dim() - 2))).expand(-1, -1, *moved.shape[2:])
        return moved.gather(1, idx).movedim(1, dim)

    def _group(self, name: str, act: Tensor, dim: int) -> Tensor:
        ids = self.group_ids.to(act.device)
        if ids.shape[0] not in (1, act.shape[0]) or ids.shape[1] != act.shape[dim]:
            raise CacheReductionError(
                f"CacheReduction.group_ids is {tuple(ids.shape)} but {name} has batch {act.shape[0]} and "
                f"{act.shape[dim]} positions; build the ids from this run's layout (model.layout(**inputs)), and drop "
                "final_positions when reducing per group"
            )
        ids, labels = row_slots(ids.expand(act.shape[0], -1))
        n_groups = labels.shape[1]
        moved = act.movedim(dim, 1)
        acc_dtype = torch.promote_types(act.dtype, torch.float32)
        total = torch.zeros(moved.shape[0], n_groups, *moved.shape[2:], dtype=acc_dtype, device=act.device)
        counts = torch.zeros(moved.shape[0], n_groups, dtype=acc_dtype, device=act.device)
        for b in range(moved.shape[0]):
            keep = ids[b] >= 0
            total[b].index_add_(0, ids[b][keep], moved[b][keep].to(acc_dtype))
            counts[b].index_add_(0, ids[b][keep], torch.ones(int(keep.sum()), dtype=acc_dtype, device=act.device))
        if self.reduce == "mean":  # a slot a row does not fill has no mean: NaN, as numpy's mean of nothing
            total = total / counts.view(*counts.shape, *([1] * (total.dim() - 2)))
        return total.to(act.dtype).movedim(1, dim)


def row_slots(group_ids: Int[Tensor, "batch pos"]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch n_groups"]]:
    """Renumber each row's groups 0..n-1 in increasing id order: ``(slot per position, -1 = dropped; id per slot,
    -1 = a slot this row does not fill)``. Layout ids are global across the batch (row 1's frames may be 3, 4,
    5); slots make the stored axis per row, with ``labels`` saying which id each slot holds."""
    per_row = [torch.unique(row[row >= 0], return_inverse=True) for row in group_ids]
    n = max((len(u) for u, _ in per_row), default=0)
    slots = torch.full_like(group_ids, -1)
    labels = torch.full((group_ids.shape[0], n), -1, dtype=group_ids.dtype, device=group_ids.device)
    for b, (uniq, inv) in enumerate(per_row):
        slots[b, group_ids[b] >= 0] = inv
        labels[b, : len(uniq)] = uniq
    return slots, labels


def position_dim(name: str) -> int | None:
    """Axis of language-model positions in a batch-first activation (None: vision hook or no position axis)."""
    if name.startswith("vision."):
        return None
    return _POSITION_DIM.get(name.rsplit(".", 1)[-1], 1)


def _store_on_disk(directory: Path, name: str, tensor: Tensor) -> Tensor:
    """Write one hook's tensor atomically and return it memory-mapped from the file."""
    path = directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".pt")
    with atomic_output(path) as tmp:
        torch.save(tensor.contiguous(), tmp)
    return torch.load(path, mmap=True, weights_only=True)


class ReducedActivationCache(HookedActivationCache):
    """An ``ActivationCache`` whose activations were reduced at hook time; ``reduction`` says how."""

    def __init__(self, cache_dict: dict[str, Tensor], model: Any, reduction: CacheReduction, has_batch_dim: bool = True):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.reduction = reduction

    @property
    def group_labels(self) -> Int[Tensor, "batch n_groups"]:
        """Which group id each stored slot holds, per row (-1: a slot this row does not fill; its mean is NaN)."""
        if not self.reduction.by_group:
            raise CacheReductionError("group_labels exist only for caches reduced per group (CacheReduction(group_ids=...))")
        return row_slots(self.reduction.group_ids)[1]

    def apply_ln_to_stack(self, *args: Any, **kwargs: Any) -> Tensor:  # type: ignore[override]
        if self.reduction.by_group:
            raise CacheReductionError(
                f"this cache holds per-group {self.reduction.reduce}s: layer norm is not linear, so applying the cached "
                "scale to a group's mean is not the group's normalised mean. Use apply_ln=False, or cache the "
                "positions you need with CacheReduction(positions=...) instead of group_ids"
            )
        return super().apply_ln_to_stack(*args, **kwargs)


def run_with_reduced_cache(
    model: Any,
    *model_args: Any,
    names_filter: Callable[[str], bool] | str | Sequence[str] | None,
    reduction: CacheReduction,
    device: str | torch.device | None = None,
    remove_batch_dim: bool = False,
    **kwargs: Any,
) -> tuple[Any, ReducedActivationCache]:
    """Forward with hooks that reduce and store each cached activation as it is produced."""
    if not isinstance(reduction, CacheReduction):
        raise CacheReductionError(f"reduction must be a hooked_vlm.CacheReduction, got {type(reduction).__name__}")
    if kwargs.get("incl_bwd"):
        raise CacheReductionError("incl_bwd=True is not supported with a cache reduction; reduce gradients in your own bwd hooks")
    if device is not None and reduction.device is None:
        import dataclasses

        reduction = dataclasses.replace(reduction, device=device)
    available = list(model.hook_dict)
    if names_filter is None:
        names = available
    elif callable(names_filter):
        names = [n for n in available if names_filter(n)]
    else:
        names = expand_hook_names(names_filter, available)
    directory = None if reduction.disk_dir is None else Path(reduction.disk_dir)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    store: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            reduced = reduction.apply(name, act)
            store[name] = reduced if directory is None else _store_on_disk(directory, name, reduced)

        return hook

    with model.hooks(fwd_hooks=[(n, make_hook(n)) for n in names]):
        out = model(*model_args, **kwargs)
    cache = ReducedActivationCache(store, model, reduction)
    if remove_batch_dim:
        cache.remove_batch_dim()
    return out, cache

