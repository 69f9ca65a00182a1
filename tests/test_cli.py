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
        return cli.input_builder_for("qwen2_5_vl")(request)  # the family's registered builder

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


# ----- front door (issue 9): lazy start, opt-in hooks, safe --out, frames, devices, two-tower models -------------
import subprocess  # noqa: E402
import sys  # noqa: E402

from hooked_vlm.cli_hooks import estimate_cache_bytes  # noqa: E402


def run_cli_err(capsys, *argv: str) -> tuple[int, str, str]:
    code, text = run_cli(*argv)
    return code, text, capsys.readouterr().err


def test_help_version_and_models_import_no_torch():
    """Timing-free: after --help, --version, `inspect --help` and `models`, neither torch nor transformers is loaded."""
    probe = (
        "import sys, io, contextlib\n"
        "from hooked_vlm import cli\n"
        "for argv in (['--help'], ['--version'], ['inspect', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            cli.main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "out = io.StringIO()\n"
        "rc = cli.main(['models'], stdout=out)\n"
        "print(rc, 'tiny-qwen2.5-vl' in out.getvalue(), sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.stdout.strip() == "0 True []", result.stderr
    version = subprocess.run([sys.executable, "-m", "hooked_vlm.cli", "--version"], capture_output=True, text=True, timeout=120)
    import hooked_vlm

    assert version.stdout.strip() == f"hooked-vlm {hooked_vlm.__version__}"


def test_every_option_has_help():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    assert set(subparsers.choices) == set(cli.COMMANDS)
    for name, sub in [("hooked-vlm", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            if action.option_strings:
                assert action.help, f"{name} {action.option_strings} has no help"


def test_models_lists_builtins_through_the_resolver_and_the_registry_table_is_complete():
    from hooked_vlm import loading

    code, text = run_cli("models")
    assert code == 0
    for name, entry in loading.builtin_models().items():
        assert f"  {name:<24} {entry.description}" in text
    from hooked_vlm.families.registry import families

    # the torch-free table is the families' registrations, and each architecture's class really serves it
    assert sorted(loading.ARCHITECTURE_MODULES) == sorted(a for fam in families() for a in fam.architectures)
    for arch, module in loading.ARCHITECTURE_MODULES.items():
        cls = loading.model_class_for(arch)
        assert cls.__module__ == module and arch in cls.hf_architectures


def test_a_new_subcommand_is_one_table_entry(tmp_path, monkeypatch):
    (tmp_path / "hello_command.py").write_text(
        "def add_arguments(parser):\n    parser.add_argument('--name', default='world', help='who')\n"
        "def run(args, stdout):\n    print('hello', args.name, file=stdout)\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "hello", ("hello_command", "say hello"))
    out = io.StringIO()
    assert cli.main(["hello", "--name", "vlm"], stdout=out) == 0 and out.getvalue() == "hello vlm\n"


def test_star_glob_skips_opt_in_hooks_and_flags_include_them(tmp_path, capsys):
    out = tmp_path / "all.safetensors"
    code, _, err = run_cli_err(capsys, "--hooks", "*", "--hook-table", "none", "--out", str(out))
    assert code == 0
    saved = load_file(out)
    assert not [n for n in saved if n.rsplit(".", 1)[-1] in ("hook_pattern", "hook_attn_scores", "hook_result", "hook_lse", "hook_rows")]
    assert "blocks.1.hook_resid_post" in saved and "vision.blocks.0.attn.hook_q" in saved
    assert "note: the hook globs skipped opt-in hooks" in err and "(--pattern)" in err and "(--attn-result)" in err and "(--attn-stats)" in err

    out2 = tmp_path / "opt.safetensors"
    code, _, _ = run_cli_err(capsys, "--hooks", "blocks.1.*", "--pattern", "--attn-result", "--attn-stats", "item",
                             "--hook-table", "none", "--out", str(out2))
    assert code == 0
    t = load_file(out2)
    # per-head results add up to the attention output; the statistics kernel's exact row equals the pattern's
    torch.testing.assert_close(t["blocks.1.attn.hook_result"].sum(2), t["blocks.1.hook_attn_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(t["blocks.1.attn.hook_rows"][:, :, 0], t["blocks.1.attn.hook_pattern"][:, :, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(t["blocks.1.attn.hook_lse"].exp().log(), torch.logsumexp(t["blocks.1.attn.hook_attn_scores"], -1), atol=1e-4, rtol=0)
    image_mass = t["blocks.1.attn.hook_pattern"][0, :, -1, 2:102].sum(-1)  # synthetic image: positions 2..101 = item 0
    torch.testing.assert_close(t["blocks.1.attn.hook_region"][0, :, 0, 0], image_mass, atol=1e-5, rtol=0)


def test_globs_that_reach_only_opt_in_hooks_say_which_flag(capsys):
    code, _, err = run_cli_err(capsys, "--hooks", "blocks.0.attn.hook_res*", "--hook-table", "none")
    assert code == 2 and "matches only opt-in hooks" in err and "--attn-result" in err
    code, _, err = run_cli_err(capsys, "--hooks", "vision.blocks.*.attn.hook_lse", "--hook-table", "none")
    assert code == 2 and "vision_attn_stats=AttnStatsRequest" in err


@pytest.mark.parametrize("name, message", [
    ("acts.json", r"the JSON manifest is written beside the tensors as FILE\.json, so this name would overwrite them; use a \.safetensors name such as .*acts\.safetensors"),
    ("folder", r"--out .*folder is a folder; give a file name such as .*folder/acts\.safetensors"),
])
def test_out_refuses_names_that_would_lose_data(tmp_path, capsys, name, message):
    target = tmp_path / name
    if name == "folder":
        target.mkdir()
    else:
        target.write_text("keep me")
    code, text, err = run_cli_err(capsys, "--out", str(target), "--hook-table", "none")
    assert code == 2 and re.search(message, err) and "Top next tokens" not in text  # refused before the forward
    assert name == "folder" or target.read_text() == "keep me"


@pytest.mark.parametrize("frames, slices", [(1, 1), (3, 2), (4, 2)])
def test_num_frames_accepts_any_positive_count(tmp_path, frames, slices):
    out = tmp_path / "v.safetensors"
    code, _ = run_cli("--model", "tiny-qwen2-vl", "--video", "synthetic", "--num-frames", str(frames),
                      "--hooks", "none", "--hook-table", "none", "--out", str(out))
    assert code == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["inputs"]["video_grid_thw"][0][0] == slices  # odd counts padded by repeating the last frame
    assert manifest["inputs"]["sources"][0]["frames"] == frames


def test_sample_frames_picks_hf_uniform_indices():
    import numpy as np

    video = np.arange(8)[:, None, None, None] * np.ones((8, 2, 2, 3), dtype=np.uint8)
    assert cli.sample_frames(video, 3, "v")[:, 0, 0, 0].tolist() == [0, 2, 5]  # floor(i * 8 / 3)
    with pytest.raises(ValueError, match=r"--num-frames 9: v has 8 frames; choose 1 to 8"):
        cli.sample_frames(video, 9, "v")


@pytest.mark.parametrize("device, message", [
    ("cuda:99", r"^hooked-vlm: error: --device cuda:99: this torch build \(.*\) cannot use it \(.*\); use --device cpu$"),
    ("banana", r"^hooked-vlm: error: --device 'banana' is not a device name"),
])
def test_unavailable_device_is_one_line(capsys, device, message):
    code, _, err = run_cli_err(capsys, "--device", device, "--hook-table", "none")
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err.strip())


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="Image file not found"):
        cli.main(["inspect", "--quiet", "--image", "missing.png", "--debug"], stdout=io.StringIO())


def test_unexpected_errors_are_one_line_with_exit_1(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "load_model", boom)
    code, _, err = run_cli_err(capsys, "--hook-table", "none")
    assert code == 1 and err.strip() == "hooked-vlm: error: RuntimeError: boom (rerun with --debug for the traceback)"


def test_text_only_run_and_the_image_default_note(tmp_path, capsys):
    out = tmp_path / "text.safetensors"
    code, text, err = run_cli_err(capsys, "--image", "none", "--prompt", "what color is the circle", "--hooks", "blocks.1.hook_resid_post",
                                  "--hook-table", "none", "--out", str(out))
    assert code == 0 and "image    none (text only)" in text
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert "pixel_values" not in manifest["inputs"]["tensors"]
    tok = build_tiny_tokenizer()
    ids = torch.tensor([tok("what color is the circle")["input_ids"]])
    assert manifest["inputs"]["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        _, cache = tiny_model("tiny-qwen2-vl", seed=0).run_with_cache(input_ids=ids, names_filter=["blocks.1.hook_resid_post"])
    assert torch.equal(load_file(out)["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"])

    code, _, err = run_cli_err(capsys, "--prompt", "<image> what color ?", "--hooks", "none", "--hook-table", "none")
    assert code == 0 and "the prompt has <image> but no --image was given: using the built-in synthetic grid image" in err


def test_large_input_warning_and_its_memory_estimate(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "LARGE_VISUAL_TOKENS", 50)
    out = tmp_path / "big.safetensors"
    hooks = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_k", "blocks.1.ln1.hook_scale",
             "blocks.0.mlp.hook_post", "vision.hook_out", "vision.blocks.0.hook_resid_post"]
    argv = [a for h in hooks for a in ("--hooks", h)]
    code, _, err = run_cli_err(capsys, *argv, "--hook-table", "none", "--out", str(out))
    assert code == 0
    saved = load_file(out)
    counted = sum(t.numel() * t.element_size() for n, t in saved.items() if n != "vision.blocks.0.hook_resid_post")
    assert f"~{counted / 2**20:,.1f} MiB (not counting 1 vision-tower / statistics hook(s))" in err
    assert "warning: large input: 100 visual tokens (114 positions x 1 prompt(s))" in err
    model = tiny_model("tiny-qwen2-vl")
    assert estimate_cache_bytes(list(saved), model, 1, 114, 100, 4) == (counted, ["vision.blocks.0.hook_resid_post"])


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_inspect_two_tower_models_reports_similarities(tmp_path, name):
    out = tmp_path / "clip.safetensors"
    code, text = run_cli("--model", name, "--text", "a red circle", "--text", "a blue square", "--hook-table", "none", "--out", str(out))
    assert code == 0 and "Image-text similarity" in text and "a blue square" in text
    saved = load_file(out)
    manifest = json.loads(out.with_suffix(".json").read_text())
    model = tiny_model(name)
    image, text_emb = saved["hook_image_embeds"], saved["hook_text_embeds"]
    cos = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text_emb, dim=-1).T
    expected = cos * model.logit_scale.exp() + (model.logit_bias if model.logit_bias is not None else 0)
    torch.testing.assert_close(torch.tensor(manifest["similarity"]["logits_per_image"]), expected.detach(), atol=1e-5, rtol=0)
    assert manifest["similarity"]["texts"] == ["a red circle", "a blue square"]


def test_hooks_that_do_not_fire_for_the_input_are_named_not_fatal(tmp_path, capsys):
    """LLaVA-NeXT-Video's video pooling hooks stay silent on an image: the run saves what fired and says so."""
    out = tmp_path / "nv.safetensors"
    code, _, err = run_cli_err(capsys, "--model", "tiny-llava-next-video", "--hooks", "video_pool.*", "--hooks", "vision.hook_out",
                               "--hook-table", "none", "--out", str(out))
    assert code == 0 and "2 selected hook(s) did not fire for these inputs and are not saved: video_pool.hook_in, video_pool.hook_out" in err
    assert sorted(load_file(out)) == ["vision.hook_out"]
