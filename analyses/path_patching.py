"""Path patching: the effect of a sender on the output *through* a receiver only.

For a sender node (e.g. the visual tokens' embeddings, or head (l, h)'s output at some positions) and
a receiver node (e.g. head (l', h')'s ``z`` at the last token), two batched passes per cell:

1. run the *base* input with the sender set to its *source* value and every other component in
   ``freeze`` (by default all attention heads' ``z``) held at its base value, except the sender and the
   receiver themselves; record the receiver's activation;
2. run the base input again with only the receiver replaced by that recorded activation; read the
   metric.

So the measured change travels sender -> (residual stream, un-frozen MLPs) -> receiver -> output and
not through other heads. With ``direction="denoise"`` (default) the base is the corrupted input and
the source the clean one; ``"noise"`` swaps them (the IOI paper's convention). ``recovery`` is
``(value - corrupt) / (clean - corrupt)`` in both cases.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .metrics import as_metric, normalized_recovery
from .patching import check_compatible_inputs
from .results_store import CellStore
from .sites import available_layers, get_site
from .sweep import SweepOptions, fingerprint_inputs, fingerprint_model, open_store, run_cells
from .variants import Edit, ForwardPlan

__all__ = ["Node", "path_patching", "PATH_KEYS"]

PATH_KEYS = ("sender", "receiver")


@dataclass(frozen=True)
class Node:
    """One activation slice: a site at a layer, optionally one head, optionally some positions.

    ``Node("embed", positions=visual)`` = the visual tokens entering the LM;
    ``Node("z", 12, 3, positions=[-1])`` = head 12.3's mixed values at the last token.
    """

    site: str
    layer: int | None = None
    head: int | None = None
    positions: tuple[int, ...] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = [self.site]
        if self.layer is not None:
            parts.append(f"L{self.layer}")
        if self.head is not None:
            parts.append(f"H{self.head}")
        if self.positions is not None:
            parts.append("pos" + ",".join(map(str, self.positions)) if len(self.positions) <= 6
                         else f"pos[{len(self.positions)}]")
        return ".".join(parts)

    def hook(self) -> str:
        return get_site(self.site).hook_name(self.layer)

    def edit(self, value: Tensor, length: int) -> Edit:
        s = get_site(self.site)
        pos = None if self.positions is None else torch.tensor(self.positions) % length
        heads = None if self.head is None else torch.tensor([self.head])
        if heads is not None and s.head_axis is None:
            raise ValueError(f"site {self.site!r} has no heads; drop head={self.head}")
        return Edit(self.hook(), value, positions=pos, pos_axis=s.pos_axis, heads=heads, head_axis=s.head_axis)


def path_patching(
    model: Any,
    clean_inputs: Mapping[str, Any],
    corrupt_inputs: Mapping[str, Any],
    metric: Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, "batch"]],
    senders: Sequence[Node],
    receivers: Sequence[Node],
    freeze: Sequence[str] = ("z",),
    direction: Literal["denoise", "noise"] = "denoise",
    batch_size: int = 16,
    store: str | os.PathLike | CellStore | None = None,
    progress: bool = True,
    plan: Callable[[Mapping[str, Any], int], ForwardPlan] | None | str = "auto",
    prefix_reuse: bool | str = "auto",
    options: SweepOptions | None = None,
) -> pd.DataFrame:
    """Path-patch every (sender, receiver) pair; returns ``sender, receiver, value, recovery``.

    Args:
        senders / receivers: :class:`Node` s (labels must be unique; pass ``name=`` to choose them).
        options: a :class:`~analyses.sweep.SweepOptions` (how the sweep runs); when given it replaces
            ``batch_size`` / ``store`` / ``progress`` / ``plan`` / ``prefix_reuse`` (/ ``layer_skip``).
        freeze: sites held at their base values in step 1 at every layer (default ``("z",)``: all
            attention heads, so paths through other heads are cut; add ``"mlp_out"`` to cut MLPs too).
            The sender's and receiver's own heads are never frozen.
    """
    opts = SweepOptions.resolve(options, batch_size=batch_size, store=store, progress=progress, plan=plan, prefix_reuse=prefix_reuse)
    batch_size, store, progress, plan, prefix_reuse = opts.batch_size, opts.store, opts.progress, opts.plan, opts.prefix_reuse
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    check_compatible_inputs(model, clean_inputs, corrupt_inputs)
    metric = as_metric(metric)
    base_inputs, source_inputs = (
        (corrupt_inputs, clean_inputs) if direction == "denoise" else (clean_inputs, corrupt_inputs)
    )
    s_by, r_by = {n.label: n for n in senders}, {n.label: n for n in receivers}
    if len(s_by) != len(senders) or len(r_by) != len(receivers):
        raise ValueError("sender and receiver labels must be unique; pass name=... to tell them apart")
    freeze_sites = [get_site(f) for f in freeze]
    freeze_names = [s.hook_name(l) for s in freeze_sites for l in available_layers(model.hook_dict, s)]
    sender_names = {n.hook() for n in senders}
    needed_base = set(freeze_names)
    with torch.no_grad():
        src_logits, src_cache = model.run_with_cache(**source_inputs, names_filter=lambda n: n in sender_names)
        base_logits, base_cache = model.run_with_cache(**base_inputs, names_filter=lambda n: n in needed_base)
    clean_logits, corrupt_logits = (
        (src_logits, base_logits) if direction == "denoise" else (base_logits, src_logits)
    )
    clean_value = float(metric(clean_logits).float().mean())
    corrupt_value = float(metric(corrupt_logits).float().mean())
    length = base_logits.shape[1]

    config = lambda: {  # noqa: E731 -- hashing inputs/model only when a store is used
        "analysis": "path_patching",
        "senders": [repr(n) for n in senders],
        "receivers": [repr(n) for n in receivers],
        "freeze": list(freeze),
        "direction": direction,
        "metric": metric.name,
        "clean_inputs": fingerprint_inputs(clean_inputs),
        "corrupt_inputs": fingerprint_inputs(corrupt_inputs),
        "model": fingerprint_model(model),
    }
    cell_store = open_store(store, config, PATH_KEYS)
    runner = opts.runner(model, base_inputs)
    cells = [{"sender": s, "receiver": r} for s in s_by for r in r_by]

    def freeze_edits(exclude: Sequence[Node]) -> list[Edit]:
        edits = []
        for s in freeze_sites:
            for l in available_layers(model.hook_dict, s):
                name = s.hook_name(l)
                skip_heads = {n.head for n in exclude if n.hook() == name and n.head is not None}
                whole = any(n.hook() == name and n.head is None for n in exclude)
                if whole:
                    continue
                act = base_cache[name]
                if skip_heads:
                    if s.head_axis is None:
                        continue
                    keep = [h for h in range(act.shape[s.head_axis]) if h not in skip_heads]
                    if not keep:
                        continue
                    edits.append(Edit(name, act, heads=torch.tensor(keep), head_axis=s.head_axis,
                                      pos_axis=s.pos_axis))
                else:
                    edits.append(Edit(name, act, pos_axis=s.pos_axis))
        return edits

    def evaluate(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        step1, recv_names = [], sorted({r_by[c["receiver"]].hook() for c in batch})
        for c in batch:
            snd, rcv = s_by[c["sender"]], r_by[c["receiver"]]
            # freezes first, then the sender (a later edit on the same hook wins)
            step1.append(freeze_edits([snd, rcv]) + [snd.edit(src_cache[snd.hook()], length)])
        _, captured = runner.run(step1, None, capture=recv_names)
        step2 = []
        for i, c in enumerate(batch):
            rcv = r_by[c["receiver"]]
            step2.append([rcv.edit(captured[rcv.hook()][i], length)])
        values, _ = runner.run(step2, metric)
        assert values is not None
        return [
            dict(c, value=float(v.mean()),
                 recovery=float(normalized_recovery(float(v.mean()), clean_value, corrupt_value)))
            for c, v in zip(batch, values)
        ]

    frame = run_cells(cells, evaluate, cell_store, batch_size, progress, desc="path patching")
    frame.attrs.update(clean_value=clean_value, corrupt_value=corrupt_value)
    return frame
