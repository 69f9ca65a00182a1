#!/usr/bin/env bash
# One-shot GPU check for hooked_vlm (issue 17): on a machine with one CUDA GPU it runs the `cuda`-marked tests
# (kernel numerics in bf16 / fp16 against the fp64 reference, masked attention and the model statistics on GPU,
# a 64k memory smoke test), the attention-statistics benchmark against SDPA and FlexAttention and the long-video
# benchmark at 16k-64k, each step under its own time limit (8 minutes in all), then prints one summary table.
#
# On a machine without CUDA it says so, skips the GPU parts, and checks the script itself instead (the cuda tests
# are collected and skip with their reason, one long-video smoke cell runs, the summary table is printed), so CI
# keeps it from rotting.
#
#   scripts/gpu_check.sh                   # uses the current environment
#   scripts/gpu_check.sh --install         # first: pip install -e ".[dev]" (the project's extras, nothing else)
#   GPU_CHECK_OUT=dir scripts/gpu_check.sh # where the step outputs go (default: gpu_check_out/)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-gpu_check_out}
if [[ "${1:-}" == "--install" ]]; then
  "$PY" -m pip install -q -e ".[dev]" || exit 1
fi
rm -rf "$OUT" && mkdir -p "$OUT"

has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))") || exit 1
if [[ "$has_cuda" != 1 || "${GPU_CHECK_FORCE_CPU:-0}" == 1 ]]; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): SKIPPING the GPU parts"
  echo "gpu_check: (cuda tests, kernel benchmark vs SDPA / FlexAttention, long-video benchmark at 16k-64k)."
  echo "gpu_check: CPU mode: collecting the cuda tests, one long-video smoke cell, and the summary table."
  "$PY" -m pytest --noconftest -q -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml "$OUT/cuda_tests.xml" || exit 1
  OMP_NUM_THREADS=1 "$PY" scripts/bench_long_video.py --smoke --cells forward --json "$OUT/long_video.jsonl" > "$OUT/long_video.log" 2>&1 || { cat "$OUT/long_video.log"; exit 1; }
  "$PY" scripts/gpu_check_summary.py "$OUT" --cpu-mode || exit 1
  echo "gpu_check: CPU mode done (GPU parts skipped)."
  exit 0
fi

unset TRITON_INTERPRET  # compiled Triton kernels on the GPU
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"
timeout 150 "$PY" -m pytest --noconftest -q -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml "$OUT/cuda_tests.xml" 2>&1 | tail -n 15
timeout 120 "$PY" scripts/bench_attention_stats.py --device cuda --lengths 16384,32768,65536 --methods sdpa,ours,flex \
  --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1 || echo "gpu_check: kernel benchmark failed or timed out (see $OUT/kernels.log)"
timeout 180 "$PY" scripts/bench_long_video.py --device cuda --lengths 16384,32768,65536 --repeats 3 --timeout 60 \
  --cells forward,forward_padded,cache_per_frame,knockout,hf_eager_attn --layers 4 --width 512 --max-gb 60 \
  --json "$OUT/long_video.jsonl" > "$OUT/long_video.log" 2>&1 || echo "gpu_check: long-video benchmark failed or timed out (see $OUT/long_video.log)"
"$PY" scripts/gpu_check_summary.py "$OUT"
