"""Overhead of a local nnsight trace against TransformerLens ``run_with_hooks`` on the same hooked model.

    python scripts/bench_nnsight.py                     # tiny + small Qwen2-VL, 60 rounds
    python scripts/bench_nnsight.py --rounds 200 --json out/bench_nnsight.json

One torch thread; the variants run round-robin (one call of each per round, so drift in machine load
hits all of them alike) and the report gives medians of per-call process CPU time (and of wall time).
All variants run under ``torch.no_grad`` on the same inputs (one image prompt). Variants:

* ``forward``: plain ``model(**inputs)``;
* ``hooks: read 1`` / ``nnsight: read 1``: save ``blocks.{L-1}.hook_resid_post``;
* ``hooks: read L + patch 1`` / ``nnsight: read L + patch 1``: save every block's ``hook_resid_post``
  and overwrite one position of ``blocks.0.hook_resid_post`` (a typical patching call);
* ``hooks: cache all`` (``run_with_cache``) / ``nnsight: cache all`` (``tracer.cache()``). Not like
  for like: ``run_with_cache`` hooks ``hook_pattern`` too, so every attention materialises its
  ``[B, H, L, L]`` pattern, while ``tracer.cache()`` only observes and attention stays on the fused
  path (read a pattern through its envoy to get it).

Overheads are reported against ``forward``; the nnsight-minus-hooks difference is the cost of nnsight.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MODELS = {
    "tiny": {},  # hooked_vlm.tiny defaults: d_model 64, 2 layers
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4),
}


def image_inputs(side: int) -> dict[str, torch.Tensor]:
    from qwen_cases import IMG, VE, VS, image_rows, tokens

    pv, grid = image_rows(side, side)
    ids = [0, 5, 6, 7, VS] + [IMG] * tokens(grid) + [VE] + list(range(8, 40))
    return dict(input_ids=torch.tensor([ids]), pixel_values=pv, image_grid_thw=grid)


def build_model(text_overrides: dict):
    """A random-weight Qwen2-VL: hooked_vlm's tiny config with the language model resized."""
    from transformers import Qwen2VLForConditionalGeneration

    from hooked_vlm.loading import from_hf
    from hooked_vlm.tiny import qwen2_vl_config, randomize_

    cfg = qwen2_vl_config(**text_overrides)
    cfg.vision_config.hidden_size = cfg.text_config.hidden_size  # the merger projects into the LM width
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = randomize_(Qwen2VLForConditionalGeneration(cfg), 0).eval()
    return from_hf(hf)


def variants(nn_model, model, inputs):
    import nnsight

    n_layers = model.cfg.n_layers
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    resid_names = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]

    def forward():
        return model(**inputs)

    def hooks_read1():
        store = {}
        model.run_with_hooks(**inputs, fwd_hooks=[(last, lambda a, hook: store.__setitem__(hook.name, a))])
        return store

    def nn_read1():
        with nn_model.trace(**inputs):
            out = nn_model.blocks[n_layers - 1].hook_resid_post.output.save()
        return out

    def hooks_patch():
        store = {}

        def patch(a, hook):
            a[:, 3] = 0
            store[hook.name] = a
            return a

        fwd = [("blocks.0.hook_resid_post", patch)] + [(n, lambda a, hook: store.__setitem__(hook.name, a)) for n in resid_names[1:]]
        model.run_with_hooks(**inputs, fwd_hooks=fwd)
        return store

    def nn_patch():
        with nn_model.trace(**inputs):
            nn_model.blocks[0].hook_resid_post.output[:, 3] = 0
            saved = nnsight.save([nn_model.blocks[i].hook_resid_post.output for i in range(n_layers)])
        return saved

    def hooks_cache():
        return model.run_with_cache(**inputs)

    def nn_cache():
        with nn_model.trace(**inputs) as tracer:
            cache = tracer.cache().save()
        return cache

    return {
        "forward": forward,
        "hooks: read 1": hooks_read1,
        "nnsight: read 1": nn_read1,
        "hooks: read L + patch 1": hooks_patch,
        "nnsight: read L + patch 1": nn_patch,
        "hooks: cache all": hooks_cache,
        "nnsight: cache all": nn_cache,
    }


def bench(name: str, overrides: dict, rounds: int, side: int) -> dict:
    from hooked_vlm.nnsight_ext import to_nnsight

    model = build_model(overrides)
    nn_model = to_nnsight(model)
    inputs = image_inputs(side)
    fns = variants(nn_model, model, inputs)
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn()
            fn()
        for _ in range(rounds):
            for key, fn in fns.items():
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                cpu[key].append(time.process_time() - c0)
                wall[key].append(time.perf_counter() - w0)
    med = {k: 1000 * statistics.median(v) for k, v in cpu.items()}
    med_wall = {k: 1000 * statistics.median(v) for k, v in wall.items()}
    return {
        "model": name,
        "config": {"d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers, "seq": int(inputs["input_ids"].shape[1]),
                   "hook_points": len(model.hook_dict)},
        "rounds": rounds,
        "cpu_ms": med,
        "wall_ms": med_wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--image-side", type=int, default=112, help="image side in pixels (multiple of 28)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")

    results = [bench(name, MODELS[name], args.rounds, args.image_side) for name in args.models]
    for res in results:
        c = res["config"]
        print(f"\n{res['model']}: d_model {c['d_model']}, {c['n_layers']} layers, {c['seq']} tokens, "
              f"{c['hook_points']} hook points; median of {res['rounds']} rounds, 1 thread, no_grad")
        base = res["cpu_ms"]["forward"]
        print(f"  {'variant':28s} {'CPU ms':>9s} {'vs forward':>11s} {'wall ms':>9s}")
        for key, ms in res["cpu_ms"].items():
            print(f"  {key:28s} {ms:9.3f} {ms - base:+11.3f} {res['wall_ms'][key]:9.3f}")
        for what in ("read 1", "read L + patch 1", "cache all"):
            d = res["cpu_ms"][f"nnsight: {what}"] - res["cpu_ms"][f"hooks: {what}"]
            print(f"  nnsight - run_with_hooks, {what}: {d:+.3f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
