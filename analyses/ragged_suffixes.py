"""Ragged suffixes: run each variant of a batch from its own first edited position, packed into one sequence.

A sweep's variants differ only from their first edited position ``s_i`` on; before it they equal the base run,
whose keys and values are cached. Instead of computing every row of a batch from the batch's smallest ``s_i``
(``n x (L - min s)`` positions), the rows' suffixes are packed into ONE sequence of ``sum (L - s_i)`` positions
that attends to the base run's cached prefix (batch 1, not copied per row):

* packed order: every row's positions ``s_i .. L-2`` (row after row), then every row's last position ``L-1``
  (the "ends", in row order), so a last-token metric reads the packed sequence's last ``n`` positions and the
  final block can compute only those (``final_positions=n``);
* each packed position keeps its own rotary position id and token; causal order inside a row is kept (a row's
  end comes after its body);
* a :class:`~kernels.mask.Knockout` removes what a row must not see: cached prefix keys at or after its own
  start, and every other row's packed positions (mask only, no ``[Lq, Lk]`` tensor).

:class:`PackedRows` holds that layout; the runner (:class:`analyses.variants.VariantRunner`) feeds it to the
model's ``forward(start_at_layer=, resid=)`` with the prefix cache. Exactness against the one-row-per-variant
path is tested (``tests/analyses/test_ragged_suffixes.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from kernels.mask import Knockout

_BLOCK_HOOK = re.compile(r"^blocks\.\d+\.")
#: hooks whose axis 1 is not the sequence (scores / patterns are [B, H, Lq, Lk]): never packed
_NOT_POSITION_FIRST = ("hook_attn_scores", "hook_pattern")


def row_starts(chunk: Sequence[Sequence["object"]], seq_len: int) -> list[int] | None:
    """Each variant's first edited position, or None when some edit cannot be packed (a vision or embedding
    edit, an attention-edge block, an edit of every position, or a hook whose axis 1 is not the sequence).
    A variant without edits starts at the last position (only the metric's position is computed)."""
    starts = []
    for edits in chunk:
        first = seq_len - 1
        for e in edits:
            if (e.mode == "block" or e.positions is None or e.pos_axis != 1 or not _BLOCK_HOOK.match(e.hook)
                    or e.hook.endswith(_NOT_POSITION_FIRST)):
                return None
            pos = torch.as_tensor(e.positions)
            if pos.numel():
                first = min(first, int(pos.min()))
        starts.append(first)
    return starts


@dataclass(frozen=True)
class PackedRows:
    """Where each (row, position) of ``n`` ragged suffixes sits in the packed sequence (see the module docstring).

    ``order[j]``: the absolute position packed at index ``j``; ``row_of[j]``: its row; ``prefix``: the cached
    prefix length the packed sequence attends to (the largest start).
    """

    starts: tuple[int, ...]
    seq_len: int
    order: Int[Tensor, "packed"]
    row_of: Int[Tensor, "packed"]
    body_offsets: Int[Tensor, "n"]

    @classmethod
    def build(cls, starts: Sequence[int], seq_len: int) -> "PackedRows":
        if not starts or min(starts) < 0 or max(starts) >= seq_len:
            raise ValueError(f"row starts {list(starts)} must lie in [0, {seq_len}) (one per variant)")
        n, last = len(starts), seq_len - 1
        bodies = [torch.arange(s, last) for s in starts]
        order = torch.cat([*bodies, torch.full((n,), last)])
        row_of = torch.cat([*(torch.full((b.numel(),), i) for i, b in enumerate(bodies)), torch.arange(n)])
        lengths = torch.tensor([b.numel() for b in bodies])
        offsets = torch.cumsum(lengths, 0) - lengths
        return cls(tuple(int(s) for s in starts), seq_len, order, row_of, offsets)

    @property
    def n_rows(self) -> int:
        return len(self.starts)

    @property
    def prefix(self) -> int:
        """Cached prefix positions the packed rows read (up to the largest start)."""
        return max(self.starts)

    @property
    def n_packed(self) -> int:
        return int(self.order.numel())

    def index_of(self, row: int, positions: Int[Tensor, "p"]) -> Int[Tensor, "p"]:
        """Packed indices of absolute ``positions`` (each >= the row's start) of variant ``row``."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        start, last = self.starts[row], self.seq_len - 1
        if positions.numel() and int(positions.min()) < start:
            raise ValueError(f"row {row} starts at position {start}; position {int(positions.min())} is not packed")
        body = self.body_offsets[row] + positions - start
        end = self.n_packed - self.n_rows + row
        return torch.where(positions == last, torch.full_like(positions, end), body)

    def gather(self, t: Tensor, axis: int, first: int = 0) -> Tensor:
        """The packed positions of ``t`` along ``axis`` (``t`` covers absolute positions ``first..``)."""
        return t.index_select(axis, (self.order - first).to(t.device))

    def knockout(self, device: torch.device | str = "cpu") -> Knockout:
        """Edges each packed row must not see: prefix keys at or after its start, other rows' packed positions.

        Regions by absolute key position (``[1, prefix + packed]``): prefix keys are bucketed by the distinct
        starts (bucket b = how many starts are <= the key), packed keys by row (``n_buckets + row``)."""
        n, p = self.n_rows, self.prefix
        cuts = torch.tensor(sorted(set(self.starts)))
        buckets = torch.searchsorted(cuts, torch.arange(p), right=True)  # 0..len(cuts)
        nb = len(cuts) + 1
        k_region = torch.cat([buckets, nb + self.row_of])[None]
        q_region = torch.cat([torch.full((p,), -1), self.row_of])[None]
        row_bucket = torch.searchsorted(cuts, torch.tensor(self.starts), right=True)  # bucket of key == start
        table = torch.zeros(n, nb + n, dtype=torch.bool)
        table[:, :nb] = torch.arange(nb)[None, :] >= row_bucket[:, None]  # prefix keys >= own start
        table[:, nb:] = ~torch.eye(n, dtype=torch.bool)  # other rows' packed positions
        return Knockout(q_region.to(device), k_region.to(device), table.to(device))


__all__ = ["PackedRows", "row_starts"]
