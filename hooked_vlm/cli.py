"""The ``hooked-vlm`` command.

``hooked-vlm inspect`` runs a model on an input and reports what a researcher looks at first: the
top next tokens, the token layout (which positions are text, which image cells or video frames)
and the hook table; with ``--out`` it writes the requested activations to a safetensors file
beside a JSON manifest (model, inputs, hook names, shapes, layout), so analyses can start from
files. ``hooked-vlm models`` lists the built-in tiny models and the supported architectures.

Models: a built-in random-weight tiny model (``tiny-qwen2-vl`` ..., no download), a local
checkpoint folder, or a hub id. Inputs: image files, video frame folders / GIFs, or the built-in
synthetic samples (``--image synthetic``: 280x280, coloured shapes on a 10x10 grid = one Qwen
token per cell).

Families plug in two things: a tiny model (``hooked_vlm.tiny.register_tiny``) and an input
builder (``register_input_builder`` here), which turns an :class:`InputRequest` into the
family's HF keyword tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

__all__ = ["InputRequest", "register_input_builder", "INPUT_BUILDERS", "build_parser", "main"]

SYNTHETIC = "synthetic"
DEFAULT_HOOKS = ("blocks.*.hook_resid_post", "vision.hook_out")
MANIFEST_FORMAT = "hooked_vlm.activations/1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# Family input builders
# --------------------------------------------------------------------------------------------
@dataclass
class InputRequest:
    """Everything a family needs to build its keyword tensors for one prompt.

    ``images`` are loaded sources (paths or PIL images), ``videos`` paths or (T, H, W, 3) arrays.
    ``processor`` is the checkpoint's HF processor when one could be built (None for tiny models
    and where torchvision is missing); ``checkpoint`` is the local folder of a real model.
    ``options`` carries the command-line pixel / frame settings that were given (others absent).
    """

    tokenizer: Any
    prompt: str
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    processor: Any = None
    checkpoint: Path | None = None
    tiny: bool = False
    options: dict[str, Any] = field(default_factory=dict)


InputBuilder = Callable[[InputRequest], dict[str, Tensor]]
#: ``cfg.family`` -> builder; LLaVA / Gemma / CLIP modules add theirs with ``register_input_builder``.
INPUT_BUILDERS: dict[str, InputBuilder] = {}


def register_input_builder(families: str | Sequence[str], builder: InputBuilder) -> InputBuilder:
    """Make ``hooked-vlm inspect`` build inputs for model family(ies) ``families`` with ``builder``."""
    for family in [families] if isinstance(families, str) else families:
        INPUT_BUILDERS[family] = builder
    return builder


def _qwen_builder(request: InputRequest) -> dict[str, Tensor]:
    """Qwen2-VL / Qwen2.5-VL: the checkpoint's processor if it could be built, else the exact hand path."""
    from hooked_vlm.inputs import build_qwen_inputs, qwen_processing_kwargs

    kwargs: dict[str, Any] = {}
    if request.checkpoint is not None and (request.checkpoint / "preprocessor_config.json").is_file():
        kwargs.update(qwen_processing_kwargs(request.checkpoint))
    if request.tiny:  # keep tiny-model videos tiny: no upsizing to HF's 128-token floor
        kwargs["video_min_pixels"] = 56 * 56
    options = dict(request.options)
    if "min_pixels" in options:
        kwargs["min_pixels"] = kwargs["video_min_pixels"] = options.pop("min_pixels")
    if "max_pixels" in options:
        kwargs["max_pixels"] = kwargs["video_max_pixels"] = options.pop("max_pixels")
    kwargs.update(options)  # fps, num_frames
    return build_qwen_inputs(request.tokenizer, request.prompt, request.images, request.videos, processor=request.processor, **kwargs)


register_input_builder(("qwen2_vl", "qwen2_5_vl"), _qwen_builder)


def _generic_processor_builder(request: InputRequest) -> dict[str, Tensor]:
    """Any family whose checkpoint ships a working HF processor: call it with HF's own conventions."""
    from PIL import Image

    from hooked_vlm.inputs import load_image

    kwargs: dict[str, Any] = {"text": [request.prompt], "return_tensors": "pt"}
    if request.images:
        kwargs["images"] = [Image.fromarray(load_image(image)) for image in request.images]
    if request.videos:
        kwargs["videos"] = request.videos
    return dict(request.processor(**kwargs))


# --------------------------------------------------------------------------------------------
# Loading models, tokenizers, processors, inputs
# --------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A hooked model with what turns text and pixels into its inputs, and where it came from."""

    model: Any
    tokenizer: Any
    processor: Any
    checkpoint: Path | None
    tiny: bool
    name: str


def _tiny_names() -> list[str]:
    from hooked_vlm import tiny

    return sorted(tiny.TINY_MODELS)


def _resolve_checkpoint(name: str) -> Path:
    """A local folder for ``name``: itself if it exists, else a hub snapshot (needs network)."""
    from hooked_vlm.errors import CheckpointError

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"'{path}' is a file; pass a checkpoint folder (config.json + *.safetensors).")
        return path
    if name.startswith(("tiny-", "tiny_")):
        raise CheckpointError(f"No built-in tiny model '{name}'; available: {', '.join(_tiny_names())}.")
    looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
    if not looks_like_id:
        close = difflib.get_close_matches(name, _tiny_names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CheckpointError(
            f"'{name}' is neither a folder, a hub id (owner/name) nor a tiny model ({', '.join(_tiny_names())}).{hint}"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as err:  # offline, unknown repo
        raise CheckpointError(
            f"Could not fetch '{name}' from the hub ({type(err).__name__}: {err}). Download it elsewhere and pass the "
            "local folder, or try a built-in tiny model (--model tiny-qwen2-vl)."
        ) from err


def _load_processor(folder: Path) -> Any:
    """The checkpoint's HF processor, or None where it cannot be built here (e.g. torchvision missing)."""
    try:
        from transformers import AutoProcessor
        from transformers.processing_utils import ProcessorMixin

        processor = AutoProcessor.from_pretrained(folder)
    except Exception:  # ImportError for torchvision, missing processor files, ...
        return None
    # AutoProcessor falls back to a bare tokenizer or image processor; only a full processor will do.
    return processor if isinstance(processor, ProcessorMixin) else None


def load_model(name: str, dtype: torch.dtype, device: str, seed: int) -> LoadedModel:
    """A hooked model with its tokenizer (and processor) from a tiny name, a folder or a hub id."""
    from hooked_vlm import tiny

    if name in tiny.TINY_MODELS:
        from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

        model = tiny.tiny_model(name, seed=seed).to(device=device, dtype=dtype)
        return LoadedModel(model, build_tiny_tokenizer(), None, None, True, name)
    from transformers import AutoTokenizer

    from hooked_vlm.model import HookedVLM

    folder = _resolve_checkpoint(name)
    model = HookedVLM.from_pretrained(str(folder), dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel(model, tokenizer, _load_processor(folder), folder, False, name)


@dataclass
class LoadedInputs:
    """Image / video sources from the command line, their descriptions for the manifest, a default prompt."""

    images: list[Any]
    videos: list[Any]
    descriptions: list[dict[str, Any]]
    default_prompt: str


def load_inputs(image_args: Sequence[str], video_args: Sequence[str], num_frames: int | None, seed: int) -> LoadedInputs:
    """Image and video sources from the command line; ``synthetic`` picks the built-in samples."""
    from hooked_vlm.inputs import load_image, load_video
    from hooked_vlm.samples import synthetic_grid_image, synthetic_video

    images, videos, descriptions = [], [], []
    prompt = "describe the image ."
    for k, source in enumerate(image_args):
        if source == SYNTHETIC:
            image, annotations = synthetic_grid_image(seed=seed + k)
            images.append(image)
            descriptions.append({"kind": "image", "source": SYNTHETIC, "seed": seed + k, "size": [280, 280], "annotations": annotations})
            if k == 0:
                first = annotations[0]
                prompt = f"what color is the {first['shape']} in row {first['row']} column {first['col']} ?"
        else:
            pixels = load_image(source)  # fails early, with a clear message
            images.append(str(source))
            descriptions.append({"kind": "image", "source": str(Path(source).resolve()), "size": list(pixels.shape[:2])})
    for k, source in enumerate(video_args):
        if source == SYNTHETIC:
            frames, annotations = synthetic_video(num_frames=num_frames or 8, seed=seed + k)
            videos.append(frames)
            descriptions.append({"kind": "video", "source": SYNTHETIC, "seed": seed + k, "frames": int(frames.shape[0]),
                                 "size": list(frames.shape[1:3]), "annotations": annotations})
        else:
            frames = load_video(source)
            videos.append(frames)
            descriptions.append({"kind": "video", "source": str(Path(source).resolve()), "frames": int(frames.shape[0]),
                                 "size": list(frames.shape[1:3])})
    if videos and not images:
        prompt = "what moves in the video ?"
    return LoadedInputs(images, videos, descriptions, prompt)


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------
def select_hooks(patterns: Sequence[str], available: Sequence[str]) -> list[str]:
    """Hook names matching each pattern (exact name or glob), in model order; unmatched patterns raise."""
    from hooked_vlm.errors import InputError

    chosen: set[str] = set()
    for pattern in patterns:
        matched = [name for name in available if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            close = difflib.get_close_matches(pattern, available, n=5, cutoff=0.5)
            raise InputError(
                f"No hook matches '{pattern}'. " + (f"Closest: {', '.join(close)}. " if close else "")
                + "Run `hooked-vlm inspect --hook-table full` to list every hook name; globs like 'blocks.*.hook_resid_post' work."
            )
        chosen.update(matched)
    return [name for name in available if name in chosen]


def _template(name: str) -> str:
    """Hook name with its block index replaced: ``blocks.3.attn.hook_q`` -> ``blocks.{i}.attn.hook_q``."""
    name = re.sub(r"^vision\.blocks\.\d+\.", "vision.blocks.{j}.", name)
    return re.sub(r"^blocks\.\d+\.", "blocks.{i}.", name)


def hook_rows(table: Sequence[tuple[str, str]], shapes: dict[str, tuple[int, ...]], full: bool) -> list[list[str]]:
    """Rows (hook, blocks, documented shape, cached shape) of the hook table, grouped per block unless ``full``."""
    rows: list[list[str]] = []
    if full:
        for name, documented in table:
            rows.append([name, "", documented, _shape_text(shapes.get(name))])
        return rows
    groups: dict[str, list[str]] = {}
    documented_of: dict[str, str] = {}
    for name, documented in table:
        groups.setdefault(_template(name), []).append(name)
        documented_of.setdefault(_template(name), documented)
    for template, names in groups.items():
        indices = [int(m.group(1)) for n in names if (m := re.match(r"^(?:vision\.)?blocks\.(\d+)\.", n))]
        span = f"{min(indices)}..{max(indices)}" if indices else ""
        cached = next((shapes[n] for n in names if n in shapes), None)
        rows.append([template, span, documented_of[template], _shape_text(cached)])
    return rows


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def top_tokens(logits: Tensor, attention_mask: Tensor | None, tokenizer: Any, k: int) -> list[dict[str, Any]]:
    """The ``k`` most likely next tokens after the last real position of prompt 0."""
    last = int(attention_mask[0].nonzero().max()) if attention_mask is not None else logits.shape[1] - 1
    scores = logits[0, last].float()
    probs = scores.softmax(-1)
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return [
        {"rank": r + 1, "id": int(i), "token": tokenizer.convert_ids_to_tokens(int(i)), "logit": float(scores[i]), "prob": float(p)}
        for r, (p, i) in enumerate(zip(values, ids))
    ]


def layout_record(layout: Any) -> dict[str, Any]:
    """The token layout as JSON-ready lists (per-position kind, item, frame, row, col; the visual items)."""
    from hooked_vlm.layout import KIND_NAMES

    def rows(t: Tensor | None) -> list | None:
        return None if t is None else t.tolist()

    return {
        "batch_size": layout.batch_size,
        "seq_len": layout.seq_len,
        "kind_names": {str(k): v for k, v in KIND_NAMES.items()},
        "kind": rows(layout.kind),
        "item": rows(layout.item),
        "frame": rows(layout.frame),
        "row": rows(layout.row),
        "col": rows(layout.col),
        "items": [dataclasses.asdict(item) for item in layout.items],
        "summary": layout.summary(),
    }


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same folder, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def manifest_path(out: Path) -> Path:
    """``acts.safetensors`` -> ``acts.json``."""
    return out.with_suffix(".json")


def write_activations(out: Path, tensors: dict[str, Tensor], manifest: dict[str, Any]) -> Path:
    """Save tensors (safetensors, manifest also in its metadata) and the JSON manifest beside it."""
    from safetensors.torch import save_file

    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    text = json.dumps(manifest, indent=1, default=_json_default)
    _atomic_write(out, lambda tmp: save_file(contiguous, tmp, metadata={"format": "pt", "hooked_vlm_manifest": text}))
    target = manifest_path(out)
    _atomic_write(target, lambda tmp: Path(tmp).write_text(text))
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Tensor):
        return value.tolist()
    return str(value)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def _progress(total: int, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="inspect", unit="step", disable=quiet, file=sys.stderr, leave=False)


def cmd_inspect(args: argparse.Namespace, stdout: TextIO) -> int:
    """Load, build inputs, run with cache, print, and write the requested activations."""
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    if not args.image and not args.video:
        args.image = [SYNTHETIC]
    with _progress(4, args.quiet) as bar:  # closed before printing, so the report is not interleaved
        bar.set_postfix_str("reading inputs")
        sources = load_inputs(args.image, args.video, args.num_frames, args.seed)  # bad paths fail before loading
        bar.update()
        bar.set_postfix_str("loading model")
        loaded = load_model(args.model, _DTYPES[args.dtype], args.device, args.seed)
        model = loaded.model
        hooks = [] if args.hooks == ["none"] else select_hooks(args.hooks or list(DEFAULT_HOOKS), list(model.hook_dict))
        bar.update()
        bar.set_postfix_str("building inputs")
        prompt = args.prompt if args.prompt is not None else sources.default_prompt
        inputs = _build_inputs(args, loaded, prompt, sources)
        bar.update()
        bar.set_postfix_str("forward")
        with torch.no_grad():
            logits, cache = model.run_with_cache(**inputs, names_filter=hooks)
        activations = {name: cache[name] for name in hooks}
        try:
            layout = model.layout(**inputs)
        except NotImplementedError:
            layout = None
        bar.update()

    tops = top_tokens(logits, inputs.get("attention_mask"), loaded.tokenizer, args.top_k)
    shapes = {name: tuple(t.shape) for name, t in activations.items()}
    _print_report(stdout, args, loaded, prompt, sources, inputs, tops, layout, shapes)
    if args.out is not None:
        manifest = _manifest(args, loaded, prompt, sources, inputs, tops, layout, activations)
        target = write_activations(Path(args.out), activations, manifest)
        print(f"\nwrote {len(activations)} activation(s) to {args.out} and the manifest to {target}", file=stdout)
    print(f"done in {time.perf_counter() - started:.2f} s", file=stdout)
    return 0


def _build_inputs(args: argparse.Namespace, loaded: LoadedModel, prompt: str, sources: LoadedInputs) -> dict[str, Any]:
    """The family's keyword tensors, on the model's device, pixels in the model's dtype."""
    from hooked_vlm.errors import UnsupportedModelError

    options = {key: getattr(args, key) for key in ("min_pixels", "max_pixels", "fps", "num_frames") if getattr(args, key) is not None}
    request = InputRequest(loaded.tokenizer, prompt, sources.images, sources.videos, loaded.processor, loaded.checkpoint, loaded.tiny, options)
    family = loaded.model.cfg.family
    builder = INPUT_BUILDERS.get(family)
    if builder is None:
        if loaded.processor is None:
            raise UnsupportedModelError(
                f"hooked-vlm inspect cannot build inputs for family '{family}' without its HF processor; register a "
                "builder with hooked_vlm.cli.register_input_builder, or install what the processor needs."
            )
        builder = _generic_processor_builder
    inputs = {k: (v.to(args.device) if isinstance(v, Tensor) else v) for k, v in builder(request).items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(_DTYPES[args.dtype])
    return inputs


def _print_report(stdout, args, loaded, prompt, sources, inputs, tops, layout, shapes) -> None:
    cfg = loaded.model.cfg
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"model    {loaded.name}  ({cfg.architecture}, family {cfg.family}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"{params:,} parameters{', random weights' if loaded.tiny else ''})", file=stdout)
    for d in sources.descriptions:
        extra = f", {len(d['annotations'])} annotated objects" if "annotations" in d and d["kind"] == "image" else ""
        frames = f"{d['frames']} frames of " if d["kind"] == "video" else ""
        print(f"{d['kind']:<8} {d['source']}  ({frames}{d['size'][0]}x{d['size'][1]}{extra})", file=stdout)
    print(f"prompt   {prompt!r}", file=stdout)
    print("inputs   " + ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items() if isinstance(v, Tensor)), file=stdout)

    print("\nTop next tokens", file=stdout)
    print(format_table(["rank", "id", "token", "logit", "prob"],
                       [[t["rank"], t["id"], t["token"], f"{t['logit']:.4f}", f"{t['prob']:.4f}"] for t in tops]), file=stdout)
    print("\nToken layout", file=stdout)
    print(layout.summary() if layout is not None else "(this family does not describe its layout)", file=stdout)
    if args.hook_table != "none":
        table = loaded.model.hook_table()
        print(f"\nHook table ({len(table)} hook points; cached shapes for the {len(shapes)} saved)", file=stdout)
        print(format_table(["hook", "blocks", "shape", "cached"], hook_rows(table, shapes, args.hook_table == "full")), file=stdout)


def _manifest(args, loaded, prompt, sources, inputs, tops, layout, activations) -> dict[str, Any]:
    cfg = loaded.model.cfg
    ids = inputs["input_ids"][0].tolist()
    return {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "hooked-vlm " + " ".join(args.argv),
        "model": {
            "name": loaded.name,
            "checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None,
            "tiny": loaded.tiny,
            "seed": args.seed if loaded.tiny else None,
            "family": cfg.family,
            "architecture": cfg.architecture,
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "n_heads": cfg.n_heads,
            "d_vocab": cfg.d_vocab,
            "dtype": args.dtype,
            "device": args.device,
        },
        "inputs": {
            "prompt": prompt,
            "sources": sources.descriptions,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in inputs.items() if isinstance(v, Tensor)},
            "input_ids": ids,
            "tokens": loaded.tokenizer.convert_ids_to_tokens(ids),
            "image_grid_thw": inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else None,
            "video_grid_thw": inputs["video_grid_thw"].tolist() if "video_grid_thw" in inputs else None,
        },
        "hooks": [
            {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in activations.items()
        ],
        "top_tokens": tops,
        "layout": layout_record(layout) if layout is not None else None,
    }


def cmd_models(args: argparse.Namespace, stdout: TextIO) -> int:
    """List the built-in tiny models and the architectures checkpoints may have."""
    from hooked_vlm.loading import supported_architectures

    print("Built-in tiny models (random weights, no download):", file=stdout)
    for name in _tiny_names():
        print(f"  {name}", file=stdout)
    print("\nSupported checkpoint architectures:", file=stdout)
    for arch in supported_architectures():
        print(f"  {arch}", file=stdout)
    print("\nInput builders for families: " + ", ".join(sorted(INPUT_BUILDERS)), file=stdout)
    from hooked_vlm.organisms.cli import cmd_list as list_organisms  # organisms (issue 11)

    print("\nModel organisms (trained here; `hooked-vlm organisms list`):", file=stdout)
    list_organisms(args, stdout)
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooked-vlm", description="Mechanistic interpretability for vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser(
        "inspect",
        help="run a model on an input: top next tokens, token layout, hook table; save activations",
        description="Run a model on an image / video and a prompt; print the top next tokens, the token layout and "
        "the hook table; with --out, save the chosen activations (safetensors) and a JSON manifest.",
    )
    inspect.add_argument("--model", default="tiny-qwen2-vl",
                         help="built-in tiny model (see `hooked-vlm models`), checkpoint folder, or hub id (default: %(default)s)")
    inspect.add_argument("--image", action="append", default=[], metavar="PATH|synthetic",
                         help="image file or 'synthetic' (the 280x280 10x10 shape grid); repeatable. Default: synthetic")
    inspect.add_argument("--video", action="append", default=[], metavar="PATH|synthetic",
                         help="folder of frames, animated GIF, or 'synthetic' (a moving shape); repeatable")
    inspect.add_argument("--prompt", default=None,
                         help="prompt text; '<image>' / '<video>' mark where each goes (default: all first). "
                         "Default prompt asks about the synthetic sample")
    inspect.add_argument("--hooks", action="append", default=None, metavar="NAME|GLOB",
                         help=f"hooks to cache and save; repeatable; 'none' for no activations (default: {' '.join(DEFAULT_HOOKS)})")
    inspect.add_argument("--out", default=None, metavar="FILE.safetensors",
                         help="write the cached activations here and the manifest to FILE.json")
    inspect.add_argument("--top-k", type=_positive_int, default=10, help="how many next tokens to show (default: %(default)s)")
    inspect.add_argument("--hook-table", choices=["grouped", "full", "none"], default="grouped",
                         help="hook table per block template (grouped), every name (full), or none")
    inspect.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    inspect.add_argument("--device", default="cpu")
    inspect.add_argument("--seed", type=int, default=0, help="tiny-model weights and synthetic samples (default: %(default)s)")
    inspect.add_argument("--min-pixels", type=_positive_int, default=None, help="smart-resize floor (pixels per image / frame)")
    inspect.add_argument("--max-pixels", type=_positive_int, default=None, help="smart-resize ceiling (pixels per image / frame)")
    inspect.add_argument("--fps", type=float, default=None, help="frame rate of the given video frames (default 2)")
    inspect.add_argument("--num-frames", type=_positive_int, default=None, help="sample this many frames uniformly")
    inspect.add_argument("--quiet", action="store_true", help="no progress bar")
    inspect.set_defaults(handler=cmd_inspect)

    models = sub.add_parser("models", help="list built-in tiny models and supported architectures")
    models.set_defaults(handler=cmd_models)
    from hooked_vlm.organisms.cli import add_parser as add_organisms_parser  # organisms (issue 11)

    add_organisms_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """Entry point of the ``hooked-vlm`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = stdout or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args, stdout)
    except (ValueError, OSError) as err:
        if args.debug:
            raise
        print(f"hooked-vlm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
