"""Checkpoint loading: HF save_pretrained -> from_pretrained round trips (plain, sharded, tied, .bin),
and clear errors for folders and architectures we cannot load."""

import json
import pickle

import pytest
import torch

from qwen_cases import case, hf_logits

from hooked_vlm import CheckpointError, HookedVLM, UnsupportedModelError
from hooked_vlm.tiny import qwen2_vl_config, tiny_hf_model


@pytest.mark.parametrize("family", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_save_pretrained_round_trip(tmp_path, family, shard):
    hf = tiny_hf_model(family, seed=1)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kw)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == bool(shard)
    model = HookedVLM.from_pretrained(str(tmp_path))
    inputs = case("image_video", family)
    with torch.no_grad():
        diff = (model(**inputs) - hf_logits(hf, inputs)).abs().max().item()
    assert diff <= 1e-4


def test_tied_embeddings(tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    cfg = qwen2_vl_config()
    cfg.tie_word_embeddings = True
    hf = Qwen2VLForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert not any("lm_head" in k for f in tmp_path.glob("*.safetensors") for k in load_file(str(f)))
    model = HookedVLM.from_pretrained(str(tmp_path))
    assert model.unembed.weight is model.embed.weight
    inputs = case("image", "tiny-qwen2-vl")
    with torch.no_grad():
        assert (model(**inputs) - hf_logits(hf, inputs)).abs().max() <= 1e-4


def test_bin_checkpoint_loads_with_weights_only(tmp_path):
    hf = tiny_hf_model("tiny-qwen2-vl", seed=2)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = HookedVLM.from_pretrained(str(tmp_path))
    inputs = case("image", "tiny-qwen2-vl")
    with torch.no_grad():
        assert (model(**inputs) - hf_logits(hf, inputs)).abs().max() <= 1e-4


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    hf = tiny_hf_model("tiny-qwen2-vl", seed=2)
    hf.config.save_pretrained(tmp_path)
    torch.save({"x": _Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        HookedVLM.from_pretrained(str(tmp_path))
    assert "pickled code ran" not in capsys.readouterr().out


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        HookedVLM.from_pretrained(str(tmp_path))


def test_folder_without_weights(tmp_path):
    qwen2_vl_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds no weights"):
        HookedVLM.from_pretrained(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="Qwen2VLForConditionalGeneration"):
        HookedVLM.from_pretrained(str(tmp_path))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match="supported"):
        HookedVLM.from_hf(gpt)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="local checkpoint folder"):
        HookedVLM.from_pretrained(str(tmp_path / "does-not-exist" / "nor-this"))


def test_weight_of_the_wrong_shape_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tiny_hf_model("tiny-qwen2-vl", seed=2)
    hf.save_pretrained(tmp_path)
    (f,) = tmp_path.glob("*.safetensors")
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("layers.0.mlp.up_proj.weight"))
    sd[key] = sd[key][:-1]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 weight\(s\) have the wrong shape .*blocks.0.mlp.up_proj.weight: checkpoint \(127, 64\) vs model \(128, 64\)"):
        HookedVLM.from_pretrained(str(tmp_path))


def test_dtype_given_by_name():
    hf = tiny_hf_model("tiny-qwen2-vl", seed=2)
    model = HookedVLM.from_hf(hf, dtype="float16")
    assert model.embed.weight.dtype == torch.float16
    assert torch.equal(model.embed.weight, hf.state_dict()["model.language_model.embed_tokens.weight"].half())
    assert HookedVLM.from_hf(hf, dtype="torch.bfloat16").embed.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype='float17' is not a floating torch dtype; pass torch.float32"):
        HookedVLM.from_hf(hf, dtype="float17")
