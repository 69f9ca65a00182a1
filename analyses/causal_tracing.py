"""Causal tracing (ROME's recipe) adapted to images: noise a token group, restore clean states.

1. **Corrupt**: add Gaussian noise to the embeddings entering the language model (``hook_embed``) at
   chosen positions -- an image region's visual tokens, a text subject -- or to the pixels of a region
   (``pixel_rows``), whose effect reaches the LM through the vision tower. ``n_samples`` noise draws
   come from a seeded ``torch.Generator``.
2. **Restore**: in each corrupted run, put back the clean value of one state -- the residual stream
   entering layer ``l`` (``kind="resid"``), or the MLP / attention outputs of a window of layers
   around ``l`` (``"mlp"`` / ``"attn"``, window centred on ``l`` as in ROME) -- at one position group.
3. **Read out** the metric (ROME: p(answer)); the *indirect effect* of a state is
   ``metric(restored) - metric(corrupted)`` per noise sample, reported with its mean and a Student-t
   confidence interval over samples. The *total effect* is ``metric(clean) - metric(corrupted)``.

**Noise scale (default)**: ``noise_scale * std``, where ``std`` is the standard deviation of all
entries of the clean embeddings at the noised positions (for pixels: of the noised pixel rows) and
``noise_scale = 3.0``. ROME used 3x the std of subject-token embeddings over a corpus; computing it on
the noised tokens themselves calibrates the noise to visual features, whose scale differs from text
embeddings. Pass ``noise_std`` to fix the absolute std instead.

**Severed paths** (``severed="mlp"`` or ``"attn"``): when restoring the residual at layer ``l``, the
MLP (attention) outputs of layers ``>= l`` at the restored positions are held at their values in the
corrupted run of the same noise sample, so the restored state cannot act through that sublayer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from .metrics import as_metric
from .patching import PositionsArg, resolve_groups
from .results_store import CellStore
from .sites import available_layers, get_site
from .sweep import SweepOptions, fingerprint_inputs, fingerprint_model, open_store, reduced_cache_run, run_cells, seq_len_of
from .variants import Edit, ForwardPlan, expand_inputs, is_hooked_vlm

__all__ = ["causal_trace", "TracingResult", "TRACE_KEYS", "t_interval"]

TRACE_KEYS = ("kind", "layer", "group")
_KIND_SITE = {"resid": "resid_pre", "mlp": "mlp_out", "attn": "attn_out"}


@torch.no_grad()
def _pixel_noise_edits(
    model: Any, inputs: Mapping[str, Any], pixel_key: str, rows: Tensor, std: float, n_samples: int,
    gen: torch.Generator, embed: str,
) -> list[Edit]:
    """Per draw, the vision tower's features on the noisy pixels written into the visual positions of
    ``hook_embed`` (a compact edit: the visual positions only, one draw's tower run at a time), instead of a
    forward of all draws at once with every position's embedding kept. The draws are those of the batched path."""
    pix = inputs[pixel_key]
    visual = (model.layout(**inputs).item[0] >= 0).nonzero().flatten()
    draws = [torch.randn(pix[rows].shape, generator=gen, dtype=torch.float32) * std for _ in range(n_samples)]
    edits = []
    for draw in draws:
        p = pix.clone()
        p[rows] = p[rows] + draw.to(p.dtype)
        feats = model.encode_vision(**{**inputs, pixel_key: p})  # [1, n visual tokens, d] = vision.hook_out
        edits.append(Edit(embed, feats[:, : visual.numel()], positions=visual, compact=True))
    return edits


def t_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, standard error, low, high) of a Student-t interval; NaN bounds for fewer than 2 samples."""
    x = np.asarray(samples, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sem = float(stats.sem(x))
    if sem == 0.0:
        return mean, 0.0, mean, mean
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=sem)
    return mean, sem, float(low), float(high)


@dataclass
class TracingResult:
    """Indirect effects per (kind, layer, group).

    Attributes:
        frame: ``kind, layer, group, value, indirect_effect, ie_sem, ie_low, ie_high, samples`` (per-sample
            restored metric as a JSON list).
        clean_value: metric without noise; corrupt_samples: metric of each noised run (``[S]``).
        total_effect / te_low / te_high: clean - corrupted, with its CI over samples.
        noise_std: the absolute noise std used.
    """

    frame: pd.DataFrame
    clean_value: float
    corrupt_samples: np.ndarray
    total_effect: float
    te_low: float
    te_high: float
    noise_std: float
    groups: dict[str, list[int]]

    @property
    def corrupt_value(self) -> float:
        return float(np.mean(self.corrupt_samples))

    def array(self, kind: str, column: str = "indirect_effect") -> np.ndarray:
        """``[n_layers, n_groups]`` of ``column`` for one kind (groups in sweep order)."""
        f = self.frame[self.frame["kind"] == kind]
        names = list(self.groups)
        out = np.full((int(f["layer"].max()) + 1, len(names)), np.nan)
        gi = {g: i for i, g in enumerate(names)}
        for l, g, v in zip(f["layer"], f["group"].astype(str), f[column]):
            out[int(l), gi[g]] = v
        return out


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    lo = max(0, layer - window // 2)
    hi = min(n_layers, layer - (-window // 2))
    return list(range(lo, hi))


@torch.no_grad()
def causal_trace(
    model: Any,
    inputs: Mapping[str, Any],
    metric: Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, "batch"]],
    noise_positions: Sequence[int] | Tensor | None = None,
    restore_positions: PositionsArg = "each",
    kinds: Sequence[Literal["resid", "mlp", "attn"]] = ("resid", "mlp", "attn"),
    layers: Sequence[int] | None = None,
    window: int = 10,
    n_samples: int = 10,
    noise_scale: float = 3.0,
    noise_std: float | None = None,
    seed: int = 0,
    severed: Literal["mlp", "attn"] | None = None,
    pixel_rows: Sequence[int] | Tensor | None = None,
    pixel_key: str | None = None,
    confidence: float = 0.95,
    batch_size: int = 16,
    store: str | os.PathLike | CellStore | None = None,
    progress: bool = True,
    plan: Callable[[Mapping[str, Any], int], ForwardPlan] | None | str = "auto",
    prefix_reuse: bool | str = "auto",
    options: SweepOptions | None = None,
) -> TracingResult:
    """Noise-and-restore tracing; see the module docstring for the recipe and the noise default.

    Args:
        noise_positions: sequence positions whose embeddings get noise (e.g. ``layout.box(...)`` of an
            object, or a text subject's ``layout.text_span(...)``). Exactly one of this and
            ``pixel_rows`` must be given.
        pixel_rows: rows of ``inputs[pixel_key]`` (the processor's patch rows) to noise instead; ``pixel_key``
            defaults to the model's image pixel input (``model.input_schema().pixel_input("image")``).
        restore_positions: position groups to restore (``"each"``, a list, or named groups).
        kinds: which states to restore: ``"resid"`` (residual entering layer l), ``"mlp"``, ``"attn"``
            (outputs of the ``window`` layers centred on l).
        severed: freeze ``"mlp"`` or ``"attn"`` outputs to corrupted values when restoring ``"resid"``.
        options: a :class:`~analyses.sweep.SweepOptions` (how the sweep runs); when given it replaces
            ``batch_size`` / ``store`` / ``progress`` / ``plan`` / ``prefix_reuse`` (/ ``layer_skip``).
        n_samples, seed: noise draws from ``torch.Generator().manual_seed(seed)``.
    """
    opts = SweepOptions.resolve(options, batch_size=batch_size, store=store, progress=progress, plan=plan, prefix_reuse=prefix_reuse)
    batch_size, store, progress, plan, prefix_reuse = opts.batch_size, opts.store, opts.progress, opts.plan, opts.prefix_reuse
    if (noise_positions is None) == (pixel_rows is None):
        raise ValueError("give exactly one of noise_positions (embeddings) or pixel_rows (pixels)")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r}: causal tracing needs at least 1 noise draw (2 or more for confidence intervals)")
    if severed not in (None, "mlp", "attn"):
        raise ValueError(f"severed must be None, 'mlp' or 'attn', got {severed!r}")
    for k in kinds:
        if k not in _KIND_SITE:
            raise ValueError(f"unknown kind {k!r}; use 'resid', 'mlp' or 'attn'")
    metric = as_metric(metric)
    embed = get_site("embed").template
    resid = get_site("resid_pre")
    n_layers = max(available_layers(model.hook_dict, resid)) + 1
    layer_list = list(range(n_layers)) if layers is None else list(layers)

    length = seq_len_of(inputs)
    groups = resolve_groups(restore_positions, length)
    npos = None if noise_positions is None else torch.as_tensor(noise_positions, dtype=torch.long).reshape(-1) % length
    # only the restored (and noised) positions of the clean states are kept: a long video's trace then caches
    # the frame spans' vectors, not L x d per layer and kind (a reduction at hook time, hooked_vlm models)
    wanted = {p for pos in groups.values() for p in pos} | (set() if npos is None else set(npos.tolist()))
    kept = torch.tensor(sorted(wanted), dtype=torch.long) if is_hooked_vlm(model) else None
    suffixes = tuple("hook_" + _KIND_SITE[k] for k in kinds)
    runner = opts.runner(model, inputs, metric)
    clean_logits, clean_cache = reduced_cache_run(
        model, inputs, lambda n: (n == embed and npos is not None) or (n.startswith("blocks.") and n.endswith(suffixes)),
        kept, runner.last_logits_only)
    clean_value = float(metric(clean_logits).float().mean())
    gen = torch.Generator().manual_seed(seed)

    def clean_at(name: str, pos: Tensor) -> tuple[Tensor, bool]:
        """(clean values of ``name`` to patch at ``pos``, whether they are compact: only those positions)."""
        if kept is None:
            return clean_cache[name], False
        return clean_cache[name].index_select(1, torch.searchsorted(kept, pos)), True

    def clean_edit(name: str, pos: Tensor) -> Edit:
        value, compact = clean_at(name, pos)
        return Edit(name, value, positions=pos, compact=compact)

    # ---- the corruption of each sample, as an edit on hook_embed
    if npos is not None:
        noised, compact = clean_at(embed, npos)
        noised = noised if compact else noised[:, npos]
        std = float(noised.float().std()) * noise_scale if noise_std is None else float(noise_std)
        noise_edits = []
        for _ in range(n_samples):
            draw = (torch.randn(noised.shape, generator=gen, dtype=torch.float32) * std).to(noised.dtype)
            noise_edits.append(Edit(embed, draw, positions=npos, mode="add", compact=True))
        noise_desc: dict[str, Any] = {"target": "embed", "positions": npos.tolist()}
    else:
        rows = torch.as_tensor(pixel_rows, dtype=torch.long).reshape(-1)
        from analyses.attribution import pixel_key as resolve_pixel_key

        pixel_key = resolve_pixel_key(inputs, pixel_key, model)  # the model's one pixel input (its input schema)
        pix = inputs[pixel_key]
        std = float(pix[rows].float().std()) * noise_scale if noise_std is None else float(noise_std)
        if is_hooked_vlm(model) and runner.base_batch == 1:
            noise_edits = _pixel_noise_edits(model, inputs, pixel_key, rows, std, n_samples, gen, embed)
        else:  # other models: the embeddings of a forward on every draw's noisy pixels, whole
            noisy = expand_inputs(inputs, n_samples)
            p = noisy[pixel_key].clone().view(n_samples, *pix.shape)
            for s in range(n_samples):
                draw = torch.randn(p[s, rows].shape, generator=gen, dtype=torch.float32) * std
                p[s, rows] = p[s, rows] + draw.to(p.dtype)
            noisy[pixel_key] = p.view(-1, *pix.shape[1:])
            _, noisy_cache = model.run_with_cache(**noisy, names_filter=lambda n: n == embed)
            emb = noisy_cache[embed].view(n_samples, -1, *noisy_cache[embed].shape[1:])
            noise_edits = [Edit(embed, emb[s]) for s in range(n_samples)]
        noise_desc = {"target": pixel_key, "rows": rows.tolist()}

    sever_site = get_site(_KIND_SITE[severed]) if severed else None
    sever_names = [sever_site.hook_name(l) for l in range(n_layers)] if sever_site else []
    keep_captured = None if kept is None else (lambda name, x: x.index_select(2, kept))  # [n, B, kept, d]
    corrupt_vals, corrupt_cache = runner.run([[e] for e in noise_edits], metric, capture=sever_names,
                                             capture_fn=keep_captured)
    assert corrupt_vals is not None
    corrupt_samples = corrupt_vals.mean(1).double().numpy()  # [S]
    te = clean_value - corrupt_samples
    te_mean, _, te_low, te_high = t_interval(te, confidence)

    cells = [{"kind": k, "layer": l, "group": g} for k in kinds for l in layer_list for g in groups]
    config = lambda: {  # noqa: E731 -- hashing inputs/model only when a store is used
        "analysis": "causal_trace",
        "noise": noise_desc,
        "noise_std": std,
        "noise_scale": noise_scale,
        "n_samples": n_samples,
        "seed": seed,
        "kinds": list(kinds),
        "layers": layer_list,
        "window": window,
        "severed": severed,
        "groups": groups,
        "metric": metric.name,
        "inputs": fingerprint_inputs(inputs),
        "model": fingerprint_model(model),
    }
    cell_store = open_store(store, config, TRACE_KEYS)

    def restore_edits(cell: dict[str, Any], sample: int) -> list[Edit]:
        pos = torch.tensor(groups[cell["group"]])
        kind, layer = cell["kind"], cell["layer"]
        edits = [noise_edits[sample]]
        if kind == "resid":
            name = resid.hook_name(layer)
            edits.append(clean_edit(name, pos))
            if sever_site is not None:
                for l in range(layer, n_layers):
                    nm = sever_site.hook_name(l)
                    held = corrupt_cache[nm][sample]
                    compact = kept is not None
                    if compact:
                        held = held.index_select(1, torch.searchsorted(kept, pos))
                    edits.append(Edit(nm, held, positions=pos, compact=compact))
        else:
            site = get_site(_KIND_SITE[kind])
            for l in _window(layer, window, n_layers):
                name = site.hook_name(l)
                edits.append(clean_edit(name, pos))
        return edits

    def evaluate(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        variants = [restore_edits(c, s) for c in batch for s in range(n_samples)]
        values, _ = runner.run(variants, metric)
        assert values is not None
        per = values.mean(1).double().numpy().reshape(len(batch), n_samples)
        out = []
        for c, restored in zip(batch, per):
            ie = restored - corrupt_samples
            mean, sem, low, high = t_interval(ie, confidence)
            out.append(dict(c, value=float(restored.mean()), indirect_effect=mean, ie_sem=sem, ie_low=low,
                            ie_high=high, samples=json.dumps(restored.tolist())))
        return out

    frame = run_cells(cells, evaluate, cell_store, max(1, batch_size // max(1, n_samples)), progress,
                      desc="causal tracing")
    frame["group"] = frame["group"].astype(str)
    return TracingResult(frame, clean_value, corrupt_samples, te_mean, te_low, te_high, std, groups)
