"""Benchmark: ``video trace`` on a long clip (64 or 128 frames at 448x448) on CPU, peak memory against a plain forward.

A random-weight Qwen2-VL-shaped model (``tiny-qwen2-vl``: 2 temporal frames per slice, 14-px patches, 2x2
merge) reads a 64-frame 448x448 clip (an mp4 written here): 32 temporal slices x 16x16 merged cells = 8,192
visual tokens. Cells, each in a fresh interpreter (``benchmarking.run_cell_in_subprocess`` in scripts/benchmarking.py, one
torch thread, so peak RSS is the cell's own):

* ``forward``: decode the clip, build the inputs, one plain forward (the memory baseline);
* ``trace``: ``hooked-vlm video trace``'s per-entry function on that clip with the ``reverse`` counterfactual:
  the clean resid_pre patched into the reversed run for every layer x (visual, text, every temporal slice).
  The clean clip runs once (resid_pre cached at the patched positions only), the reversed clip once as the base
  of the cells (its vision tower once, its key/value prefix reused before each cell's first patched position,
  the layers below the patched one once per batch): ``analyses.pipelines.video.patch_cells``.

The table gives wall and CPU time (one thread: CPU time is robust to other jobs), peak RSS above the process baseline, the ratio trace / forward, and what one
L x L fp32 attention matrix (all heads of one layer) would take, to show that none was formed.

Usage::

    python scripts/bench_video_trace.py                     # 64 frames, 448x448: 8,192 visual tokens
    python scripts/bench_video_trace.py --frames 128        # 16,384 visual tokens
    python scripts/bench_video_trace.py --frames 16 --size 224 --out bench.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "tiny-qwen2-vl"


def _clip(frames: int, size: int, folder: Path) -> Path:
    """A moving square on grey, written as mp4 (the same file for every cell)."""
    import numpy as np

    from analyses.pipelines.video.decoding import write_mp4

    path = folder / f"clip_{frames}x{size}.mp4"
    if not path.exists():
        video = np.full((frames, size, size, 3), 200, dtype=np.uint8)
        side = size // 8
        for t in range(frames):
            x = int((size - side) * t / max(1, frames - 1))
            video[t, size // 2 - side // 2 : size // 2 + side // 2, x : x + side] = (220, 30, 30)
        write_mp4(video, path, fps=2.0)
    return path


def _case(path: Path, frames: int) -> object:
    from analyses.pipelines.datasets import Case

    data = {"video_name": path.name, "question": "what moves in the video ?", "candidates": ["left", "right"],
            "answer": "right", "answer_number": 1, "start": None, "end": None, "question_id": "bench", "task_name": "bench",
            "frames_with_answer_object": None}
    return Case("bench", 0, data, "bench")


def _options(path: Path, frames: int, size: int, batch: int) -> dict:
    return {"video_root": str(path.parent), "num_frames": frames, "fps": None, "folder_fps": 2.0, "prompt_template": "<video> {question}",
            "token_slices": [], "swap_spans": [], "counterfactuals": ["reverse"], "dump_representations": False, "batch_size": batch}


def run_cell(cell: str, frames: int, size: int, batch: int, folder: Path) -> dict:
    """One cell in this process: its wall time and peak RSS above the RSS after loading the model."""
    import numpy as np
    import torch

    from analyses.pipelines.runner import CaseContext, ModelSpec
    from analyses.pipelines.video.clips import case_clip, case_prompt
    from analyses.pipelines.video.model_io import build_inputs, load_video_model
    from analyses.pipelines.video.trace import trace_case
    from benchmarking import reset_peak_rss, rss_mib

    torch.set_num_threads(1)
    vm = load_video_model(ModelSpec(MODEL))
    vm.options.update(video_min_pixels=size * size, video_max_pixels=size * size)  # keep 448x448: no resize
    path = _clip(frames, size, folder)
    case = _case(path, frames)
    options = _options(path, frames, size, batch)
    ctx = CaseContext("cpu", torch.float32, 0, np.random.default_rng(0), options, folder)
    base, _ = rss_mib()
    reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    if cell == "forward":
        clip = case_clip(case, options)
        inputs = build_inputs(vm, case_prompt(case, options), clip.frames, clip.effective_fps, "cpu", torch.float32)
        with torch.no_grad():
            vm.model(**inputs)
        record = {"seq_len": int(inputs["input_ids"].shape[1]), "visual_tokens": int(vm.model.layout(**inputs).item[0].ge(0).sum())}
    else:
        out = trace_case(vm, case, ctx)
        cells = json.loads(out["cells"])
        record = {"seq_len": out["seq_len"], "visual_tokens": out["n_visual_tokens"], "cells": len(cells),
                  "layers": len({c["layer"] for c in cells}), "groups": len({c["token_slice"] for c in cells})}
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    _, peak = rss_mib()
    heads = int(vm.model.cfg.n_heads)
    record.update(cell=cell, frames=frames, size=size, batch=batch, wall_s=round(wall, 2), cpu_s=round(cpu, 2), peak_mib=round(peak - base, 1),
                  lxl_fp32_mib=round(heads * record["seq_len"] ** 2 * 4 / 2**20, 1), threads=torch.get_num_threads())
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--batch", type=int, default=2, help="patched forwards per batch in the trace cell")
    ap.add_argument("--cells", default="forward,trace")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="append the rows to this JSON-lines file")
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.cell, args.frames, args.size, args.batch, Path(args.folder))))
        return
    from benchmarking import append_jsonl, run_cell_in_subprocess

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    folder = Path(tempfile.mkdtemp(prefix="bench_video_trace_"))
    _clip(args.frames, args.size, folder)
    rows = []
    for cell in args.cells.split(","):
        extra = ["--frames", str(args.frames), "--size", str(args.size), "--batch", str(args.batch), "--folder", str(folder)]
        row = run_cell_in_subprocess(os.path.abspath(__file__), cell, extra, timeout=7200)
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r.get("cell"): r for r in rows}
    if "forward" in by and "trace" in by and "peak_mib" in by["forward"] and "peak_mib" in by["trace"]:
        f, t = by["forward"], by["trace"]
        print(f"\n{t['visual_tokens']:,} visual tokens ({t['seq_len']:,} positions), {t['cells']} cells "
              f"({t['layers']} layers x {t['groups']} token slices)")
        print(f"plain forward: {f['wall_s']:.1f} s wall ({f['cpu_s']:.1f} s CPU), peak +{f['peak_mib']:.0f} MiB")
        print(f"trace (reverse): {t['wall_s']:.1f} s wall ({t['cpu_s']:.1f} s CPU), peak +{t['peak_mib']:.0f} MiB = {t['peak_mib'] / max(f['peak_mib'], 1e-9):.2f}x the forward "
              f"(one L x L fp32 matrix of one layer, all heads: {t['lxl_fp32_mib']:,.0f} MiB)")
    append_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
