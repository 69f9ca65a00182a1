"""Token slices of a video prompt: ``visual``, ``text`` and ``visual_frames:A:B`` (input frames ``[A, B)``).

A frame span is counted in the frames given to the model. Qwen2-VL / Qwen2.5-VL embed ``temporal_patch_size``
(2) consecutive frames as one temporal slice and merge 2x2 patches into one token, so input frames ``[A, B)``
are the tokens of slices ``A // tps`` .. ``ceil(B / tps) - 1``, each slice ``(h / 2) * (w / 2)`` tokens long;
LLaVA video families have one slice per frame. The mapping reads the model's token layout
(``model.layout(**inputs)``: per position its item, slice, row and column), so it never hard-codes a count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SpanError", "TokenSlice", "parse_token_slice", "parse_span_list", "frame_span_tokens", "slice_positions",
           "token_slice_positions", "frame_groups"]

_FRAMES = re.compile(r"^visual_frames:(\d+):(\d+)$")


class SpanError(ValueError):
    """A token slice or frame span that does not fit the model or the clip."""


@dataclass(frozen=True)
class TokenSlice:
    """``kind`` is ``visual``, ``text`` or ``frames``; ``start`` / ``stop`` are input frames for ``frames``."""

    kind: str
    start: int = 0
    stop: int = 0

    @property
    def name(self) -> str:
        return f"visual_frames:{self.start}:{self.stop}" if self.kind == "frames" else self.kind


def parse_token_slice(text: str) -> TokenSlice:
    """``visual`` | ``text`` | ``visual_frames:A:B`` (A < B) -> :class:`TokenSlice`."""
    if text in ("visual", "text"):
        return TokenSlice(text)
    m = _FRAMES.match(text)
    if not m:
        raise SpanError(f"--token_slice {text!r}: use 'visual', 'text' or 'visual_frames:A:B' (input frames A..B-1, e.g. visual_frames:0:2)")
    start, stop = int(m.group(1)), int(m.group(2))
    if stop <= start:
        raise SpanError(f"--token_slice {text!r}: the span needs A < B (frames A..B-1)")
    return TokenSlice("frames", start, stop)


def parse_span_list(text: str) -> list[tuple[int, int]]:
    """``"0:2,2:4"`` -> ``[(0, 2), (2, 4)]`` (input frames, stop exclusive)."""
    spans = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+):(\d+)", part)
        if not m or int(m.group(2)) <= int(m.group(1)):
            raise SpanError(f"span {part!r} in {text!r}: write spans as A:B with A < B, separated by commas (e.g. 0:2,2:4)")
        spans.append((int(m.group(1)), int(m.group(2))))
    return spans


def _video_item(layout: Any, video: int, what: str) -> tuple[int, Any]:
    videos = layout.videos()
    if not videos:
        raise SpanError(f"{what} needs video tokens, but this input has none (an image model or an image prompt); "
                        "use --token_slice visual or text, or a video-capable model")
    return layout.find_item(video=video)


def frame_span_tokens(layout: Any, start: int, stop: int, n_frames: int, video: int = 0) -> tuple[list[int], list[int]]:
    """(sequence positions, temporal slices) of input frames ``[start, stop)`` of video ``video``.

    ``n_frames`` is how many frames were given to the model (before padding to whole slices); a span past
    it raises :class:`SpanError`.
    """
    item_id, item = _video_item(layout, video, f"visual_frames:{start}:{stop}")
    if not 0 <= start < stop <= n_frames:
        raise SpanError(f"visual_frames:{start}:{stop} is outside the clip: it has {n_frames} input frames (0..{n_frames - 1}); "
                        "choose a span inside it or raise --num_frames")
    tps = int(item.temporal_patch_size)
    slices = list(range(start // tps, math.ceil(stop / tps)))
    return slice_positions(layout, slices, video), slices


def slice_positions(layout: Any, slices: list[int], video: int = 0) -> list[int]:
    """Sequence positions of temporal slices ``slices`` of video ``video`` (prompt row of that video)."""
    item_id, item = _video_item(layout, video, "a frame slice")
    sel = layout.item[item.batch] == item_id
    frame = layout.frame[item.batch]
    keep = torch.zeros_like(sel)
    for s in slices:
        keep |= sel & (frame == s)
    return keep.nonzero().flatten().tolist()


def token_slice_positions(layout: Any, token_slice: TokenSlice, n_frames: int, batch: int = 0) -> list[int]:
    """Positions of one token slice: every visual token, every text token, or a frame span's tokens."""
    if token_slice.kind == "frames":
        return frame_span_tokens(layout, token_slice.start, token_slice.stop, n_frames)[0]
    if token_slice.kind == "visual":
        return (layout.item[batch] >= 0).nonzero().flatten().tolist()
    from hooked_vlm.layout import TEXT

    return (layout.kind[batch] == TEXT).nonzero().flatten().tolist()


def frame_groups(layout: Any, n_frames: int, video: int = 0) -> dict[str, list[int]]:
    """One group per temporal slice, named by the input frames it holds (``frames 0-1``), in slice order."""
    _, item = _video_item(layout, video, "per-frame tracing")
    tps = int(item.temporal_patch_size)
    out = {}
    for s in range(item.merged_grid[0]):
        first, last = s * tps, min((s + 1) * tps, max(n_frames, 1)) - 1
        name = f"frames {first}-{last}" if last > first else f"frame {first}"
        out[name] = slice_positions(layout, [s], video)
    return out

