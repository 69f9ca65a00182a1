"""Bad inputs get an error that names the problem and the fix."""

import pytest
import torch

from qwen_cases import case

from hooked_vlm import InputError


@pytest.fixture
def model(qwen_pair):
    return qwen_pair("tiny-qwen2.5-vl")[1]


def test_placeholder_count(model):
    inputs = case("image", "tiny-qwen2.5-vl")
    inputs["input_ids"] = inputs["input_ids"][:, 1:]  # fine
    ids = inputs["input_ids"].tolist()[0]
    ids.remove(100)
    inputs["input_ids"] = torch.tensor([ids])
    with pytest.raises(InputError, match=r"found 23 image placeholder tokens .* implies 24"):
        model(**inputs)


def test_pixel_rows_vs_grid(model):
    inputs = case("image", "tiny-qwen2.5-vl")
    inputs["pixel_values"] = inputs["pixel_values"][:-4]
    with pytest.raises(InputError, match=r"pixel_values has 92 rows but image_grid_thw implies 96"):
        model(**inputs)


def test_grid_not_divisible_by_merge(model):
    inputs = case("image", "tiny-qwen2.5-vl")
    inputs["image_grid_thw"] = torch.tensor([[1, 8, 11]])
    with pytest.raises(InputError, match="multiples of spatial_merge_size=2"):
        model(**inputs)


@pytest.mark.parametrize("drop", ["pixel_values", "image_grid_thw"])
def test_grid_without_pixels_and_pixels_without_grid(model, drop):
    inputs = case("image", "tiny-qwen2.5-vl")
    del inputs[drop]
    with pytest.raises(InputError, match="pass both"):
        model(**inputs)


def test_second_per_grid_ts_length(model):
    inputs = case("video", "tiny-qwen2.5-vl")
    inputs["second_per_grid_ts"] = torch.tensor([1.0, 2.0])
    with pytest.raises(InputError, match="second_per_grid_ts has 2 entries but there are 1 videos"):
        model(**inputs)


def test_dtypes(model):
    inputs = case("image", "tiny-qwen2.5-vl")
    with pytest.raises(InputError, match="must be integer token ids"):
        model(**{**inputs, "input_ids": inputs["input_ids"].float()})
    with pytest.raises(InputError, match="raw uint8 pixels"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"].to(torch.uint8)})


def test_device_mismatch(model):
    inputs = case("image", "tiny-qwen2.5-vl")
    with pytest.raises(InputError, match=r"is on meta but the model is on cpu; move the inputs"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"].to("meta")})


def test_batch_shape_mismatch(model):
    inputs = case("batch_left", "tiny-qwen2.5-vl")
    with pytest.raises(InputError, match=r"attention_mask has shape \(1, \d+\) but input_ids has \(2"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:1]})


def test_mm_token_type_ids_must_agree(model):
    inputs = case("image", "tiny-qwen2.5-vl")
    wrong = torch.zeros_like(inputs["input_ids"])
    with pytest.raises(InputError, match="mm_token_type_ids disagrees with input_ids"):
        model(**inputs, mm_token_type_ids=wrong)


def test_unknown_keyword(model):
    inputs = case("image", "tiny-qwen2.5-vl")
    with pytest.raises(TypeError, match="unexpected input.*image_sizes"):
        model(**inputs, image_sizes=torch.tensor([[112, 168]]))


def test_placeholders_spanning_prompts(model):
    inputs = case("batch_right", "tiny-qwen2.5-vl")
    inputs["image_grid_thw"] = torch.tensor([[1, 8, 14]])  # one grid claiming both prompts' tokens
    inputs["pixel_values"] = torch.randn(112, 1176)
    with pytest.raises(InputError, match="span two prompts"):
        model(**inputs)


def test_token_id_outside_the_vocabulary(model):
    inputs = case("image", "tiny-qwen2.5-vl")
    ids = inputs["input_ids"].clone()
    ids[0, 1] = 128  # vocab_size 128: ids 0..127
    with pytest.raises(InputError, match=r"input_ids holds token id 128 but this model's vocabulary has 128 ids \(0..127\)"):
        model(**{**inputs, "input_ids": ids})
    ids[0, 1] = -3
    with pytest.raises(InputError, match=r"token id -3 but"):
        model(**{**inputs, "input_ids": ids})


def test_placeholder_ids_beyond_the_vocabulary_are_allowed():
    """LLaVA / Gemma 3 checkpoints may give the image placeholder an id >= vocab (it is replaced by features)."""
    from hooked_vlm.input_checks import check_token_inputs

    class Stub(torch.nn.Module):
        image_token_id = 12

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

    ids = torch.tensor([[0, 12, 12, 9]])
    assert check_token_inputs(Stub(), {"input_ids": ids}) is ids
    with pytest.raises(InputError, match=r"token id 11 but this model's vocabulary has 10 ids \(0..9\)"):
        check_token_inputs(Stub(), {"input_ids": torch.tensor([[0, 12, 11]])})
