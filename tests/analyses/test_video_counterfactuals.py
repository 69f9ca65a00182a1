"""Video counterfactuals: frame provenance, slice awareness, value semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses import video_counterfactuals as vc


def _video(t=8, h=4, w=5, c=3, dtype=np.uint8):
    # frame t has constant value 10*t so provenance can be read off the pixels
    return (np.arange(t)[:, None, None, None] * 10 * np.ones((t, h, w, c))).astype(dtype)


def _frame_values(frames):
    return [int(np.asarray(f)[0, 0, 0]) // 10 for f in frames]


def test_reverse_frame_and_slice_units():
    v = _video()
    r = vc.reverse(v)
    assert _frame_values(r.frames) == list(range(7, -1, -1))
    assert r.source_index.tolist() == list(range(7, -1, -1))
    rs = vc.reverse(v, unit="slice")
    assert rs.source_index.tolist() == [6, 7, 4, 5, 2, 3, 0, 1]
    assert _frame_values(rs.frames) == rs.source_index.tolist()
    assert rs.changed_slices() == [0, 1, 2, 3]


def test_swap_spans_moves_whole_slices_and_rejects_split_slices():
    v = _video()
    s = vc.swap_spans(v, (0, 1), (2, 3))  # slices
    assert s.source_index.tolist() == [4, 5, 2, 3, 0, 1, 6, 7]
    assert s.changed_slices() == [0, 2]
    f = vc.swap_spans(v, (0, 2), (4, 6), unit="frame")
    assert f.source_index.tolist() == s.source_index.tolist()
    with pytest.raises(ValueError, match="splits a temporal slice"):
        vc.swap_spans(v, (1, 3), (4, 6), unit="frame")
    with pytest.raises(ValueError, match="overlap"):
        vc.swap_spans(v, (0, 2), (1, 3))


def test_shuffle_is_seeded_derangement_of_slices():
    v = _video(t=12)
    a, b = vc.shuffle(v, seed=3), vc.shuffle(v, seed=3)
    assert np.array_equal(a.frames, b.frames)
    slices = a.source_index.reshape(-1, 2)
    assert (slices[:, 1] == slices[:, 0] + 1).all() and (slices[:, 0] % 2 == 0).all()  # slices stay intact
    assert (slices[:, 0] // 2 != np.arange(6)).all()  # every slice moved
    assert sorted(a.source_index.tolist()) == list(range(12))


def test_freeze_and_drop():
    v = _video()
    fz = vc.freeze(v, frame=3)
    assert _frame_values(fz.frames) == [3] * 8
    # frozen on frame 2: slice 1 keeps its first frame (2) and changes only its second (3 -> 2)
    f2 = vc.freeze(v, frame=2)
    assert f2.source_index.tolist() == [2] * 8 and f2.changed_slices() == [0, 1, 2, 3]
    part = vc.freeze(v, frame=0, span=(4, 8))
    assert part.source_index.tolist() == [0, 1, 2, 3, 0, 0, 0, 0] and part.changed_slices() == [2, 3]
    d = vc.drop_frames(v, slices=[1, 2])
    assert d.source_index.tolist() == [0, 1, 1, 1, 1, 1, 6, 7] and d.frames.shape == v.shape
    dr = vc.drop_frames(v, slices=[1], fill="remove")
    assert dr.source_index.tolist() == [0, 1, 4, 5, 6, 7]
    d0 = vc.drop_frames(v, slices=[0])
    assert d0.source_index.tolist() == [2, 2, 2, 3, 4, 5, 6, 7]


def test_padding_to_temporal_patch_and_strict_mode():
    v = _video(t=7)
    r = vc.identity(v)
    assert r.frames.shape[0] == 8 and r.source_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 6]
    assert r.changed_slices() == []  # padding is what the processor does too
    with pytest.raises(ValueError, match="not a multiple"):
        vc.reverse(v, pad=False)
    assert vc.identity(_video(t=6), temporal_patch_size=3).num_slices == 2


def test_motion_only_removes_static_content():
    v = np.zeros((4, 3, 3, 1), dtype=np.uint8) + 100
    v[2, 1, 1] = 180  # a pixel that changes at frame 2 and back at frame 3
    m = vc.motion_only(v)
    assert m.frames.dtype == np.uint8
    mid = np.rint(127.5)  # (0 + 255) / 2, rounded as the output is uint8
    assert (m.frames[0] == mid).all()
    assert m.frames[2, 1, 1, 0] == np.rint(127.5 + 80) and m.frames[3, 1, 1, 0] == np.rint(127.5 - 80)
    static = np.ones(v.shape[1:3], bool)
    static[1, 1] = False
    assert (m.frames[1:, static] == mid).all()
    assert m.sources[2] == (1, 2) and m.source_index[2] == -1


def test_destroy_motion_keeps_appearance():
    rng = np.random.default_rng(0)
    v = rng.random((6, 4, 4, 3)).astype(np.float32)
    mean = vc.destroy_motion(v)
    assert np.allclose(mean.frames, v.mean(0, keepdims=True)) and mean.frames.dtype == np.float32
    ps = vc.destroy_motion(v, mode="pixel_shuffle", seed=1)
    # each pixel keeps its multiset of values over time
    assert np.allclose(np.sort(ps.frames, 0), np.sort(v, 0))
    assert not np.allclose(ps.frames, v)
    assert ps.changed_slices() == [0, 1, 2]


def test_torch_input_roundtrip():
    v = torch.from_numpy(_video()).float()
    r = vc.reverse(v)
    assert isinstance(r.frames, torch.Tensor) and r.frames.dtype == torch.float32
    assert torch.equal(r.frames, v.flip(0))
    assert "slice 0" in r.describe()
