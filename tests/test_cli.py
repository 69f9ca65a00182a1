"""The ``hooked-vlm`` command: inspect on tiny models, the files it writes, and its errors."""

from __future__ import annotations

import io
import json
import re
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hooked_vlm import cli
from hooked_vlm.inputs import build_qwen_inputs
from hooked_vlm.samples import synthetic_grid_image, synthetic_video
from hooked_vlm.tiny import tiny_hf_model, tiny_model
from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(["inspect", "--quiet", *argv] if argv and argv[0] != "models" else list(argv), stdout=out), out.getvalue()


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("acts") / "acts.safetensors"
    code, text = run_cli("--model", "tiny-qwen2-vl", "--image", "synthetic", "--out", str(out))
    return code, text, out


def test_inspect_prints_tokens_layout_and_hook_table(synthetic_run):
    code, text, _ = synthetic_run
    assert code == 0
    assert "Top next tokens" in text and "Token layout" in text and "Hook table" in text
    assert "image 0: 1 slice(s) x 10x10 cells of 28px, pixels 280x280" in text
    assert "[    2,   102) image" in text  # bos, vision_start, then 100 image tokens
    assert "blocks.{i}.hook_resid_post" in text and "vision.blocks.{j}.attn.hook_pattern" in text
    assert "[1, 100, 64]" in text  # cached shape of vision.hook_out
    assert "random weights" in text


def test_inspect_files_match_a_direct_run(synthetic_run):
    _, text, out = synthetic_run
    manifest_file = out.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    tensors = load_file(out)
    assert sorted(tensors) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "vision.hook_out"]
    with safe_open(str(out), "pt") as handle:
        assert json.loads(handle.metadata()["hooked_vlm_manifest"]) == manifest

    # the same model and inputs, built by hand
    image, annotations = synthetic_grid_image(seed=0)
    prompt = f"what color is the {annotations[0]['shape']} in row {annotations[0]['row']} column {annotations[0]['col']} ?"
    inputs = build_qwen_inputs(build_tiny_tokenizer(), prompt, [image])
    model = tiny_model("tiny-qwen2-vl", seed=0)
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs, names_filter=list(tensors))
    for name, tensor in tensors.items():
        assert torch.equal(tensor, cache[name]), name
    length = inputs["input_ids"].shape[1]
    assert tensors["blocks.1.hook_resid_post"].shape == (1, length, 64)
    assert tensors["vision.hook_out"].shape == (1, 100, 64)

    assert manifest["format"] == cli.MANIFEST_FORMAT
    assert manifest["model"]["name"] == "tiny-qwen2-vl" and manifest["model"]["family"] == "qwen2_vl"
    assert manifest["model"]["tiny"] is True and manifest["model"]["n_layers"] == 2
    assert {h["name"]: h["shape"] for h in manifest["hooks"]} == {k: list(v.shape) for k, v in tensors.items()}
    assert manifest["inputs"]["prompt"] == prompt
    assert manifest["inputs"]["input_ids"] == inputs["input_ids"][0].tolist()
    assert manifest["inputs"]["image_grid_thw"] == [[1, 20, 20]]
    assert manifest["inputs"]["sources"][0]["annotations"] == json.loads(json.dumps(annotations))
    layout = manifest["layout"]
    assert layout["seq_len"] == length and layout["kind"][0].count(1) == 100
    assert layout["items"][0]["grid_thw"] == [1, 20, 20] and layout["items"][0]["start"] == 2
    # token k of the 280x280 grid is cell (k // 10, k % 10)
    start = layout["items"][0]["start"]
    assert [layout["row"][0][start + k] for k in (0, 37, 99)] == [0, 3, 9]
    assert [layout["col"][0][start + k] for k in (0, 37, 99)] == [0, 7, 9]
    # the printed and recorded top token is the model's argmax
    top = manifest["top_tokens"][0]
    assert top["id"] == int(logits[0, -1].argmax()) and top["rank"] == 1
    assert len(manifest["top_tokens"]) == 10
    assert abs(sum(t["prob"] for t in manifest["top_tokens"]) - float(logits[0, -1].softmax(-1).topk(10).values.sum())) < 1e-5


def test_inspect_video_and_image_with_globs(tmp_path):
    out = tmp_path / "video.safetensors"
    code, text = run_cli(
        "--model", "tiny-qwen2.5-vl", "--video", "synthetic", "--image", "synthetic", "--num-frames", "6",
        "--prompt", "<video> then <image> what moves ?", "--hooks", "blocks.*.attn.hook_pattern",
        "--hooks", "hook_embed", "--hook-table", "full", "--top-k", "3", "--out", str(out),
    )
    assert code == 0
    assert "video 0: 3 slice(s) x 4x4 cells of 28px, pixels 112x112" in text
    assert "blocks.1.attn.hook_pattern" in text  # full table lists every name
    manifest = json.loads(out.with_suffix(".json").read_text())
    tensors = load_file(out)
    assert sorted(tensors) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern", "hook_embed"]
    length = len(manifest["inputs"]["input_ids"])
    assert tensors["blocks.0.attn.hook_pattern"].shape == (1, 4, length, length)
    torch.testing.assert_close(tensors["blocks.0.attn.hook_pattern"].sum(-1), torch.ones(1, 4, length))
    assert manifest["inputs"]["video_grid_thw"] == [[3, 8, 8]]
    assert manifest["inputs"]["tensors"]["second_per_grid_ts"]["shape"] == [1]
    kinds = [item["kind"] for item in manifest["layout"]["items"]]
    assert sorted(kinds) == ["image", "video"] and len(manifest["top_tokens"]) == 3
    frames, _ = synthetic_video(num_frames=6, seed=0)
    video_source = next(s for s in manifest["inputs"]["sources"] if s["kind"] == "video")
    assert video_source["frames"] == frames.shape[0] == 6


def test_inspect_image_file_and_checkpoint_folder(tmp_path):
    """A saved checkpoint (no torchvision -> no HF processor) runs through the exact hand path."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = tmp_path / "ckpt"
    tiny_hf_model("tiny-qwen2-vl", seed=3).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280).save_pretrained(folder)
    image_path = tmp_path / "grid.png"
    synthetic_grid_image(seed=5)[0].resize((200, 120)).save(image_path)
    out = tmp_path / "ckpt.safetensors"
    code, text = run_cli("--model", str(folder), "--image", str(image_path), "--prompt", "what is this ?",
                         "--hooks", "vision.hook_out", "--out", str(out))
    assert code == 0 and "random weights" not in text
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["model"]["checkpoint"] == str(folder) and manifest["model"]["tiny"] is False
    assert manifest["inputs"]["image_grid_thw"] == [[1, 8, 14]]  # smart_resize(120, 200) = 112 x 196
    assert load_file(out)["vision.hook_out"].shape == (1, 28, 64)
    # the same weights as the built-in tiny model with that seed give the same top tokens
    code, tiny_text = run_cli("--model", "tiny-qwen2-vl", "--seed", "3", "--image", str(image_path),
                              "--prompt", "what is this ?", "--hooks", "none", "--hook-table", "none")
    assert code == 0
    section = lambda t: t.split("Top next tokens")[1].split("Token layout")[0]  # noqa: E731
    assert section(text) == section(tiny_text)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hooks", "blocks.*.hook_resid_pots"], r"No hook matches 'blocks\.\*\.hook_resid_pots'\. Closest: blocks\."),
        (["--image", "missing.png"], "Image file not found"),
        (["--model", "tiny-qwen9"], r"No built-in tiny model 'tiny-qwen9'; available: .*tiny-qwen2-vl"),
        (["--model", "qwen-tiny"], "neither a folder, a hub id"),
        (["--image", "synthetic", "--image", "synthetic", "--prompt", "<image> only one"], r"1 image marker\(s\)"),
    ],
)
def test_inspect_errors_name_the_fix(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _ = run_cli(*argv, "--hook-table", "none")
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_models_lists_tiny_models_and_builders():
    code, text = run_cli("models")
    assert code == 0
    assert "tiny-qwen2-vl" in text and "tiny-qwen2.5-vl" in text and "Qwen2VLForConditionalGeneration" in text
    assert "qwen2_vl" in text.split("Input builders")[1]


def test_register_input_builder_is_used(monkeypatch):
    seen = {}

    def builder(request: cli.InputRequest):
        seen["prompt"], seen["tiny"] = request.prompt, request.tiny
        return cli._qwen_builder(request)

    monkeypatch.setitem(cli.INPUT_BUILDERS, "qwen2_vl", builder)
    code, _ = run_cli("--prompt", "what ?", "--hooks", "none", "--hook-table", "none")
    assert code == 0 and seen == {"prompt": "what ?", "tiny": True}


def test_entry_point_is_declared():
    import importlib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["hooked-vlm"].split(":")
    assert getattr(importlib.import_module(module), function) is cli.main
    with pytest.raises(SystemExit) as exit_info:  # argparse: a subcommand is required
        cli.main([])
    assert exit_info.value.code == 2


def test_inspect_bfloat16_saves_bfloat16(tmp_path):
    out = tmp_path / "bf16.safetensors"
    code, _ = run_cli("--dtype", "bfloat16", "--hooks", "blocks.1.hook_resid_post", "--hook-table", "none", "--out", str(out))
    assert code == 0
    assert load_file(out)["blocks.1.hook_resid_post"].dtype == torch.bfloat16
    assert json.loads(out.with_suffix(".json").read_text())["hooks"][0]["dtype"] == "bfloat16"


def test_hub_id_failure_is_one_clear_line(monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, _ = run_cli("--model", "someone/some-vlm", "--hook-table", "none")
    assert code == 2
    err = capsys.readouterr().err
    assert "Could not fetch 'someone/some-vlm'" in err and "--model tiny-qwen2-vl" in err
