"""Helpers for the benchmark scripts: timing medians, peak memory of one call, and the competitor
(TransformerLens's TransformerBridge) built around an in-memory transformers model.

Benchmarks are scripts, not timed tests; they run the competitor in the same run and print ratios.
"""

from __future__ import annotations

import copy
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) of this process in MiB (Linux /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (writes 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time and median CPU time of this process (``cpu_s``: robust to other jobs on a shared machine)
    of ``fn``, and the peak RSS it adds above the RSS before the first call."""
    gc.collect()
    base, _ = rss_mib()
    reset_peak_rss()
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    _, peak = rss_mib()
    return {"time_s": statistics.median(times), "cpu_s": statistics.median(cpu), "peak_mib": peak - base, "times": times}


def run_cell_in_subprocess(script: str, cell: str, extra: list[str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run ``python script --cell cell`` in a fresh interpreter and parse the JSON line it prints last."""
    cmd = [sys.executable, script, "--cell", cell, *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"], "returncode": proc.returncode}
    return json.loads(lines[-1])


def tl_bridge(hf_model: Any, architecture: str | None = None, copy_model: bool = True) -> Any:
    """TransformerLens 4.x TransformerBridge around an in-memory HF model (deep-copied: the bridge mutates it).

    The adapters' optional-library check (torchvision for the Qwen adapters, which cannot be installed
    with the CPU torch build) is bypassed; the bridge never runs a processor here.
    """
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    model = copy.deepcopy(hf_model) if copy_model else hf_model
    original = ArchitectureAdapter._check_required_libraries
    ArchitectureAdapter._check_required_libraries = lambda self: None
    try:
        return build_bridge_from_module(model, architecture or type(model).__name__, hf_config=model.config)
    finally:
        ArchitectureAdapter._check_required_libraries = original


def append_jsonl(path: str | None, rows: list[dict[str, Any]]) -> None:
    """Append benchmark rows to a JSON-lines file (``--out``), one object per line; nothing when no path."""
    if path:
        with open(path, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
