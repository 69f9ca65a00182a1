"""Activation patching sweeps: sites x layers x (heads x) position groups, batched and resumable.

For every cell -- a site (``resid_pre``, ``attn_out``, ``z``, ``vision.resid_post``, ...), a layer, a
head where the site has heads, and a group of positions -- run the *base* input with that activation
replaced by the *source* run's activation, and record the metric. ``direction="denoise"`` (default)
patches clean activations into the corrupted run (how much does this site restore the clean
behaviour?); ``"noise"`` patches corrupted activations into the clean run (how much does breaking it
hurt?). Both report ``recovery = (patched - corrupt) / (clean - corrupt)``.

What is different from TransformerLens's ``patching`` module:

* inputs are the full multimodal keyword tensors, so corrupted runs keep their images and videos;
* many cells share one batched forward (:class:`~analyses.variants.VariantRunner`), and when only
  language-model sites are patched the vision tower's output is computed once and reused (via a
  model-provided forward plan);
* grouped-query attention is honest: ``k``/``v`` cells exist only for real key/value heads;
* finished cells are written to disk as they go and a rerun resumes (``store=``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vlm.cache_reduction import position_dim

from .metrics import as_metric, normalized_recovery
from .results_store import CellStore
from .sites import Site, available_layers, get_site
from .sweep import SweepOptions, default_plan, fingerprint_inputs, fingerprint_model, open_store, reduced_cache_run, run_cells, seq_len_of  # noqa: F401
from .variants import Edit, ForwardPlan, VariantRunner, VisionReusePlan, input_schema_of, is_hooked_vlm  # noqa: F401

__all__ = [
    "activation_patching",
    "PatchingResult",
    "LayoutMismatchError",
    "check_compatible_inputs",
    "resolve_groups",
    "default_plan",
    "KEY_COLUMNS",
]

KEY_COLUMNS = ("site", "layer", "head", "group")
PositionsArg = str | Sequence[int] | Mapping[str, Sequence[int]]


class LayoutMismatchError(ValueError):
    """Clean and corrupted inputs do not share a token layout, so positions cannot be matched."""


# ----------------------------------------------------------------------------- inputs
#: Inputs compared by shape / by value whatever the model (the family's own come from its input schema).
_GENERIC_SAME_VALUES = ("attention_mask", "position_ids")
_GENERIC_SAME_SHAPES = ("input_ids", "input", "tokens", "inputs_embeds")


def _same_shapes_and_values(model: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs that must match in shape, inputs that must match exactly), read from the model's input schema."""
    schema = input_schema_of(model)
    same_values = _GENERIC_SAME_VALUES + tuple(k for k in schema.must_match if k not in _GENERIC_SAME_VALUES)
    same_shapes = _GENERIC_SAME_SHAPES + tuple(k for k in schema.pixels if k not in _GENERIC_SAME_SHAPES)
    return same_shapes, same_values


def check_compatible_inputs(model: Any, clean: Mapping[str, Any], corrupt: Mapping[str, Any]) -> None:
    """Raise :class:`LayoutMismatchError` unless every position means the same thing in both inputs.

    Content may differ (other words, other pixels); the layout may not: same keys, same sequence
    length, same image/video grids, same token types and padding. When the model can describe its
    layout (``model.layout(**inputs)``), the two layouts must also agree position by position.
    """
    ka, kb = set(clean), set(corrupt)
    if ka != kb:
        raise LayoutMismatchError(
            f"clean and corrupted inputs have different keys: only clean {sorted(ka - kb)}, only corrupt "
            f"{sorted(kb - ka)}. Build both with the same processor call (same number of images/videos)."
        )
    same_shapes, same_values = _same_shapes_and_values(model)
    for k in same_shapes + same_values:
        a, b = clean.get(k), corrupt.get(k)
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape != b.shape:
            raise LayoutMismatchError(
                f"{k}: clean shape {tuple(a.shape)} != corrupt shape {tuple(b.shape)}. Patching by position "
                "needs identical layouts: the same text length (pad or re-word the prompt to the same "
                "token count) and the same image sizes / frame counts."
            )
    for k in same_values:
        a, b = clean.get(k), corrupt.get(k)
        if isinstance(a, Tensor) and isinstance(b, Tensor) and not torch.equal(a, b):
            raise LayoutMismatchError(
                f"{k} differs between clean and corrupted inputs, so the same position holds different "
                "kinds of tokens (or a different image grid / padding). Use images of the same size and "
                "prompts with the same token count."
            )
    layout_fn = getattr(model, "layout", None)
    if callable(layout_fn):
        try:
            la, lb = layout_fn(**clean), layout_fn(**corrupt)
        except (TypeError, NotImplementedError):
            return
        for field_name in ("kind", "item", "frame", "row", "col"):
            a, b = getattr(la, field_name, None), getattr(lb, field_name, None)
            if isinstance(a, Tensor) and isinstance(b, Tensor) and (a.shape != b.shape or not torch.equal(a, b)):
                where = (a != b).nonzero()[:3].tolist() if a.shape == b.shape else "shape"
                raise LayoutMismatchError(
                    f"the token layouts differ in {field_name!r} (first differing [batch, position]: {where}); "
                    "clean and corrupted inputs need the same kinds of tokens at the same positions, the same "
                    "images/frames and the same grid cells"
                )


def resolve_groups(positions: PositionsArg, length: int) -> dict[str, list[int]]:
    """Position groups as ``{name: [positions]}``.

    ``"each"`` -> every position alone (names ``"0"``, ``"1"``, ...); ``"all"`` -> one group with every
    position; a sequence of ints -> each of them alone; a mapping -> as given (e.g. from the token
    layout: per frame, per image, per grid cell, text spans). Negative positions count from the end.
    """
    if isinstance(positions, str):
        if positions == "each":
            return {str(i): [i] for i in range(length)}
        if positions == "all":
            return {"all": list(range(length))}
        raise ValueError(f"positions must be 'each', 'all', a list of positions or a mapping; got {positions!r}")
    def norm(p: Any) -> int:
        p = int(p)
        if not -length <= p < length:
            raise ValueError(f"position {p} is outside 0..{length - 1} (negative positions count from the end)")
        return p % length

    if isinstance(positions, Mapping):
        groups = {str(k): [norm(p) for p in torch.as_tensor(v).reshape(-1).tolist()] for k, v in positions.items()}
    else:
        groups = {str(norm(p)): [norm(p)] for p in torch.as_tensor(positions).reshape(-1).tolist()}
    for name, pos in groups.items():
        if not pos:
            raise ValueError(f"position group {name!r} is empty")
    return groups


# ----------------------------------------------------------------------------- results
@dataclass
class PatchingResult:
    """Cells of an activation-patching sweep.

    Attributes:
        frame: one row per cell: ``site, layer, head, group, n_positions, value, recovery`` (``layer``
            / ``head`` are <NA> where not applicable). ``value`` is the metric averaged over the base
            batch.
        clean_value / corrupt_value: the metric on the unpatched clean and corrupted runs.
        groups: the position groups in sweep order.
        metric: the metric's name.
    """

    frame: pd.DataFrame
    clean_value: float
    corrupt_value: float
    groups: dict[str, list[int]]
    metric: str
    group_order: dict[str, list[str]] = field(default_factory=dict)

    def array(self, site: str, column: str = "value") -> np.ndarray:
        """``[n_layers, n_groups]`` (or ``[n_layers, n_heads, n_groups]`` for head sites), NaN where absent.

        Layers and heads run from 0 to the largest present; a head missing from a layer (e.g. key/value
        heads under grouped-query attention beyond ``n_kv_heads``) is NaN, never 0.
        """
        f = self.frame[self.frame["site"] == site]
        if f.empty:
            raise KeyError(f"no cells for site {site!r}; sites present: {sorted(self.frame['site'].unique())}")
        names = self.group_order.get(site, list(self.groups))
        gi = {g: i for i, g in enumerate(names)}
        layers = f["layer"].fillna(0).astype(int)
        n_layers = int(layers.max()) + 1
        has_heads = f["head"].notna().any()
        if has_heads:
            heads = f["head"].astype(int)
            out = np.full((n_layers, int(heads.max()) + 1, len(names)), np.nan)
            for l, h, g, v in zip(layers, heads, f["group"], f[column]):
                out[l, h, gi[g]] = v
        else:
            out = np.full((n_layers, len(names)), np.nan)
            for l, g, v in zip(layers, f["group"], f[column]):
                out[l, gi[g]] = v
        return out

    def table(self, site: str, column: str = "value", head: int | None = None) -> pd.DataFrame:
        """Layers x groups as a DataFrame (one head of a head site via ``head``)."""
        f = self.frame[self.frame["site"] == site]
        if head is not None:
            f = f[f["head"] == head]
        t = f.pivot_table(index="layer", columns="group", values=column, dropna=False)
        names = self.group_order.get(site, list(self.groups))
        return t.reindex(columns=[g for g in names if g in t.columns])


# ----------------------------------------------------------------------------- the sweep
def activation_patching(
    model: Any,
    clean_inputs: Mapping[str, Any],
    corrupt_inputs: Mapping[str, Any],
    metric: Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, "batch"]],
    sites: Sequence[str | Site] = ("resid_pre",),
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: PositionsArg = "each",
    direction: Literal["denoise", "noise"] = "denoise",
    batch_size: int = 16,
    store: str | os.PathLike | CellStore | None = None,
    progress: bool = True,
    plan: Callable[[Mapping[str, Any], int], ForwardPlan] | None | Literal["auto"] = "auto",
    prefix_reuse: bool | Literal["auto"] = "auto",
    layer_skip: bool | Literal["auto"] = "auto",
    check_layout: bool = True,
    options: SweepOptions | None = None,
) -> PatchingResult:
    """Patch each (site, layer, head, position group) cell and record ``metric``.

    Args:
        model: a hooked model (``run_with_hooks``/``run_with_cache`` with keyword inputs, logits out).
        clean_inputs / corrupt_inputs: keyword tensors of the two runs (content may differ, layout may
            not; see :func:`check_compatible_inputs`). Any base batch size ``B`` works; values are
            averaged over it.
        metric: ``logits [B, L, V] -> [B]`` (see :mod:`analyses.metrics`; custom callables welcome).
        sites: short site names (:data:`analyses.sites.SITES`).
        layers: layers to sweep (default: every layer where the site's hook exists).
        heads: heads to sweep for head sites (default: all heads the activation has; heads that do not
            exist for a site -- e.g. ``k``/``v`` heads beyond the key/value heads -- are skipped).
        positions: ``"each"``, ``"all"``, a list of positions, or named groups (from the token layout);
            positions index the site's position axis (patches, in raster order, for vision sites).
        direction: ``"denoise"`` = clean into corrupted (default), ``"noise"`` = corrupted into clean.
        batch_size: cells per batched forward.
        store: a directory (or :class:`CellStore`) to write cells to as they finish and resume from.
        progress: show a tqdm bar.
        plan: how to batch the forward; ``"auto"`` runs the vision tower once and reuses its output
            (:func:`default_plan`) when only language-model sites are patched; None repeats everything.
        prefix_reuse: compute positions before the first patched position once (key/value cache)
            instead of once per variant; ``"auto"`` = when the model supports it exactly (causal LM).
            Cells are then evaluated in tiles of nearby positions so batches share long prefixes.
        layer_skip: run the blocks below a batch's lowest patched block once and expand to the
            variants there (base batch 1; ``"auto"`` = on for hooked_vlm models). Exact.
        options: a :class:`~analyses.sweep.SweepOptions` (how the sweep runs); when given it replaces
            ``batch_size`` / ``store`` / ``progress`` / ``plan`` / ``prefix_reuse`` (/ ``layer_skip``).
        check_layout: verify that the two inputs share a layout (disable only if you know they do).
    """
    opts = SweepOptions.resolve(options, batch_size=batch_size, store=store, progress=progress, plan=plan, prefix_reuse=prefix_reuse, layer_skip=layer_skip)
    batch_size, store, progress, plan, prefix_reuse, layer_skip = opts.batch_size, opts.store, opts.progress, opts.plan, opts.prefix_reuse, opts.layer_skip
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    if check_layout:
        check_compatible_inputs(model, clean_inputs, corrupt_inputs)
    metric = as_metric(metric)
    site_objs = [get_site(s) for s in sites]
    base_inputs, source_inputs = (
        (corrupt_inputs, clean_inputs) if direction == "denoise" else (clean_inputs, corrupt_inputs)
    )

    site_layers: dict[str, list[int | None]] = {}
    names: set[str] = set()
    for s in site_objs:
        ls: list[int | None]
        if s.has_layers:
            avail = available_layers(model.hook_dict, s)
            if not avail:
                raise KeyError(f"model has no hooks for site {s.name!r} ({s.template})")
            ls = list(avail if layers is None else [l for l in layers if l in avail])
            missing = [] if layers is None else [l for l in layers if l not in avail]
            if missing:
                raise ValueError(f"site {s.name!r} has no layers {missing}; available: {avail}")
        else:
            if s.template not in model.hook_dict:
                raise KeyError(f"model has no hook {s.template!r} for site {s.name!r}")
            ls = [None]
        site_layers[s.name] = ls
        names.update(s.hook_name(l) for l in ls)

    runner = opts.runner(model, base_inputs, metric)
    length = seq_len_of(source_inputs)
    # language-model sites: only the positions some group patches are cached (a long video's cache is then
    # the frame spans' vectors, not L x d per layer); vision sites keep their patch axis whole
    lm_groups = None if all(s.vision for s in site_objs) else _site_groups(positions, length, "sequence positions")
    kept = None
    if lm_groups is not None and is_hooked_vlm(model) and all(
        s.vision or position_dim(s.hook_name(l)) == s.pos_axis for s in site_objs for l in site_layers[s.name]
    ):
        kept = torch.tensor(sorted({p for pos in lm_groups.values() for p in pos}), dtype=torch.long)
    source_logits, source_cache = reduced_cache_run(model, source_inputs, lambda n: n in names, kept,
                                                    runner.last_logits_only)
    base_logits = runner.base_logits()
    clean_logits, corrupt_logits = (
        (source_logits, base_logits) if direction == "denoise" else (base_logits, source_logits)
    )
    clean_value = float(metric(clean_logits).float().mean())
    corrupt_value = float(metric(corrupt_logits).float().mean())

    cells: list[dict[str, Any]] = []
    group_order: dict[str, list[str]] = {}
    site_groups: dict[str, dict[str, list[int]]] = {}
    most_heads = 0  # the most heads any requested head site has
    for s in site_objs:
        if s.vision:
            first = source_cache[s.hook_name(site_layers[s.name][0])]
            groups = _site_groups(positions, first.shape[s.pos_axis], "vision patches")
        else:
            assert lm_groups is not None
            groups = lm_groups
        site_groups[s.name] = groups
        group_order[s.name] = list(groups)
        for l in site_layers[s.name]:
            act = source_cache[s.hook_name(l)]
            if s.head_axis is None:
                head_list: list[int | None] = [None]
            else:
                n_heads = act.shape[s.head_axis]
                most_heads = max(most_heads, n_heads)
                head_list = list(range(n_heads)) if heads is None else [h for h in heads if 0 <= h < n_heads]
            for h in head_list:
                for g in groups:
                    cells.append({"site": s.name, "layer": l, "head": h, "group": g})

    absent = [h for h in (heads or []) if not 0 <= h < most_heads]
    if absent and most_heads:
        raise ValueError(
            f"heads {absent} do not exist: the head sites {[s.name for s in site_objs if s.head_axis is not None]} "
            f"have at most {most_heads} heads (0..{most_heads - 1}); pass heads from that range or heads=None for all"
        )
    config = lambda: {  # noqa: E731 -- hashing inputs/model only when a store is used
        "analysis": "activation_patching",
        "sites": [s.name for s in site_objs],
        "layers": {k: v for k, v in site_layers.items()},
        "heads": None if heads is None else list(heads),
        "groups": site_groups,
        "direction": direction,
        "metric": metric.name,
        "clean_inputs": fingerprint_inputs(clean_inputs),
        "corrupt_inputs": fingerprint_inputs(corrupt_inputs),
        "model": fingerprint_model(model),
    }
    cell_store = open_store(store, config, KEY_COLUMNS)
    site_by_name = {s.name: s for s in site_objs}

    def source_edit(s: Site, name: str, pos: list[int], head: int | None) -> Edit:
        """Patch ``pos`` of ``name`` with the source run's values (read from the reduced cache when it is one)."""
        pos_t = torch.tensor(pos)
        value, compact = source_cache[name], False
        if kept is not None and not s.vision:
            value, compact = value.index_select(s.pos_axis, torch.searchsorted(kept, pos_t)), True
        return Edit(name, value, positions=pos_t, pos_axis=s.pos_axis,
                    heads=None if head is None else torch.tensor([head]), head_axis=s.head_axis, compact=compact)

    def evaluate(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        variants = []
        for c in batch:
            s = site_by_name[c["site"]]
            variants.append([source_edit(s, s.hook_name(c["layer"]), site_groups[s.name][c["group"]], c["head"])])
        values, _ = runner.run(variants, metric)
        assert values is not None
        out = []
        for c, v in zip(batch, values):
            val = float(v.mean())
            rec = dict(c)
            rec["n_positions"] = len(site_groups[c["site"]][c["group"]])
            rec["value"] = val
            rec["recovery"] = float(normalized_recovery(val, clean_value, corrupt_value))
            out.append(rec)
        return out

    frame = run_cells(cells, evaluate, cell_store, batch_size, progress, desc="activation patching",
                      order_key=_tile_order(cells, site_by_name, site_groups, batch_size,
                                            one_layer_tall=runner.packs_rows(metric))
                      if (runner.prefix_reuse or runner.layer_skip) else None)
    frame = _tidy(frame)
    return PatchingResult(frame, clean_value, corrupt_value, site_groups[site_objs[0].name], metric.name, group_order)


def _site_groups(positions: PositionsArg, length: int, what: str) -> dict[str, list[int]]:
    """:func:`resolve_groups` with the site kind named in the error (sequence positions / vision patches)."""
    try:
        return resolve_groups(positions, length)
    except ValueError as e:
        raise ValueError(
            f"the sweep has {length} {what}: {e}. Sweep language-model and vision-tower sites in separate calls "
            "when passing explicit positions."
        ) from None


def _tile_order(
    cells: Sequence[dict[str, Any]],
    site_by_name: Mapping[str, Site],
    site_groups: Mapping[str, Mapping[str, list[int]]],
    batch_size: int,
    one_layer_tall: bool = False,
) -> Callable[[dict[str, Any]], tuple]:
    """Evaluation order that makes batches cheap: tiles of a few layers x nearby positions.

    A batch costs about (layers from its lowest edited layer up) x (positions from its first edited
    position on) x rows, because layers below the lowest one run once (layer skip) and positions before
    the first one come from the cache (prefix reuse). Tiles about a quarter of the layers tall and as
    many positions wide as fill a batch keep both factors small. When the runner packs ragged rows
    (``one_layer_tall``: each row computes from its own position) positions cost nothing extra, so tiles are
    one layer tall. Vision-tower cells come last.
    """
    layers = sorted({c["layer"] for c in cells if c["layer"] is not None})
    ranks: dict[tuple[str, str], int] = {}
    for name, groups in site_groups.items():
        order = sorted(groups, key=lambda g: min(groups[g]))
        ranks.update({(name, g): i for i, g in enumerate(order)})
    n_groups = max(1, len({(c["site"], c["group"]) for c in cells}) // max(1, len(site_groups)))
    per_layer_group = max(1.0, len(cells) / max(1, len(layers)) / n_groups)
    tall = 1 if one_layer_tall else max(1, round(len(layers) / 4))
    wide = max(1, round(batch_size / (per_layer_group * tall)))

    def key(c: dict[str, Any]) -> tuple:
        vision = site_by_name[c["site"]].vision
        rank = ranks[(c["site"], c["group"])]
        layer = -1 if c["layer"] is None else c["layer"]
        return (vision, rank // wide, layer // tall, rank, layer, c["site"], -1 if c["head"] is None else c["head"])

    return key


def _tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Nullable integer layer/head columns and string group names, whatever the storage format did."""
    frame = frame.copy()
    for col in ("layer", "head"):
        if col in frame:
            frame[col] = pd.array([None if pd.isna(v) else int(v) for v in frame[col]], dtype="Int64")
    if "group" in frame:
        frame["group"] = frame["group"].astype(str)
    return frame
