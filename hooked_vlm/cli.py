"""The ``hooked-vlm`` command.

``hooked-vlm inspect`` runs a model on an input and reports what a researcher looks at first: the
top next tokens, the token layout (which positions are text, which image cells or video frames)
and the hook table; with ``--out`` it writes the requested activations to a safetensors file
beside a JSON manifest (model, inputs, hook names, shapes, layout), so analyses can start from
files. ``hooked-vlm models`` lists the built-in tiny models and the supported architectures.

Models: a built-in model (``hooked_vlm.loading.builtin_models``: the random-weight tiny models, no
download), a local checkpoint folder, or a hub id. Inputs: image files, video frame folders / GIFs, the
built-in synthetic samples (``--image synthetic``: 280x280, coloured shapes on a 10x10 grid = one Qwen
token per cell), or none (``--image none``: text only). CLIP / SigLIP models report embeddings and
image-text similarities instead of next tokens.

Subcommands live in :data:`COMMANDS` (name -> module, help); a module is imported only when its
subcommand runs, so ``--help``, ``--version`` and ``models`` never import torch. Families plug in through
their registration (``hooked_vlm.families.<family>.FAMILY``): its tiny models and its input builder, which turns
an :class:`InputRequest` into the family's HF keyword tensors (``register_input_builder`` overrides one at run time).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from hooked_vlm.atomic_files import atomic_output, atomic_write_text

if TYPE_CHECKING:  # torch is imported by the commands that need it, never by --help / models
    import torch
    from torch import Tensor

__all__ = ["InputRequest", "register_input_builder", "input_builder_for", "INPUT_BUILDERS", "COMMANDS", "Command", "build_parser", "main"]

#: subcommand -> ("module" or "module:attribute", one-line help). The target is an object (or module) with
#: ``add_arguments(parser)`` and ``run(args, stdout) -> int``; it is imported only when its subcommand is
#: chosen, so keep heavy imports inside ``run``. Adding a subcommand is one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("hooked_vlm.cli:INSPECT", "run a model on an input: top next tokens (or CLIP / SigLIP similarities), token layout, hook table; save activations"),
    "models": ("hooked_vlm.cli:MODELS", "list the built-in models and the supported checkpoint architectures"),
    "organisms": ("hooked_vlm.organisms.cli", "train, evaluate and list the model organisms (tiny VLMs trained on planted tasks)"),
    # --- research pipelines III (issue 16) ---
    "cir": ("analyses.pipelines.cir.cli", "composed image retrieval (SEARLE phi) with Grad-ECLIP explanations: build-db, query"),
    "compare-attention": ("analyses.pipelines.compare_attention.cli", "compare two VLMs' image attention / Grad-CAM / saliency per paraphrase, with clustered statistics"),
    # --- research pipelines I (issue 14) ---
    "visual-search": ("analyses.pipelines.visual_search.command", "visual search on grid images: presence answers, answer-token attention per head, TP-vs-FN head rankings"),
    "spatial": ("analyses.pipelines.spatial.command", "spatial relations: accuracy, relation-word attention, mirror patching, probes, attention scaling"),
    "video": ("analyses.pipelines.video.cli:VIDEO", "video QA study: infer, counterfactual trace, Have-1/2 probes, mean vectors, indexing check"),
}

SYNTHETIC = "synthetic"
NONE = "none"
DEFAULT_HOOKS = ("blocks.*.hook_resid_post", "vision.hook_out")
MANIFEST_FORMAT = "hooked_vlm.activations/1"
DTYPE_NAMES = ("bfloat16", "float16", "float32")
#: inputs at least this large get a warning with their visual token count and estimated cache memory
LARGE_VISUAL_TOKENS = 4096
LARGE_CACHE_BYTES = 2 * 1024**3


def _dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name)


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
    family: str = ""  # the model's ``cfg.family`` (one builder serves every variant of a family)


InputBuilder = Callable[[InputRequest], "dict[str, Tensor]"]
class _InputBuilders(dict):
    """``cfg.family`` -> builder: run-time registrations first, else the family registration's own builder
    (``hooked_vlm.families.<family>.FAMILY.input_builder``, imported on first use)."""

    def __missing__(self, config_family: str) -> InputBuilder:
        from hooked_vlm.families.registry import family_of

        fam = family_of(config_family)
        builder = None if fam is None else fam.load_input_builder()
        if builder is None:
            raise KeyError(config_family)

        def build(request: InputRequest) -> dict[str, Tensor]:
            # one builder serves every variant of a family: it reads the variant from request.family
            return builder(request if request.family else dataclasses.replace(request, family=config_family))

        return build

    def get(self, config_family: str, default: InputBuilder | None = None) -> InputBuilder | None:  # type: ignore[override]
        """Like ``dict.get``, but a family's own builder counts as present (``dict.get`` skips ``__missing__``)."""
        try:
            return self[config_family]
        except KeyError:
            return default


#: ``cfg.family`` -> input builder (see :class:`_InputBuilders`; ``register_input_builder`` overrides one).
INPUT_BUILDERS: dict[str, InputBuilder] = _InputBuilders()


def register_input_builder(families: str | Sequence[str], builder: InputBuilder) -> InputBuilder:
    """Make ``hooked-vlm inspect`` build inputs for model family(ies) ``families`` with ``builder``."""
    for family in [families] if isinstance(families, str) else families:
        INPUT_BUILDERS[family] = builder
    return builder


def input_builder_for(config_family: str) -> InputBuilder | None:
    """The input builder of a model family (``cfg.family``): a run-time registration, else its family's own."""
    try:
        return INPUT_BUILDERS[config_family]
    except KeyError:
        return None


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
    from hooked_vlm.loading import builtin_models

    return list(builtin_models())


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
        import difflib

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
    """A hooked model with its tokenizer (and processor) from a built-in name, a folder or a hub id."""
    from hooked_vlm.loading import builtin_models
    from hooked_vlm.organisms import ORGANISMS, checkpoint_dir

    builtin = builtin_models().get(name)
    folder_name = name
    if name in ORGANISMS and not Path(name).exists():  # a shipped checkpoint folder: its processor comes too
        builtin, folder_name = None, str(checkpoint_dir(name))
    if builtin is not None and not Path(name).exists():
        model = builtin.load(seed=seed, dtype=dtype, device=device)
        return LoadedModel(model, model.tokenizer, None, None, True, name)
    from transformers import AutoTokenizer

    from hooked_vlm.model import HookedVLM

    folder = _resolve_checkpoint(folder_name)
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
    """Image and video sources from the command line; ``synthetic`` picks the built-in samples, ``none``
    (alone) gives no image. ``num_frames`` uses that many frames of each video (see :func:`sample_frames`)."""
    from hooked_vlm.inputs import load_image, load_video
    from hooked_vlm.samples import synthetic_grid_image, synthetic_video

    images, videos, descriptions = [], [], []
    prompt = "describe the image ."
    if NONE in image_args:
        if len(image_args) > 1:
            raise ValueError("--image none means a text-only run; do not combine it with other --image values")
        image_args = []
        prompt = "the red circle is"
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
            total = int(frames.shape[0])
            if num_frames is not None:
                frames = sample_frames(frames, num_frames, str(source))
            videos.append(frames)
            descriptions.append({"kind": "video", "source": str(Path(source).resolve()), "frames": int(frames.shape[0]),
                                 "source_frames": total, "size": list(frames.shape[1:3])})
    if videos and not images:
        prompt = "what moves in the video ?"
    return LoadedInputs(images, videos, descriptions, prompt)


def sample_frames(frames: Any, num_frames: int, source: str) -> Any:
    """``num_frames`` frames of a ``(T, H, W, 3)`` video at uniform indices ``floor(i * T / n)`` (HF's rule).

    Any count from 1 to T works; models that pair frames into temporal slices (Qwen: 2 per slice) pad an
    odd count by repeating the last frame, so 3 frames make 2 slices.
    """
    total = int(frames.shape[0])
    if not 1 <= num_frames <= total:
        raise ValueError(f"--num-frames {num_frames}: {source} has {total} frames; choose 1 to {total}")
    return frames[[int(i * total / num_frames) for i in range(num_frames)]]


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------
def select_hooks(patterns: Sequence[str], available: Sequence[str]) -> list[str]:
    """Hook names matching each pattern (exact name or glob), in model order, opt-in hooks only when named
    (see :func:`hooked_vlm.cli_hooks.select_hooks`, which also honours the opt-in flags)."""
    from hooked_vlm.cli_hooks import select_hooks as select

    return select(patterns, available).names


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


def manifest_path(out: Path) -> Path:
    """``acts.safetensors`` -> ``acts.json``."""
    return out.with_suffix(".json")


def check_out_path(out: Path) -> None:
    """Refuse an ``--out`` that is a folder or whose manifest would overwrite the tensors (before any work)."""
    if out.is_dir() or str(out).endswith(("/", os.sep)):
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'acts.safetensors'}")
    if manifest_path(out).resolve() == out.resolve():
        raise ValueError(
            f"--out {out}: the JSON manifest is written beside the tensors as FILE.json, so this name would "
            f"overwrite them; use a .safetensors name such as {out.with_suffix('.safetensors')}"
        )
    if manifest_path(out).is_dir():
        raise ValueError(f"--out {out}: its manifest path {manifest_path(out)} is a folder; choose another name")


def write_activations(out: Path, tensors: dict[str, Tensor], manifest: dict[str, Any]) -> Path:
    """Save tensors (safetensors, manifest also in its metadata) and the JSON manifest beside it."""
    from safetensors.torch import save_file

    contiguous, storages = {}, set()
    for name, t in tensors.items():  # hooks that pass a tensor through (resid_post -> next resid_pre) share storage
        t = t.detach().to("cpu").contiguous()
        key = t.untyped_storage().data_ptr()
        contiguous[name] = t.clone() if key in storages else t
        storages.add(key)
    text = json.dumps(manifest, indent=1, default=_json_default)
    with atomic_output(out) as tmp:
        save_file(contiguous, str(tmp), metadata={"format": "pt", "hooked_vlm_manifest": text})
    target = manifest_path(out)
    atomic_write_text(target, text)
    return target


def _json_default(value: Any) -> Any:
    import torch

    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def _progress(total: int, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="inspect", unit="step", disable=quiet, file=sys.stderr, leave=False)


def check_device(name: str) -> None:
    """Fail in one line when this torch build cannot use device ``name`` (before loading anything)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps): {err}") from None
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--device {name}: this torch build ({torch.__version__}, {cuda}) cannot use it ({first}); use --device cpu") from None


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def cmd_inspect(args: argparse.Namespace, stdout: TextIO) -> int:
    """Load, build inputs, run with cache, print, and write the requested activations."""
    import torch

    from hooked_vlm.cli_hooks import enable_opt_in, select_hooks as select

    started = time.perf_counter()
    if args.out is not None:
        check_out_path(Path(args.out))  # before any work: a bad name must not cost a forward
    check_device(args.device)
    torch.manual_seed(args.seed)
    if not args.image and not args.video:
        args.image = [SYNTHETIC]
        if args.prompt is not None and "<image>" in args.prompt:
            _note("note: the prompt has <image> but no --image was given: using the built-in synthetic grid image "
                  "(--image synthetic); pass --image PATH, or --image none for a text-only run")
        elif args.prompt is not None:
            _note("note: no --image given: the built-in synthetic grid image goes before the prompt; --image none runs text only")
    with _progress(4, args.quiet) as bar:  # closed before printing, so the report is not interleaved
        bar.set_postfix_str("reading inputs")
        sources = load_inputs(args.image, args.video, args.num_frames, args.seed)  # bad paths fail before loading
        bar.update()
        bar.set_postfix_str("loading model")
        loaded = load_model(args.model, _dtype(args.dtype), args.device, args.seed)
        model = loaded.model
        flags = {flag for flag, on in (("--pattern", args.pattern), ("--attn-result", args.attn_result), ("--attn-stats", args.attn_stats)) if on}
        patterns = args.hooks or list(DEFAULT_HOOKS)
        if patterns == [NONE]:
            selection = select([], [])
        elif loaded.model.cfg.family in ("clip", "siglip") and not args.hooks:
            selection = select(["hook_image_embeds", "hook_text_embeds"], list(model.hook_dict))
        else:
            selection = select(patterns, list(model.hook_dict), flags)
        if (note := selection.skipped_note()) is not None:
            _note(note)
        hooks = selection.names
        enable_opt_in(model, hooks)
        bar.update()
        bar.set_postfix_str("building inputs")
        if loaded.model.cfg.family in ("clip", "siglip"):
            from hooked_vlm.cli_two_tower import run_two_tower

            bar.close()
            return run_two_tower(args, loaded, sources, hooks, stdout, started)
        prompt = args.prompt if args.prompt is not None else sources.default_prompt
        inputs = _build_inputs(args, loaded, prompt, sources)
        layout = _layout_or_none(model, inputs)
        _warn_if_large(model, inputs, layout, hooks, args.dtype)
        bar.update()
        bar.set_postfix_str("forward")
        stats = _stats_request(args, layout) if selection.wants_stats or args.attn_stats else None
        with torch.no_grad():
            logits, cache = model.run_with_cache(**inputs, names_filter=hooks, attn_stats=stats)
        activations = {name: cache[name] for name in hooks if name in cache.cache_dict}
        bar.update()
    _note_silent_hooks(hooks, activations)

    tops = top_tokens(logits, inputs.get("attention_mask"), loaded.tokenizer, args.top_k)
    shapes = {name: tuple(t.shape) for name, t in activations.items()}
    _print_report(stdout, args, loaded, prompt, sources, inputs, tops, layout, shapes)
    if args.out is not None:
        manifest = _manifest(args, loaded, prompt, sources, inputs, tops, layout, activations)
        target = write_activations(Path(args.out), activations, manifest)
        print(f"\nwrote {len(activations)} activation(s) to {args.out} and the manifest to {target}", file=stdout)
    print(f"done in {time.perf_counter() - started:.2f} s", file=stdout)
    return 0


def _note_silent_hooks(hooks: Sequence[str], activations: dict[str, Any]) -> None:
    """Say which selected hooks did not fire (e.g. video pooling on an image-only input): nothing was saved for them."""
    silent = [name for name in hooks if name not in activations]
    if silent:
        _note(f"note: {len(silent)} selected hook(s) did not fire for these inputs and are not saved: "
              f"{', '.join(silent[:4])}{' ...' if len(silent) > 4 else ''}")


def _layout_or_none(model: Any, inputs: dict[str, Any]) -> Any:
    try:
        return model.layout(**inputs)
    except NotImplementedError:
        return None


def _stats_request(args: argparse.Namespace, layout: Any) -> Any:
    """Attention statistics for ``--attn-stats BY``: mass from the last token to each BY group (region, row
    mass), attention each key receives from each token kind (colsum), and the last token's exact row."""
    from hooked_vlm import AttnStatsRequest

    if layout is None:
        raise ValueError("attention statistics need the token layout, which this family does not describe")
    by = args.attn_stats or "item"
    return AttnStatsRequest(
        key_group_ids=layout.group_ids(by), q_group_ids=layout.group_ids("last"),
        colsum_q_group_ids=layout.group_ids("kind"), rows=layout.last_token()[:, None], row_mass=True,
    )


def _warn_if_large(model: Any, inputs: dict[str, Any], layout: Any, hooks: Sequence[str], dtype: str) -> None:
    """Warn (stderr) with the visual token count and the estimated cache memory when an input is large."""
    from hooked_vlm.cli_hooks import estimate_cache_bytes
    from hooked_vlm.layout import IMAGE, VIDEO

    ids = inputs["input_ids"]
    if layout is not None:
        visual = int(((layout.kind == IMAGE) | (layout.kind == VIDEO)).sum())
    else:
        visual = int(sum(int(v.numel()) for k, v in inputs.items() if k.startswith("pixel_values")) > 0)
    element = _dtype(dtype).itemsize
    estimate, uncounted = estimate_cache_bytes(hooks, model, int(ids.shape[0]), int(ids.shape[1]), visual, element)
    if visual < LARGE_VISUAL_TOKENS and estimate < LARGE_CACHE_BYTES:
        return
    left_out = f" (not counting {len(uncounted)} vision-tower / statistics hook(s))" if uncounted else ""
    _note(
        f"warning: large input: {visual:,} visual tokens ({int(ids.shape[1]):,} positions x {int(ids.shape[0])} prompt(s)); "
        f"caching the {len(hooks)} selected hook(s) needs ~{estimate / 2**20:,.1f} MiB{left_out}. Lower --max-pixels / "
        "--num-frames or cache fewer hooks if memory runs out."
    )


def _build_inputs(args: argparse.Namespace, loaded: LoadedModel, prompt: str, sources: LoadedInputs) -> dict[str, Any]:
    """The family's keyword tensors, on the model's device, pixels in the model's dtype."""
    import torch

    from hooked_vlm.errors import UnsupportedModelError

    # frames were already sampled (sources); the builders get the effective frame rate per video
    options = {key: getattr(args, key) for key in ("min_pixels", "max_pixels", "fps") if getattr(args, key) is not None}
    if args.num_frames is not None and sources.videos:
        fps = args.fps if args.fps is not None else 2.0
        options["fps"] = [fps * d["frames"] / d.get("source_frames", d["frames"]) for d in sources.descriptions if d["kind"] == "video"]
        if len(options["fps"]) == 1:
            options["fps"] = options["fps"][0]
    family = loaded.model.cfg.family
    request = InputRequest(loaded.tokenizer, prompt, sources.images, sources.videos, loaded.processor, loaded.checkpoint, loaded.tiny,
                           options, family)
    builder = input_builder_for(family)
    if builder is None:
        if loaded.processor is None:
            raise UnsupportedModelError(
                f"hooked-vlm inspect cannot build inputs for family '{family}' without its HF processor; register a "
                "builder with hooked_vlm.cli.register_input_builder, or install what the processor needs."
            )
        builder = _generic_processor_builder
    inputs = {k: (v.to(args.device) if isinstance(v, torch.Tensor) else v) for k, v in builder(request).items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(_dtype(args.dtype))
    return inputs


def _tensor_items(inputs: dict[str, Any]) -> list[tuple[str, Any]]:
    import torch

    return [(k, v) for k, v in inputs.items() if isinstance(v, torch.Tensor)]


def _print_header(stdout: TextIO, loaded: LoadedModel, sources: LoadedInputs) -> None:
    cfg = loaded.model.cfg
    params = sum(p.numel() for p in loaded.model.parameters())
    arch = getattr(cfg, "architecture", type(loaded.model).__name__)
    layers = f"{cfg.n_layers} layers, d_model {cfg.d_model}, " if hasattr(cfg, "n_layers") else ""
    print(f"model    {loaded.name}  ({arch}, family {cfg.family}, {layers}"
          f"{params:,} parameters{', random weights' if loaded.tiny else ''})", file=stdout)
    for d in sources.descriptions:
        extra = f", {len(d['annotations'])} annotated objects" if "annotations" in d and d["kind"] == "image" else ""
        frames = f"{d['frames']} frames of " if d["kind"] == "video" else ""
        print(f"{d['kind']:<8} {d['source']}  ({frames}{d['size'][0]}x{d['size'][1]}{extra})", file=stdout)
    if not sources.descriptions:
        print("image    none (text only)", file=stdout)


def _print_hook_table(stdout: TextIO, args: argparse.Namespace, loaded: LoadedModel, shapes: dict[str, tuple[int, ...]]) -> None:
    if args.hook_table != "none":
        table = loaded.model.hook_table()
        print(f"\nHook table ({len(table)} hook points; cached shapes for the {len(shapes)} saved)", file=stdout)
        print(format_table(["hook", "blocks", "shape", "cached"], hook_rows(table, shapes, args.hook_table == "full")), file=stdout)


def _print_report(stdout, args, loaded, prompt, sources, inputs, tops, layout, shapes) -> None:
    _print_header(stdout, loaded, sources)
    print(f"prompt   {prompt!r}", file=stdout)
    print("inputs   " + ", ".join(f"{k} {list(v.shape)}" for k, v in _tensor_items(inputs)), file=stdout)

    print("\nTop next tokens", file=stdout)
    print(format_table(["rank", "id", "token", "logit", "prob"],
                       [[t["rank"], t["id"], t["token"], f"{t['logit']:.4f}", f"{t['prob']:.4f}"] for t in tops]), file=stdout)
    print("\nToken layout", file=stdout)
    print(layout.summary() if layout is not None else "(this family does not describe its layout)", file=stdout)
    _print_hook_table(stdout, args, loaded, shapes)


def model_record(args: argparse.Namespace, loaded: LoadedModel) -> dict[str, Any]:
    """The manifest's description of the model (name, where it came from, its shape and dtype)."""
    cfg = loaded.model.cfg
    record = {
        "name": loaded.name,
        "checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None,
        "tiny": loaded.tiny,
        "seed": args.seed if loaded.tiny else None,
        "family": cfg.family,
        "architecture": getattr(cfg, "architecture", type(loaded.model).__name__),
        "dtype": args.dtype,
        "device": args.device,
    }
    for key in ("n_layers", "d_model", "n_heads", "d_vocab"):
        if hasattr(cfg, key):
            record[key] = getattr(cfg, key)
    return record


def _manifest(args, loaded, prompt, sources, inputs, tops, layout, activations) -> dict[str, Any]:
    ids = inputs["input_ids"][0].tolist()
    return {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "hooked-vlm " + " ".join(args.argv),
        "model": model_record(args, loaded),
        "inputs": {
            "prompt": prompt,
            "sources": sources.descriptions,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in _tensor_items(inputs)},
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
    """List the built-in models and the architectures checkpoints may have (no torch import)."""
    from hooked_vlm.loading import ARCHITECTURE_MODULES, builtin_models

    print("Built-in models (no download; HookedVLM.from_pretrained(name) or --model name):", file=stdout)
    for entry in builtin_models().values():
        print(f"  {entry.name:<24} {entry.description}", file=stdout)
    print("\nSupported checkpoint architectures:", file=stdout)
    for arch, module in sorted(ARCHITECTURE_MODULES.items()):
        print(f"  {arch:<42} {module}", file=stdout)
    from hooked_vlm.families.registry import families

    # CLIP / SigLIP have no builder entry: hooked_vlm.cli_two_tower builds their inputs
    names = {f for fam in families() for f in fam.config_families}
    print("\nInput builders for families: " + ", ".join(sorted(names | set(INPUT_BUILDERS))), file=stdout)
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _inspect_arguments(inspect: argparse.ArgumentParser) -> None:
    inspect.add_argument("--model", default="tiny-qwen2-vl",
                         help="built-in model (see `hooked-vlm models`), checkpoint folder, or hub id (default: %(default)s)")
    inspect.add_argument("--image", action="append", default=[], metavar="PATH|synthetic|none",
                         help="image file, 'synthetic' (the 280x280 10x10 shape grid) or 'none' (text only); repeatable. "
                         "Default: synthetic when no --video is given")
    inspect.add_argument("--video", action="append", default=[], metavar="PATH|synthetic",
                         help="folder of frames, animated GIF, or 'synthetic' (a moving shape); repeatable")
    inspect.add_argument("--prompt", default=None,
                         help="prompt text; '<image>' / '<video>' mark where each goes (default: all first). "
                         "Default prompt asks about the synthetic sample. CLIP / SigLIP: one of the texts")
    inspect.add_argument("--text", action="append", default=[], metavar="TEXT",
                         help="CLIP / SigLIP: a candidate text to compare with the image(s); repeatable "
                         "(default: captions of the synthetic shapes)")
    inspect.add_argument("--hooks", action="append", default=None, metavar="NAME|GLOB",
                         help="hooks to cache and save (fnmatch globs); repeatable; 'none' for no activations. Globs skip "
                         "opt-in hooks unless their flag is given or the glob ends in their name "
                         f"(default: {' '.join(DEFAULT_HOOKS)})")
    inspect.add_argument("--pattern", action="store_true",
                         help="let --hooks globs include attention patterns / scores (builds the L x L matrix per layer)")
    inspect.add_argument("--attn-result", action="store_true",
                         help="let --hooks globs include per-head attention results (attn.hook_result, B L H d)")
    inspect.add_argument("--attn-stats", nargs="?", const="item", default=None, metavar="BY",
                         choices=["item", "frame", "cell", "visual", "kind"],
                         help="compute language-model attention statistics without the L x L matrix (hook_lse, "
                         "hook_region / hook_row_mass: last token -> each BY group, hook_colsum: attention received "
                         "per key by token kind, hook_rows: the last token's row) and let globs include them; "
                         "BY is item, frame, cell, visual or kind (default item)")
    inspect.add_argument("--out", default=None, metavar="FILE.safetensors",
                         help="write the cached activations here and the manifest to FILE.json (a .json name or a "
                         "folder is refused: the manifest would overwrite the tensors)")
    inspect.add_argument("--top-k", type=_positive_int, default=10, help="how many next tokens to show (default: %(default)s)")
    inspect.add_argument("--hook-table", choices=["grouped", "full", "none"], default="grouped",
                         help="hook table per block template (grouped), every name (full), or none (default: %(default)s)")
    inspect.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                         help="model weights and pixel dtype (default: %(default)s)")
    inspect.add_argument("--device", default="cpu",
                         help="torch device (cpu, cuda, cuda:1, mps); checked against this torch build (default: %(default)s)")
    inspect.add_argument("--seed", type=int, default=0, help="built-in model weights and synthetic samples (default: %(default)s)")
    inspect.add_argument("--min-pixels", type=_positive_int, default=None, help="smart-resize floor (pixels per image / frame)")
    inspect.add_argument("--max-pixels", type=_positive_int, default=None, help="smart-resize ceiling (pixels per image / frame)")
    inspect.add_argument("--fps", type=_positive_float, default=None, help="frame rate of the given video frames (default 2)")
    inspect.add_argument("--num-frames", type=_positive_int, default=None, metavar="N",
                         help="use N frames of each video, uniformly spaced (any N from 1 to its frame count; a synthetic "
                         "video is made with N frames); Qwen pairs frames into slices of 2, padding an odd N by repeating "
                         "the last frame")
    inspect.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclass(frozen=True)
class Command:
    """A subcommand: its options and what runs it (see :data:`COMMANDS`)."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO], int]
    description: str | None = None


INSPECT = Command(
    _inspect_arguments, cmd_inspect,
    "Run a model on an image / video and a prompt; print the top next tokens (CLIP / SigLIP: embeddings and "
    "image-text similarities), the token layout and the hook table; with --out, save the chosen activations "
    "(safetensors) and a JSON manifest.",
)
MODELS = Command(lambda parser: None, cmd_models, "List the built-in models and the supported checkpoint architectures.")


def load_command(name: str) -> Any:
    """Import the object that runs subcommand ``name`` (see :data:`COMMANDS`)."""
    target = COMMANDS[name][0]
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def _version() -> str:
    from hooked_vlm import __version__

    return f"hooked-vlm {__version__}"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``argv``, only the chosen subcommand's module is imported."""
    parser = argparse.ArgumentParser(prog="hooked-vlm", description="Mechanistic interpretability for vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors (also after the subcommand)")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None) if argv is not None else None
    for name, (_, help_text) in COMMANDS.items():
        command = load_command(name) if argv is None or name == chosen else None
        description = getattr(command, "description", None) or help_text
        sp = sub.add_parser(name, help=help_text, description=description)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks instead of one-line errors")
        if command is not None:
            command.add_arguments(sp)
            sp.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """Entry point of the ``hooked-vlm`` console script; returns the exit status.

    Errors print one line (``hooked-vlm: error: ...``, exit 2 for bad input, 1 for anything unexpected);
    ``--debug`` (before or after the subcommand) shows the traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = stdout or sys.stdout
    args = build_parser(argv).parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args, stdout)
    except KeyboardInterrupt:
        print("hooked-vlm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as err:  # InputError, CheckpointError, HookNameError, ...
        if args.debug:
            raise
        print(f"hooked-vlm: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one line instead of a traceback; --debug shows it
        if args.debug:
            raise
        print(f"hooked-vlm: error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
