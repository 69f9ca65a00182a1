"""Benchmark: attention statistics without the L x L matrix, against the materialising path and the sdpa floor.

One attention layer with Qwen2-VL-7B shapes (H=28 query heads, Hkv=4, head dim 128, causal), laid out like a
video prompt: a short text prefix, F frames of visual tokens, a text suffix. Three statistics are asked for:

* region mass: last token -> each frame            ([B, H, 1, F])
* attention received per key (so per visual token), from all queries and from the text suffix ([B, H, 2, L])
* the last token's exact probability row           ([B, H, 1, L])

Methods (rows of the table):

* ``ours``        kernels.attn_stats (CPU: the chunked torch backend, one sweep; GPU: the Triton kernels)
* ``materialise`` what HF eager attention with ``output_attentions=True`` does per layer: scores, additive mask,
                  softmax, P @ V, then the statistics read off P
* ``sdpa``        a plain ``scaled_dot_product_attention`` forward, output only: the floor
* ``flex``        (GPU only) FlexAttention forward with a causal block mask and the LSE

Every cell runs in a fresh subprocess with one torch thread, after the same method ran once at L = 256 in that
process (so library code pages are loaded before measuring). CPU memory is the peak RSS (``VmHWM``, reset via
``/proc/self/clear_refs`` after the inputs exist) minus the RSS with the inputs allocated; GPU memory is
``max_memory_allocated`` above the inputs. Materialising cells whose predicted memory exceeds
``--max-materialise-gb`` (default 16) or what the machine has available are skipped and printed as
``OOM-predicted``.

The GPU code path (``--device cuda``: throughput against torch SDPA and FlexAttention) is written but has NOT been
run or measured yet.

    python scripts/bench_attention_stats.py --quick           # seconds: L = 1k, 2k, 4 heads
    python scripts/bench_attention_stats.py                   # L = 4k, 8k, 16k, 32k, Qwen2-VL shapes (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- one cell
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _layout(torch, L: int, frames: int, prefix: int, suffix: int, device):
    """Key groups (frame id of each visual token, -1 for text) and the text-suffix mask."""
    pos = torch.arange(L, device=device)
    n_vis = L - prefix - suffix
    per = max(1, n_vis // frames)
    is_vis = (pos >= prefix) & (pos < prefix + n_vis)
    frame = torch.where(is_vis, ((pos - prefix) // per).clamp(max=frames - 1), torch.full_like(pos, -1))
    return frame, pos >= L - suffix


def _cell(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from kernels import MaskSpec, attn_stats

    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    L, H, HKV, D = args.L, args.heads, args.kv_heads, args.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, H, L, D, generator=g, device=dev, dtype=dtype)
    k = torch.randn(1, HKV, L, D, generator=g, device=dev, dtype=dtype)
    v = torch.randn(1, HKV, L, D, generator=g, device=dev, dtype=dtype)
    frame, suffix = _layout(torch, L, args.frames, 16, 64, dev)
    last_group = torch.full((L,), -1, dtype=torch.long, device=dev)
    last_group[-1] = 0
    W = torch.stack([torch.ones(L, device=dev), suffix.float()], dim=1)  # [L, 2]: all queries, text suffix
    rows = torch.tensor([L - 1], device=dev)
    mask = MaskSpec(causal=True)
    scale = D**-0.5

    def ours():
        st = attn_stats(q, k, v, mask, key_group_ids=frame, q_group_ids=last_group, colsum_q_weights=W, rows=rows,
                        backend="torch" if dev.type == "cpu" else "triton")
        return st.out, st.region, st.colsum, st.rows

    def materialise():
        # transformers' eager_attention_forward (repeat_kv, scores * scaling + additive mask, fp32 softmax, P @ V)
        rep = H // HKV
        kk = k[:, :, None].expand(1, HKV, rep, L, D).reshape(1, H, L, D)
        vv = v[:, :, None].expand(1, HKV, rep, L, D).reshape(1, H, L, D)
        amask = torch.full((L, L), float("-inf"), device=dev, dtype=dtype).triu(1)[None, None]
        w = torch.matmul(q, kk.transpose(2, 3)) * scale
        w = w + amask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(dtype)
        out = torch.matmul(w, vv)
        last = w[:, :, -1:, :].float()
        region = torch.zeros(1, H, 1, args.frames, device=dev).index_add_(3, frame.clamp(min=0), last * (frame >= 0))
        colsum = torch.einsum("lc,bhlk->bhck", W.to(w.dtype), w).float()
        return out, region, colsum, last.clone()

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    flex_state: dict = {}

    def flex():
        # FlexAttention is only fast compiled; the compile happens in the untimed warm-up call
        from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

        if not flex_state:
            flex_state["fn"] = torch.compile(flex_attention)
            flex_state["mask"] = create_block_mask(lambda b, h, i, j: j <= i, 1, 1, L, L, device=dev)
        return flex_state["fn"](q, k, v, block_mask=flex_state["mask"], enable_gqa=True, return_aux=AuxRequest(lse=True))

    fn = {"ours": ours, "materialise": materialise, "sdpa": sdpa, "flex": flex}[args.method]
    if args.warmup and dev.type == "cpu":
        # load the method's library code (BLAS / sdpa kernels) on a tiny problem, so the peak measured below
        # is data, not code pages: run this same cell at L = 256 in-process first
        small = argparse.Namespace(**{**vars(args), "L": 256, "warmup": False, "reps": 1})
        _cell(small)
    times = []
    if dev.type == "cuda":
        fn()  # warm-up / compile
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(args.reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            res = fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
            del res
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        reset = _reset_peak()
        base = _status_kb("VmHWM" if reset else "VmRSS")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t0)
            del res
        peak = (_status_kb("VmHWM") - base) / 1024
    return {"method": args.method, "L": L, "times": times, "median_s": statistics.median(times), "peak_mib": peak}


# ------------------------------------------------------------------------------------------- driver
def _mem_available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def _predicted_materialise_gb(L: int, H: int, bytes_per: int) -> float:
    # two [H, L, L] buffers alive at once (old and new scores / probabilities) plus the [L, L] additive mask
    return (2 * H * L * L + 2 * L * L) * bytes_per / 2**30


def _run_cell(args, method: str, L: int) -> dict:
    cmd = [sys.executable, __file__, "--cell", "--method", method, "--L", str(L), "--heads", str(args.heads),
           "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim), "--frames", str(args.frames),
           "--dtype", args.dtype, "--device", args.device, "--reps", str(args.reps_for(L))]
    if not args.warmup:
        cmd.append("--no-warmup")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HOOKED_VLM_ATTN_BACKEND="")
    env.pop("TRITON_INTERPRET", None)

    def oom_first():  # if anything must die for memory, let it be this cell
        try:
            Path("/proc/self/oom_score_adj").write_text("1000")
        except OSError:
            pass

    p = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=oom_first)
    if p.returncode != 0:
        return {"method": method, "L": L, "error": f"exit {p.returncode}: {p.stderr.strip()[-300:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: L = 1k, 2k, 4 heads (seconds)")
    ap.add_argument("--lengths", type=str, default="4096,8192,16384,32768")
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default fp32 on CPU, bf16 on GPU")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per cell (default 3 up to 8k, then 1)")
    ap.add_argument("--max-materialise-gb", type=float, default=16.0)
    ap.add_argument("--methods", type=str, default=None)
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the tiny in-process warm-up before each measured cell")
    # internal: run one cell
    ap.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", type=str, help=argparse.SUPPRESS)
    ap.add_argument("--L", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" else "bf16"
    if args.cell:
        if args.reps is None:
            args.reps = 1
        print(json.dumps(_cell(args)))
        return
    if args.quick:
        args.lengths, args.heads, args.kv_heads = "1024,2048", 4, 2
    args.reps_for = lambda L: args.reps if args.reps is not None else (3 if L <= 8192 else 1)
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = (args.methods.split(",") if args.methods else
               ["sdpa", "ours", "materialise"] + (["flex"] if args.device == "cuda" else []))
    bytes_per = 4 if args.dtype == "fp32" else 2
    print(f"# attention statistics benchmark: H={args.heads} Hkv={args.kv_heads} dh={args.head_dim} {args.dtype} "
          f"device={args.device} threads=1 frames={args.frames}")
    if args.device == "cuda":
        print("# NOTE: the CUDA path of this script has not been run or validated yet; treat its numbers with care")
    results = []
    for L in lengths:
        for m in methods:
            if m == "materialise":
                need = _predicted_materialise_gb(L, args.heads, bytes_per)
                avail = _mem_available_gb() - 3.0 if args.device == "cpu" else float("inf")
                if need > min(args.max_materialise_gb, avail):
                    r = {"method": m, "L": L, "skipped": f"OOM-predicted ({need:.1f} GB needed)"}
                    print(f"L={L:>6} {m:>12}: OOM-predicted ({need:.1f} GB > limit {min(args.max_materialise_gb, avail):.1f} GB)", flush=True)
                    results.append(r)
                    continue
            r = _run_cell(args, m, L)
            results.append(r)
            if "error" in r:
                print(f"L={L:>6} {m:>12}: FAILED {r['error']}", flush=True)
            else:
                print(f"L={L:>6} {m:>12}: median {r['median_s']:8.3f} s  peak +{r['peak_mib']:9.1f} MiB  "
                      f"(runs: {', '.join(f'{t:.3f}' for t in r['times'])})", flush=True)
    # summary table with ratios against the sdpa floor and the materialising path
    by = {(r["L"], r["method"]): r for r in results}
    print("\n|     L | method       | median s | peak MiB | time / sdpa | mem / sdpa | materialise mem / ours |")
    print("|------:|--------------|---------:|---------:|------------:|-----------:|-----------------------:|")
    for L in lengths:
        base = by.get((L, "sdpa"))
        ours = by.get((L, "ours"))
        for m in methods:
            r = by[(L, m)]
            if "median_s" not in r:
                print(f"| {L:>5} | {m:<12} | {r.get('skipped', r.get('error', ''))[:60]} |")
                continue
            tr = mr = xr = ""
            if base and "median_s" in base:
                tr = f"{r['median_s'] / base['median_s']:.2f}x"
                mr = f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}x"
            if m == "materialise" and ours and "peak_mib" in ours:
                xr = f"{r['peak_mib'] / max(ours['peak_mib'], 1e-9):.1f}x"
            if args.device == "cuda":
                flops = 2 * args.heads * L * L * args.head_dim  # causal forward: half of 4 H L^2 d
                tr += f" ({flops / r['median_s'] / 1e12:.1f} TF/s)"
            print(f"| {L:>5} | {m:<12} | {r['median_s']:8.3f} | {r['peak_mib']:8.1f} | {tr:>11} | {mr:>10} | {xr:>22} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
