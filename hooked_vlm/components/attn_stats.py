"""What a run asks of the attention layers besides their output: statistics and knockouts.

Two independent context managers attach per-run state to the attention layers of one tower and restore the
previous state on exit (they nest and compose):

* :func:`attn_stats_request` attaches an :class:`AttnStatsRequest`: the layers run the ``kernels`` statistics
  path and fire ``hook_lse`` / ``hook_region`` / ``hook_row_mass`` / ``hook_colsum`` / ``hook_rows``.
* :func:`knockout` (also ``HookedVLM.knockout``) removes attention edges by mask in chosen layers: the
  :class:`kernels.mask.Knockout` is added to each layer's ``MaskSpec``, so the output, every statistic and a
  cached pattern all see the same edit, without an L x L matrix.

The state lives on each layer as one :class:`AttnRun` (``attn.run``), created by the context and dropped when it
exits: nothing is kept process-wide.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor, nn

from kernels.mask import Knockout, MaskSpec

if TYPE_CHECKING:
    from hooked_vlm.components.attention import Attention


@dataclass
class AttnStatsRequest:
    """What one run asks of every attention layer it is attached to (shared by all of them).

    Ids are in the coordinates of the attended sequence: LM positions ``[B, L]`` for the language model
    (build them from the token layout: ``lay.group_ids("frame")``, ``"item"``, ``"cell"``, ``"visual"``,
    ``"kind"``, ``"last"``), patch rows ``[B, N]`` for the vision tower; ``-1`` = in no group.

    * ``key_group_ids`` -> ``hook_region [B, H, QG, KG]``: mass from each query group (``q_group_ids``; all
      queries when None) to each key group; with ``row_mass=True`` also ``hook_row_mass [B, H, Lq, KG]``.
    * ``colsum_q_group_ids`` / ``colsum_q_weights`` / ``colsum=True`` -> ``hook_colsum [B, H, QG, Lk]``:
      attention received per key from each query group (dense weights: one exact rollout step).
    * ``rows`` ``[B, S]`` query positions -> ``hook_rows [B, H, S, Lk]``: exact probability rows.
    * ``layers``: the layers that compute statistics (None = all of the tower).
    * ``knockout`` / ``knockout_layers``: a knockout riding on the request (kept for compatibility; prefer the
      separate :func:`knockout` context). ``knockout_layers`` None = the same layers as ``layers``.
    * ``backend``: ``"triton"``, ``"torch"`` or ``"naive"`` (None = automatic, see ``kernels.resolve_backend``).

    ``hook_lse [B, H, Lq]`` fires in every layer that computes statistics.
    """

    key_group_ids: Tensor | None = None
    q_group_ids: Tensor | None = None
    colsum_q_group_ids: Tensor | None = None
    colsum_q_weights: Tensor | None = None
    colsum: bool = False
    rows: Tensor | None = None
    row_mass: bool = False
    layers: Sequence[int] | None = None
    knockout: Knockout | None = None
    knockout_layers: Sequence[int] | None = None
    backend: str | None = None


STAT_HOOKS = ("hook_lse", "hook_region", "hook_row_mass", "hook_colsum", "hook_rows")


@dataclass
class AttnRun:
    """One attention layer's per-run state: the statistics it computes (or None) and the knockout it applies
    (or None). ``masks`` holds the knocked-out MaskSpec derived per base mask, shared by every layer of the run
    (kernel caches key on the MaskSpec object)."""

    stats: AttnStatsRequest | None = None
    knockout: Knockout | None = None
    masks: dict[int, tuple[MaskSpec, MaskSpec]] = field(default_factory=dict, repr=False)

    def mask(self, base: MaskSpec) -> MaskSpec:
        """``base`` with this run's knockout added (``base`` itself without one)."""
        if self.knockout is None:
            return base
        hit = self.masks.get(id(base))
        if hit is not None and hit[0] is base:
            return hit[1]
        spec = with_knockout(base, self.knockout)
        self.masks[id(base)] = (base, spec)
        return spec


def with_knockout(mask: MaskSpec, knockout: Knockout) -> MaskSpec:
    """``mask`` with ``knockout`` added."""
    if mask.knockout is not None and mask.knockout is not knockout:
        raise ValueError("this attention call's MaskSpec already carries a knockout; merge both into one Knockout table")
    return mask if mask.knockout is knockout else dataclasses.replace(mask, knockout=knockout)


def tower_attentions(model: nn.Module, tower: str) -> list["Attention"]:
    """The attention layers of ``tower`` (``"lm"``: ``model.blocks``; ``"vision"``: ``model.vision.blocks``)."""
    if tower == "lm":
        return [blk.attn for blk in model.blocks]
    if tower == "vision":
        vision = getattr(model, "vision", None)
        if vision is None or not hasattr(vision, "blocks"):
            raise ValueError(f"{type(model).__name__} has no vision tower with blocks")
        return [blk.attn for blk in vision.blocks]
    raise ValueError(f"tower must be 'lm' or 'vision', got {tower!r}")


def _checked_layers(attns: list, layers: Sequence[int] | None, tower: str) -> set[int]:
    n = len(attns)
    chosen = set(range(n)) if layers is None else set(layers)
    bad = sorted(i for i in chosen if not 0 <= i < n)
    if bad:
        raise ValueError(f"layers {bad} do not exist: the {tower} tower has {n} attention layers (0..{n - 1})")
    return chosen


@contextmanager
def _attached(attns: list, update: dict[int, dict]) -> Iterator[None]:
    """Give layer i a new :class:`AttnRun` = its current one with ``update[i]`` applied; restore on exit."""
    saved = [a.run for a in attns]
    shared: dict[tuple[int, int], AttnRun] = {}  # one AttnRun per (stats, knockout): layers share derived masks
    try:
        for i, changes in update.items():
            base = attns[i].run or AttnRun()
            stats, ko = changes.get("stats", base.stats), changes.get("knockout", base.knockout)
            attns[i].run = shared.setdefault((id(stats), id(ko)), AttnRun(stats=stats, knockout=ko))
        yield
    finally:
        for a, run in zip(attns, saved):
            a.run = run


@contextmanager
def attn_stats_request(model: nn.Module, request: AttnStatsRequest, tower: str = "lm") -> Iterator[AttnStatsRequest]:
    """Attach ``request`` to the attention layers of one tower (``"lm"`` or ``"vision"``) for the enclosed runs.

    Example::

        lay = model.layout(**inputs)
        req = AttnStatsRequest(key_group_ids=lay.group_ids("frame"), q_group_ids=lay.group_ids("last"),
                               colsum_q_group_ids=lay.group_ids("kind"), rows=lay.last_token()[:, None])
        with attn_stats_request(model, req):
            logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith(STAT_HOOKS))
        cache["blocks.3.attn.hook_region"]  # [B, H, 1, n_frames]
    """
    attns = tower_attentions(model, tower)
    layers = _checked_layers(attns, request.layers, tower)
    ko_layers: set[int] = set()
    if request.knockout is not None:
        ko_layers = layers if request.knockout_layers is None else _checked_layers(attns, request.knockout_layers, tower)
    update: dict[int, dict] = {i: {"stats": request} for i in layers}
    for i in ko_layers:
        update.setdefault(i, {})["knockout"] = request.knockout
    with _attached(attns, update):
        yield request


@contextmanager
def knockout(model: nn.Module, knockout: Knockout, layers: Sequence[int] | None = None, tower: str = "lm") -> Iterator[Knockout]:
    """Remove the attention edges of ``knockout`` in ``layers`` (None = all) of ``tower`` for the enclosed runs.

    Example (the last token no longer sees image 0 in blocks 2..3)::

        lay = model.layout(**inputs)
        q, k = lay.group_ids("last"), torch.where(lay.item == 0, 0, -1)
        with model.knockout(Knockout(q, k, torch.ones(1, 1, dtype=torch.bool)), layers=[2, 3]):
            logits = model(**inputs)
    """
    attns = tower_attentions(model, tower)
    with _attached(attns, {i: {"knockout": knockout} for i in _checked_layers(attns, layers, tower)}):
        yield knockout


__all__ = ["AttnStatsRequest", "AttnRun", "STAT_HOOKS", "attn_stats_request", "knockout", "with_knockout", "tower_attentions"]
