"""Benchmark: long-video inputs (8k-64k tokens) through the forward, a reduced cache and the sweeps, on a
Qwen2-VL-shaped model, against HF eager attention with ``output_attentions`` and TransformerLens's bridge.

The model is a random-weight ``Qwen2VLForConditionalGeneration`` built in memory from a transformers config
(no downloads), with Qwen2-VL-7B's proportions at a CPU-sized width (``--width``: d = 256, 8 query heads, 2
key/value heads, head dim 32, MLP 5.25 d, ``--layers`` 2; vision: 2 blocks, 4 px patches so pixel inputs stay
small). The prompt is a text prefix, one video of ``L / 256`` temporal slices of 16 x 16 merged tokens, and a
text suffix; ``L`` counts every token.

Cells (rows of the table), each run in a fresh process with one torch thread
(`run_cell_in_subprocess` in scripts/benchmarking.py), timed as the median of ``--repeats`` calls after
one warm-up call, peak memory = peak RSS above the RSS with model and inputs built:

* ``forward``            plain forward (vision tower included), batch 1
* ``forward_padded``     batch of two, the second row left-padded by 32 tokens (no ``[L, L]`` mask)
* ``cache_per_frame``    ``run_with_cache`` of every ``hook_resid_post`` reduced to per-frame means
* ``patch_frames``       ``resid_pre`` activation patching, every layer x 4 frame spans (clean -> corrupted video);
                         the source cache keeps the spans only, variants run against the base run's KV prefix with
                         its vision features, at most one plain forward's positions per batched forward
                         (``SweepOptions.max_positions="auto"``)
* ``causal_trace``       noise on the first frame span's embeddings, restore ``resid`` per layer x 4 frame spans, 2 draws
                         (same reductions as patching)
* ``knockout``           knockout sweep (all visual tokens -> last token), every layer alone, MaskSpec knockout; each
                         variant computes the last position only, against the KV prefix
* ``hf_eager_attn``      transformers' eager forward with ``output_attentions=True`` (what FastV-style code does)
* ``tl_bridge_cache``    TransformerLens ``TransformerBridge.run_with_cache`` of the residual stream

HF eager / TL cells run only when their predicted memory (``H * L^2 * 4`` bytes per layer kept for
``output_attentions``, plus two such planes transient) fits ``--max-gb``; otherwise the predicted GB is printed.

    python scripts/bench_long_video.py --lengths 8192,16384        # CPU, minutes per length
    python scripts/bench_long_video.py --smoke                     # seconds: L = 1024, 1 repeat (CI / gpu_check CPU mode)
    python scripts/bench_long_video.py --device cuda --lengths 16384,32768,65536 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CELLS = ["forward", "forward_padded", "cache_per_frame", "patch_frames", "causal_trace", "knockout", "hf_eager_attn",
         "tl_bridge_cache"]
OURS = CELLS[:6]
VID, VS, VE, PAD = 101, 102, 103, 2
TOKENS_PER_SLICE = 256  # 16 x 16 merged tokens per temporal slice
PREFIX, SUFFIX = 48, 16


def model_config(layers: int, width: int) -> Any:
    from hooked_vlm.tiny import qwen2_vl_config

    heads = max(2, width // 32)
    cfg = qwen2_vl_config(hidden_size=width, intermediate_size=int(width * 5.25) // 8 * 8, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 4))
    # head dim 32: the M-RoPE sections (temporal, height, width) must sum to 16
    cfg.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
    vc = cfg.vision_config
    for key, value in dict(depth=2, embed_dim=64, num_heads=4, hidden_size=width, patch_size=4).items():
        setattr(vc, key, value)
    return cfg


def build_models(layers: int, width: int, device: str, hf_attn: str = "sdpa") -> tuple[Any, Any]:
    """(HF model, hooked twin) with the same random weights."""
    from transformers import Qwen2VLForConditionalGeneration

    from hooked_vlm.loading import from_hf
    from hooked_vlm.tiny import randomize_

    torch.manual_seed(0)
    cfg = model_config(layers, width)
    cfg._attn_implementation = hf_attn
    hf = randomize_(Qwen2VLForConditionalGeneration(cfg).eval(), seed=0)
    return hf.to(device), from_hf(hf).to(device)


def video_inputs(length: int, seed: int = 0, device: str = "cpu", patch: int = 4) -> dict[str, torch.Tensor]:
    """A prompt of ``length`` tokens: text prefix, one video of 16 x 16-token slices, text suffix (random pixels)."""
    n_slices = max(1, (length - PREFIX - SUFFIX - 3) // TOKENS_PER_SLICE)
    n_vid = n_slices * TOKENS_PER_SLICE
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 90, (PREFIX,), generator=torch.Generator().manual_seed(1)).tolist()
    suffix_len = length - PREFIX - n_vid - 3
    suffix = torch.randint(3, 90, (suffix_len,), generator=torch.Generator().manual_seed(2)).tolist()
    ids = [0] + prefix + [VS] + [VID] * n_vid + [VE] + suffix
    grid = torch.tensor([[n_slices, 32, 32]])
    pixels = torch.randn(n_slices * 32 * 32, 3 * 2 * patch * patch, generator=g)
    return dict(input_ids=torch.tensor([ids], device=device), pixel_values_videos=pixels.to(device),
                video_grid_thw=grid.to(device))


def padded_pair(inputs: dict[str, torch.Tensor], pad: int = 32) -> dict[str, torch.Tensor]:
    """The prompt twice; the second row's first ``pad`` text tokens are left padding."""
    ids = inputs["input_ids"].repeat(2, 1)
    am = torch.ones_like(ids)
    ids[1, :pad], am[1, :pad] = PAD, 0
    return dict(input_ids=ids, attention_mask=am, pixel_values_videos=inputs["pixel_values_videos"].repeat(2, 1),
                video_grid_thw=inputs["video_grid_thw"].repeat(2, 1))


def frame_spans(model: Any, inputs: dict[str, torch.Tensor], n_spans: int = 4) -> dict[str, list[int]]:
    """The video's positions cut into ``n_spans`` consecutive frame spans (named groups for the sweeps)."""
    pos = model.layout(**inputs).positions(video=0)
    return {f"frames{i}": chunk.tolist() for i, chunk in enumerate(torch.tensor_split(pos, n_spans))}


def mm_token_type_ids(ids: torch.Tensor) -> torch.Tensor:
    """What transformers' Qwen2-VL expects beside the ids: 2 at video placeholders, else 0."""
    return (ids == VID).long() * 2


def predicted_eager_gb(length: int, layers: int, heads: int, batch: int = 1, keep_all: bool = True) -> float:
    """HF eager attention memory: every layer's fp32 ``[B, H, L, L]`` probabilities kept (output_attentions)
    plus the scores and probabilities of the layer being computed."""
    plane = batch * heads * length * length * 4
    return ((layers if keep_all else 0) + 2) * plane / 2**30


# ------------------------------------------------------------------------------------------- one cell
def run_cell(args: argparse.Namespace) -> dict[str, Any]:
    from analyses.metrics import logit_diff
    from benchmarking import measure

    torch.set_num_threads(args.threads)
    dev = args.device
    hf_attn = "eager" if args.cell == "hf_eager_attn" or args.cell == "tl_bridge_cache" else "sdpa"
    row: dict[str, Any] = {"cell": args.cell, "L": args.L, "device": dev}
    if args.cell in ("hf_eager_attn", "tl_bridge_cache"):
        heads = model_config(args.layers, args.width).text_config.num_attention_heads
        pred = predicted_eager_gb(args.L, args.layers, heads, keep_all=args.cell == "hf_eager_attn")
        row["predicted_gb"] = round(pred, 2)
        if pred > args.max_gb:
            row["skipped"] = f"predicted {pred:.1f} GB > --max-gb {args.max_gb}"
            return row
    hf, model = build_models(args.layers, args.width, dev, hf_attn)
    inputs = video_inputs(args.L, device=dev)
    metric = logit_diff(5, 6)
    with torch.no_grad():
        if args.cell == "forward":
            fn = lambda: model(**inputs)  # noqa: E731
        elif args.cell == "forward_padded":
            pair = padded_pair(inputs)
            fn = lambda: model(**pair)  # noqa: E731
        elif args.cell == "cache_per_frame":
            from hooked_vlm.cache_reduction import CacheReduction

            red = CacheReduction(group_ids=model.layout(**inputs).group_ids("frame"))
            fn = lambda: model.run_with_cache(**inputs, names_filter="blocks.*.hook_resid_post", reduction=red)  # noqa: E731
        elif args.cell == "patch_frames":
            from analyses.patching import activation_patching

            corrupt = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"].flip(0))
            spans = frame_spans(model, inputs)
            fn = lambda: activation_patching(model, inputs, corrupt, metric, sites=("resid_pre",), positions=spans,  # noqa: E731
                                             batch_size=args.batch_size, progress=False)
        elif args.cell == "causal_trace":
            from analyses.causal_tracing import causal_trace

            spans = frame_spans(model, inputs)
            fn = lambda: causal_trace(model, inputs, metric, noise_positions=spans["frames0"], restore_positions=spans,  # noqa: E731
                                      kinds=("resid",), n_samples=2, batch_size=args.batch_size, progress=False)
        elif args.cell == "knockout":
            from analyses.knockout import knockout_sweep

            lay = model.layout(**inputs)
            edges = {"video->last": (lay.last_token(), lay.positions(video=0))}
            fn = lambda: knockout_sweep(model, inputs, metric, edges, batch_size=args.batch_size, progress=False)  # noqa: E731
        elif args.cell == "hf_eager_attn":
            extra = dict(inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"]))
            fn = lambda: hf(**extra, output_attentions=True)  # noqa: E731
        elif args.cell == "tl_bridge_cache":
            from benchmarking import tl_bridge

            try:
                bridge = tl_bridge(hf, copy_model=False)
            except ValueError as err:  # TransformerLens 4.x has no Qwen2-VL adapter (it has Qwen2.5-VL's)
                row["skipped"] = f"TransformerLens bridge: {err}; predicted {row['predicted_gb']} GB"
                return row
            extra = dict(inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"]))
            fn = lambda: bridge.run_with_cache(extra["input_ids"], **{k: v for k, v in extra.items() if k != "input_ids"},  # noqa: E731
                                               names_filter=lambda n: n.endswith("hook_resid_post"))
        else:
            raise ValueError(f"unknown cell {args.cell!r}; choose from {CELLS}")
        if dev == "cuda":
            row.update(_measure_cuda(fn, args.repeats))
        else:
            m = measure(fn, repeats=args.repeats, warmup=args.warmup)
            row.update(time_s=round(m["time_s"], 3), cpu_s=round(m["cpu_s"], 3), peak_mib=round(m["peak_mib"], 1),
                       times=[round(t, 3) for t in m["times"]])
    return row


def _measure_cuda(fn: Any, repeats: int) -> dict[str, Any]:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"time_s": round(statistics.median(times), 4), "peak_mib": round(peak, 1), "times": [round(t, 4) for t in times]}


# ------------------------------------------------------------------------------------------- the table
def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: time, peak memory and both ratios to the plain forward at the same length."""
    base = {r["L"]: r for r in rows if r.get("cell") == "forward" and "time_s" in r}
    lines = ["| L | cell | time (s) | x forward | peak (MiB) | x forward | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r.get("L"))
        if "time_s" in r:
            tr = f"{r['time_s'] / b['time_s']:.2f}" if b else "-"
            mr = f"{r['peak_mib'] / b['peak_mib']:.2f}" if b and b["peak_mib"] > 0 else "-"
            lines.append(f"| {r['L']} | {r['cell']} | {r['time_s']:.3g} | {tr} | {r['peak_mib']:.0f} | {mr} | |")
        else:
            note = r.get("skipped") or "; ".join(r.get("error", ["failed"]))
            lines.append(f"| {r.get('L', '?')} | {r.get('cell', '?')} | - | - | - | - | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="8192,16384,32768,65536")
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (CPU)")
    ap.add_argument("--batch-size", type=int, default=4, help="variants per batched forward in the sweeps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--max-gb", type=float, default=8.0, help="skip HF eager / TL cells predicted above this")
    ap.add_argument("--smoke", action="store_true", help="L = 1024, one repeat, every cell: checks the script runs")
    ap.add_argument("--json", type=Path, help="append each cell's row here as JSON lines, as it finishes")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per cell")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--L", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args)))
        return 0
    if args.smoke:
        args.lengths, args.repeats, args.warmup = "1024", 1, 0
    from benchmarking import append_jsonl, run_cell_in_subprocess

    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        ap.error(f"unknown cells {unknown}; choose from {CELLS}")
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for cell in cells:
            extra = ["--L", str(length), "--layers", str(args.layers), "--width", str(args.width), "--repeats",
                     str(args.repeats), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device",
                     args.device, "--max-gb", str(args.max_gb)]
            row = run_cell_in_subprocess(str(Path(__file__).resolve()), cell, extra, timeout=args.timeout)
            row.setdefault("cell", cell)
            row.setdefault("L", length)
            rows.append(row)
            append_jsonl(str(args.json) if args.json else None, [row])
            print(json.dumps(row), flush=True)
    print(table(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
