"""hooked_vlm.inputs, samples and tiny_tokenizer: exactness against transformers' Qwen processor,
video layout, placeholder expansion, padding, and errors that name the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vlm import inputs as hv_inputs
from hooked_vlm.inputs import (
    build_qwen_inputs,
    load_image,
    load_video,
    patchify_image,
    patchify_video,
    qwen_image_inputs,
    qwen_processing_kwargs,
    qwen_video_inputs,
    smart_resize,
)
from hooked_vlm.errors import InputError
from hooked_vlm.samples import COLORS, synthetic_grid_image, synthetic_video
from hooked_vlm.tiny_tokenizer import SPECIAL_IDS, WORDS, build_tiny_tokenizer

torch.set_num_threads(1)

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def hf_image_processor():
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------
# smart_resize (notes §8)
# ------------------------------------------------------------------------------------------
SMART_RESIZE_TABLE = [
    # (h, w) -> (H, W), grid_thw, patches, tokens
    ((280, 280), (280, 280), (1, 20, 20), 400, 100),
    ((224, 224), (224, 224), (1, 16, 16), 256, 64),
    ((300, 500), (308, 504), (1, 22, 36), 792, 198),
    ((20, 20), (56, 56), (1, 4, 4), 16, 4),
    ((1000, 1000), (980, 980), (1, 70, 70), 4900, 1225),
    ((1080, 1920), (728, 1316), (1, 52, 94), 4888, 1222),
    ((37, 1200), (28, 1204), (1, 2, 86), 172, 43),
]


@pytest.mark.parametrize("resize", [smart_resize, hv_inputs._smart_resize], ids=["transformers", "fallback"])
@pytest.mark.parametrize("size, resized, grid, patches, tokens", SMART_RESIZE_TABLE)
def test_smart_resize_table(resize, size, resized, grid, patches, tokens):
    assert resize(*size, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280) == resized
    out_grid = (1, resized[0] // 14, resized[1] // 14)
    assert out_grid == grid
    assert out_grid[1] * out_grid[2] == patches
    assert patches // 4 == tokens


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        hv_inputs._smart_resize(10, 2500)


# ------------------------------------------------------------------------------------------
# images: bit-exact with Qwen2VLImageProcessorPil
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(280, 280), (224, 224), (300, 500), (20, 20), (37, 1200), (60, 90), (500, 300)])
def test_image_inputs_bit_exact_with_hf(size, hf_image_processor):
    image = _random_image(*size, seed=size[0] + size[1])
    ours = qwen_image_inputs(image)
    ref = hf_image_processor(images=[image], return_tensors="pt")
    assert ours["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    h, w = smart_resize(*size)
    assert ours["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    assert ours["pixel_values"].shape == (h * w // 196, 1176)


def test_image_inputs_every_input_type_matches_hf(tmp_path, hf_image_processor):
    image, _ = synthetic_grid_image(seed=3)
    array = np.array(image)
    path = tmp_path / "grid.png"
    image.save(path)
    ref = hf_image_processor(images=[image], return_tensors="pt")["pixel_values"]
    for variant in (
        image,
        str(path),
        path,
        array,
        np.moveaxis(array, -1, 0),  # CHW
        torch.from_numpy(array).permute(2, 0, 1),  # CHW tensor
        torch.from_numpy(array),  # HWC tensor
        array.astype(np.float32) / 255.0,  # float in [0, 1]
    ):
        assert torch.equal(qwen_image_inputs(variant)["pixel_values"], ref)


def test_image_inputs_rgba_grey_and_resize_hf_exact(hf_image_processor):
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, (90, 130, 4), dtype=np.uint8), mode="RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (90, 130), dtype=np.uint8), mode="L")
    rgba_array = rng.integers(0, 256, (90, 130, 4), dtype=np.uint8)
    grey_array = rng.integers(0, 256, (3, 130), dtype=np.uint8)  # 2-D: grey, even with 3 rows
    # (ours, HF's): HF does not take a 2-D array, so it gets the same pixels as a PIL "L" image
    for image, hf_image in ((rgba, rgba), (grey, grey), (rgba_array, rgba_array), (grey_array, Image.fromarray(grey_array))):
        ours = qwen_image_inputs(image)
        ref = hf_image_processor(images=[hf_image], return_tensors="pt")
        assert torch.equal(ours["pixel_values"], ref["pixel_values"])


def test_several_images_concatenate_and_custom_limits():
    images = [_random_image(280, 280, 1), _random_image(300, 500, 2), _random_image(20, 20, 3)]
    proc = Qwen2VLImageProcessorPil(min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28)
    ours = qwen_image_inputs(images, min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28)
    ref = proc(images=images, return_tensors="pt")
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape[0] == int(ours["image_grid_thw"].prod(-1).sum())


def test_280_grid_token_k_is_cell_k():
    """Rows 4k..4k+3 of a 280x280 image are the 2x2 patch block of cell (k // 10, k % 10) (notes §8)."""
    image, annotations = synthetic_grid_image(seed=0)
    out = qwen_image_inputs(image)
    assert out["image_grid_thw"].tolist() == [[1, 20, 20]]
    pixels = out["pixel_values"].reshape(100, 4, 3, 2, 14, 14)  # token, sub-patch, C, t, y, x
    background = pixels[0, 0, :, 0, 0, 0]
    filled = {a["row"] * 10 + a["col"] for a in annotations}
    for k in range(100):
        differs = not torch.allclose(pixels[k], background[None, :, None, None, None].expand_as(pixels[k]))
        assert differs == (k in filled), k


def test_patchify_image_matches_notes_formula():
    image = torch.randn(3, 56, 84)
    rows = patchify_image(image)
    # explicit loop: row 4k + 2 ih + iw <- patch (2 (k // 3) + ih, 2 (k % 3) + iw), repeated over t
    for k in range(6):
        for ih in range(2):
            for iw in range(2):
                py, px = 2 * (k // 3) + ih, 2 * (k % 3) + iw
                patch = image[:, 14 * py : 14 * py + 14, 14 * px : 14 * px + 14]
                expected = torch.stack([patch, patch], dim=1).reshape(-1)
                assert torch.equal(rows[4 * k + 2 * ih + iw], expected)


# ------------------------------------------------------------------------------------------
# videos
# ------------------------------------------------------------------------------------------
def test_patchify_video_matches_notes_formula_and_image_patchify():
    frames = torch.arange(5 * 3 * 56 * 84, dtype=torch.float32).reshape(5, 3, 56, 84)
    rows, grid = patchify_video(frames)
    assert grid == (3, 4, 6)  # 5 frames padded to 6
    padded = torch.cat([frames, frames[-1:]])
    x = padded.reshape(3, 2, 3, 2, 2, 14, 3, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(72, 1176)
    assert torch.equal(rows, x)
    # frame t's patches live in temporal slice t // 2, at time index t % 2 of each row
    per_slice = rows.reshape(3, 24, 3, 2, 14, 14)
    for t in range(6):
        source = padded[t]
        image_rows = patchify_image(source).reshape(24, 3, 2, 14, 14)[:, :, 0]
        assert torch.equal(per_slice[t // 2, :, :, t % 2], image_rows)
    # a slice of two identical frames equals the image patchify of that frame
    two = torch.stack([frames[0], frames[0]])
    assert torch.equal(patchify_video(two)[0], patchify_image(frames[0]))


def test_video_inputs_shapes_padding_and_seconds():
    frames, _ = synthetic_video(num_frames=5, size=(56, 84), seed=1)
    out = qwen_video_inputs(frames, fps=4.0, min_pixels=56 * 56)
    assert out["video_grid_thw"].tolist() == [[3, 4, 6]]
    assert out["pixel_values_videos"].shape == (72, 1176)
    assert out["second_per_grid_ts"].tolist() == [0.5]
    # the padded sixth frame repeats the fifth: slice 2 holds frame 4 twice
    last = out["pixel_values_videos"][48:].reshape(24, 3, 2, 196)
    assert torch.equal(last[:, :, 0], last[:, :, 1])
    # HF's fused normalisation agrees with the image path to float32 rounding
    image_rows = qwen_image_inputs(frames[4])["pixel_values"]
    torch.testing.assert_close(out["pixel_values_videos"][48:], image_rows, atol=1e-5, rtol=0)


def test_video_normalisation_is_hf_fused_formula():
    frames, _ = synthetic_video(num_frames=2, size=(56, 56), seed=2)
    out = qwen_video_inputs(frames, min_pixels=56 * 56)
    mean = torch.tensor(hv_inputs.IMAGE_MEAN) * 255.0
    std = torch.tensor(hv_inputs.IMAGE_STD) * 255.0
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    expected = patchify_video((x - mean[:, None, None]) / std[:, None, None])[0]
    assert torch.equal(out["pixel_values_videos"], expected)


def test_video_sources_agree(tmp_path):
    frames, _ = synthetic_video(num_frames=4, size=(56, 56), seed=3)
    files = []
    for t, frame in enumerate(frames):
        files.append(tmp_path / f"f{t:02d}.png")
        Image.fromarray(frame).save(files[-1])
    gif = tmp_path.parent / f"{tmp_path.name}-clip.gif"
    pil = [Image.fromarray(f) for f in frames]
    pil[0].save(gif, save_all=True, append_images=pil[1:], duration=100, loop=0)
    ref = qwen_video_inputs(frames, min_pixels=56 * 56)["pixel_values_videos"]
    for source in (
        frames,
        torch.from_numpy(frames).permute(0, 3, 1, 2),
        files,  # a flat list of frame files is one video
        pil,
        tmp_path,  # folder of frames
    ):
        assert torch.equal(qwen_video_inputs(source, min_pixels=56 * 56)["pixel_values_videos"], ref)
    assert load_video(gif).shape == (4, 56, 56, 3)  # GIF palette quantises colours; shape only


def test_several_videos_and_frame_sampling():
    a, _ = synthetic_video(num_frames=8, size=(56, 84), seed=4)
    b, _ = synthetic_video(num_frames=4, size=(56, 56), seed=5)
    out = qwen_video_inputs([a, b], fps=[2.0, 1.0], min_pixels=56 * 56)
    assert out["video_grid_thw"].tolist() == [[4, 4, 6], [2, 4, 4]]
    assert out["second_per_grid_ts"].tolist() == [1.0, 2.0]
    assert out["pixel_values_videos"].shape == (96 + 32, 1176)
    sampled = qwen_video_inputs(a, num_frames=4, fps=2.0, min_pixels=56 * 56)
    assert sampled["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert sampled["second_per_grid_ts"].tolist() == [2.0]  # half the frames kept -> 1 fps
    assert torch.equal(sampled["pixel_values_videos"], qwen_video_inputs(a[[0, 2, 4, 6]], min_pixels=56 * 56)["pixel_values_videos"])


def test_video_default_limits_are_hf_video_defaults():
    frames, _ = synthetic_video(num_frames=2, size=(56, 84), seed=6)
    out = qwen_video_inputs(frames)  # min_pixels = 128*28*28 upsizes the frames as HF's video processor does
    h, w = smart_resize(56, 84, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768)
    assert out["video_grid_thw"].tolist() == [[1, h // 14, w // 14]]


# ------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------
def test_image_placeholders_wrapped_and_counted(tok):
    image, _ = synthetic_grid_image()
    out = build_qwen_inputs(tok, "<image> what color is the shape in cell 3 7 ?", [image])
    ids = out["input_ids"][0].tolist()
    assert ids[:2] == [SPECIAL_IDS["<bos>"], SPECIAL_IDS["<|vision_start|>"]]
    assert ids[2:102] == [SPECIAL_IDS["<|image_pad|>"]] * 100
    assert ids[102] == SPECIAL_IDS["<|vision_end|>"]
    assert ids[103] == WORDS.index("what") + 3
    assert out["mm_token_type_ids"][0].tolist() == [0, 0] + [1] * 100 + [0] * (len(ids) - 102)
    assert out["attention_mask"].all()
    assert out["input_ids"].dtype == torch.int64
    assert set(out) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}


def test_marker_conventions_agree(tok):
    image = _random_image(56, 84, 7)
    marker = build_qwen_inputs(tok, "what <image> is this", [image])
    bare = build_qwen_inputs(tok, "what <|vision_start|><|image_pad|><|vision_end|> is this", [image])
    assert torch.equal(marker["input_ids"], bare["input_ids"])
    front = build_qwen_inputs(tok, "is this", [image])  # no marker: image first
    explicit = build_qwen_inputs(tok, "<image> is this", [image])
    assert torch.equal(front["input_ids"], explicit["input_ids"])


def test_video_and_image_prompt(tok):
    image = _random_image(112, 168, 8)
    frames, _ = synthetic_video(num_frames=6, size=(56, 84), seed=8)
    out = build_qwen_inputs(tok, "<image> and <video> what moves ?", [image], [frames], video_min_pixels=56 * 56)
    assert out["image_grid_thw"].tolist() == [[1, 8, 12]]
    assert out["video_grid_thw"].tolist() == [[3, 4, 6]]
    types = out["mm_token_type_ids"][0]
    assert int((types == 1).sum()) == 24 and int((types == 2).sum()) == 18
    ids = out["input_ids"][0]
    assert int((ids == SPECIAL_IDS["<|video_pad|>"]).sum()) == 18
    assert torch.equal(types == 2, ids == SPECIAL_IDS["<|video_pad|>"])
    assert out["second_per_grid_ts"].tolist() == [1.0]
    # images are first in the sequence, then the video (marker order)
    first_video = int((types == 2).nonzero()[0])
    assert int((types == 1).nonzero()[-1]) < first_video


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(tok, side):
    images = [_random_image(56, 56, 9), _random_image(112, 112, 10)]
    out = build_qwen_inputs(tok, ["<image> what color ?", "<image> which shape is in the top left cell ?"], images, padding_side=side)
    lengths = out["attention_mask"].sum(-1).tolist()
    single = [build_qwen_inputs(tok, p, [im]) for p, im in zip(["<image> what color ?", "<image> which shape is in the top left cell ?"], images)]
    assert lengths == [s["input_ids"].shape[1] for s in single]
    width = out["input_ids"].shape[1]
    for row, s in enumerate(single):
        n = lengths[row]
        span = slice(width - n, width) if side == "left" else slice(0, n)
        assert torch.equal(out["input_ids"][row, span], s["input_ids"][0])
        assert torch.equal(out["mm_token_type_ids"][row, span], s["mm_token_type_ids"][0])
        pad = torch.ones(width, dtype=torch.bool)
        pad[span] = False
        assert (out["input_ids"][row, pad] == SPECIAL_IDS["<pad>"]).all()
        assert (out["attention_mask"][row, pad] == 0).all() and (out["mm_token_type_ids"][row, pad] == 0).all()
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8]]


class _ImageOnlyQwenProcessor:
    """Qwen2VLProcessor without a video processor (HF's video processors need torchvision)."""

    def __new__(cls, image_processor, tokenizer):
        from transformers import Qwen2VLProcessor
        from transformers.processing_utils import ProcessorMixin

        class Processor(Qwen2VLProcessor):
            def __init__(self, image_processor, tokenizer):
                self.image_token, self.video_token = tokenizer.image_token, tokenizer.video_token
                self.image_token_id, self.video_token_id = tokenizer.image_token_id, tokenizer.video_token_id
                ProcessorMixin.__init__(self, image_processor, tokenizer)

        return Processor(image_processor, tokenizer)


@pytest.mark.parametrize("side", ["left", "right"])
def test_hand_path_equals_hf_processor(tok, hf_image_processor, side):
    processor = _ImageOnlyQwenProcessor(hf_image_processor, tok)
    image, _ = synthetic_grid_image(seed=1)
    prompts = ["<image> what color is the circle ?", "what is in <image> and <image>"]
    images = [image, _random_image(60, 90, 11), _random_image(300, 500, 12)]
    ours = build_qwen_inputs(tok, prompts, images, padding_side=side)
    theirs = build_qwen_inputs(tok, prompts, images, padding_side=side, processor=processor)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # and the raw HF call with HF's own convention
    raw = processor(
        text=[p.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>") for p in prompts],
        images=images, padding=True, padding_side=side, return_tensors="pt",
    )
    assert torch.equal(ours["input_ids"], raw["input_ids"])
    assert torch.equal(ours["mm_token_type_ids"], torch.as_tensor(raw["mm_token_type_ids"]))


def _tiny_qwen(family: str):
    import transformers

    text = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    )
    ids = dict(image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model_cls = transformers.Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
                      fullatt_block_indexes=[1, 3], tokens_per_second=2)
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_reference_models_accept_inputs_and_padding_is_neutral(tok, family):
    """The HF models take the dict as is; each row of a left-padded batch gives its own logits."""
    model = _tiny_qwen(family)
    image = _random_image(56, 84, 13)
    frames, _ = synthetic_video(num_frames=4, size=(56, 56), seed=13)
    prompts = ["<image> what color ?", "<video> what moves in the video ?"]
    batch = build_qwen_inputs(tok, prompts, [image], [frames], padding_side="left", video_min_pixels=56 * 56)
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for row, (prompt, imgs, vids) in enumerate(zip(prompts, [[image], []], [[], [frames]])):
            model.model.rope_deltas = None
            single = build_qwen_inputs(tok, prompt, imgs, vids, video_min_pixels=56 * 56)
            torch.testing.assert_close(batched[row], model(**single).logits[0, -1], atol=1e-4, rtol=0)
            model.model.rope_deltas = None


# ------------------------------------------------------------------------------------------
# errors name the problem and the fix
# ------------------------------------------------------------------------------------------
def test_marker_count_mismatch(tok):
    image = _random_image(56, 56)
    with pytest.raises(InputError, match=r"1 image marker\(s\).*2 image\(s\).*'<image>'"):
        build_qwen_inputs(tok, "<image> what", [image, image])
    with pytest.raises(ValueError, match=r"2 image marker\(s\)"):
        build_qwen_inputs(tok, "<image> <image> what", [image])
    with pytest.raises(ValueError, match="video marker"):
        build_qwen_inputs(tok, ["<video> a", "b"], [], [])
    with pytest.raises(ValueError, match="marker"):  # batch without markers cannot be auto-placed
        build_qwen_inputs(tok, ["a", "b"], [image])


def test_unreadable_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="Image file not found.*existing image path"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="Cannot read .* Pillow"):
        load_image(bad)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(ValueError, match="ffmpeg"):
        load_video(clip)
    with pytest.raises(FileNotFoundError, match="Video not found"):
        load_video(tmp_path / "nothing")


def test_wrong_shapes_and_values():
    with pytest.raises(ValueError, match=r"shape \(2, 56, 56, 3\).*qwen_video_inputs"):
        qwen_image_inputs(np.zeros((2, 56, 56, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="no axis of size 1, 3 or 4"):
        load_image(np.zeros((56, 56, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expected raw pixels in \[0, 1\]"):
        load_image(np.full((56, 56, 3), -0.5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected \(T, H, W, C\)"):
        load_video(np.zeros((56, 56, 3), dtype=np.uint8)[None, None])
    with pytest.raises(ValueError, match="differ in size"):
        load_video([np.zeros((56, 56, 3), np.uint8), np.zeros((28, 56, 3), np.uint8)])
    with pytest.raises(TypeError, match="Unsupported image type"):
        load_image(42)
    with pytest.raises(ValueError, match="fps"):
        qwen_video_inputs([np.zeros((2, 56, 56, 3), np.uint8)], fps=[1.0, 2.0])


def test_tokenizer_without_placeholder_is_rejected():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "a": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    with pytest.raises(ValueError, match=r"no '<\|image_pad\|>' token.*extra_special_tokens"):
        build_qwen_inputs(plain, "<image> a", [_random_image(56, 56)])
    text_only = build_qwen_inputs(plain, "a a")  # no vision tokens needed for text
    assert text_only["input_ids"].tolist() == [[2, 2]] and not text_only["mm_token_type_ids"].any()


# ------------------------------------------------------------------------------------------
# samples and tokenizer
# ------------------------------------------------------------------------------------------
def test_synthetic_grid_image_is_deterministic_and_annotated():
    image, annotations = synthetic_grid_image(seed=7)
    again, annotations_again = synthetic_grid_image(seed=7)
    other, _ = synthetic_grid_image(seed=8)
    assert image.size == (280, 280) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(again)) and annotations == annotations_again
    assert not np.array_equal(np.asarray(image), np.asarray(other))
    pixels = np.asarray(image)
    cells = {(a["row"], a["col"]) for a in annotations}
    assert len(cells) == len(annotations) == 12
    assert {a["shape"] for a in annotations} <= {"circle", "square", "triangle"}
    for a in annotations:
        x0, y0, x1, y1 = a["bbox"]
        assert 28 * a["col"] <= x0 < x1 <= 28 * (a["col"] + 1) and 28 * a["row"] <= y0 < y1 <= 28 * (a["row"] + 1)
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        assert tuple(pixels[cy + 2, cx]) == COLORS[a["color"]] == a["rgb"]
        assert a["color"] in WORDS and a["shape"] in WORDS
    for row in range(10):
        for col in range(10):
            if (row, col) not in cells:
                assert (pixels[28 * row : 28 * row + 28, 28 * col : 28 * col + 28] == (245, 245, 245)).all()


def test_synthetic_video_moves_and_is_annotated():
    frames, annotations = synthetic_video(num_frames=6, size=(56, 84), seed=0)
    again, _ = synthetic_video(num_frames=6, size=(56, 84), seed=0)
    assert frames.shape == (6, 56, 84, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, again) and len(annotations) == 6
    assert len({a["bbox"] for a in annotations}) > 1  # it moves
    for a, frame in zip(annotations, frames):
        x0, y0, x1, y1 = a["bbox"]
        assert 0 <= x0 < x1 <= 84 and 0 <= y0 < y1 <= 56
        assert tuple(frame[(y0 + y1) // 2 + 2, (x0 + x1) // 2]) == a["rgb"]
        outside = np.ones((56, 84), dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert (frame[outside] == (245, 245, 245)).all()


def test_tiny_tokenizer_layout(tmp_path, tok):
    assert len(tok) == 128
    expected = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "unk_token_id": 96, "image_token_id": 100,
                "video_token_id": 101, "vision_start_token_id": 102, "vision_end_token_id": 103,
                "boi_token_id": 98, "eoi_token_id": 99}
    for attribute, value in expected.items():
        assert getattr(tok, attribute) == value, attribute
    assert tok.image_token == "<|image_pad|>" and tok.boi_token == "<start_of_image>"
    assert tok.convert_tokens_to_ids(list(WORDS)) == list(range(3, 96))
    ids = tok("What COLOR is the zebra? <|vision_start|><|image_pad|><|vision_end|>")["input_ids"]
    assert ids == [0, 3 + WORDS.index("what"), 3 + WORDS.index("color"), 3 + WORDS.index("is"),
                   3 + WORDS.index("the"), 96, 3 + WORDS.index("?"), 102, 100, 103]
    assert all(isinstance(tok.decode([i]), str) and tok.decode([i]) for i in range(128))
    assert build_tiny_tokenizer(add_eos=True)("red")["input_ids"] == [0, 3 + WORDS.index("red"), 1]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.image_token_id == 100 and reloaded("red <|video_pad|>")["input_ids"] == [0, 3 + WORDS.index("red"), 101]


def test_processing_kwargs_from_checkpoint_configs(tmp_path, tok, hf_image_processor):
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "image_processor_type": "Qwen2VLImageProcessor"}
    ))
    kwargs = qwen_processing_kwargs(tmp_path)
    assert kwargs["min_pixels"] == 3136 and kwargs["video_max_pixels"] == 12845056
    assert kwargs["image_mean"] == (0.5, 0.5, 0.5)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 56 * 56, "longest_edge": 1000}}))
    kwargs = qwen_processing_kwargs(tmp_path)
    assert kwargs["video_min_pixels"] == 56 * 56 and kwargs["video_max_pixels"] == 1000 and kwargs["max_pixels"] == 12845056
    image = _random_image(70, 90, 14)
    ours = build_qwen_inputs(tok, "<image> a", [image], **kwargs)
    ref = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    assert torch.equal(ours["pixel_values"], ref(images=[image], return_tensors="pt")["pixel_values"])
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        qwen_processing_kwargs(tmp_path / "nowhere")
