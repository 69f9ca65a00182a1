"""Benchmark: a layer x position ``resid_pre`` patching sweep, hooked_vlm vs TransformerLens.

Both sides use the same Qwen2.5-VL weights (a random-weight model built in memory from a transformers
config, no downloads) and the same clean/corrupted inputs (an image pair, and a video with its
temporal slices reversed). TransformerLens's ``get_act_patch_resid_pre`` runs on a
``TransformerBridge`` built from a deep copy of the Hugging Face model; because that utility passes
only token ids, a thin proxy re-injects the corrupted run's pixel inputs (and resets HF's cached
``rope_deltas``) so both sides compute the same numbers. The script checks they agree (max |diff|)
and times:

* ``TL bridge``: ``transformer_lens.patching.get_act_patch_resid_pre`` (one forward per cell);
* ``ours, naive``: :func:`analyses.patching.activation_patching` with batch 1, no reuse;
* ``ours, batched``: many cells per forward;
* ``ours, + vision reuse``: the vision tower runs once;
* ``ours, + prefix reuse``: positions before a batch's first patched position come from a cache;
* ``ours, default (+ layer skip)``: blocks below a batch's lowest patched block run once (the library
  default: all of the above).

The methods are interleaved within every repeat (so all see the same machine load). The table gives
each method's best CPU time of this process (1 thread; robust to other jobs on a shared machine), the
speed-up best-vs-best and the median of the per-repeat paired speed-ups (both on CPU time), and the
best wall time with its speed-up.

Usage::

    python scripts/bench_patching.py                   # tiny and small configs, image and video
    python scripts/bench_patching.py --configs small --repeats 5 --out bench.json

Never lets TransformerLens install anything: the adapter's optional-library check is bypassed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses.metrics import logit_diff  # noqa: E402
from benchmarking import tl_bridge  # noqa: E402
from analyses.patching import activation_patching  # noqa: E402

# (LM overrides, vision overrides, image side in px): "tiny" is hooked_vlm.tiny's test model; "small"
# is deeper and wider so that compute, not per-call overhead, dominates; "7b-shape" keeps
# Qwen2.5-VL-7B's vision/LM cost ratio (vision width/LM width ~ 0.36, as many vision as LM layers,
# 4 patches per visual token: the tower costs ~0.55x the LM per visual token) at 1/14 the width.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"text": {}, "vision": {}},
    "7b-shape": {
        "text": dict(hidden_size=256, intermediate_size=1344, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2),
        "vision": dict(depth=8, hidden_size=96, intermediate_size=256, num_heads=4, out_hidden_size=256),
        "image_grid": 6,
    },
    "small": {
        "text": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=2),
        "vision": dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=256),
    },
}


def build_hf(name: str, seed: int = 0) -> Any:
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` (eager attention, fp32)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from hooked_vlm.tiny import qwen2_5_vl_config, randomize_

    spec = CONFIGS[name]
    cfg = qwen2_5_vl_config(**spec["text"])
    if spec["vision"]:
        vc = cfg.vision_config
        for k, v in spec["vision"].items():
            setattr(vc, k, v)
        vc.fullatt_block_indexes = [i for i in range(vc.depth) if i % 2 == 1]
        cfg.text_config.head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
        head_half = cfg.text_config.head_dim // 2
        third = head_half // 3
        cfg.text_config.rope_parameters["mrope_section"] = [head_half - 2 * third, third, third]
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration(cfg)
    randomize_(hf, seed)
    return hf.eval()


class ReinjectInputs:
    """What TL's patching utilities call (``run_with_hooks(tokens, fwd_hooks=...)``), with the
    multimodal inputs of the run added back and HF's cached ``rope_deltas`` reset every call."""

    def __init__(self, bridge: Any, extra: dict[str, Any]) -> None:
        self.bridge, self.extra, self.cfg = bridge, extra, bridge.cfg

    def _reset(self) -> None:
        for mod in self.bridge.modules():
            if hasattr(mod, "rope_deltas"):
                mod.rope_deltas = None

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks: Any = (), **kw: Any) -> torch.Tensor:
        self._reset()
        out = self.bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **self.extra, **kw)
        return out.logits if hasattr(out, "logits") else out

    def run_with_cache(self, tokens: torch.Tensor, **kw: Any) -> Any:
        self._reset()
        return self.bridge.run_with_cache(tokens, **self.extra, **kw)


def make_inputs(kind: str, grid: int = 4) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Clean/corrupted pairs with the same layout: two images (``grid`` x ``grid`` visual tokens), or a
    clip and its reversal."""
    from analyses import video_counterfactuals as vc
    from hooked_vlm.inputs import build_qwen_inputs
    from hooked_vlm.samples import synthetic_grid_image, synthetic_video
    from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    if kind == "image":
        a, _ = synthetic_grid_image(seed=0, grid=grid, num_shapes=3)
        b, _ = synthetic_grid_image(seed=1, grid=grid, num_shapes=3)
        prompt = "<image> what is the red circle"
        return build_qwen_inputs(tok, prompt, images=[a]), build_qwen_inputs(tok, prompt, images=[b])
    frames, _ = synthetic_video(num_frames=8, size=(56, 84))
    kw = dict(video_min_pixels=56 * 84, video_max_pixels=56 * 84)
    prompt = "<video> where does it go"
    rev = vc.reverse(frames, unit="slice").frames
    return build_qwen_inputs(tok, prompt, videos=[frames], **kw), build_qwen_inputs(tok, prompt, videos=[rev], **kw)


def bench_one(config: str, kind: str, repeats: int, batch_size: int, methods: list[str] | None = None) -> dict[str, Any]:
    from transformer_lens import patching as tlp

    from hooked_vlm import HookedVLM

    hf = build_hf(config)
    model = HookedVLM.from_hf(hf).eval()
    bridge = tl_bridge(hf)  # deep copy: the bridge mutates the model it wraps
    clean, corrupt = make_inputs(kind, CONFIGS[config].get("image_grid", 4))
    metric = logit_diff(5, 6)
    tokens = {k: v for k, v in corrupt.items() if k != "input_ids"}
    clean_extra = {k: v for k, v in clean.items() if k != "input_ids"}
    n_layers, length = model.cfg.n_layers, clean["input_ids"].shape[1]

    def run_tl() -> torch.Tensor:
        with torch.no_grad():
            _, cache = ReinjectInputs(bridge, clean_extra).run_with_cache(clean["input_ids"])
            return tlp.get_act_patch_resid_pre(
                ReinjectInputs(bridge, tokens), corrupt["input_ids"], cache, lambda lg: metric(lg).mean()
            )

    def ours(**kw: Any):
        def fn():
            return activation_patching(model, clean, corrupt, metric, sites=["resid_pre"], progress=False, **kw)
        return fn

    variants = {
        "TL bridge get_act_patch_resid_pre": run_tl,
        "ours, naive (batch 1, no reuse)": ours(batch_size=1, plan=None, prefix_reuse=False, layer_skip=False),
        "ours, batched": ours(batch_size=batch_size, plan=None, prefix_reuse=False, layer_skip=False),
        "ours, + vision reuse": ours(batch_size=batch_size, prefix_reuse=False, layer_skip=False),
        "ours, + prefix reuse": ours(batch_size=batch_size, layer_skip=False),
        "ours, default (+ layer skip)": ours(batch_size=batch_size),
    }
    if methods:  # TransformerLens's row always runs: it is what every speed-up divides
        unknown = [m for m in methods if m not in variants]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(variants)}")
        variants = {k: v for k, v in variants.items() if k == "TL bridge get_act_patch_resid_pre" or k in methods}
    # Interleave the methods in every repeat so that all of them see the same machine load. Both wall
    # time and this process's CPU time are recorded: on a shared machine the CPU time (1 thread) is
    # far less sensitive to other jobs than the wall time, so speed-ups are computed from it.
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    tl_name = "TL bridge get_act_patch_resid_pre"
    tl_vals = outputs[tl_name].double()
    rows = []
    for name in variants:
        if name == tl_name:
            diff = 0.0
        else:
            diff = float((torch.as_tensor(outputs[name].array("resid_pre")) - tl_vals).abs().max())
        ratios = sorted(t_tl / t for t_tl, t in zip(cpu[tl_name], cpu[name]))
        rows.append({
            "method": name,
            "cpu_seconds": min(cpu[name]),
            "wall_seconds": min(wall[name]),
            "speedup_vs_tl": min(cpu[tl_name]) / min(cpu[name]),
            "median_paired_speedup": ratios[len(ratios) // 2],
            "wall_speedup_vs_tl": min(wall[tl_name]) / min(wall[name]),
            "max_abs_diff_vs_tl": diff,
        })
    return {
        "config": config, "input": kind, "n_layers": n_layers, "seq_len": length, "cells": n_layers * length,
        "threads": torch.get_num_threads(), "rows": rows,
    }


def to_markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | input | cells (layers x positions) | method | CPU s (best) | speed-up vs TL | "
             "median paired speed-up | wall s (best) | wall speed-up | max abs diff vs TL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            lines.append(
                f"| {res['config']} | {res['input']} | {res['n_layers']} x {res['seq_len']} = {res['cells']} | "
                f"{r['method']} | {r['cpu_seconds']:.3f} | {r['speedup_vs_tl']:.1f}x | "
                f"{r['median_paired_speedup']:.1f}x | {r['wall_seconds']:.3f} | {r['wall_speedup_vs_tl']:.1f}x | "
                f"{r['max_abs_diff_vs_tl']:.1e} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small", "7b-shape"], choices=sorted(CONFIGS))
    ap.add_argument("--inputs", nargs="+", default=["image", "video"], choices=["image", "video"])
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed repeats; methods are interleaved in each repeat, the best time is reported")
    ap.add_argument("--batch-size", type=int, default=16, help="cells per batched forward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--methods", nargs="+", help="only these of our rows (names as in the table; TL always runs), "
                    "e.g. --methods 'ours, default (+ layer skip)'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for config in args.configs:
        for kind in args.inputs:
            res = bench_one(config, kind, args.repeats, args.batch_size, args.methods)
            results.append(res)
            print(to_markdown([res]), flush=True)
    print()
    print(to_markdown(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    worst = max(r["max_abs_diff_vs_tl"] for res in results for r in res["rows"])
    print(f"\nlargest |ours - TL| over all cells: {worst:.2e}")


if __name__ == "__main__":
    main()
