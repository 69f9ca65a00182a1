"""Method validation on the shipped Qwen organisms: patching finds the planted cell, reversal flips, spans localise.

Small versions of ``python -m analyses.organism_validation`` (the docs/organisms.md table uses n=50).
The expected values are the planted truth of the generators, never the methods' own output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses import organism_validation as ov
from hooked_vlm.organisms import is_trained

pytestmark = pytest.mark.slow

def _load(name):
    if not is_trained(name):
        pytest.fail(f"{name} has no shipped checkpoint; train it with `hooked-vlm organisms train {name}`")
    return ov.load_organism(name)


@pytest.fixture(scope="module")
def grid():
    return _load("grid-qwen2.5-vl")


@pytest.fixture(scope="module")
def video():
    return _load("video-qwen2-vl")


def test_cell_sweep_top_recovery_is_the_target_cell(grid):
    with torch.no_grad():
        cases = ov.grid_cell_sweep(*grid, n=10, seed=31)
    top_is_target = [c.top_cell == c.target_cell for c in cases]
    assert np.mean(top_is_target) >= 0.9, [(c.target_cell, c.top_cell) for c in cases]
    # patching the target cell alone restores "yes" in the corrupted (target removed) image
    assert np.mean([c.restored for c in cases]) >= 0.9
    # the model reads the pixels: removing the target moves the yes-no logit difference by more than one logit
    # (a median over cases, so one clean run that does not say "yes" does not decide it)
    assert np.median([c.clean_diff - c.corrupt_diff for c in cases]) > 1.0


def test_reversing_a_clip_flips_the_direction_answer(video):
    with torch.no_grad():
        result = ov.video_reversal(*video, n=20, seed=32)
    assert result["accuracy"] >= 0.9
    assert result["reversed_flips"] >= 0.9


def test_frame_span_patching_localises_the_answer_frames(video):
    with torch.no_grad():
        cases = ov.video_span_patching(*video, n=4, seed=33, layers=(0,))
    for c in cases:
        rec = np.array(c.recovery[0])
        outside = [s for s in range(len(rec)) if s not in c.answer_slices]
        assert c.top_in_span[0]
        # slices outside the span hold identical frames in both clips and the vision tower attends within a
        # slice, so at the LM input their patch changes nothing
        assert np.allclose(rec[outside], 0.0, atol=1e-6)
        assert c.span_recovery[0] > 0.9
