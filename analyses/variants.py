"""Run many edited copies ("variants") of one input in a single batched forward.

Every causal analysis here -- activation patching, path patching, noise tracing, knockout -- is a list
of *variants*: the same base input run with a few :class:`Edit` s applied at named hook points
(replace these positions/heads with a stored activation, add noise, block attention edges). The
:class:`VariantRunner` stacks ``n`` variants along the batch axis (variant ``i`` occupies rows
``i*B .. (i+1)*B-1`` for a base batch of ``B``), registers one hook per touched hook name that edits
only its own rows, and evaluates the metric per variant. One batched forward replaces ``n`` serial
ones; the results are identical to a one-forward-per-variant loop (tested).

The runner only uses ``model.run_with_hooks(**inputs, fwd_hooks=...)`` and hook names, so it works
with any TransformerLens ``HookedRootModule`` -- the hooked VLMs and, for tests, a tiny
``HookedTransformer`` fed ``{"input": tokens}``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["Edit", "VariantRunner", "expand_inputs", "ForwardPlan", "VisionReusePlan", "knockout_mask", "seq_len_of"]


@dataclass(frozen=True, eq=False)
class Edit:
    """One change to one activation of one variant.

    Attributes:
        hook: full hook name (``"blocks.3.hook_resid_pre"``).
        value: for ``"replace"``/``"add"``: a tensor shaped like the activation of the *base* batch
            (``[B, ...]``; only the selected entries are read), e.g. a clean-run activation or a noise
            tensor. For ``"block"``: a bool ``[Lq, Lk]`` (or ``[B, Lq, Lk]``) mask of attention edges
            to remove, applied to a pre-softmax score hook by setting them to ``-inf``.
        positions: indices along ``pos_axis`` to edit; None = all.
        heads: indices along ``head_axis`` to edit; None = all heads.
        mode: ``"replace"`` (default), ``"add"`` or ``"block"``.
        compact: ``value`` holds only the edited positions, in the order of ``positions``, along
            ``pos_axis`` (``[B, P, ...]`` instead of ``[B, L, ...]``): a long input's sweep then keeps the
            patched positions of each source activation, not every position of it.
    """

    hook: str
    value: Tensor
    positions: Int[Tensor, "p"] | None = None
    pos_axis: int = 1
    heads: Int[Tensor, "h"] | None = None
    head_axis: int | None = None
    mode: Literal["replace", "add", "block"] = "replace"
    compact: bool = False

    def __post_init__(self) -> None:
        if self.compact:
            if self.positions is None:
                raise ValueError(f"Edit({self.hook!r}, compact=True) needs positions: a compact value holds only them")
            n = torch.as_tensor(self.positions).numel()
            if self.value.shape[self.pos_axis] != n:
                raise ValueError(
                    f"Edit({self.hook!r}, compact=True): value has {self.value.shape[self.pos_axis]} entries on axis "
                    f"{self.pos_axis} but {n} positions are edited; a compact value holds exactly the edited positions"
                )

    def index(self, ndim: int) -> tuple:
        """Index tuple (batch axis included as a full slice) selecting the edited entries."""
        return self._index(ndim, self.positions)

    def source_index(self, ndim: int) -> tuple:
        """Index tuple selecting the edited entries of ``value`` (the same as :meth:`index` unless compact)."""
        if not self.compact:
            return self.index(ndim)
        return self._index(ndim, torch.arange(torch.as_tensor(self.positions).numel()))

    def _index(self, ndim: int, positions: Any) -> tuple:
        idx: list[Any] = [slice(None)] * ndim
        pos = None if positions is None else torch.as_tensor(positions, dtype=torch.long)
        heads = None if self.heads is None else torch.as_tensor(self.heads, dtype=torch.long)
        if pos is not None and heads is not None:
            # broadcast the two index vectors against each other, in axis order
            if self.pos_axis < (self.head_axis or 0):
                pos, heads = pos[:, None], heads[None, :]
            else:
                pos, heads = pos[None, :], heads[:, None]
        if pos is not None:
            idx[self.pos_axis] = pos
        if heads is not None:
            assert self.head_axis is not None
            idx[self.head_axis] = heads
        return tuple(idx)


def is_hooked_vlm(model: Any) -> bool:
    """A hooked_vlm decoder VLM (its public capability queries and input schema are available)."""
    from hooked_vlm.model import HookedVLM

    return isinstance(model, HookedVLM)


def input_schema_of(model: Any) -> Any:
    """The model's :class:`~hooked_vlm.families.registry.InputSchema`; for other models the union of every
    registered family's (so their Hugging Face twins are read the same way)."""
    from hooked_vlm.families.registry import InputSchema, families

    if is_hooked_vlm(model):
        return model.input_schema()
    union = InputSchema(per_sequence=(), pad_values=())
    for fam in families():
        sch = fam.input_schema
        union = InputSchema(
            per_sequence=union.per_sequence + tuple(n for n in sch.per_sequence if n not in union.per_sequence),
            pixels=union.pixels + tuple(n for n in sch.pixels if n not in union.pixels),
            structure=union.structure + tuple(n for n in sch.structure if n not in union.structure),
            per_prompt=union.per_prompt + tuple(n for n in sch.per_prompt if n not in union.per_prompt),
            options=union.options + tuple(n for n in sch.options if n not in union.options),
        )
    return union


def pixel_tensor(inputs: Mapping[str, Any], schema: Any) -> Tensor | None:
    """The first pixel input present (by the schema), or None for text-only inputs."""
    return next((inputs[k] for k in schema.pixels if isinstance(inputs.get(k), Tensor)), None)


def expand_inputs(inputs: Mapping[str, Any], n: int) -> dict[str, Any]:
    """Repeat every tensor input ``n`` times along its first axis.

    Works for per-sequence tensors (``input_ids [B, L]``) and for packed per-image tensors alike
    (Qwen ``pixel_values [sum patches, d]`` with ``image_grid_thw [n_images, 3]``): concatenating
    whole copies keeps images, grids and sequences in matching order.
    """
    if n == 1:
        return dict(inputs)
    return {k: torch.cat([v] * n, dim=0) if isinstance(v, Tensor) and v.ndim > 0 else v for k, v in inputs.items()}


@dataclass
class ForwardPlan:
    """How to run ``n`` copies of the base input: keyword inputs plus hooks to add.

    The default plan repeats every input (the vision tower runs once per copy). Model-specific plans
    (see :meth:`VariantRunner.plan`) feed precomputed vision features instead, so the tower runs once.
    """

    inputs: dict[str, Any]
    hooks: list[tuple[str, Callable]]


class VisionReusePlan:
    """Batched-forward plan that runs the vision tower once and feeds its output to every copy.

    For models with ``encode_vision(**inputs)`` and a ``vision_features=`` forward keyword (the hooked
    VLMs): the features are computed on first use and cached, then concatenated ``n`` times. The pixel
    inputs stay in the batch (the model validates them against the grids) but the tower is skipped, and
    ``vision.hook_out`` still fires on the given features. Only valid when no edit touches the tower.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._schema = input_schema_of(model)
        self._features: Tensor | None = None
        self._key: int | None = None
        self.n_encodes = 0

    def seed(self, inputs: Mapping[str, Any], features: Tensor) -> None:
        """Use ``features`` (``vision.hook_out`` of an unedited run on ``inputs``) instead of encoding."""
        self._features = features
        self._key = id(pixel_tensor(inputs, self._schema))

    def __call__(self, inputs: Mapping[str, Any], n: int) -> ForwardPlan:
        pixels = pixel_tensor(inputs, self._schema)
        if pixels is None:
            return ForwardPlan(expand_inputs(inputs, n), [])
        key = id(pixels)
        if self._features is None or self._key != key:
            with torch.no_grad():
                self._features = self.model.encode_vision(**inputs)
            self._key = key
            self.n_encodes += 1
        out = expand_inputs(inputs, n)
        out["vision_features"] = torch.cat([self._features] * n) if n > 1 else self._features
        return ForwardPlan(out, [])


class VariantRunner:
    """Evaluate edited variants of a base input, many per forward.

    Args:
        model: a TransformerLens ``HookedRootModule`` called as ``model.run_with_hooks(**inputs,
            fwd_hooks=...)`` and returning logits ``[B, L, V]``.
        inputs: the base input's keyword tensors (batch ``B``).
        batch_size: variants per forward (the forward's batch is ``batch_size * B``).
        plan: optional callable ``(inputs, n) -> ForwardPlan`` to build the batched forward, e.g. a
            :class:`VisionReusePlan`. Default: :func:`expand_inputs` (everything recomputed per copy).
        prefix_reuse: reuse the unchanged prefix: when every edit of a chunk sits at positions ``>= p``
            of the sequence, run the base input once with a key/value cache and compute only positions
            ``p..L-1`` for the variants (exact for causal language models; the prefix's keys and values
            cannot depend on later edits). ``"auto"`` enables it when the model supports it (a
            ``past_key_values`` forward, a layout with position ids, causal masks only).
        layer_skip: when every edit of a chunk is in blocks ``>= l`` and the base batch is 1, run the
            layers below ``l`` once (batch 1) and expand to the ``n`` variants at
            ``blocks.{l}.hook_resid_pre``: those layers compute the same values for every variant.
            ``"auto"`` = on for hooked_vlm models (their blocks broadcast positions and masks over the
            batch); exactness is covered by the tests against one-forward-per-cell loops.
        max_positions: the most positions (rows x computed positions per row) one batched forward may
            hold; a chunk of ``batch_size`` variants is split further when its suffixes are longer, so a
            long input's sweep stays near one forward's memory. ``"auto"``: the base input's positions
            (one plain forward's worth), at least :data:`AUTO_MIN_POSITIONS` (short inputs batch fully);
            None: no limit.
        last_logits_only: the sweep's metric reads only the last position (``metric.reads == "last"``): the
            base run then unembeds that position alone (no ``[B, L, vocab]`` logits kept; hooked_vlm models).
    """

    def __init__(
        self,
        model: Any,
        inputs: Mapping[str, Any],
        batch_size: int = 16,
        plan: Callable[[Mapping[str, Any], int], ForwardPlan] | None = None,
        prefix_reuse: bool | str = False,
        layer_skip: bool | str = "auto",
        max_positions: int | str | None = None,
        last_logits_only: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not (max_positions is None or max_positions == "auto" or (isinstance(max_positions, int) and max_positions >= 1)):
            raise ValueError(f"max_positions must be a positive int, 'auto' or None, got {max_positions!r}")
        self.model = model
        self.inputs = dict(inputs)
        self.batch_size = batch_size
        self._plan = plan
        self.n_forwards = 0
        self.positions_computed = 0
        self.base_batch = _batch_size_of(self.inputs)
        self.seq_len = seq_len_of(self.inputs)
        auto = max(self.base_batch * self.seq_len, AUTO_MIN_POSITIONS)
        self.max_positions = auto if max_positions == "auto" else max_positions
        self.last_logits_only = last_logits_only and self._can_unembed_last()
        self.largest_forward = 0  # the most positions (rows x positions) any variant forward computed
        self._want_prefix = prefix_reuse
        # batch expansion at the first edited layer: layers below it run once, not once per variant
        broadcasts = is_hooked_vlm(model) and model.blocks_broadcast_batch
        self.layer_skip = bool(layer_skip) and (layer_skip is True or broadcasts) and self.base_batch == 1
        self._base: _BaseRun | None = None
        self._prefix: _BaseRun | None = None
        if prefix_reuse or isinstance(plan, VisionReusePlan):
            base = self.base_run()  # now, before any caller attaches a context (e.g. a knockout)
            if prefix_reuse and base.prefix_supported(strict=prefix_reuse is True):
                self._prefix = base

    def base_run(self) -> "_BaseRun":
        """The unedited base input, run once: logits, embeddings, vision features, key/value cache."""
        if self._base is None:
            self._base = _BaseRun(self.model, self.inputs, kv=bool(self._want_prefix), last_only=self.last_logits_only)
            if isinstance(self._plan, VisionReusePlan) and self._base.vision_features is not None:
                self._plan.seed(self.inputs, self._base.vision_features)
            self.n_forwards += 1
        return self._base

    def base_logits(self) -> Float[Tensor, "batch pos vocab"]:
        """Logits of the unedited base input (computed once, shared with the reuse machinery); the last
        position only when the runner was built with ``last_logits_only``."""
        return self.base_run().logits

    def _final_block_untouched(self, hooks: list) -> bool:
        """True when the model can skip the final block's other positions and no hook would notice."""
        if "final_positions" not in getattr(self.model, "generic_inputs", ()):
            return False
        last = f"blocks.{len(self.model.blocks) - 1}."
        for name, _ in hooks:
            if not isinstance(name, str):
                return False
            if name.startswith("ln_final.") or (name.startswith(last) and name != last + "hook_resid_pre"):
                return False
        return True

    def _can_unembed_last(self) -> bool:
        """hooked_vlm models: ``return_type="resid"`` gives the final normalised residual, ``unembed`` maps it."""
        names = getattr(self.model, "generic_inputs", ())
        return "return_type" in names and isinstance(getattr(self.model, "unembed", None), torch.nn.Module)

    @property
    def prefix_reuse(self) -> bool:
        """Whether unchanged prefixes are computed once (see the class docstring)."""
        return self._prefix is not None

    def plan(self, n: int, edits_touch_vision: bool) -> ForwardPlan:
        """The batched-forward plan for ``n`` variants (vision reuse only if no edit is in the tower)."""
        if self._plan is not None and not edits_touch_vision:
            if isinstance(self._plan, VisionReusePlan) and self._plan._features is None:
                self.base_run()  # seeds the features from vision.hook_out: no separate encode
            return self._plan(self.inputs, n)
        return ForwardPlan(expand_inputs(self.inputs, n), [])

    @torch.no_grad()
    def run(
        self,
        variants: Sequence[Sequence[Edit]],
        metric: Callable[[Tensor], Tensor] | None,
        capture: Sequence[str] = (),
        capture_fn: Callable[[str, Tensor], Tensor] | None = None,
        context: Callable[[int, int], ContextManager] | None = None,
        first_position: int | None = None,
    ) -> tuple[Float[Tensor, "n batch"] | None, dict[str, Tensor]]:
        """Run all ``variants`` in chunks of ``batch_size`` (split further to fit ``max_positions``).

        Returns the metric per variant and base example ``[n, B]`` (None if ``metric`` is None) and,
        for each name in ``capture``, the (edited) activation per variant ``[n, B, ...]``
        (``capture_fn(name, act)`` may reduce it first, e.g. to selected positions). ``context(first,
        count)``, if given, wraps the forward of variants ``first .. first+count-1`` (e.g. to attach a
        per-row attention knockout to the model for that forward). ``first_position`` declares that the
        context's changes reach no position before it (a knockout of the last token's queries: L - 1), so
        the positions before it come from the prefix cache like those before an edit.
        """
        values: list[Tensor] = []
        captured: dict[str, list[Tensor]] = defaultdict(list)
        pack = context is None and first_position is None and not capture and self.packs_rows(metric)
        for start, stop in self._chunks(variants, bool(capture), first_position, pack):
            chunk = variants[start:stop]
            with context(start, len(chunk)) if context is not None else nullcontext():
                v, c = self._run_chunk(chunk, metric, capture, capture_fn, first_position, pack)
            if v is not None:
                values.append(v)
            for k, t in c.items():
                captured[k].append(t)
        out_values = torch.cat(values) if values else None
        return out_values, {k: torch.cat(t) for k, t in captured.items()}

    def _start(self, chunk: Sequence[Sequence[Edit]], capture: bool, first_position: int | None) -> int:
        """The first position a chunk's forward computes (0 unless the prefix is reused)."""
        touches_vision = any(e.hook.startswith("vision.") for edits in chunk for e in edits)
        if self._prefix is None or capture or touches_vision:
            return 0
        edited = _first_edited_position(chunk) if any(chunk) else None
        if first_position is not None:
            edited = first_position if edited is None else min(edited, first_position)
        return min(edited or 0, self.seq_len - 1)

    def packs_rows(self, metric: Callable[[Tensor], Tensor] | None) -> bool:
        """Whether chunks may run as packed ragged suffixes (:mod:`analyses.ragged_suffixes`): prefix reuse on, one
        base row without padding, a last-token metric, and a model whose forward can start at a layer."""
        if self._prefix is None or self.base_batch != 1 or metric is None or getattr(metric, "reads", "all") != "last":
            return False
        if not self._can_unembed_last() or "start_at_layer" not in getattr(self.model, "generic_inputs", ()):
            return False
        am = self.inputs.get("attention_mask")
        return not isinstance(am, Tensor) or bool(am.bool().all())

    def _ragged_starts(self, chunk: Sequence[Sequence[Edit]]) -> list[int] | None:
        """The chunk's per-variant first positions when it runs packed (more than one variant, unequal starts)."""
        from analyses.ragged_suffixes import row_starts

        if len(chunk) < 2:
            return None
        starts = row_starts(chunk, self.seq_len)
        return starts if starts is not None and len(set(starts)) > 1 else None

    def _positions_cost(self, chunk: Sequence[Sequence[Edit]], capture: bool, first_position: int | None, pack: bool) -> int:
        """Positions one forward of ``chunk`` holds: the packed suffixes' total, or rows x the common suffix."""
        starts = self._ragged_starts(chunk) if pack else None
        if starts is not None:
            return sum(self.seq_len - s for s in starts)
        return len(chunk) * self.base_batch * (self.seq_len - self._start(chunk, capture, first_position))

    def _chunks(self, variants: Sequence[Sequence[Edit]], capture: bool, first_position: int | None,
                pack: bool = False) -> list[tuple[int, int]]:
        """``(start, stop)`` index ranges of at most ``batch_size`` variants whose forward fits ``max_positions``
        (a chunk's cost: :meth:`_positions_cost`; one variant always runs)."""
        out: list[tuple[int, int]] = []
        i = 0
        while i < len(variants):
            j = min(i + self.batch_size, len(variants))
            if self.max_positions is not None:
                k = i + 1
                while k < j:
                    if self._positions_cost(variants[i : k + 1], capture, first_position, pack) > self.max_positions:
                        break
                    k += 1
                j = k
            out.append((i, j))
            i = j
        return out

    def _run_chunk(
        self,
        chunk: Sequence[Sequence[Edit]],
        metric: Callable[[Tensor], Tensor] | None,
        capture: Sequence[str],
        capture_fn: Callable[[str, Tensor], Tensor] | None,
        first_position: int | None = None,
        pack: bool = False,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        starts = self._ragged_starts(chunk) if pack else None
        if starts is not None:
            assert metric is not None
            return self._run_packed(chunk, metric, starts), {}
        n, b = len(chunk), self.base_batch
        by_hook: dict[str, list[tuple[int, Edit]]] = defaultdict(list)
        for row, edits in enumerate(chunk):
            for e in edits:
                by_hook[e.hook].append((row, e))
        touches_vision = any(h.startswith("vision.") for h in by_hook)
        start = self._start(chunk, bool(capture), first_position)
        expand_at = 0
        if self.layer_skip and n > 1 and not capture and not touches_vision:
            expand_at = _first_edited_layer(chunk)
            if f"blocks.{expand_at}.hook_resid_pre" not in getattr(self.model, "hook_dict", {}):
                expand_at = 0
        if start > 0:
            assert self._prefix is not None
            plan = self._prefix.plan(start, n, expand_from=expand_at)
            by_hook = {k: [(r, _shift(e, start)) for r, e in v] for k, v in by_hook.items()}
        else:
            plan = self.plan(1 if expand_at > 0 else n, touches_vision)
        hooks = list(plan.hooks)
        if expand_at > 0:
            hooks.append((f"blocks.{expand_at}.hook_resid_pre", _expand_hook(n)))
        for name, items in by_hook.items():
            hooks.append((name, _make_edit_hook(items, n, b)))
        store: dict[str, Tensor] = {}
        for name in capture:
            hooks.append((name, _make_capture_hook(name, store, n, b, capture_fn)))
        last_only = metric is not None and getattr(metric, "reads", "all") == "last" and self._can_unembed_last()
        if last_only:
            # final normalised residual, unembedded at the last position only (exact, no [N, L, V]); when no
            # hook reads or edits the final block past its input, that block computes only the last position
            extra = {"final_positions": 1} if self._final_block_untouched(hooks) else {}
            resid = self.model.run_with_hooks(**plan.inputs, return_type="resid", fwd_hooks=hooks, **extra)
            logits = self.model.unembed(resid[:, -1:])
            computed = plan.inputs["input_ids"].shape[1]  # positions run through the blocks
        else:
            logits = self.model.run_with_hooks(**plan.inputs, fwd_hooks=hooks)
            computed = logits.shape[1]
        self.n_forwards += 1
        self.positions_computed += computed * n
        self.largest_forward = max(self.largest_forward, computed * n * b)
        if start > 0 and not last_only:
            assert self._prefix is not None
            logits = self._prefix.full_logits(logits, start, n)
        vals = None
        if metric is not None:
            if logits.shape[0] != n * b:
                raise RuntimeError(f"model returned batch {logits.shape[0]}, expected {n}x{b}")
            vals = torch.stack([torch.as_tensor(metric(logits[i * b : (i + 1) * b])).reshape(-1).expand(b)
                                for i in range(n)]).detach().float().cpu()
        return vals, store


    def _run_packed(self, chunk: Sequence[Sequence[Edit]], metric: Callable[[Tensor], Tensor], starts: list[int]) -> Tensor:
        """One forward of the chunk's ragged suffixes packed into one sequence against the cached prefix
        (:mod:`analyses.ragged_suffixes`); blocks below the lowest edited one run once, for the shortest start."""
        from analyses.ragged_suffixes import PackedRows

        base = self._prefix
        assert base is not None and base.embed is not None
        rows, n = PackedRows.build(starts, self.seq_len), len(chunk)
        layer = _first_edited_layer(chunk) if self.layer_skip else 0
        first = min(starts)
        resid = base.embed[:, first:] if layer == 0 else self._resid_entering(layer, first)
        hooks = [(name, _make_edit_hook(items, 1, 1)) for name, items in _packed_edits(chunk, rows).items()]
        extra = {"final_positions": n} if self._final_block_untouched(hooks) else {}
        knocked = self.model.knockout(rows.knockout(resid.device), layers=range(layer, len(self.model.blocks)))
        with knocked:
            out = self.model.run_with_hooks(**base.packed_inputs(rows, layer), start_at_layer=layer,
                                            resid=rows.gather(resid, 1, first=first), return_type="resid",
                                            fwd_hooks=hooks, **extra)
        logits = self.model.unembed(out[0, -n:, None, :])  # the rows' last positions, in row order: [n, 1, vocab]
        self.n_forwards += 1
        self.positions_computed += rows.n_packed
        self.largest_forward = max(self.largest_forward, rows.n_packed)
        return torch.stack([torch.as_tensor(metric(logits[i : i + 1])).reshape(-1).expand(1) for i in range(n)]
                           ).detach().float().cpu()

    def _resid_entering(self, layer: int, first: int) -> Float[Tensor, "1 pos d_model"]:
        """The base run's residual entering block ``layer`` at positions ``first..L-1`` (blocks below run once)."""
        assert self._prefix is not None
        kept = self._prefix.resid_pre.get(layer)
        if kept is not None:  # the base run's (short input): no forward
            return kept[:, first:]
        plan = self._prefix.plan(first, 1) if first > 0 else self.plan(1, False)
        self.n_forwards += 1
        self.positions_computed += self.seq_len - first
        return self.model.run_with_hooks(**plan.inputs, stop_at_layer=layer, fwd_hooks=plan.hooks)


def _resid_cache_fits(model: Any, inputs: Mapping[str, Any]) -> bool:
    """Whether every block's input residual of one base row fits :data:`RESID_CACHE_BYTES`."""
    if _batch_size_of(inputs) != 1:
        return False
    w = model.W_E
    return len(model.blocks) * seq_len_of(inputs) * w.shape[1] * w.element_size() <= RESID_CACHE_BYTES


def _packed_edits(chunk: Sequence[Sequence[Edit]], rows: Any) -> dict[str, list[tuple[int, Edit]]]:
    """Each variant's edits moved to its packed positions, as compact edits of the single packed row."""
    by_hook: dict[str, list[tuple[int, Edit]]] = defaultdict(list)
    for i, edits in enumerate(chunk):
        for e in edits:
            pos = torch.as_tensor(e.positions, dtype=torch.long)
            value = e.value if e.compact else e.value.index_select(e.pos_axis, pos.to(e.value.device))
            by_hook[e.hook].append((0, Edit(e.hook, value, positions=rows.index_of(i, pos), pos_axis=1, heads=e.heads,
                                            head_axis=e.head_axis, mode=e.mode, compact=True)))
    return by_hook


def seq_len_of(inputs: Mapping[str, Any]) -> int:
    """The sequence length of keyword inputs (``input_ids`` / ``input`` / ``tokens`` / ``inputs_embeds``)."""
    for key in ("input_ids", "input", "tokens", "inputs_embeds", "attention_mask"):
        v = inputs.get(key)
        if isinstance(v, Tensor) and v.ndim >= 2:
            return v.shape[1]
    raise ValueError("cannot tell the sequence length: inputs need one of input_ids / input / tokens / inputs_embeds")


def _batch_size_of(inputs: Mapping[str, Any]) -> int:
    for key in ("input_ids", "input", "tokens", "inputs_embeds", "attention_mask"):
        v = inputs.get(key)
        if isinstance(v, Tensor):
            return v.shape[0]
    raise ValueError(
        "cannot tell the batch size: inputs need one of input_ids / input / tokens / inputs_embeds"
    )


def _make_edit_hook(items: list[tuple[int, Edit]], n: int, b: int) -> Callable:
    """A hook applying each (row, edit) to its own variant's slice of the batched activation."""

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        if act.shape[0] != n * b:
            raise RuntimeError(
                f"hook {items[0][1].hook}: activation has batch {act.shape[0]}, expected {n}x{b}; "
                "vision-tower activations must be batch-first per input for per-variant edits"
            )
        out = act.clone()
        view = out.view(n, b, *act.shape[1:])
        for row, e in items:
            target = view[row]
            if e.mode == "block":
                mask = e.value.to(target.device)
                if mask.ndim == 2:
                    mask = mask[None]
                # target: [B, H, Lq, Lk]; mask: [B or 1, Lq, Lk]
                sel = target if e.heads is None else target[:, torch.as_tensor(e.heads)]
                blocked = torch.where(mask[:, None], torch.full_like(sel, float("-inf")), sel)
                if e.heads is None:
                    target.copy_(blocked)
                else:
                    target[:, torch.as_tensor(e.heads)] = blocked
                continue
            idx = e.index(target.ndim)
            src = e.value.to(device=target.device, dtype=target.dtype)
            if src.shape[0] != b and src.shape[0] == 1:
                src = src.expand(b, *src.shape[1:])
            sidx = e.source_index(target.ndim)
            if e.mode == "replace":
                target[idx] = src[sidx]
            elif e.mode == "add":
                target[idx] = target[idx] + src[sidx]
            else:
                raise ValueError(f"unknown edit mode {e.mode!r}")
        return out

    return hook


def _make_capture_hook(
    name: str, store: dict[str, Tensor], n: int, b: int, capture_fn: Callable[[str, Tensor], Tensor] | None
) -> Callable:
    def hook(act: Tensor, hook: Any = None) -> None:
        x = act.detach().view(n, b, *act.shape[1:])
        store[name] = (capture_fn(name, x) if capture_fn is not None else x).clone()

    return hook


def knockout_mask(
    queries: Sequence[int] | Int[Tensor, "q"], keys: Sequence[int] | Int[Tensor, "k"], length: int
) -> Bool[Tensor, "length length"]:
    """Bool ``[L, L]`` mask, True on edges ``query -> key`` for every query in ``queries`` and key in ``keys``."""
    m = torch.zeros(length, length, dtype=torch.bool)
    q = torch.as_tensor(queries, dtype=torch.long)
    k = torch.as_tensor(keys, dtype=torch.long)
    m[q[:, None], k[None, :]] = True
    return m


# ----------------------------------------------------------------------------- prefix reuse
def _first_edited_position(chunk: Sequence[Sequence[Edit]]) -> int:
    """Smallest sequence position any edit of the chunk touches (0 if some edit spans everything)."""
    first = None
    for edits in chunk:
        for e in edits:
            if e.mode == "block":
                rows = e.value.reshape(-1, *e.value.shape[-2:]).any(-1).any(0).nonzero()
                p = int(rows.min()) if rows.numel() else None
            elif e.positions is None:
                return 0
            else:
                p = int(torch.as_tensor(e.positions).min())
            if p is not None:
                first = p if first is None else min(first, p)
    return first or 0


#: ``max_positions="auto"`` never limits a forward below this many positions: below it batching pays and memory is small.
AUTO_MIN_POSITIONS = 4096

#: the prefix-reuse base run keeps every block's input residual when all of them together take at most this many
#: bytes (short inputs), so packed ragged chunks start from them instead of rerunning the blocks below their layer
RESID_CACHE_BYTES = 16 * 2**20

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _first_edited_layer(chunk: Sequence[Sequence[Edit]]) -> int:
    """Smallest language-model block any edit of the chunk touches (0 if some edit is outside the blocks)."""
    first = None
    for edits in chunk:
        for e in edits:
            m = _BLOCK.match(e.hook)
            if m is None:
                return 0
            layer = int(m.group(1))
            first = layer if first is None else min(first, layer)
    return first or 0


def _expand_hook(n: int) -> Callable:
    """Turn the single shared residual into ``n`` variant copies (the first hook on its hook point)."""

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        return act.repeat(n, *([1] * (act.dim() - 1)))

    return hook


def _shift(e: Edit, start: int) -> Edit:
    """The same edit on an activation that starts at sequence position ``start``."""
    if e.mode == "block":
        return Edit(e.hook, e.value[..., start:, :], heads=e.heads, head_axis=e.head_axis, mode="block")
    assert e.positions is not None
    value = e.value if e.compact else e.value.narrow(e.pos_axis, start, e.value.shape[e.pos_axis] - start)
    pos = torch.as_tensor(e.positions) - start
    return Edit(e.hook, value, positions=pos, pos_axis=e.pos_axis, heads=e.heads, head_axis=e.head_axis,
                mode=e.mode, compact=e.compact)


class _BaseRun:
    """The base input run once, unedited, recording what the reuse paths need.

    * ``logits``: the base logits (the corrupted/clean baseline of a sweep);
    * ``vision_features``: ``vision.hook_out`` (fed back as ``vision_features=`` to skip the tower);
    * ``embed``: ``hook_embed`` (the suffix's embeddings with visual features injected);
    * ``cache``: the language model's keys and values at every position (hooked_vlm models), sliced to
      any prefix length for suffix-only runs.
    """

    def __init__(self, model: Any, inputs: dict[str, Any], kv: bool, last_only: bool = False) -> None:
        self.model = model
        self.inputs = inputs
        store: dict[str, Tensor] = {}

        def grab(key: str) -> Callable:
            def hook(act: Tensor, hook: Any = None) -> None:
                store[key] = act.detach().clone()

            return hook

        self.schema = input_schema_of(model)
        hooks = [("hook_embed", grab("embed"))]
        if "vision.hook_out" in getattr(model, "hook_dict", {}) and pixel_tensor(inputs, self.schema) is not None:
            hooks.append(("vision.hook_out", grab("vision")))
        extra: dict[str, Any] = {}
        self.cache = None
        self.position_ids = None
        self.kv = kv and is_hooked_vlm(model) and model.supports_kv_cache
        if self.kv and _resid_cache_fits(model, inputs):
            hooks += [(f"blocks.{l}.hook_resid_pre", grab(f"resid.{l}")) for l in range(len(model.blocks))]
        if self.kv:
            from hooked_vlm.components.attention import KVCache

            self.layout = model.layout(**inputs)
            pos = getattr(self.layout, "position_ids", None)
            if pos is None:
                ids = inputs["input_ids"]
                am = inputs.get("attention_mask")
                pos = (am.long().cumsum(-1) - 1).clamp(min=0) if am is not None else torch.arange(ids.shape[1]).expand_as(ids)
            self.position_ids = pos
            self.cache = KVCache()
            extra = {"position_ids": pos, "past_key_values": self.cache}
        with torch.no_grad():
            if last_only:  # the final normalised residual, unembedded at the last position only (exact)
                resid = model.run_with_hooks(**inputs, **extra, return_type="resid", fwd_hooks=hooks)
                self.logits = model.unembed(resid[:, -1:])
            else:
                self.logits = model.run_with_hooks(**inputs, **extra, fwd_hooks=hooks)
        self.last_only = last_only
        self.embed = store.get("embed")
        self.vision_features = store.get("vision")
        #: each block's input residual of the base run (short inputs only, see RESID_CACHE_BYTES)
        self.resid_pre = {int(k.split(".")[1]): v for k, v in store.items() if k.startswith("resid.")}

    def prefix_supported(self, strict: bool) -> bool:
        """Whether suffix runs against the cached prefix are exact (a causal language model)."""
        why = None
        if not self.kv:
            why = "the model is not a hooked_vlm model (no key/value-cache forward)"
        else:
            why = self.model.prefix_reuse_problem(**self.inputs)
        if why is not None and strict:
            raise ValueError(f"prefix reuse is not available for this model: {why}")
        return why is None

    def plan(self, start: int, n: int, expand_from: int = 0) -> ForwardPlan:
        """Inputs and hooks computing positions ``start..L-1`` of ``n`` copies against the cached prefix.

        With ``expand_from = l > 0`` the inputs hold one copy, the cache of layers below ``l`` one copy
        and that of layers ``>= l`` ``n`` copies (the caller expands the residual at layer ``l``).
        """
        from hooked_vlm.components.attention import KVCache

        assert self.cache is not None and self.position_ids is not None and self.embed is not None
        ids = self.inputs["input_ids"]
        cat_n = (lambda t, d=0: torch.cat([t] * n, dim=d)) if n > 1 else (lambda t, d=0: t)
        cat = cat_n if expand_from == 0 else (lambda t, d=0: t)

        def per_layer(layer: int, t: Tensor) -> Tensor:
            t = t[:, :start].contiguous()
            return cat_n(t) if layer >= expand_from else t

        cache = KVCache(
            keys={l: per_layer(l, k) for l, k in self.cache.keys.items()},
            values={l: per_layer(l, v) for l, v in self.cache.values.items()},
        )
        inputs: dict[str, Any] = {
            "input_ids": cat(ids[:, start:]),
            "past_key_values": cache,
            "position_ids": cat(self.position_ids[..., start:], self.position_ids.dim() - 2),
        }
        if isinstance(self.inputs.get("attention_mask"), Tensor):
            inputs["attention_mask"] = cat(self.inputs["attention_mask"])  # covers the cached prefix too
        for name in self.schema.per_sequence:  # the family's other [B, L] inputs: the suffix's positions
            if name not in inputs and isinstance(self.inputs.get(name), Tensor):
                inputs[name] = cat(self.inputs[name][:, start:])
        suffix_embed = cat(self.embed[:, start:])

        def put_embed(act: Tensor, hook: Any = None) -> Tensor:
            # the suffix's embeddings with visual features injected, as in the full base run
            return suffix_embed.to(act.dtype)

        return ForwardPlan(inputs, [("hook_embed", put_embed)])

    def packed_inputs(self, rows: Any, from_layer: int) -> dict[str, Any]:
        """Inputs of a packed ragged-suffix forward from block ``from_layer`` (:class:`analyses.ragged_suffixes.PackedRows`):
        the packed positions' tokens, position ids and other per-sequence inputs, and the cached prefix (batch 1,
        up to the largest start) of the blocks that run."""
        from hooked_vlm.components.attention import KVCache

        assert self.cache is not None and self.position_ids is not None
        p = rows.prefix
        cache = KVCache(keys={l: k[:, :p] for l, k in self.cache.keys.items() if l >= from_layer},
                        values={l: v[:, :p] for l, v in self.cache.values.items() if l >= from_layer})
        inputs: dict[str, Any] = {
            "input_ids": rows.gather(self.inputs["input_ids"], 1),
            "past_key_values": cache,
            "position_ids": rows.gather(self.position_ids, self.position_ids.dim() - 1),
        }
        for name in self.schema.per_sequence:  # the family's other [B, L] inputs (no padding: packing needs none)
            if name not in inputs and name != "attention_mask" and isinstance(self.inputs.get(name), Tensor):
                inputs[name] = rows.gather(self.inputs[name], 1)
        return inputs

    def full_logits(self, suffix_logits: Tensor, start: int, n: int) -> Tensor:
        """Prepend the base run's prefix logits (identical for every variant) to each variant's suffix."""
        if self.last_only:
            raise RuntimeError("the base run kept the last position's logits only (last_logits_only); full logits are gone")
        prefix = self.logits[:, :start].to(suffix_logits.dtype)
        prefix = torch.cat([prefix] * n) if n > 1 else prefix
        return torch.cat([prefix, suffix_logits], dim=1)
