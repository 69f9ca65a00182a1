"""Load test for the self-hosted NDIF stack: N concurrent clients x T traces of tiny Qwen2-VL, checked against local.

    # inside the stack's loopback-only namespace, with the stack running:
    python scripts/ndif/loadtest.py --clients 1 4 8 16 --traces 10 --out /tmp/hvlm-ndif/load.json

Each client is a thread running blocking ``remote=True`` traces one after another (an image prompt:
save the vision output, patch one residual position, save the logits). Per N: successes, p50 / p95
latency, throughput (traces / wall second) and whether every result is ``torch.equal`` to the local
run. Bounded: at most ``--traces`` per client and ``--budget`` seconds per N (later traces are not
started). Results are written after each N (atomically) and printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def loopback_only() -> bool:
    """True when this process's network namespace has no interface but ``lo``."""
    with open("/proc/self/net/dev") as handle:
        return {line.split(":")[0].strip() for line in handle.readlines()[2:]} == {"lo"}


def configure_client() -> None:
    """Point nnsight at the loopback stack (``HOOKED_VLM_NDIF_URL``) with its API key, if any."""
    from nnsight import CONFIG

    CONFIG.API.HOST = os.environ.get("HOOKED_VLM_NDIF_URL", f"http://127.0.0.1:{os.environ.get('NDIF_API_PORT', '8001')}")
    CONFIG.API.APIKEY = os.environ.get("HOOKED_VLM_NDIF_API_KEY") or os.environ.get("NDIF_API_KEY") or None
    CONFIG.APP.REMOTE_LOGGING = False


def toy_case() -> torch.Tensor:
    return torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))


def qwen_case() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(ROOT / "tests"))
    from qwen_cases import case

    return case("image", "tiny-qwen2-vl")


def one_trace(model, inputs: dict, remote: bool):
    with model.trace(**inputs, remote=remote):
        vision = model.vision.hook_out.output.save()
        model.blocks[0].hook_resid_post.output[:, -1] = 0
        logits = model.output.save()
    return vision, logits


def run_level(model, inputs: dict, reference, clients: int, traces: int, budget_s: float) -> dict:
    """``clients`` threads x ``traces`` traces; returns the row for this N."""
    latencies, equal, failures, lock = [], [], [], threading.Lock()
    stop_at = time.time() + budget_s

    def client() -> None:
        for _ in range(traces):
            if time.time() > stop_at:
                return
            t0 = time.perf_counter()
            try:
                out = one_trace(model, inputs, remote=True)
                same = all(torch.equal(a, b) for a, b in zip(out, reference))
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    equal.append(same)
            except Exception as error:
                with lock:
                    failures.append(f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) >= 2 else [float("nan")] * 19
    return dict(
        clients=clients, traces=clients * traces, ok=len(latencies), failed=len(failures),
        p50_ms=round(1000 * statistics.median(latencies), 1) if latencies else None,
        p95_ms=round(1000 * q[18], 1) if latencies else None,
        throughput_per_s=round(len(latencies) / wall, 2), wall_s=round(wall, 1),
        all_equal_local=bool(equal) and all(equal), first_failure=failures[0] if failures else None,
    )


def markdown(rows: list[dict]) -> str:
    lines = ["| clients | traces | ok | failed | p50 ms | p95 ms | traces/s | all equal local |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['traces']} | {r['ok']} | {r['failed']} | {r['p50_ms']} | {r['p95_ms']} | "
                     f"{r['throughput_per_s']} | {'yes' if r['all_equal_local'] else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--traces", type=int, default=10, help="traces per client")
    parser.add_argument("--budget", type=float, default=120, help="seconds per N after which no new trace starts")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("HOOKED_VLM_NDIF_STATE", "/tmp/hvlm-ndif")) / "load.json")
    args = parser.parse_args(argv)
    if not loopback_only():
        print("loadtest.py runs only inside the stack's loopback-only network namespace (see scripts/ndif/README.md)", file=sys.stderr)
        return 2
    if max(args.clients) > 64 or args.traces > 100:
        parser.error("bounded by design: at most 64 clients and 100 traces per client")
    torch.set_num_threads(1)
    configure_client()
    from hooked_vlm.nnsight_ext import tiny_nnsight

    model, inputs = tiny_nnsight("tiny-qwen2-vl", seed=0), qwen_case()
    reference = one_trace(model, inputs, remote=False)
    t0 = time.perf_counter()
    one_trace(model, inputs, remote=True)  # deploys the model: not part of any level
    print(f"[ndif-load] deployed tiny-qwen2-vl in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for clients in args.clients:
        rows.append(run_level(model, inputs, reference, clients, args.traces, args.budget))
        print(f"[ndif-load] {rows[-1]}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, args.out)
    print(markdown(rows))
    return 0 if all(r["failed"] == 0 and r["all_equal_local"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
