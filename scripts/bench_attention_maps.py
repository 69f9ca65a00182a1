"""Benchmark: attention map + rollout from the last token on a long synthetic video, vs a plain forward.

Each cell runs in a fresh interpreter (``--cell``) so peak RSS is its own; one torch thread. Cells:

* ``forward``: the hooked model's plain forward (SDPA fast path, no grad): the reference;
* ``maps``: ``rollout(model, inputs, "last", with_map=True)``: one forward that records each layer's q, k and row LSE
  (stopping after the last layer: no unembedding), the last token's per-layer, per-head map (exact rows) and its
  rollout (one public SDPA column pass per layer below the top, ``kernels.colsum_with_lse``); no L x L;
* ``hf_eager``: transformers' eager model with ``output_attentions=True`` (what HF / TransformerLens users run),
  only at lengths where its predicted memory fits (``--eager-max-gib``); otherwise its prediction is printed.

Usage: ``python scripts/bench_attention_maps.py --frames 512 --side 224`` (16k LM tokens with Qwen2-VL's 2x2 merge
and 2-frame temporal patches: tokens = frames / 2 * (side / 28)^2). Prints one JSON line per cell and a summary
with the wall-time and CPU-time ratios (CPU time is this process's own, which other jobs on a shared machine
barely change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = dict(num_hidden_layers=4, intermediate_size=256)  # width 64 (the tiny vision merger's output), 4 heads, 2 KV heads


def build(frames: int, side: int):
    """A tiny Qwen2-VL (wider LM) and keyword inputs of one synthetic video of ``frames`` frames of ``side`` px."""
    import torch

    from hooked_vlm.tiny import tiny_hf_model

    hf = tiny_hf_model("tiny-qwen2-vl", vision_depth=1, **TEXT)
    t, g = frames // 2, side // 14
    n_tok = t * (g // 2) ** 2
    ids = torch.tensor([[0, 5, 102] + [101] * n_tok + [103, 7, 9, 11]])
    mm = (ids == 101).long() * 2
    gen = torch.Generator().manual_seed(0)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                  pixel_values_videos=torch.randn(t * g * g, 3 * 2 * 14 * 14, generator=gen),
                  video_grid_thw=torch.tensor([[t, g, g]]))
    return hf, inputs


def cell(name: str, frames: int, side: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from benchmarking import measure, rss_mib
    from hooked_vlm.loading import from_hf

    hf, inputs = build(frames, side)
    length = inputs["input_ids"].shape[1]
    if name == "hf_eager":
        hf.config._attn_implementation = "eager"
        hf.model.language_model.config._attn_implementation = "eager"

        def fn():
            with torch.no_grad():
                return hf(**inputs, output_attentions=True).attentions[-1].shape
    else:
        model = from_hf(hf).eval()
        del hf
        if name == "forward":
            def fn():
                with torch.no_grad():
                    return model(**inputs, final_positions=1)
        elif name == "maps":
            from analyses.rollout import rollout

            def fn():  # one forward: per-layer, per-head map of the last token + its rollout
                ro = rollout(model, inputs, "last", with_map=True)
                return ro.attention.values.shape, float(ro.values.sum())
        else:
            raise SystemExit(f"unknown cell {name}")
    cpu: list[float] = []

    def timed():  # this process's CPU time too: far less sensitive than wall time to other jobs on a shared machine
        c0 = time.process_time()
        fn()
        cpu.append(time.process_time() - c0)

    base, _ = rss_mib()
    r = measure(timed, repeats=repeats, warmup=0)
    _, peak = rss_mib()
    return {"cell": name, "L": length, "time_s": r["time_s"], "times": r["times"], "cpu_s": statistics.median(cpu),
            "cpus": cpu, "peak_rss_mib": peak, "delta_mib": r["peak_mib"], "base_mib": base}


def predicted_pattern_gib(length: int, heads: int = 4, layers: int = TEXT["num_hidden_layers"]) -> float:
    """fp32 attention probabilities every layer keeps for output_attentions / hook_pattern: layers * H * L^2 * 4 B."""
    return layers * heads * length**2 * 4 / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell")
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--eager-max-gib", type=float, default=4.0)
    ap.add_argument("--out", default=None, help="append the JSON rows to this file")
    a = ap.parse_args()
    if a.cell:
        print(json.dumps(cell(a.cell, a.frames, a.side, a.repeats)))
        return
    from benchmarking import append_jsonl, run_cell_in_subprocess

    env_extra = ["--frames", str(a.frames), "--side", str(a.side), "--repeats", str(a.repeats)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    load = os.getloadavg()
    for name in ("forward", "maps"):
        t0 = time.time()
        rows.append(run_cell_in_subprocess(__file__, name, env_extra, timeout=3600))
        print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s wall)", flush=True)
    length = rows[0].get("L", 0)
    pred = predicted_pattern_gib(length)
    if pred <= a.eager_max_gib:
        rows.append(run_cell_in_subprocess(__file__, "hf_eager", env_extra, timeout=3600))
    else:
        rows.append({"cell": "hf_eager", "L": length, "skipped": f"predicted attention probabilities {pred:.1f} GiB > {a.eager_max_gib} GiB"})
    print(json.dumps(rows[-1]))
    f, m = rows[0], rows[1]
    if "time_s" in f and "time_s" in m:
        summary = {"L": length, "load_avg": load, "load_avg_end": os.getloadavg(), "time_ratio": m["time_s"] / f["time_s"],
                   "cpu_ratio": m["cpu_s"] / f["cpu_s"],
                   "peak_rss_ratio": m["peak_rss_mib"] / f["peak_rss_mib"],
                   "delta_ratio": m["delta_mib"] / max(f["delta_mib"], 1e-9), "hf_eager_predicted_gib": pred}
        print(json.dumps(summary))
        rows.append(summary)
    append_jsonl(a.out, rows)


if __name__ == "__main__":
    main()
