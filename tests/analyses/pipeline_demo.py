"""A tiny demo pipeline for the runner tests: next-token answer + image attention mass per case.

Runs on a built-in tiny model (``tiny-qwen2-vl``) through the default loader. Per case: the greedy
next token after ``<image> question``, its log-probability, and the last token's attention mass on the
image tokens in every layer (mean over heads), from the attention-statistics kernels (no L x L).
Also a command-line entry point (``python pipeline_demo.py DATA --output-dir OUT ...``) built with
:func:`analyses.pipelines.add_common_args`, used by the kill-and-resume test.

Test-only knobs (environment, not options, so they do not change the stored configuration):
``DEMO_DELAY_S`` sleeps after each case; ``DEMO_CALL_LOG`` appends each computed case id to a file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analyses.pipelines import Case, CaseContext, Field, Pipeline, Schema, add_common_args, config_from_args, run_pipeline  # noqa: E402

SCHEMA = Schema(
    fields=(
        Field("id", str),
        Field("image", str, path=True, help="image file, relative to the dataset's folder"),
        Field("question", str),
        Field("size", int, required=False, default=56, check=lambda v: None if v % 28 == 0 and v > 0 else "a positive multiple of 28"),
        Field("split", str, required=False, choices=("train", "test"), default="test"),
    ),
    id_field="id",
)


def run_case(loaded: Any, case: Case, ctx: CaseContext) -> dict[str, Any]:
    """Greedy answer, its log-prob, and per-layer attention mass on the image from the last token."""
    from hooked_vlm import AttnStatsRequest
    from hooked_vlm.inputs import build_qwen_inputs

    model, tokenizer = loaded.model, loaded.tokenizer
    size = int(case.data["size"])
    image = Image.open(case.path("image")).convert("RGB").resize((size, size))
    inputs = build_qwen_inputs(tokenizer, f"<image> {case.data['question']}", [image])
    inputs = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    lay = model.layout(**inputs)
    req = AttnStatsRequest(key_group_ids=lay.group_ids("visual"), q_group_ids=lay.group_ids("last"))
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs, attn_stats=req, names_filter=lambda n: n.endswith("attn.hook_region"))
    logprobs = logits[0, -1].float().log_softmax(-1)
    answer = int(logprobs.argmax())
    n_layers = model.cfg.n_layers
    image_mass = [float(cache[f"blocks.{i}.attn.hook_region"][0, :, 0, 0].float().mean()) for i in range(n_layers)]
    # a seeded per-case draw: must not depend on the order or the worker the case ran on
    noise = float(ctx.rng.normal())
    if os.environ.get("DEMO_CALL_LOG"):
        with open(os.environ["DEMO_CALL_LOG"], "a") as f:
            f.write(case.id + "\n")
    if os.environ.get("DEMO_DELAY_S"):
        time.sleep(float(os.environ["DEMO_DELAY_S"]))
    return {"answer_id": answer, "answer_token": tokenizer.convert_ids_to_tokens(answer),
            "answer_logprob": float(logprobs[answer]), "image_mass": image_mass, "noise": noise}


DEMO = Pipeline(name="demo", schema=SCHEMA, run_case=run_case)


def make_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` random 56x56 images and an ``annotations.jsonl`` naming them (relative paths)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"images/img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(folder / name)
        lines.append(f'{{"id": "c{i:03d}", "image": "{name}", "question": "what color is it ?"}}')
    path = folder / "annotations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description="Demo pipeline: next token + image attention per case.")
    parser.add_argument("data", help="annotations.jsonl")
    add_common_args(parser, default_model="tiny-qwen2-vl")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    config.threads = 1
    summary = run_pipeline(DEMO, args.data, args.output_dir, config, argv=sys.argv)
    print(summary.counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
