"""Benchmark: integrated gradients on one image's pixels, ours vs Captum's ``IntegratedGradients``.

Same tiny Qwen2-VL weights (Captum runs on the transformers model, ours on the hooked twin), same inputs, the
same black baseline and Riemann-midpoint rule, ``--steps`` steps, ``--batch`` path points per forward for both
(Captum's ``internal_batch_size`` counts patch rows of Qwen's packed pixels, so it is set to batch x rows).
Each cell runs in a fresh interpreter (peak RSS of its own), one torch thread; ``compare`` checks the values.

Usage: ``python scripts/bench_attribution.py --side 224 --steps 32 --batch 8``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def setup(side: int):
    import numpy as np
    import torch

    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.tiny import tiny_hf_model
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    hf = tiny_hf_model("tiny-qwen2-vl")
    img = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    inputs = build_qwen_inputs(build_tiny_tokenizer(), "what is <image> the red circle", images=[img],
                               min_pixels=side * side, max_pixels=side * side)

    def metric(logits):
        return torch.log_softmax(logits[:, -1].float(), -1)[:, 7]

    return hf, dict(inputs), metric


def run_ours(hf, inputs, metric, steps, batch):
    from analyses.attribution import integrated_gradients
    from hooked_vlm.loading import from_hf

    model = from_hf(hf).eval()
    return lambda: integrated_gradients(model, inputs, metric, baseline="black", steps=steps, batch_size=batch).values


def run_captum(hf, inputs, metric, steps, batch):
    from captum.attr import IntegratedGradients

    from analyses.attribution import pixel_baseline
    from hooked_vlm.loading import from_hf

    base = pixel_baseline(from_hf(hf), inputs, "black")  # the same baseline tensor

    def forward(pv, ids, am, thw, mm):
        return metric(hf(input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=thw, mm_token_type_ids=mm).logits)

    extra = tuple(inputs[k] for k in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids"))
    ig = IntegratedGradients(forward)
    rows = inputs["pixel_values"].shape[0]
    return lambda: ig.attribute(inputs["pixel_values"], baselines=base, additional_forward_args=extra, n_steps=steps,
                                method="riemann_middle", internal_batch_size=rows * batch).detach()


def cell(name: str, side: int, steps: int, batch: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from benchmarking import measure, rss_mib

    hf, inputs, metric = setup(side)
    if name == "compare":
        a, b = run_ours(hf, inputs, metric, steps, batch)(), run_captum(hf, inputs, metric, steps, batch)()
        return {"cell": name, "max_abs_diff": float((a - b).abs().max()), "max_abs": float(b.abs().max()),
                "sum_ours": float(a.sum()), "sum_captum": float(b.sum())}
    fn = {"ours": run_ours, "captum": run_captum}[name](hf, inputs, metric, steps, batch)
    r = measure(fn, repeats=repeats, warmup=1)
    _, peak = rss_mib()
    return {"cell": name, "rows": int(inputs["pixel_values"].shape[0]), "time_s": r["time_s"], "delta_mib": r["peak_mib"], "peak_rss_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell")
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.cell:
        print(json.dumps(cell(a.cell, a.side, a.steps, a.batch, a.repeats)))
        return
    from benchmarking import append_jsonl, run_cell_in_subprocess

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    extra = ["--side", str(a.side), "--steps", str(a.steps), "--batch", str(a.batch), "--repeats", str(a.repeats)]
    rows = [{"load_avg": os.getloadavg(), "side": a.side, "steps": a.steps, "batch": a.batch}]
    for name in ("ours", "captum", "compare"):
        t0 = time.time()
        rows.append(run_cell_in_subprocess(__file__, name, extra, timeout=3600))
        print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s wall)", flush=True)
    if "time_s" in rows[1] and "time_s" in rows[2]:
        s = {"time_ratio_ours_over_captum": rows[1]["time_s"] / rows[2]["time_s"],
             "delta_ratio_ours_over_captum": rows[1]["delta_mib"] / max(rows[2]["delta_mib"], 1e-9)}
        print(json.dumps(s))
        rows.append(s)
    append_jsonl(a.out, rows)


if __name__ == "__main__":
    main()
