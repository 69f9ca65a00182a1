"""Attention statistics through a hooked model on a long synthetic video, against the materialising tools.

Qwen2.5-VL-shaped model (LM d_model 512, 8 heads / 2 KV heads, head dim 64, 2 layers; ViT 128 wide), a
synthetic video of 112x112 frames (16 tokens per 2-frame slice) sized to L positions. For every LM layer
and head we want: the last token's attention mass per frame (region), the attention each visual token
receives from the text queries (column sums) and the last token's exact attention row.

Cells (fresh process each, one torch thread, CPU fp32):
  sdpa_floor     our forward, no statistics (the SDPA fast path: the floor)
  ours_stats     our forward + AttnStatsRequest (kernels; no L x L matrix)
  hf_eager       transformers with eager attention and output_attentions=True, statistics from the matrices
  tl_bridge      TransformerLens bridge run_with_cache of every hook_pattern, statistics from them
Cells whose predicted memory exceeds --max-gib are reported as "skipped (predicted N GiB)".

    python scripts/bench_attention_model.py --lengths 2048 4096 8192 16384
    python scripts/bench_attention_model.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CELLS = ["sdpa_floor", "ours_stats", "hf_eager", "tl_bridge"]
N_LAYERS, N_HEADS = 2, 8
TOKENS_PER_SLICE = 16


def build(length: int):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from hooked_vlm.tiny import randomize_

    text = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=N_LAYERS,
                num_attention_heads=N_HEADS, num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                max_position_embeddings=65536,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
    vision = dict(depth=1, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=512, window_size=112,
                  fullatt_block_indexes=[0], tokens_per_second=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=100, video_token_id=101,
                           vision_start_token_id=102, vision_end_token_id=103)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = randomize_(Qwen2_5_VLForConditionalGeneration(cfg), seed=0, std=0.02).eval()
    slices = max(1, (length - 16) // TOKENS_PER_SLICE)
    n_vis = slices * TOKENS_PER_SLICE
    gen = torch.Generator().manual_seed(1)
    ids = [0, 5, 6, 102] + [101] * n_vis + [103] + [7 + (i % 80) for i in range(length - n_vis - 5)]
    inputs = dict(
        input_ids=torch.tensor([ids]),
        pixel_values_videos=torch.randn(slices * 64, 1176, generator=gen),
        video_grid_thw=torch.tensor([[slices, 8, 8]]),
        second_per_grid_ts=torch.tensor([1.0]),
    )
    return hf, inputs


def statistics_from_patterns(patterns, frame_ids, text_mask):
    """The same three statistics from materialised [B, H, L, L] patterns (what eager-based code does)."""
    import torch

    out = []
    onehot = torch.nn.functional.one_hot(frame_ids.clamp(min=0)).float() * (frame_ids >= 0)[..., None]
    for p in patterns:
        last = p[:, :, -1]  # B H L
        region = torch.einsum("bhk,bkg->bhg", last, onehot[None].float() if onehot.dim() == 2 else onehot)
        colsum = torch.einsum("bhqk,bq->bhk", p, text_mask.float())
        out.append((region, colsum, last))
    return out


def predicted_gib(cell: str, length: int) -> float:
    mat = N_HEADS * length * length * 4 / 2**30  # one layer's fp32 pattern
    if cell == "hf_eager":
        return N_LAYERS * mat + 2 * mat + length * length * 4 / 2**30  # kept weights + transient softmax + mask
    if cell == "tl_bridge":
        return 2 * N_LAYERS * mat + 2 * mat
    return 0.1


def run_cell(cell: str, length: int, repeats: int) -> dict:
    import torch

    from benchmarking import measure

    torch.set_num_threads(1)
    hf, inputs = build(length)
    ids = inputs["input_ids"]
    mm = (ids == 101).long() * 2
    out: dict = {"cell": cell, "L": ids.shape[1]}
    with torch.no_grad():
        if cell in ("sdpa_floor", "ours_stats"):
            from hooked_vlm import HookedVLM
            from hooked_vlm.components.attention import STAT_HOOKS, AttnStatsRequest, attn_stats_request

            model = HookedVLM.from_hf(hf)
            del hf
            lay = model.layout(**inputs)
            text = (lay.kind == 0).long() - 1  # 0 for text queries, -1 elsewhere
            req = AttnStatsRequest(key_group_ids=lay.group_ids("frame"), q_group_ids=lay.group_ids("last"),
                                   colsum_q_group_ids=text, rows=lay.last_token()[:, None])
            if cell == "sdpa_floor":
                fn = lambda: model(**inputs)  # noqa: E731
            else:
                def fn():
                    with attn_stats_request(model, req):
                        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith(STAT_HOOKS))
                    out["stats_mib"] = sum(v.numel() * v.element_size() for v in cache.values()) / 2**20
                    return cache
        elif cell == "hf_eager":
            hf.set_attn_implementation("eager")
            from hooked_vlm.loading import from_hf

            lay = from_hf(hf).layout(**inputs)
            frames, text = lay.group_ids("frame")[0], (lay.kind == 0)

            def fn():
                hf.model.rope_deltas = None
                res = hf(**inputs, mm_token_type_ids=mm, output_attentions=True)
                return statistics_from_patterns(res.attentions, frames, text)
        elif cell == "tl_bridge":
            from benchmarking import tl_bridge
            from hooked_vlm.loading import from_hf

            lay = from_hf(hf).layout(**inputs)
            frames, text = lay.group_ids("frame")[0], (lay.kind == 0)
            bridge = tl_bridge(hf, copy_model=False)
            names = [f"blocks.{i}.attn.hook_pattern" for i in range(N_LAYERS)]
            rest = {k: v for k, v in inputs.items() if k != "input_ids"}

            def fn():
                hf.model.rope_deltas = None
                _, cache = bridge.run_with_cache(ids, **rest, mm_token_type_ids=mm, names_filter=names)
                return statistics_from_patterns([cache[n] for n in names], frames, text)
        else:
            raise SystemExit(f"unknown cell {cell}")
        out.update(measure(fn, repeats=repeats))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", choices=CELLS)
    p.add_argument("--length", type=int)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gib", type=float, default=12.0)
    p.add_argument("--quick", action="store_true", help="L = 512 and 1024, one repeat")
    p.add_argument("--json")
    a = p.parse_args()
    if a.cell:
        print(json.dumps(run_cell(a.cell, a.length, a.repeats)))
        return
    from benchmarking import run_cell_in_subprocess

    lengths = [512, 1024] if a.quick else a.lengths
    repeats = 1 if a.quick else a.repeats
    results = {}
    print(f"Qwen2.5-VL-shaped LM (d 512, {N_HEADS} heads / 2 KV, {N_LAYERS} layers), synthetic video; CPU fp32, 1 thread, median of {repeats}")
    print(f"{'L':>7} {'cell':<12}{'time s':>9}{'x floor':>9}{'peak MiB':>10}{'x floor':>9}")
    for length in lengths:
        row = {}
        for cell in CELLS:
            need = predicted_gib(cell, length)
            if need > a.max_gib:
                row[cell] = {"skipped": f"predicted {need:.0f} GiB"}
            else:
                row[cell] = run_cell_in_subprocess(os.path.abspath(__file__), cell, ["--length", str(length), "--repeats", str(repeats)])
        floor = row["sdpa_floor"]
        for cell in CELLS:
            r = row[cell]
            if "time_s" not in r:
                print(f"{length:>7} {cell:<12} {r.get('skipped') or r.get('error')}")
                continue
            print(f"{length:>7} {cell:<12}{r['time_s']:>9.2f}{r['time_s'] / floor['time_s']:>9.2f}"
                  f"{r['peak_mib']:>10.0f}{r['peak_mib'] / max(floor['peak_mib'], 1):>9.2f}")
        results[length] = row
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
