"""Counterfactual videos on frame arrays ``[T, H, W, C]``, aware of Qwen's temporal patching.

Qwen2-VL / Qwen2.5-VL embed a video in *temporal slices* of ``temporal_patch_size`` (2) consecutive
frames: one slice = one token-layout frame (``video_grid_thw[0]`` slices). An edit that splits a slice
mixes two moments inside one token, so by default span-level edits (swap, shuffle, drop) work on whole
slices and refuse frame ranges that do not fall on slice boundaries. Frame-level edits that are
meaningful inside a slice (reverse, freeze) are frame-level on purpose and say so.

Every function returns a :class:`VideoCounterfactual`: the new frames plus, for every output frame,
the tuple of original frame indices it was made from (one index for a copied frame, several for
derived frames such as motion maps and temporal means). :meth:`VideoCounterfactual.changed_slices`
tells which token-layout frames differ from the original, i.e. which frame spans of the token layout
a patching sweep should look at.

Inputs may be numpy arrays or torch tensors (uint8 or float); outputs have the same type and dtype.
Frame counts that are not a multiple of the temporal patch size are padded by repeating the last
frame, as the Qwen processors do, before the edit (``pad=True``; otherwise an error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Shaped

__all__ = [
    "VideoCounterfactual",
    "identity",
    "reverse",
    "swap_spans",
    "shuffle",
    "freeze",
    "drop_frames",
    "motion_only",
    "destroy_motion",
    "pad_to_temporal_patch",
    "frame_to_slice",
]

Frames = Shaped[np.ndarray, "time height width channels"] | Shaped[torch.Tensor, "time height width channels"]


@dataclass
class VideoCounterfactual:
    """A transformed video and where each of its frames came from.

    Attributes:
        frames: the transformed frames ``[T', H, W, C]`` (same array type and dtype as the input).
        sources: one tuple per output frame with the original frame indices it was built from.
        name: the transform's name (``"reverse"``, ``"swap_spans"``, ...).
        params: the transform's parameters (JSON-friendly), for manifests.
        temporal_patch_size: frames per temporal slice (token-layout frame).
        reference: original frame index at each position of the (padded) original video that the
            output is compared with; ``None`` = ``0..T'-1`` (no padding).
    """

    frames: Any
    sources: tuple[tuple[int, ...], ...]
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    temporal_patch_size: int = 2
    reference: tuple[int, ...] | None = None

    @property
    def source_index(self) -> np.ndarray:
        """``[T']`` original frame index of each output frame; -1 where it mixes several frames."""
        return np.array([s[0] if len(s) == 1 else -1 for s in self.sources], dtype=np.int64)

    @property
    def num_slices(self) -> int:
        """Number of temporal slices (token-layout frames) of the output."""
        return len(self.sources) // self.temporal_patch_size

    def changed_slices(self) -> list[int]:
        """Temporal slices whose frames are not the identical original frames at the same places."""
        tps = self.temporal_patch_size
        ref = self.reference if self.reference is not None else tuple(range(len(self.sources)))
        out = []
        for s in range(self.num_slices):
            span = range(s * tps, (s + 1) * tps)
            if any(t >= len(ref) or self.sources[t] != (ref[t],) for t in span):
                out.append(s)
        return out

    def describe(self) -> str:
        """One line per output frame: ``out_t <- original frames``."""
        lines = [f"{self.name} {self.params}"]
        for t, src in enumerate(self.sources):
            lines.append(f"  frame {t:3d} (slice {t // self.temporal_patch_size}) <- {list(src)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers
def _to_numpy(frames: Frames) -> tuple[np.ndarray, bool, Any]:
    if isinstance(frames, torch.Tensor):
        return frames.detach().cpu().numpy(), True, (frames.dtype, frames.device)
    arr = np.asarray(frames)
    return arr, False, arr.dtype


def _from_numpy(arr: np.ndarray, was_torch: bool, meta: Any) -> Any:
    if was_torch:
        dtype, device = meta
        return torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=dtype)
    return arr.astype(meta, copy=False)


def _check(frames: np.ndarray) -> None:
    if frames.ndim != 4:
        raise ValueError(f"frames must be [T, H, W, C]; got shape {frames.shape}")
    if frames.shape[0] < 1:
        raise ValueError("frames must hold at least one frame")


def frame_to_slice(t: int, temporal_patch_size: int = 2) -> int:
    """Temporal slice (token-layout frame) that frame ``t`` falls into."""
    return t // temporal_patch_size


def pad_to_temporal_patch(frames: Frames, temporal_patch_size: int = 2) -> VideoCounterfactual:
    """Repeat the last frame until ``T`` is a multiple of the temporal patch size (as Qwen processors)."""
    arr, was_torch, meta = _to_numpy(frames)
    _check(arr)
    t = arr.shape[0]
    extra = (-t) % temporal_patch_size
    idx = list(range(t)) + [t - 1] * extra
    return VideoCounterfactual(
        _from_numpy(arr[idx], was_torch, meta),
        tuple((i,) for i in idx),
        "pad",
        {"added": extra},
        temporal_patch_size,
    )


def _prepare(frames: Frames, tps: int, pad: bool) -> tuple[np.ndarray, bool, Any, list[int]]:
    """Numpy frames padded to a multiple of ``tps``, and the original index of each padded frame."""
    arr, was_torch, meta = _to_numpy(frames)
    _check(arr)
    if tps < 1:
        raise ValueError("temporal_patch_size must be >= 1")
    t = arr.shape[0]
    if t % tps:
        if not pad:
            raise ValueError(
                f"{t} frames is not a multiple of temporal_patch_size={tps}; pass pad=True to repeat the "
                "last frame as the processor does, or trim the video"
            )
        idx = list(range(t)) + [t - 1] * ((-t) % tps)
        arr = arr[idx]
    else:
        idx = list(range(t))
    return arr, was_torch, meta, idx


def _gather(
    arr: np.ndarray, base: list[int], order: Sequence[int], was_torch: bool, meta: Any, name: str,
    params: dict, tps: int,
) -> VideoCounterfactual:
    order = list(order)
    return VideoCounterfactual(
        _from_numpy(arr[order], was_torch, meta), tuple((base[i],) for i in order), name, params, tps,
        tuple(base),
    )


def _slice_frames(slices: Sequence[int], tps: int) -> list[int]:
    return [s * tps + k for s in slices for k in range(tps)]


def _span_to_slices(span: tuple[int, int], n_frames: int, tps: int, unit: str) -> list[int]:
    start, stop = span
    if not (0 <= start < stop):
        raise ValueError(f"span {span} must satisfy 0 <= start < stop")
    if unit == "slice":
        n_slices = n_frames // tps
        if stop > n_slices:
            raise ValueError(f"span {span} exceeds the video's {n_slices} temporal slices")
        return list(range(start, stop))
    if unit == "frame":
        if stop > n_frames:
            raise ValueError(f"span {span} exceeds the video's {n_frames} frames")
        if start % tps or stop % tps:
            raise ValueError(
                f"frame span {span} splits a temporal slice of {tps} frames; use slice boundaries "
                f"(multiples of {tps}) or unit='slice'"
            )
        return list(range(start // tps, stop // tps))
    raise ValueError(f"unit must be 'slice' or 'frame', got {unit!r}")


# ----------------------------------------------------------------------------- transforms
def identity(frames: Frames, temporal_patch_size: int = 2, pad: bool = True) -> VideoCounterfactual:
    """The original video (padded to whole slices): the control condition."""
    arr, wt, meta, base = _prepare(frames, temporal_patch_size, pad)
    return _gather(arr, base, range(arr.shape[0]), wt, meta, "identity", {}, temporal_patch_size)


def reverse(
    frames: Frames, temporal_patch_size: int = 2, unit: Literal["frame", "slice"] = "frame", pad: bool = True
) -> VideoCounterfactual:
    """Play the video backwards.

    ``unit="frame"`` (default) reverses every frame, so the order inside each slice flips too (true
    time reversal, which the 3-D patch embedding can see); ``unit="slice"`` reverses the order of
    slices but keeps the frame order inside each slice (a reversal the token layout can express
    exactly: token frame ``s`` of the output is token frame ``S-1-s`` of the input).
    """
    tps = temporal_patch_size
    arr, wt, meta, base = _prepare(frames, tps, pad)
    t = arr.shape[0]
    if unit == "frame":
        order = list(range(t - 1, -1, -1))
    elif unit == "slice":
        order = _slice_frames(list(range(t // tps - 1, -1, -1)), tps)
    else:
        raise ValueError(f"unit must be 'frame' or 'slice', got {unit!r}")
    return _gather(arr, base, order, wt, meta, "reverse", {"unit": unit}, tps)


def swap_spans(
    frames: Frames,
    span_a: tuple[int, int],
    span_b: tuple[int, int],
    temporal_patch_size: int = 2,
    unit: Literal["slice", "frame"] = "slice",
    pad: bool = True,
) -> VideoCounterfactual:
    """Exchange two non-overlapping, equally long spans ``[start, stop)`` (a local temporal swap).

    Spans are in slices by default; with ``unit="frame"`` they must lie on slice boundaries.
    """
    tps = temporal_patch_size
    arr, wt, meta, base = _prepare(frames, tps, pad)
    a = _span_to_slices(span_a, arr.shape[0], tps, unit)
    b = _span_to_slices(span_b, arr.shape[0], tps, unit)
    if len(a) != len(b):
        raise ValueError(f"spans must have equal length; got {span_a} and {span_b}")
    if set(a) & set(b):
        raise ValueError(f"spans {span_a} and {span_b} overlap")
    slices = list(range(arr.shape[0] // tps))
    for x, y in zip(a, b):
        slices[x], slices[y] = slices[y], slices[x]
    params = {"span_a": list(span_a), "span_b": list(span_b), "unit": unit}
    return _gather(arr, base, _slice_frames(slices, tps), wt, meta, "swap_spans", params, tps)


def shuffle(
    frames: Frames,
    seed: int = 0,
    temporal_patch_size: int = 2,
    unit: Literal["slice", "frame"] = "slice",
    derangement: bool = True,
    pad: bool = True,
) -> VideoCounterfactual:
    """Randomly permute slices (default) or frames with a seeded generator.

    ``derangement=True`` redraws until no unit stays in place (when there are at least two units), so
    every slice really moves.
    """
    tps = temporal_patch_size
    arr, wt, meta, base = _prepare(frames, tps, pad)
    n = arr.shape[0] // tps if unit == "slice" else arr.shape[0]
    if unit not in ("slice", "frame"):
        raise ValueError(f"unit must be 'slice' or 'frame', got {unit!r}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    if derangement and n >= 2:
        while np.any(perm == np.arange(n)):
            perm = rng.permutation(n)
    order = _slice_frames(perm.tolist(), tps) if unit == "slice" else perm.tolist()
    params = {"seed": seed, "unit": unit, "derangement": derangement}
    return _gather(arr, base, order, wt, meta, "shuffle", params, tps)


def freeze(
    frames: Frames,
    frame: int = 0,
    span: tuple[int, int] | None = None,
    temporal_patch_size: int = 2,
    pad: bool = True,
) -> VideoCounterfactual:
    """Repeat frame ``frame`` over ``span`` (frames ``[start, stop)``; default: the whole video).

    A fully frozen video keeps one moment's appearance and has no motion at all.
    """
    tps = temporal_patch_size
    arr, wt, meta, base = _prepare(frames, tps, pad)
    t = arr.shape[0]
    if not 0 <= frame < t:
        raise ValueError(f"frame {frame} out of range for {t} frames")
    start, stop = span if span is not None else (0, t)
    if not 0 <= start < stop <= t:
        raise ValueError(f"span {span} out of range for {t} frames")
    order = [frame if start <= i < stop else i for i in range(t)]
    params = {"frame": frame, "span": [start, stop]}
    return _gather(arr, base, order, wt, meta, "freeze", params, tps)


def drop_frames(
    frames: Frames,
    slices: Sequence[int],
    temporal_patch_size: int = 2,
    fill: Literal["remove", "repeat_previous"] = "repeat_previous",
    pad: bool = True,
) -> VideoCounterfactual:
    """Drop whole temporal slices.

    ``fill="repeat_previous"`` (default) keeps the length: each dropped slice shows the last frame
    before it (the first kept frame if the drop is at the start), so the token layout is unchanged and
    the result can be patched against the original. ``fill="remove"`` shortens the video (the layout
    changes, so it cannot be position-patched against the original).
    """
    tps = temporal_patch_size
    arr, wt, meta, base = _prepare(frames, tps, pad)
    n = arr.shape[0] // tps
    drop = sorted(set(int(s) for s in slices))
    if not drop:
        raise ValueError("slices must name at least one slice to drop")
    if drop[0] < 0 or drop[-1] >= n:
        raise ValueError(f"slices {drop} out of range for {n} temporal slices")
    if len(drop) == n:
        raise ValueError("cannot drop every slice")
    if fill == "remove":
        order = _slice_frames([s for s in range(n) if s not in drop], tps)
    elif fill == "repeat_previous":
        dropped = set(_slice_frames(drop, tps))
        kept = [i for i in range(arr.shape[0]) if i not in dropped]
        order, last = [], None
        for i in range(arr.shape[0]):
            if i in dropped:
                order.append(last if last is not None else kept[0])
            else:
                order.append(i)
                last = i
    else:
        raise ValueError(f"fill must be 'remove' or 'repeat_previous', got {fill!r}")
    params = {"slices": drop, "fill": fill}
    return _gather(arr, base, order, wt, meta, "drop_frames", params, tps)


def _value_range(arr: np.ndarray) -> tuple[float, float]:
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return float(info.min), float(info.max)
    return (0.0, 1.0) if arr.min() >= 0 and arr.max() <= 1 else (float(arr.min()), float(arr.max()))


def motion_only(
    frames: Frames, temporal_patch_size: int = 2, gain: float = 1.0, pad: bool = True
) -> VideoCounterfactual:
    """Keep only what moves: frame differences ``x_t - x_{t-1}`` shown around mid-grey.

    Output frame ``t`` = ``mid + gain * (x_t - x_{t-1})`` clipped to the input's value range (uint8:
    0..255, floats in [0, 1]: 0..1, other floats: their observed range); frame 0 has no predecessor
    and is plain mid-grey (source ``(0,)`` with zero motion). Static appearance is gone; motion
    (where and how pixels change) remains. Sources of frame ``t > 0`` are ``(t-1, t)``.
    """
    tps = temporal_patch_size
    arr, wt, meta, base = _prepare(frames, tps, pad)
    lo, hi = _value_range(arr)
    x = arr.astype(np.float64)
    mid = (lo + hi) / 2.0
    diff = np.zeros_like(x)
    diff[1:] = x[1:] - x[:-1]
    out = np.clip(mid + gain * diff, lo, hi)
    if np.issubdtype(arr.dtype, np.integer):
        out = np.rint(out)
    out = out.astype(arr.dtype)
    sources = ((base[0],),) + tuple((base[t - 1], base[t]) for t in range(1, arr.shape[0]))
    # a one-source entry that is not a copy must not read as "unchanged": mark frame 0 as mixed
    sources = ((base[0], base[0]),) + sources[1:]
    return VideoCounterfactual(
        _from_numpy(out, wt, meta), sources, "motion_only", {"gain": gain}, tps, tuple(base)
    )


def destroy_motion(
    frames: Frames,
    mode: Literal["mean", "pixel_shuffle"] = "mean",
    seed: int = 0,
    temporal_patch_size: int = 2,
    pad: bool = True,
) -> VideoCounterfactual:
    """Remove motion while keeping appearance.

    * ``"mean"`` (default): every frame is the temporal mean frame -- the appearance of the whole clip,
      no change over time.
    * ``"pixel_shuffle"``: each pixel's time series is permuted independently (seeded), so every
      pixel keeps its set of values but coherent motion is destroyed.

    Every output frame's sources are all original frames.
    """
    tps = temporal_patch_size
    arr, wt, meta, base = _prepare(frames, tps, pad)
    t = arr.shape[0]
    if mode == "mean":
        out = arr.astype(np.float64).mean(0, keepdims=True).repeat(t, 0)
        if np.issubdtype(arr.dtype, np.integer):
            out = np.rint(out)
        out = out.astype(arr.dtype)
    elif mode == "pixel_shuffle":
        rng = np.random.default_rng(seed)
        keys = rng.random((t,) + arr.shape[1:3])
        perm = np.argsort(keys, axis=0)  # T H W: independent permutation per pixel
        out = np.take_along_axis(arr, perm[..., None].repeat(arr.shape[3], -1), axis=0)
    else:
        raise ValueError(f"mode must be 'mean' or 'pixel_shuffle', got {mode!r}")
    everything = tuple(sorted(set(base)))
    sources = tuple(everything if len(everything) > 1 else everything * 2 for _ in range(t))
    params = {"mode": mode, "seed": seed}
    return VideoCounterfactual(
        _from_numpy(out, wt, meta), sources, "destroy_motion", params, tps, tuple(base)
    )
