"""Foundation benchmark: our forward and caching against HF and the TransformerLens bridge.

Small-but-real-width Qwen2.5-VL (LM d_model 512, 4 layers, GQA 8/2 heads; ViT width 256, 4 blocks,
window attention), one 896x896 image = 1024 visual tokens (~1040 positions), CPU fp32, one torch
thread. Each cell runs in a fresh process so peak memory is its own.

    python scripts/bench_foundation.py            # full table
    python scripts/bench_foundation.py --quick    # 448x448 image, 2 repeats (smoke test)

Targets (issue 2): our no-hook forward <= 1.10x HF sdpa; caching every residual hook costs no more memory
than the plain forward plus the cached tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CELLS = ["hf_sdpa", "ours_forward", "ours_cache_resid", "tl_bridge_cache_resid"]


def build_hf(image_px: int):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from hooked_vlm.tiny import randomize_

    text = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
    vision = dict(depth=4, hidden_size=256, intermediate_size=768, num_heads=4, out_hidden_size=512, window_size=112,
                  fullatt_block_indexes=[3], tokens_per_second=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=100, video_token_id=101,
                           vision_start_token_id=102, vision_end_token_id=103)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = randomize_(Qwen2_5_VLForConditionalGeneration(cfg), seed=0, std=0.02).eval()
    g = image_px // 14
    n_tokens = g * g // 4
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        input_ids=torch.tensor([[0, 5, 6, 102] + [100] * n_tokens + [103, 7, 8, 9, 10]]),
        pixel_values=torch.randn(g * g, 1176, generator=gen),
        image_grid_thw=torch.tensor([[1, g, g]]),
    )
    return hf, inputs


def run_cell(cell: str, image_px: int, repeats: int) -> dict:
    import torch

    from benchmarking import measure

    torch.set_num_threads(1)
    hf, inputs = build_hf(image_px)
    ids = inputs["input_ids"]
    mm = (ids == 100).long()
    resid = [f"blocks.{i}.hook_resid_{k}" for i in range(4) for k in ("pre", "mid", "post")]
    out: dict = {"cell": cell, "positions": ids.shape[1]}
    with torch.no_grad():
        if cell == "hf_sdpa":
            def fn():
                hf.model.rope_deltas = None
                return hf(**inputs, mm_token_type_ids=mm).logits
        elif cell in ("ours_forward", "ours_cache_resid"):
            from hooked_vlm import HookedVLM

            model = HookedVLM.from_hf(hf)
            del hf
            if cell == "ours_forward":
                fn = lambda: model(**inputs)  # noqa: E731
            else:
                def fn():
                    _, cache = model.run_with_cache(**inputs, names_filter=resid)
                    out["cached_mib"] = sum(v.numel() * v.element_size() for v in cache.values()) / 2**20
                    return cache
        elif cell == "tl_bridge_cache_resid":
            from benchmarking import tl_bridge

            bridge = tl_bridge(hf, copy_model=False)
            names = [n for n in bridge.hook_dict if any(n == r for r in resid)]
            out["bridge_names"] = len(names)

            def fn():
                hf.model.rope_deltas = None
                rest = {k: v for k, v in inputs.items() if k != "input_ids"}
                _, cache = bridge.run_with_cache(ids, **rest, mm_token_type_ids=mm, names_filter=resid)
                out["cached_mib"] = sum(v.numel() * v.element_size() for v in cache.values()) / 2**20
                return cache
        else:
            raise SystemExit(f"unknown cell {cell}")
        out.update(measure(fn, repeats=repeats))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", choices=CELLS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    image_px = 448 if a.quick else 896
    repeats = a.repeats or (2 if a.quick else 5)
    if a.cell:
        print(json.dumps(run_cell(a.cell, image_px, repeats)))
        return
    from benchmarking import run_cell_in_subprocess

    env_extra = ["--repeats", str(repeats)] + (["--quick"] if a.quick else [])
    results = {c: run_cell_in_subprocess(os.path.abspath(__file__), c, env_extra) for c in CELLS}
    hf = results["hf_sdpa"]
    print(f"\nQwen2.5-VL d_model 512 x 4 layers, ViT 256 x 4, image {image_px}px -> {hf.get('positions')} positions; "
          f"CPU fp32, 1 thread, median of {repeats}")
    print(f"{'cell':<24}{'time s':>10}{'x HF':>8}{'peak MiB':>10}{'x HF':>8}{'cached MiB':>12}")
    for c in CELLS:
        r = results[c]
        if "error" in r:
            print(f"{c:<24} failed: {r['error']}")
            continue
        print(f"{c:<24}{r['time_s']:>10.3f}{r['time_s'] / hf['time_s']:>8.2f}{r['peak_mib']:>10.1f}"
              f"{r['peak_mib'] / max(hf['peak_mib'], 1e-9):>8.2f}{r.get('cached_mib', 0):>12.1f}")
    ours, cache = results["ours_forward"], results["ours_cache_resid"]
    if "error" not in ours and "error" not in cache:
        ratio = ours["time_s"] / hf["time_s"]
        budget = ours["peak_mib"] + cache["cached_mib"]
        print(f"\nno-hook forward / HF sdpa = {ratio:.2f}x (target <= 1.10x): {'PASS' if ratio <= 1.10 else 'MISS'}")
        print(f"resid caching peak {cache['peak_mib']:.1f} MiB vs plain forward + cached = {budget:.1f} MiB: "
              f"{'PASS' if cache['peak_mib'] <= budget * 1.02 else 'MISS'}")
        tl = results["tl_bridge_cache_resid"]
        if "error" not in tl:
            print(f"TL bridge resid caching: {tl['time_s'] / cache['time_s']:.2f}x our time, "
                  f"{tl['peak_mib'] / max(cache['peak_mib'], 1e-9):.2f}x our peak memory")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
