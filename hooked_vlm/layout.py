"""Token layout: what every position of a multimodal sequence is, and where it came from.

For each position: text / image / video / special / padding, which image or video, which frame
(temporal slice: ``temporal_patch_size`` input frames merged into one), the merged-grid row and column,
and the pixel box it covers. The same object gives the vision-tower row of every patch, the M-RoPE
position ids (computed exactly as transformers does), and group ids for the attention-statistics kernels
and for patching sweeps. Nothing here hard-codes a token count.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

TEXT, IMAGE, VIDEO, SPECIAL, PAD = 0, 1, 2, 3, -1
KIND_NAMES = {TEXT: "text", IMAGE: "image", VIDEO: "video", SPECIAL: "special", PAD: "pad"}

#: Part codes of layouts whose items have several token parts (``TokenLayout.part``; any-res LLaVA): the base
#: crop, the stitched high-resolution grid, row-end newline tokens, a CLS token, a video frame.
BASE, GRID, NEWLINE, CLS, FRAME = 0, 1, 2, 3, 4
PART_NAMES = {BASE: "base", GRID: "grid", NEWLINE: "newline", CLS: "cls", FRAME: "frame", -1: "-"}


@dataclass(frozen=True)
class VisualItem:
    """One image or video as placed in the prompt batch."""

    kind: Literal["image", "video"]
    index: int  # among images (or videos), in the order transformers consumes them
    batch: int  # prompt row
    start: int  # first sequence position of its placeholder tokens
    grid_thw: tuple[int, int, int]  # patch grid (temporal slices, rows, cols) before merging
    merge: int
    patch_size: int
    temporal_patch_size: int
    vision_offset: int  # first row of this item in its prompt's vision-tower batch row
    pixel_offset: int  # first row of this item in the packed pixel_values(_videos) tensor
    second_per_grid_t: float | None = None

    # Generic names of the fields above (the stored names are Qwen's; they stay for one release, then swap):
    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """(temporal slices, rows, cols) of vision-tower patches before merging (``grid_thw``)."""
        return self.grid_thw

    @property
    def frames_per_slice(self) -> int:
        """Input frames merged into one temporal slice (``temporal_patch_size``; 1 for images of most families)."""
        return self.temporal_patch_size

    @property
    def pixel_row(self) -> int:
        """First row (packed patches) or index (one tensor per image) of this item in its pixel input
        (``pixel_offset``; the input is ``layout.pixel_input(item.kind)``)."""
        return self.pixel_offset

    @property
    def seconds_per_slice(self) -> float | None:
        """Seconds one temporal slice spans, where the inputs say (``second_per_grid_t``)."""
        return self.second_per_grid_t

    @property
    def merged_grid(self) -> tuple[int, int, int]:
        t, h, w = self.grid_thw
        return t, h // self.merge, w // self.merge

    @property
    def n_tokens(self) -> int:
        t, h, w = self.merged_grid
        return t * h * w

    @property
    def n_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of the resized image the grid covers."""
        _, h, w = self.grid_thw
        return h * self.patch_size, w * self.patch_size

    @property
    def cell_pixels(self) -> int:
        return self.merge * self.patch_size


@dataclass
class TokenLayout:
    """Per-position description of a batch; all per-position tensors are ``[B, L]``."""

    input_ids: Int[Tensor, "batch pos"]
    kind: Int[Tensor, "batch pos"]
    item: Int[Tensor, "batch pos"]  # index into ``items``; -1 for non-visual positions
    frame: Int[Tensor, "batch pos"]  # temporal slice; -1 for non-visual
    row: Int[Tensor, "batch pos"]  # merged-grid row; -1 for non-visual
    col: Int[Tensor, "batch pos"]
    items: list[VisualItem]
    position_ids: Int[Tensor, "3 batch pos"] | None = None
    rope_deltas: Int[Tensor, "batch"] | None = None
    attention_mask: Int[Tensor, "batch pos"] | None = None
    meta: dict = field(default_factory=dict)
    #: item kind (``"image"`` / ``"video"``) -> the keyword input holding its pixels (set by ``model.layout``)
    pixel_inputs: dict[str, str] = field(default_factory=dict, kw_only=True)

    # ----- selection helpers -------------------------------------------------------------------------
    def pixel_input(self, kind: str) -> str:
        """The keyword input that holds the pixels of this layout's items of ``kind`` (``"image"`` / ``"video"``)."""
        if kind not in self.pixel_inputs:
            raise ValueError(
                f"this layout does not know which input holds {kind} pixels (known: {self.pixel_inputs}); "
                "build it with model.layout(**inputs)"
            )
        return self.pixel_inputs[kind]

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def images(self) -> list[VisualItem]:
        return [it for it in self.items if it.kind == "image"]

    def videos(self) -> list[VisualItem]:
        return [it for it in self.items if it.kind == "video"]

    def find_item(self, image: int | None = None, video: int | None = None) -> tuple[int, VisualItem]:
        """The (item id, item) of image number ``image`` or video number ``video`` (global order)."""
        if (image is None) == (video is None):
            raise ValueError("pass exactly one of image=... or video=...")
        kind, idx = ("image", image) if image is not None else ("video", video)
        for i, it in enumerate(self.items):
            if it.kind == kind and it.index == idx:
                return i, it
        n = len(self.images() if kind == "image" else self.videos())
        raise IndexError(f"there is no {kind} {idx}: this input has {n} {kind}(s), numbered from 0")

    def positions(
        self, image: int | None = None, video: int | None = None, frame: int | None = None
    ) -> Int[Tensor, "n"]:
        """Sequence positions (in its prompt row) of an image, a video, or one frame of a video."""
        item_id, it = self.find_item(image, video)
        sel = self.item[it.batch] == item_id
        if frame is not None:
            _check_frame(frame, it)
            sel = sel & (self.frame[it.batch] == frame)
        return sel.nonzero().flatten()

    def cell(self, row: int, col: int, image: int | None = None, video: int | None = None, frame: int = 0) -> int:
        """Sequence position of merged-grid cell (row, col) (of a given frame for videos)."""
        item_id, it = self.find_item(image, video)
        t, gh, gw = it.merged_grid
        if not (0 <= row < gh and 0 <= col < gw):
            raise IndexError(f"cell ({row}, {col}) outside the {gh}x{gw} grid of {it.kind} {it.index}")
        _check_frame(frame, it)
        # looked up, not computed from ``start``: a video's slices may be separated by text (Qwen3-VL timestamps)
        b = it.batch
        sel = (self.item[b] == item_id) & (self.frame[b] == frame) & (self.row[b] == row) & (self.col[b] == col)
        return int(sel.nonzero()[0, 0])

    def pixel_box(self, batch: int, pos: int) -> tuple[int, int, int, int] | None:
        """(y0, x0, y1, x1) in resized-image pixels covered by a visual token, or None for other tokens."""
        item_id = int(self.item[batch, pos])
        if item_id < 0:
            return None
        it = self.items[item_id]
        r, c, s = int(self.row[batch, pos]), int(self.col[batch, pos]), it.cell_pixels
        return r * s, c * s, (r + 1) * s, (c + 1) * s

    def box(
        self, y0: int, x0: int, y1: int, x1: int, image: int | None = None, video: int | None = None
    ) -> Int[Tensor, "n"]:
        """Positions of the visual tokens whose cell overlaps the pixel box [y0, y1) x [x0, x1)."""
        item_id, it = self.find_item(image, video)
        s = it.cell_pixels
        b = it.batch
        rows, cols = self.row[b], self.col[b]
        sel = (self.item[b] == item_id) & (rows * s < y1) & ((rows + 1) * s > y0) & (cols * s < x1) & ((cols + 1) * s > x0)
        return sel.nonzero().flatten()

    def text_span(self, substring: str, tokenizer, batch: int = 0, occurrence: int = 0) -> Int[Tensor, "n"]:
        """Positions of the tokens covering ``substring`` (its ``occurrence``-th match) in prompt ``batch``.

        Matching ignores whitespace, so it works whether the tokenizer's pieces carry their spaces (BPE) or
        not (word-level).
        """
        ids = self.input_ids[batch].tolist()
        pieces = ["".join(tokenizer.decode([i]).split()) for i in ids]
        target = "".join(substring.split())
        if not target:
            raise ValueError("text_span needs a non-empty substring")
        text, starts = "", []
        for p in pieces:
            starts.append(len(text))
            text += p
        at = -1
        for _ in range(occurrence + 1):
            at = text.find(target, at + 1)
            if at < 0:
                raise ValueError(f"{substring!r} does not occur {occurrence + 1} time(s) in prompt {batch}")
        end = at + len(target)
        sel = [i for i, s in enumerate(starts) if pieces[i] and s < end and s + len(pieces[i]) > at]
        return torch.tensor(sel, dtype=torch.long)

    def last_token(self, batch: int | None = None) -> Int[Tensor, "batch"]:
        """Position of the last non-padding token of each row (or of one row)."""
        if self.attention_mask is None:
            last = torch.full((self.batch_size,), self.seq_len - 1, dtype=torch.long)
        else:
            valid = self.attention_mask.bool()
            idx = torch.arange(self.seq_len).expand_as(valid)
            last = torch.where(valid, idx, -1).max(dim=1).values
        return last if batch is None else last[batch]

    # ----- group ids for kernels and sweeps --------------------------------------------------------
    def group_ids(self, by: Literal["item", "frame", "cell", "visual", "kind", "last"]) -> Int[Tensor, "batch pos"]:
        """Integer group per position (-1 = no group).

        * ``item``: one group per image/video (its id in ``items``);
        * ``frame``: one group per (item, temporal slice), numbered consecutively;
        * ``cell``: one group per merged-grid cell ``row * W + col`` of any image (frame 0 for videos);
        * ``visual``: 0 for every visual token;
        * ``kind``: the kind code (text 0, image 1, video 2, special 3);
        * ``last``: 0 at each row's last token.
        """
        out = torch.full_like(self.kind, -1)
        visual = self.item >= 0
        if by == "item":
            return torch.where(visual, self.item, out)
        if by == "frame":
            offsets, total = [], 0
            for it in self.items:
                offsets.append(total)
                total += it.merged_grid[0]
            off = torch.tensor(offsets + [0], dtype=torch.long)
            return torch.where(visual, off[self.item.clamp(min=0)] + self.frame, out)
        if by == "cell":
            widths = torch.tensor([it.merged_grid[2] for it in self.items] + [0], dtype=torch.long)
            return torch.where(visual, self.row * widths[self.item.clamp(min=0)] + self.col, out)
        if by == "visual":
            return torch.where(visual, torch.zeros_like(out), out)
        if by == "kind":
            return self.kind.clone()
        if by == "last":
            last = self.last_token()
            out[torch.arange(self.batch_size), last] = 0
            return out
        raise ValueError(f"unknown grouping {by!r}; choose item, frame, cell, visual, kind or last")

    # ----- vision tower rows ------------------------------------------------------------------------
    def vision_rows(
        self, image: int | None = None, video: int | None = None, frame: int | None = None
    ) -> tuple[int, Int[Tensor, "n"]]:
        """(batch row, patch indices) of an item in the vision tower's batch-first, raster-order activations."""
        _, it = self.find_item(image, video)
        t, h, w = it.grid_thw
        rows = torch.arange(it.vision_offset, it.vision_offset + it.n_patches)
        if frame is not None:
            _check_frame(frame, it)
            rows = rows[frame * h * w : (frame + 1) * h * w]
        return it.batch, rows

    def vision_grid(self, activation: Tensor, image: int | None = None, video: int | None = None) -> Tensor:
        """Reshape a vision activation ``[B, N, ...]`` to this item's ``[t, h, w, ...]`` patch grid."""
        b, rows = self.vision_rows(image, video)
        _, it = self.find_item(image, video)
        return activation[b, rows].reshape(*it.grid_thw, *activation.shape[2:])

    def summary(self) -> str:
        """A human-readable account of each prompt's segments."""
        lines = []
        for b in range(self.batch_size):
            kinds = self.kind[b].tolist()
            items = self.item[b].tolist()
            segs = []
            for key, grp in itertools.groupby(enumerate(zip(kinds, items)), key=lambda x: x[1]):
                grp = list(grp)
                segs.append((key, grp[0][0], grp[-1][0] + 1))
            lines.append(f"prompt {b}: {self.seq_len} positions")
            for (k, item_id), s, e in segs:
                desc = f"  [{s:>5}, {e:>5}) {KIND_NAMES[k]:<7}"
                if item_id >= 0:
                    it = self.items[item_id]
                    t, gh, gw = it.merged_grid
                    desc += (
                        f" {it.kind} {it.index}: {t} slice(s) x {gh}x{gw} cells of {it.cell_pixels}px, "
                        f"pixels {it.pixel_size[0]}x{it.pixel_size[1]}"
                    )
                lines.append(desc)
        return "\n".join(lines)


def _check_frame(frame: int, it: VisualItem) -> None:
    """``frame`` must be one of the item's temporal slices (0..t-1); images have one."""
    t = it.merged_grid[0]
    if not 0 <= frame < t:
        raise IndexError(
            f"frame {frame} out of range: {it.kind} {it.index} has {t} temporal slice(s), numbered 0..{t - 1} "
            f"(one slice = temporal_patch_size={it.temporal_patch_size} input frames)"
        )


def __getattr__(name: str):
    """Deprecated alias: ``mrope_position_ids`` is Qwen's rule and moved to :mod:`hooked_vlm.families.qwen_vl.layout`."""
    if name == "mrope_position_ids":
        from hooked_vlm.families.qwen_vl.layout import mrope_position_ids

        return mrope_position_ids
    raise AttributeError(f"module 'hooked_vlm.layout' has no attribute {name!r}")
