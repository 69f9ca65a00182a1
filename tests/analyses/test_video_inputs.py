"""Video pipeline inputs: decoding (mp4 / GIF / frame folder), annotations, token slices and frame spans, mean vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analyses.pipelines import read_dataset
from analyses.pipelines.video.annotations import ANNOTATION_SCHEMA, AnnotationError, correct_index, require
from analyses.pipelines.video.decoding import VideoDecodeError, read_video, sample_times, write_mp4
from analyses.pipelines.video.mean_vector import MeanVectorError, mean_vector
from analyses.pipelines.video.spans import SpanError, frame_span_tokens, parse_span_list, parse_token_slice

pytest.importorskip("av", reason="PyAV is in the dev extra; install hooked-vlm[video]")


def _clip(n: int = 12, size: int = 32) -> np.ndarray:
    """Frames whose colour encodes their index (decoding must keep order and content)."""
    frames = np.zeros((n, size, size, 3), dtype=np.uint8)
    for t in range(n):
        frames[t] = (20 * t % 256, 255 - 20 * t % 256, 128)
    return frames


# ------------------------------------------------------------------------------------------ decoding
def test_mp4_round_trip_keeps_frames_times_and_sampling(tmp_path):
    frames = _clip()
    write_mp4(frames, tmp_path / "a.mp4", fps=2.0)
    video = read_video(tmp_path / "a.mp4")
    assert video.frames.shape == frames.shape
    assert np.abs(video.frames.astype(int) - frames).max() <= 2  # lossless H.264 up to the RGB <-> YUV rounding
    assert video.times == tuple(k / 2.0 for k in range(12))
    # start / end clip in seconds ([1.0, 5.0) = frames 2..9), then 4 uniform frames floor(i * 8 / 4) = 0, 2, 4, 6 of them
    clipped = read_video(tmp_path / "a.mp4", num_frames=4, start=1.0, end=5.0)
    assert clipped.times == (1.0, 2.0, 3.0, 4.0) and clipped.source_frames == 8
    assert np.abs(clipped.frames.astype(int) - frames[[2, 4, 6, 8]]).max() <= 2
    # --fps 1 on a 2 fps clip keeps every other frame
    assert read_video(tmp_path / "a.mp4", fps=1.0).times == (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)


def test_gif_and_frame_folder_decode_with_their_clocks(tmp_path):
    frames = _clip(6)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp_path / "a.gif", save_all=True, append_images=images[1:], duration=250, loop=0)
    gif = read_video(tmp_path / "a.gif")
    assert gif.times == tuple(0.25 * k for k in range(6))
    assert np.array_equal(gif.frames[:, 0, 0], frames[:, 0, 0])  # solid colours survive the GIF palette
    (tmp_path / "frames").mkdir()
    for k, image in enumerate(images):
        image.save(tmp_path / "frames" / f"{k:03d}.png")
    folder = read_video(tmp_path / "frames", folder_fps=4.0, start=0.5)
    assert folder.times == (0.5, 0.75, 1.0, 1.25) and np.array_equal(folder.frames, frames[2:])


def test_sample_times_picks_the_nearest_frame_once():
    assert sample_times([0.0, 0.4, 0.8, 1.2, 1.6, 2.0], 1.0) == [0, 2, 5]  # t = 0, 1 (0.8 is nearest), 2


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.mp4", r"missing\.mp4 does not exist; check video_name and --video_root"),
    (lambda d: (d / "bad.mp4").write_bytes(b"not a video at all") and d / "bad.mp4", r"bad\.mp4 cannot be decoded"),
    (lambda d: (d / "empty").mkdir() or d / "empty", r"empty is a folder without frame images"),
])
def test_unreadable_videos_name_the_file_and_the_fix(tmp_path, make, match):
    with pytest.raises(VideoDecodeError, match=match):
        read_video(make(tmp_path))


def test_window_and_frame_count_errors(tmp_path):
    write_mp4(_clip(), tmp_path / "a.mp4", fps=2.0)
    with pytest.raises(VideoDecodeError, match=r"no frame between start=9.0 s and end=None s \(the video lasts 6.00 s\)"):
        read_video(tmp_path / "a.mp4", start=9.0)
    with pytest.raises(VideoDecodeError, match=r"asked for 20 frames but the clip has 12 in its window.*at most 12"):
        read_video(tmp_path / "a.mp4", num_frames=20)


# ------------------------------------------------------------------------------------------ annotations
def test_annotation_schema_requires_only_video_and_question(tmp_path):
    entries = [
        {"video_name": "a.mp4", "question": "q ?"},
        {"video_name": "a.mp4", "question": "q ?", "candidates": ["x", "y"], "answer": "z"},
        {"video_name": "a.mp4", "question": "q ?", "candidates": ["x", "y"], "answer": "y", "answer_number": 0},
        {"question": "q ?"},
        {"video_name": "a.mp4", "question": "q ?", "start": 3.0, "end": 1.0},
    ]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    data = read_dataset(tmp_path / "ann.json", ANNOTATION_SCHEMA)
    assert [c.id for c in data.cases] == ["case-0"]
    messages = [str(i.error) for i in data.invalid]
    assert "answer 'z' is not one of the candidates ['x', 'y']" in messages[0]
    assert "answer_number 0 points to 'x' but answer is 'y'" in messages[1]
    assert "missing required field 'video_name'" in messages[2]
    assert "end (1.0) must be after start (3.0)" in messages[3]
    with pytest.raises(AnnotationError, match=r"`hooked-vlm video trace` needs field\(s\) \['candidates'\]"):
        correct_index(data.cases[0].data, "trace")
    assert correct_index({"candidates": ["a", "b"], "answer": "b"}, "trace") == 1
    require({"candidates": ["a"]}, "trace", "candidates")


# ------------------------------------------------------------------------------------------ token slices
def test_token_slice_and_span_parsing():
    assert parse_token_slice("visual_frames:2:6").name == "visual_frames:2:6"
    assert parse_span_list("0:2,2:4") == [(0, 2), (2, 4)]
    with pytest.raises(SpanError, match="use 'visual', 'text' or 'visual_frames:A:B'"):
        parse_token_slice("frames:0:2")
    with pytest.raises(SpanError, match="needs A < B"):
        parse_token_slice("visual_frames:3:3")
    with pytest.raises(SpanError, match=r"span '4:2' in '0:2,4:2': write spans as A:B with A < B"):
        parse_span_list("0:2,4:2")


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_frame_spans_follow_temporal_patches_and_the_merge(name):
    """Hand count: 8 frames of 56x56 -> 4 slices of 2 frames, 4x4 patches merged 2x2 -> 4 tokens per slice,
    laid out slice after slice from the first video placeholder on."""
    from analyses.pipelines.runner import ModelSpec
    from analyses.pipelines.video.model_io import build_inputs, load_video_model

    vm = load_video_model(ModelSpec(name))
    frames = np.random.default_rng(0).integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)
    inputs = build_inputs(vm, "<video> what moves ?", frames, 2.0, "cpu", torch.float32)
    first = int((inputs["input_ids"][0] == vm.tokenizer.convert_tokens_to_ids("<|video_pad|>")).nonzero()[0])
    layout = vm.model.layout(**inputs)
    for (a, b), slices in {(0, 2): [0], (3, 5): [1, 2], (1, 2): [0], (6, 8): [3], (0, 8): [0, 1, 2, 3]}.items():
        positions, got = frame_span_tokens(layout, a, b, 8)
        assert got == slices
        assert positions == [first + 4 * s + k for s in slices for k in range(4)]
    with pytest.raises(SpanError, match=r"visual_frames:6:10 is outside the clip: it has 8 input frames"):
        frame_span_tokens(layout, 6, 10, 8)


@pytest.mark.slow
def test_check_indexing_agrees_with_pixel_edits_on_every_video_family():
    """The mapped tokens are exactly those whose LM input changes when only the span's pixels change."""
    from analyses.pipelines.video.check_indexing import check_indexing

    rows = check_indexing()
    assert {r["family"] for r in rows} == {"qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_next_video"}
    assert all(r["match"] and r["n_positions"] > 0 for r in rows), [r for r in rows if not r["match"]]
    split = [r for r in rows if r["span"] == "3:5"]
    assert [r["slices"] for r in split] == [[1, 2], [1, 2], [3, 4], [3, 4]]  # 2 frames / slice on Qwen, 1 on LLaVA


def test_frame_span_on_an_image_prompt_is_refused():
    from analyses.pipelines.runner import ModelSpec
    from analyses.pipelines.video.model_io import load_video_model
    from hooked_vlm.inputs import build_qwen_inputs

    vm = load_video_model(ModelSpec("tiny-qwen2-vl"))
    inputs = build_qwen_inputs(vm.tokenizer, "<image> what is it ?", [np.zeros((56, 56, 3), dtype=np.uint8)])
    with pytest.raises(SpanError, match="needs video tokens, but this input has none"):
        frame_span_tokens(vm.model.layout(**inputs), 0, 2, 2)


# ------------------------------------------------------------------------------------------ mean vector
def test_mean_vector_streams_files_and_skips_bad_ones(tmp_path):
    from safetensors.torch import save_file

    a, b = torch.randn(3, 4), torch.randn(2, 4)
    torch.save(a, tmp_path / "0.pt")
    save_file({"activations": b}, str(tmp_path / "1.safetensors"))
    torch.save(torch.randn(5), tmp_path / "2.pt")  # width 5: skipped
    (tmp_path / "3.pt").write_bytes(b"garbage")
    torch.save({"x": [1, 2]}, tmp_path / "4.pt")  # not tensors
    summary = mean_vector(tmp_path)
    expected = np.concatenate([a.numpy(), b.numpy()]).mean(0)
    got = torch.load(tmp_path / "mean_vector.pt", weights_only=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert summary["vectors"] == {"activations": {"rows": 5, "width": 4}}
    assert summary["files_used"] == ["0.pt", "1.safetensors"]
    errors = {s["file"]: s["error"] for s in summary["files_skipped"]}
    assert "width 5, the files before it 4" in errors["2.pt"]
    assert set(errors) == {"2.pt", "3.pt", "4.pt"}
    assert json.loads((tmp_path / "mean_vector.json").read_text())["files_used"] == ["0.pt", "1.safetensors"]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(MeanVectorError, match=r"holds no \.safetensors / \.pt / \.pth files"):
        mean_vector(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ saved input settings
def test_a_copied_organism_folder_gets_the_organism_inputs_from_its_saved_processor_config(tmp_path):
    """The organism's pixel limits and fps, written by ``qwen_preprocessor_files``, reach a model loaded by path; a
    copy without them falls back to its organism.json's class; a bare copy gets Qwen's defaults (a different grid)."""
    import dataclasses
    import shutil

    from analyses.pipelines.runner import ModelSpec
    from analyses.pipelines.video.model_io import VideoModel, build_inputs, input_options, load_video_model
    from hooked_vlm.organisms import checkpoint_dir
    from hooked_vlm.organisms.saving import qwen_preprocessor_files
    from hooked_vlm.organisms.video_qwen import FRAMES, SIZE, VideoOrganism

    source = checkpoint_dir("video-qwen2-vl")
    saved, bare, card_only = (tmp_path / n for n in ("saved", "bare", "card"))
    for folder in (saved, bare, card_only):
        shutil.copytree(source, folder)
        (folder / "organism.json").unlink()
        for saved_config in folder.glob("*preprocessor_config.json"):  # the shipped folder has them; start without
            saved_config.unlink()
    shutil.copy(source / "organism.json", card_only / "organism.json")
    vm = load_video_model(ModelSpec("video-qwen2-vl"))
    files = qwen_preprocessor_files(_hf_config(source), VideoOrganism.input_kwargs)
    for name, text in files.items():
        (saved / name).write_text(text)
    video = json.loads(files["video_preprocessor_config.json"])
    assert (video["min_pixels"], video["max_pixels"], video["fps"], video["temporal_patch_size"]) == (56 * 56, 224 * 224, 2.0, 2)
    assert input_options(str(saved), saved) == {"fps": 2.0}
    assert input_options(str(card_only), card_only) == VideoOrganism.input_kwargs
    assert input_options(str(bare), bare) == {}
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)

    def inputs(folder: Path) -> dict:
        path_loaded = VideoModel(dataclasses.replace(vm.loaded, checkpoint=folder, name=str(folder)), input_options(str(folder), folder))
        return build_inputs(path_loaded, "<video> which way ?", frames, 2.0, "cpu", torch.float32)

    expected = build_inputs(vm, "<video> which way ?", frames, 2.0, "cpu", torch.float32)
    assert expected["video_grid_thw"].tolist() == [[FRAMES // 2, SIZE // 14, SIZE // 14]]  # 112 px kept: 8x8 patches
    for folder in (saved, card_only):
        got = inputs(folder)
        assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected), folder.name
    assert inputs(bare)["video_grid_thw"].tolist() != expected["video_grid_thw"].tolist()  # Qwen's 128-token floor upsizes


def _hf_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)
