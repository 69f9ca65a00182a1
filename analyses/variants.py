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

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["Edit", "VariantRunner", "expand_inputs", "ForwardPlan"]


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
    """

    hook: str
    value: Tensor
    positions: Int[Tensor, "p"] | None = None
    pos_axis: int = 1
    heads: Int[Tensor, "h"] | None = None
    head_axis: int | None = None
    mode: Literal["replace", "add", "block"] = "replace"

    def index(self, ndim: int) -> tuple:
        """Index tuple (batch axis included as a full slice) selecting the edited entries."""
        idx: list[Any] = [slice(None)] * ndim
        pos = None if self.positions is None else torch.as_tensor(self.positions, dtype=torch.long)
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


class VariantRunner:
    """Evaluate edited variants of a base input, many per forward.

    Args:
        model: a TransformerLens ``HookedRootModule`` called as ``model.run_with_hooks(**inputs,
            fwd_hooks=...)`` and returning logits ``[B, L, V]``.
        inputs: the base input's keyword tensors (batch ``B``).
        batch_size: variants per forward (the forward's batch is ``batch_size * B``).
        plan: optional callable ``(inputs, n) -> ForwardPlan`` to build the batched forward, e.g. one
            that reuses precomputed vision features. Default: :func:`expand_inputs`.
    """

    def __init__(
        self,
        model: Any,
        inputs: Mapping[str, Any],
        batch_size: int = 16,
        plan: Callable[[Mapping[str, Any], int], ForwardPlan] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.inputs = dict(inputs)
        self.batch_size = batch_size
        self._plan = plan
        self.n_forwards = 0
        self.base_batch = _batch_size_of(self.inputs)

    def plan(self, n: int, edits_touch_vision: bool) -> ForwardPlan:
        """The batched-forward plan for ``n`` variants (vision reuse only if no edit is in the tower)."""
        if self._plan is not None and not edits_touch_vision:
            return self._plan(self.inputs, n)
        return ForwardPlan(expand_inputs(self.inputs, n), [])

    @torch.no_grad()
    def run(
        self,
        variants: Sequence[Sequence[Edit]],
        metric: Callable[[Tensor], Tensor] | None,
        capture: Sequence[str] = (),
        capture_fn: Callable[[str, Tensor], Tensor] | None = None,
    ) -> tuple[Float[Tensor, "n batch"] | None, dict[str, Tensor]]:
        """Run all ``variants`` in chunks of ``batch_size``.

        Returns the metric per variant and base example ``[n, B]`` (None if ``metric`` is None) and,
        for each name in ``capture``, the (edited) activation per variant ``[n, B, ...]``
        (``capture_fn(name, act)`` may reduce it first, e.g. to selected positions).
        """
        values: list[Tensor] = []
        captured: dict[str, list[Tensor]] = defaultdict(list)
        for start in range(0, len(variants), self.batch_size):
            chunk = variants[start : start + self.batch_size]
            v, c = self._run_chunk(chunk, metric, capture, capture_fn)
            if v is not None:
                values.append(v)
            for k, t in c.items():
                captured[k].append(t)
        out_values = torch.cat(values) if values else None
        return out_values, {k: torch.cat(t) for k, t in captured.items()}

    def _run_chunk(
        self,
        chunk: Sequence[Sequence[Edit]],
        metric: Callable[[Tensor], Tensor] | None,
        capture: Sequence[str],
        capture_fn: Callable[[str, Tensor], Tensor] | None,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        n, b = len(chunk), self.base_batch
        by_hook: dict[str, list[tuple[int, Edit]]] = defaultdict(list)
        for row, edits in enumerate(chunk):
            for e in edits:
                by_hook[e.hook].append((row, e))
        touches_vision = any(h.startswith("vision.") for h in by_hook)
        plan = self.plan(n, touches_vision)
        hooks = list(plan.hooks)
        for name, items in by_hook.items():
            hooks.append((name, _make_edit_hook(items, n, b)))
        store: dict[str, Tensor] = {}
        for name in capture:
            hooks.append((name, _make_capture_hook(name, store, n, b, capture_fn)))
        logits = self.model.run_with_hooks(**plan.inputs, fwd_hooks=hooks)
        self.n_forwards += 1
        vals = None
        if metric is not None:
            if logits.shape[0] != n * b:
                raise RuntimeError(f"model returned batch {logits.shape[0]}, expected {n}x{b}")
            vals = torch.stack([torch.as_tensor(metric(logits[i * b : (i + 1) * b])).reshape(-1).expand(b)
                                for i in range(n)]).detach().float().cpu()
        return vals, store


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
            if e.mode == "replace":
                target[idx] = src[idx]
            elif e.mode == "add":
                target[idx] = target[idx] + src[idx]
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
