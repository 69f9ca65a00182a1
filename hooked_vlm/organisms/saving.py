"""Save a trained organism in the Hugging Face layout, with its model card and a metadata file.

A folder holds ``config.json``, ``model.safetensors``, ``generation_config.json`` (transformers'
``save_pretrained``), ``tokenizer.json`` + ``tokenizer_config.json`` (``tokenizer.save_pretrained``),
``README.md`` (the model card) and ``organism.json`` (accuracy per task, training steps, time and load,
read by ``hooked-vlm models``). The folder is written beside its target and renamed into place, so an
interrupted run never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "model_card", "write_model_card", "qwen_preprocessor_files"]


def save_checkpoint(organism: Any, model: torch.nn.Module, tokenizer: Any, out_dir: str | os.PathLike, result: Any, seed: int,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write model, tokenizer, generation config, model card and ``organism.json`` to ``out_dir`` (atomically)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.bos_token_id = tokenizer.bos_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.do_sample = False
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = metadata(organism, model, result, seed)
        (tmp / "organism.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "README.md").write_text(model_card(organism, meta))
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is package data
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def qwen_preprocessor_files(model_config: Any, input_kwargs: dict[str, Any]) -> dict[str, str]:
    """``preprocessor_config.json`` + ``video_preprocessor_config.json`` (Hugging Face's Qwen2-VL spelling) holding the
    pixel limits and frame rate a Qwen organism was trained with (its ``input_kwargs``), for
    :func:`save_checkpoint`'s ``extra_files``: a model loaded from the folder by path then gets the same inputs.

    ``model_config`` is the Hugging Face config (its ``vision_config`` gives the patch, temporal-patch and merge
    sizes). Settings ``input_kwargs`` does not give keep ``build_qwen_inputs``' defaults. No ``processor_class`` is
    written, so loading keeps hooked_vlm's exact hand preprocessing rather than building an HF processor.
    """
    from hooked_vlm.families.qwen_vl import preprocess as qp

    vision = model_config.vision_config
    common = {
        "patch_size": int(vision.patch_size),
        "temporal_patch_size": int(vision.temporal_patch_size),
        "merge_size": int(vision.spatial_merge_size),
        "image_mean": list(input_kwargs.get("image_mean", qp.IMAGE_MEAN)),
        "image_std": list(input_kwargs.get("image_std", qp.IMAGE_STD)),
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    }

    def limits(low: int, high: int) -> dict[str, Any]:
        return {"min_pixels": int(low), "max_pixels": int(high), "size": {"shortest_edge": int(low), "longest_edge": int(high)}}

    image = {"image_processor_type": "Qwen2VLImageProcessor",
             **limits(input_kwargs.get("min_pixels", qp.MIN_PIXELS), input_kwargs.get("max_pixels", qp.MAX_PIXELS)), **common}
    video = {"video_processor_type": "Qwen2VLVideoProcessor",
             **limits(input_kwargs.get("video_min_pixels", qp.VIDEO_MIN_PIXELS), input_kwargs.get("video_max_pixels", qp.VIDEO_MAX_PIXELS)),
             "fps": float(input_kwargs.get("fps", qp.DEFAULT_VIDEO_FPS)), "do_sample_frames": False, **common}
    return {"preprocessor_config.json": json.dumps(image, indent=2) + "\n",
            "video_preprocessor_config.json": json.dumps(video, indent=2) + "\n"}


def metadata(organism: Any, model: torch.nn.Module, result: Any, seed: int) -> dict[str, Any]:
    """JSON-friendly facts about a training run (what ``hooked-vlm models`` and the model card show)."""
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    res = result.to_dict()
    losses = res.pop("losses")
    return {
        "name": organism.name,
        "architecture": organism.architecture,
        "family": organism.family,
        "tasks": list(organism.tasks),
        "target_accuracy": organism.target_accuracy,
        "parameters": n_params,
        "seed": seed,
        "steps": res["steps"],
        "train_seconds": round(res["seconds"], 1),
        "load_average_at_save": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "loss_first_50": sum(losses[:50]) / max(1, len(losses[:50])),
        "loss_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "accuracy": res["accuracy"],
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def model_card(organism: Any, meta: dict[str, Any]) -> str:
    """The checkpoint's README.md: task, generator, recipe, measured accuracy and the planted ground truth."""
    from hooked_vlm.organisms import ORGANISMS
    from hooked_vlm.organisms.base import TaskAccuracy, accuracy_table

    acc = {k: TaskAccuracy(k, v["correct"], v["n"]) for k, v in meta.get("accuracy", {}).items()}
    table = accuracy_table(acc) if acc else "(not evaluated)"
    module = ORGANISMS.get(organism.name, type(organism).__module__)  # the registry's module, also for a subclass run as a script
    heads = getattr(organism, "token_heads", ())
    loss = "loss on the answer tokens only." if not heads else (
        "loss on the answer tokens plus training-only linear probes on the language model's hidden states (dropped "
        "before saving; `layer` 0 is the LM input, `at` visual = every visual token, answer = the position that "
        "predicts the answer): "
        + "; ".join(f"{h.name} (layer {h.layer}, {h.at}, weight {h.weight:g})" for h in heads) + ".")
    phases = getattr(organism, "training_mix", ())
    mix = "" if len(phases) < 2 else " Task mix of the batches (examples cycle through the tasks listed): " + "; ".join(
        f"from step {first:,}: {', '.join(tasks)}" for first, tasks in phases) + "." + "".join(
        f" \"{kind}\" is {what}." for kind, what in getattr(organism, "training_task_notes", {}).items())
    return f"""---
library_name: transformers
tags: [hooked_vlm, model-organism, interpretability, synthetic]
---
# {organism.name}

A model organism of [hooked_vlm](https://github.com/): a tiny `{organism.architecture}` (transformers' own class,
{meta['parameters']:,} parameters, fp32) trained from scratch on a synthetic task whose answer is planted, so that
interpretability methods can be checked against a known mechanism. It is not a general model.

## Task
{organism.summary}

Tasks: {', '.join(f'`{t}`' for t in organism.tasks)}.

## Planted ground truth
{organism.planted_truth}

## Generator
`{module}` — `organism("{organism.name}").generate(n, seed)`
draws examples deterministically from a seed (Pillow drawing); each example carries its ground truth in
`example.truth`.

## Training recipe
Plain torch: AdamW (betas 0.9/0.98), linear warmup then cosine decay, gradient clipping at 1, fp32, seed
{meta['seed']}, {meta['steps']} steps of {getattr(organism, 'batch_size', '?')} freshly generated examples, {loss}{mix}
Trained in {meta['train_seconds']} s on {meta['torch_threads']} CPU thread(s)
(load average when saved: {meta['load_average_at_save']}). Mean loss over the first / last 50 steps:
{meta['loss_first_50']:.4f} / {meta['loss_last_50']:.4f}.

Reproduce: `hooked-vlm organisms train {organism.name} --out DIR` (or `python -m hooked_vlm.organisms.train {organism.name}`).

## Measured accuracy (held-out, freshly generated; target {organism.target_accuracy:.0%} per task)
{table}

Re-measure: `hooked-vlm organisms eval {organism.name}`.

## Loading
```python
from hooked_vlm import HookedVLM
model = HookedVLM.from_pretrained("{organism.name}")  # the shipped checkpoint; model.tokenizer attached
```
or with transformers: `transformers.{organism.architecture}.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)`.
"""


def write_model_card(organism: Any, out_dir: str | os.PathLike) -> None:
    """Rewrite README.md of a checkpoint from its organism.json (after editing the card text)."""
    out = Path(out_dir)
    meta = json.loads((out / "organism.json").read_text())
    (out / "README.md").write_text(model_card(organism, meta))
