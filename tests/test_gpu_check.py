"""scripts/gpu_check.sh in its CPU mode (what CI runs): it says the GPU parts are skipped, the cuda tests skip
with their reason, one long-video smoke cell runs, and the one summary table comes out."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path / "out"), GPU_CHECK_FORCE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "SKIPPING the GPU parts" in out
    n_cuda_tests = 13  # 8 Triton low-precision cases + 3 masked-attention masks + model statistics + 64k smoke
    assert f"| cuda tests | - | 0 passed | 0 failed, {n_cuda_tests} skipped | skipped (no GPU) |" in out
    assert "| kernels | - | - | - | skipped (no GPU) |" in out
    row = next(line for line in out.splitlines() if line.startswith("| long video: forward | 1024 |"))
    assert row.endswith("| ok |")
    assert (tmp_path / "out" / "long_video.jsonl").is_file()


def test_gpu_check_summary_flags_a_failed_step(tmp_path):
    import json
    import sys

    (tmp_path / "long_video.jsonl").write_text(json.dumps({"cell": "forward", "L": 16384, "error": ["CUDA OOM"]}) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_summary.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "| cuda tests | - | - | - | not run (cuda_tests.xml missing) |" in proc.stdout
    assert "| long video: forward | 16384 | - | - | ERROR: ['CUDA OOM'] |" in proc.stdout
