"""Activation datasets and mean activation vectors, streamed over a dataset of inputs.

:func:`collect_activations` runs chosen hooks over ``(example_id, inputs)`` pairs, reduces each
activation per layout group (last token, mean over an image / a frame / a text run / a grid cell; groups
from :func:`analyses.positions.layout_groups`, never hard-coded counts) and writes sharded
``shard-NNNNN.safetensors`` files (one tensor per hook) with a ``shard-NNNNN.parquet`` row index
(``example_id, hook, group, n_tokens, row``) and a ``manifest.json``. A shard is written to a temporary
file and moved into place, then the manifest (also atomic) lists it; a killed run resumes from the
manifest, ignoring any shard it does not list, so no example is stored twice. Memory is bounded by
``shard_size`` examples.

Each shard also carries the float64 sum and token count of every ``(hook, group)``, so
:meth:`ActivationDataset.mean_vectors` gives exact token-weighted mean vectors whatever the number of
resumptions (:func:`mean_vectors` computes them in one pass without writing activations).
:class:`MeanVectors` turns them into mean-ablation edits for :mod:`analyses.variants` (the
:class:`~analyses.variants.Edit` the patching sweeps use) and :func:`mean_ablation_sweep` runs
the sweep: the base input with the mean vector written at a group's positions, per site x layer x group.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from analyses.positions import layout_groups
from hooked_vlm.atomic_files import atomic_write_json
from analyses.results_store import ConfigMismatchError

__all__ = [
    "collect_activations", "ActivationDataset", "MeanVectors", "mean_vectors",
    "example_groups", "mean_ablation_sweep",
]

GROUPINGS = ("last", "item", "frame", "cell", "text", "visual", "token")


def example_groups(layout: Any, by: Sequence[str], batch: int = 0) -> dict[str, list[int]]:
    """Named position groups of prompt ``batch`` for the groupings in ``by`` (see :data:`GROUPINGS`)."""
    unknown = [b for b in by if b not in GROUPINGS]
    if unknown:
        raise ValueError(f"unknown grouping(s) {unknown}; choose from {list(GROUPINGS)}")
    return layout_groups(layout, [b for b in by if b != "last"], batch=batch, include_last="last" in by)


def _vision_groups(layout: Any, batch: int, by: Sequence[str]) -> dict[str, tuple[list[int], list[int]]]:
    """Vision-tower (rows, patch indices) per image / video (``by`` item: every tower row of the item, e.g.
    all LLaVA-NeXT crops) or per temporal patch slice / video frame (``frame``), from ``layout.vision_rows``."""
    out: dict[str, tuple[list[int], list[int]]] = {}
    for it in layout.items:
        if it.batch != batch:
            continue
        kw = {it.kind: it.index}
        name = f"{it.kind}{it.index}"
        n_rows = int(getattr(it, "n_rows", 1) or 1)  # LLaVA: one tower row per crop / frame
        if n_rows > 1:
            parts = [(layout.vision_rows(**kw, frame=k) if it.kind == "video" else layout.vision_rows(**kw, crop=k)) for k in range(n_rows)]
        elif it.kind == "video":
            parts = [layout.vision_rows(**kw, frame=f) for f in range(it.grid_thw[0])]
        else:
            parts = [layout.vision_rows(**kw)]
        if "frame" in by and it.kind == "video":
            for f, (row, idx) in enumerate(parts):
                out[f"{name}/patchframe{f}"] = ([int(row)] * len(idx), idx.tolist())
        elif "item" in by or "frame" in by:
            out[name] = ([int(r) for r, idx in parts for _ in idx], [int(i) for _, idx in parts for i in idx])
    if not out:
        raise ValueError("vision-tower hooks are reduced per item ('item') or temporal patch slice ('frame'); "
                         f"got by={list(by)}, or the prompt has no images/videos")
    return out


def _as_examples(dataset: Iterable[Any]) -> Iterable[tuple[list[str], Mapping[str, Any]]]:
    """Normalise ``(id, inputs)`` / ``(ids, inputs)`` pairs; a batch of B prompts needs B ids."""
    for entry in dataset:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise TypeError("the dataset must yield (example_id, inputs) pairs (ids: str/int, or a list for a batch)")
        ids, inputs = entry
        ids = [str(i) for i in ids] if isinstance(ids, (list, tuple)) else [str(ids)]
        b = int(inputs["input_ids"].shape[0])
        if len(ids) != b:
            raise ValueError(f"{len(ids)} example id(s) for a batch of {b} prompts; give one id per prompt")
        yield ids, inputs


def _stream(
    model: Any, dataset: Iterable[Any], hooks: Sequence[str], by: Sequence[str], skip: set[str],
) -> Iterable[tuple[str, dict[str, dict[str, tuple[Tensor, Tensor, int]]]]]:
    """Per example: ``{hook: {group: (group mean, float64 sum, n_tokens)}}``."""
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise KeyError(f"model has no hook(s) {missing}; see model.hook_dict for valid names")
    seen: set[str] = set()
    for ids, inputs in _as_examples(dataset):
        todo = [i for i in ids if i not in skip]
        for i in ids:
            if i in seen:
                raise ValueError(f"example id {i!r} occurs twice in the dataset; ids must be unique")
            seen.add(i)
        if not todo:
            continue
        with torch.no_grad():
            _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n in set(hooks))
        lay = model.layout(**inputs)
        for b, ex in enumerate(ids):
            if ex in skip:
                continue
            out: dict[str, dict[str, tuple[Tensor, Tensor, int]]] = {}
            for h in hooks:
                act = cache[h]
                if h.startswith("vision."):
                    sel_of = {g: act[torch.as_tensor(r, device=act.device), torch.as_tensor(i, device=act.device)]
                              for g, (r, i) in _vision_groups(lay, b, by).items()}
                else:
                    sel_of = {g: act[b, torch.as_tensor(pos, dtype=torch.long, device=act.device)]
                              for g, pos in example_groups(lay, by, b).items()}
                out[h] = {}
                for g, sel in sel_of.items():
                    s = sel.double().sum(0).cpu()
                    out[h][g] = ((s / sel.shape[0]), s, int(sel.shape[0]))
            yield ex, out


# ----------------------------------------------------------------------------- mean vectors
@dataclass
class MeanVectors:
    """Token-weighted mean activation per ``(hook, group)``, accumulated exactly in float64.

    ``mean(hook, group)`` = sum of the activations at the group's positions over every example / number
    of such positions. Groups are layout group names (``"image0"``, ``"text1"``, ``"last"``,
    ``"image0/r1c2"``, ...), so one mean per token type or grid cell.
    """

    sums: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, hook: str, group: str, total: Tensor, n: int) -> None:
        key = (hook, group)
        t = total.double()
        self.sums[key] = self.sums[key] + t if key in self.sums else t.clone()
        self.counts[key] += int(n)

    def merge(self, other: "MeanVectors") -> "MeanVectors":
        for (h, g), s in other.sums.items():
            self.add(h, g, s, other.counts[(h, g)])
        return self

    def mean(self, hook: str, group: str) -> Float[Tensor, "*shape"]:
        """The float64 mean vector of ``group`` at ``hook``."""
        key = (hook, group)
        if key not in self.sums:
            have = sorted({g for h, g in self.sums if h == hook})
            raise KeyError(f"no mean for hook {hook!r}, group {group!r}; groups at this hook: {have}")
        return self.sums[key] / self.counts[key]

    def groups(self, hook: str) -> list[str]:
        return sorted(g for h, g in self.sums if h == hook)

    def frame(self) -> pd.DataFrame:
        """One row per (hook, group): token count and vector norm."""
        return pd.DataFrame([{"hook": h, "group": g, "n_tokens": self.counts[(h, g)], "norm": float(self.mean(h, g).norm())}
                             for h, g in sorted(self.sums)])

    def save(self, path: str | os.PathLike) -> Path:
        """Write sums (float64) and counts to one safetensors file."""
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        for i, (h, g) in enumerate(sorted(self.sums)):
            tensors[f"sum{i}"] = self.sums[(h, g)].contiguous()
            meta[f"key{i}"] = json.dumps([h, g, self.counts[(h, g)]])
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MeanVectors":
        from safetensors import safe_open

        out = cls()
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            for k, v in meta.items():
                if k.startswith("key"):
                    h, g, n = json.loads(v)
                    out.add(h, g, f.get_tensor("sum" + k[3:]), n)
        return out

    def ablation_edit(self, hook: str, group: str, positions: Sequence[int], like: Tensor, pos_axis: int = 1) -> Any:
        """An :class:`analyses.variants.Edit` replacing ``positions`` of ``hook`` by the group's mean
        (``like``: the base run's activation, for shape, dtype and device)."""
        from analyses.variants import Edit

        mean = self.mean(hook, group).to(like.dtype).to(like.device)
        shape = [1] * like.dim()
        rest = like.shape[pos_axis + 1 :]
        if tuple(mean.shape) != tuple(rest):
            raise ValueError(f"mean of {hook!r}/{group!r} has shape {tuple(mean.shape)}, the activation's per-position shape is {tuple(rest)}")
        shape[pos_axis + 1 :] = rest
        value = mean.reshape(shape).expand_as(like)
        return Edit(hook, value, positions=torch.as_tensor(list(positions), dtype=torch.long), pos_axis=pos_axis)

    def ablation_hook(self, group: str, positions: Sequence[int]) -> Callable[[Tensor, Any], Tensor]:
        """A forward hook for ``run_with_hooks`` writing the group's mean at ``positions`` (every batch row)."""
        pos = torch.as_tensor(list(positions), dtype=torch.long)

        def hook(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            act[:, pos.to(act.device)] = self.mean(hook.name, group).to(act.dtype).to(act.device)
            return act

        return hook


def mean_vectors(model: Any, dataset: Iterable[Any], hooks: Sequence[str], by: Sequence[str] = ("item", "text", "last"),
                 progress: bool = True, total: int | None = None) -> MeanVectors:
    """Mean vectors per hook and group in one streaming pass (no activations kept or written)."""
    mv = MeanVectors()
    for _, per_hook in tqdm(_stream(model, dataset, hooks, by, set()), desc="mean vectors", disable=not progress, total=total, leave=False):
        for h, groups in per_hook.items():
            for g, (_, s, n) in groups.items():
                mv.add(h, g, s, n)
    return mv


# ----------------------------------------------------------------------------- the dataset on disk
class ActivationDataset:
    """A folder written by :func:`collect_activations`: ``manifest.json`` + shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise FileNotFoundError(f"{mf} does not exist: not an activation dataset (write one with collect_activations)")
        self.manifest = json.loads(mf.read_text())

    @property
    def example_ids(self) -> list[str]:
        return [e for s in self.manifest["shards"] for e in s["examples"]]

    def index(self) -> pd.DataFrame:
        """Every stored row: ``shard, example_id, hook, group, n_tokens, row``."""
        parts = [pd.read_parquet(self.path / s["index"]).assign(shard=s["file"]) for s in self.manifest["shards"]]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["example_id", "hook", "group", "n_tokens", "row", "shard"])

    def load(self, hook: str, groups: Sequence[str] | None = None) -> tuple[Tensor, pd.DataFrame]:
        """``(X [rows, *shape], index)`` of one hook (optionally some groups), in storage order."""
        from safetensors import safe_open

        xs, idx = [], []
        for s in self.manifest["shards"]:
            ix = pd.read_parquet(self.path / s["index"])
            ix = ix[(ix["hook"] == hook) & (ix["group"].isin(groups) if groups is not None else True)]
            if ix.empty:
                continue
            with safe_open(str(self.path / s["file"]), "pt") as f:
                xs.append(f.get_tensor(f"act::{hook}")[torch.tensor(ix["row"].to_numpy(), dtype=torch.long)])
            idx.append(ix.assign(shard=s["file"]))
        if not xs:
            raise KeyError(f"no rows for hook {hook!r}" + (f" and groups {list(groups)}" if groups else "") +
                           f"; hooks stored: {self.manifest['config']['hooks']}")
        return torch.cat(xs), pd.concat(idx, ignore_index=True)

    def mean_vectors(self) -> MeanVectors:
        """Exact float64 token-weighted means from the per-shard sums (independent of resumptions)."""
        from safetensors import safe_open

        mv = MeanVectors()
        for s in self.manifest["shards"]:
            with safe_open(str(self.path / s["file"]), "pt") as f:
                meta = f.metadata() or {}
                for k, v in meta.items():
                    if k.startswith("mean"):
                        h, g, n = json.loads(v)
                        mv.add(h, g, f.get_tensor("sum::" + k[4:]), n)
        return mv


def collect_activations(
    model: Any, dataset: Iterable[Any], hooks: Sequence[str], out_dir: str | os.PathLike,
    by: Sequence[str] = ("item", "text", "last"), shard_size: int = 256, dtype: torch.dtype = torch.float32,
    progress: bool = True, total: int | None = None, overwrite: bool = False,
) -> ActivationDataset:
    """Stream ``hooks`` over ``dataset`` (``(example_id, inputs)`` pairs) into sharded files; resumable.

    Args:
        by: layout groupings, each activation reduced per group (:data:`GROUPINGS`). Vision-tower hooks
            (``vision.*``) are reduced per image / video (``"item"``: every tower row of it, e.g. all
            LLaVA-NeXT crops) or per temporal patch slice / video frame (``"frame"``).
        shard_size: examples per shard: the most activations held in memory at once.
        dtype: storage dtype of the reduced activations (the mean-vector sums are always float64).
        total: number of examples, for the progress bar.
        overwrite: start afresh; otherwise a folder with another configuration raises
            :class:`~analyses.results_store.ConfigMismatchError` and one with the same resumes.
    """
    from safetensors.torch import save_file

    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"hooks": list(hooks), "by": list(by), "dtype": str(dtype).replace("torch.", "")}
    mf = out / "manifest.json"
    manifest = {"config": config, "shards": []}
    if mf.exists() and not overwrite:
        old = json.loads(mf.read_text())
        if old["config"] != config:
            raise ConfigMismatchError(f"{out} holds an activation dataset with config {old['config']}, not {config}; "
                                      "use another folder or overwrite=True")
        manifest = old
    listed = {s["file"] for s in manifest["shards"]} | {s["index"] for s in manifest["shards"]}
    for f in out.iterdir():  # shards of a killed run that the manifest never listed, and temporaries
        if f.name != "manifest.json" and f.name not in listed and (f.name.startswith("shard-") or f.suffix == ".tmp"):
            f.unlink()
    atomic_write_json(mf, manifest, indent=1, sort_keys=False)
    done = {e for s in manifest["shards"] for e in s["examples"]}

    buf: dict[str, list[Tensor]] = defaultdict(list)
    rows: list[dict[str, Any]] = []
    sums = MeanVectors()
    examples: list[str] = []

    def flush() -> None:
        if not examples:
            return
        n = len(manifest["shards"])
        name, iname = f"shard-{n:05d}.safetensors", f"shard-{n:05d}.parquet"
        tensors = {f"act::{h}": torch.stack(v).contiguous() for h, v in buf.items()}
        meta = {}
        for i, (h, g) in enumerate(sorted(sums.sums)):
            tensors[f"sum::{i}"] = sums.sums[(h, g)].contiguous()
            meta[f"mean{i}"] = json.dumps([h, g, sums.counts[(h, g)]])
        save_file(tensors, str(out / (name + ".tmp")), metadata=meta)
        os.replace(out / (name + ".tmp"), out / name)
        pd.DataFrame(rows).to_parquet(out / (iname + ".tmp"), index=False)
        os.replace(out / (iname + ".tmp"), out / iname)
        manifest["shards"].append({"file": name, "index": iname, "examples": list(examples), "rows": len(rows)})
        atomic_write_json(mf, manifest, indent=1, sort_keys=False)
        buf.clear()
        rows.clear()
        examples.clear()
        sums.sums.clear()
        sums.counts.clear()

    bar = tqdm(total=total, initial=len(done), desc="activations", disable=not progress, leave=False)
    try:
        for ex, per_hook in _stream(model, dataset, hooks, by, done):
            for h, groups in per_hook.items():
                for g, (m, s, n) in groups.items():
                    rows.append({"example_id": ex, "hook": h, "group": g, "n_tokens": n, "row": len(buf[h])})
                    buf[h].append(m.to(dtype))
                    sums.add(h, g, s, n)
            examples.append(ex)
            bar.update(1)
            if len(examples) >= shard_size:
                flush()
        flush()
    finally:
        bar.close()
    return ActivationDataset(out)


# ----------------------------------------------------------------------------- mean ablation
def mean_ablation_sweep(
    model: Any, inputs: Mapping[str, Any], metric: Callable[[Tensor], Tensor], means: MeanVectors,
    positions: Mapping[str, Sequence[int]], sites: Sequence[str] = ("resid_pre",), layers: Sequence[int] | None = None,
    mean_group: Mapping[str, str] | None = None, batch_size: int = 16, progress: bool = True,
) -> pd.DataFrame:
    """Mean-ablate each (site, layer, group): the group's positions get the dataset mean of that group.

    ``positions``: ``{group: positions}`` of this input (e.g. ``example_groups(model.layout(**inputs), by)``);
    the mean used is ``means.mean(hook, mean_group.get(group, group))``. Runs on
    :class:`~analyses.variants.VariantRunner` (batched, vision tower run once). One row per cell:
    ``site, layer, group, mean_group, value, clean_value, effect`` (= value - clean).
    """
    from analyses.metrics import as_metric
    from analyses.patching import default_plan
    from analyses.sites import available_layers, get_site
    from analyses.variants import VariantRunner

    metric = as_metric(metric)
    mean_group = dict(mean_group or {})
    site_objs = [get_site(s) for s in sites]
    runner = VariantRunner(model, inputs, batch_size, plan=default_plan(model))
    clean_value = float(metric(runner.base_logits()).float().mean())
    names = {s.hook_name(l) for s in site_objs for l in available_layers(model.hook_dict, s)}
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n in names)
    cells, variants = [], []
    for s in site_objs:
        ls = available_layers(model.hook_dict, s)
        for l in ls if layers is None else [l for l in layers if l in ls]:
            hook = s.hook_name(l)
            for g, pos in positions.items():
                mg = mean_group.get(g, g)
                variants.append([means.ablation_edit(hook, mg, pos, cache[hook], s.pos_axis)])
                cells.append({"site": s.name, "layer": l, "group": g, "mean_group": mg})
    values, _ = runner.run(variants, metric)
    frame = pd.DataFrame(cells)
    frame["value"] = values.float().mean(1).numpy() if values is not None else np.nan
    frame["clean_value"] = clean_value
    frame["effect"] = frame["value"] - clean_value
    return frame
