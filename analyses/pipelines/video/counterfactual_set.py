"""The counterfactual clips of one entry, built with :mod:`analyses.video_counterfactuals` from the run options.

Names: ``reverse`` (every frame, backwards), ``swap A:B<->C:D`` (one per pair of ``--swap_spans``, input frames
on temporal-slice boundaries), ``destroy_motion`` (every frame = the clip's mean frame), ``motion_only``
(frame differences around grey; with ``--include_motion_only``), ``shuffle`` (slices permuted, seeded per
entry) and ``freeze`` (frame 0 throughout). Each keeps the clip's frame count, so its token layout is the
clean clip's and states can be patched position by position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from analyses import video_counterfactuals as vc

from .spans import SpanError

__all__ = ["COUNTERFACTUALS", "DEFAULT_COUNTERFACTUALS", "build_counterfactuals", "check_swap_spans"]

COUNTERFACTUALS = ("reverse", "swap", "destroy_motion", "motion_only", "shuffle", "freeze")
DEFAULT_COUNTERFACTUALS = ("reverse", "swap", "destroy_motion", "shuffle", "freeze")


def check_swap_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pair ``--swap_spans`` into swaps (1st with 2nd, 3rd with 4th, ...); spans of a pair must be equally long."""
    if len(spans) % 2:
        raise SpanError(f"--swap_spans needs spans in pairs (A:B,C:D swaps A..B-1 with C..D-1); got {len(spans)} span(s)")
    pairs = []
    for a, b in zip(spans[::2], spans[1::2]):
        if a[1] - a[0] != b[1] - b[0]:
            raise SpanError(f"--swap_spans {a[0]}:{a[1]},{b[0]}:{b[1]}: swapped spans must be equally long")
        if a[0] < b[1] and b[0] < a[1]:
            raise SpanError(f"--swap_spans {a[0]}:{a[1]},{b[0]}:{b[1]}: swapped spans must not overlap")
        pairs.append((a, b))
    return pairs


def build_counterfactuals(
    frames: np.ndarray, temporal_patch_size: int, names: Sequence[str], swap_pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]],
    seed: int, n_frames: int,
) -> dict[str, vc.VideoCounterfactual]:
    """``{name: VideoCounterfactual}`` for the requested counterfactual kinds (see the module docstring)."""
    tps = temporal_patch_size
    out: dict[str, vc.VideoCounterfactual] = {}
    for name in names:
        if name == "reverse":
            out[name] = vc.reverse(frames, tps, unit="frame")
        elif name == "swap":
            for a, b in swap_pairs:
                for span in (a, b):
                    if span[1] > n_frames:
                        raise SpanError(f"--swap_spans {span[0]}:{span[1]} goes past the clip's end: it has {n_frames} input frames "
                                        f"(0..{n_frames - 1}); choose spans inside the clip or raise --num_frames")
                    if span[0] % tps or span[1] % tps:
                        raise SpanError(f"--swap_spans {span[0]}:{span[1]} splits a temporal slice of {tps} frames (one token holds "
                                        f"{tps} frames on this model); use multiples of {tps}")
                out[f"swap {a[0]}:{a[1]}<->{b[0]}:{b[1]}"] = vc.swap_spans(frames, a, b, tps, unit="frame")
        elif name == "destroy_motion":
            out[name] = vc.destroy_motion(frames, "mean", temporal_patch_size=tps)
        elif name == "motion_only":
            out[name] = vc.motion_only(frames, tps)
        elif name == "shuffle":
            if len(frames) // tps >= 2:
                out[name] = vc.shuffle(frames, seed=seed % 2**31, temporal_patch_size=tps, unit="slice")
        elif name == "freeze":
            out[name] = vc.freeze(frames, 0, temporal_patch_size=tps)
        else:
            raise ValueError(f"unknown counterfactual {name!r}; choose from {', '.join(COUNTERFACTUALS)}")
    return out
