#!/usr/bin/env bash
# CI entry point for the real-NDIF integration tests (called by .ci/run):
#
#   bash scripts/ndif/ci.sh
#
# 1. installs the NDIF server stack into .venv-ndif and redis-server via apt (scripts/ndif/install.sh);
# 2. runs tests/test_ndif_remote.py inside a fresh network namespace that has only `lo`
#    (`unshare -n`); the test fixture starts the whole stack there (scripts/ndif/start.sh) and stops
#    it afterwards, so nothing of it outlives this script and no packet can leave loopback;
# 3. prints the measured numbers (server start, first deploys, median round trip).
#
# Env: HOOKED_VLM_SKIP_NDIF=1 skips everything (reported as skipped, exit 0);
#      PYTHON: the client interpreter (default .venv/bin/python, else python3), which needs hooked-vlm
#      and nnsight==0.8.1 (pip install -e ".[dev]").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

if [ "${HOOKED_VLM_SKIP_NDIF:-0}" = "1" ]; then
  echo "[ndif-ci] HOOKED_VLM_SKIP_NDIF=1: real-NDIF integration tests skipped on request"
  exit 0
fi
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

t0=$(date +%s)
bash scripts/ndif/install.sh
t1=$(date +%s)
echo "[ndif-ci] install took $((t1 - t0)) s"

export HOOKED_VLM_NDIF_STATE="${HOOKED_VLM_NDIF_STATE:-/tmp/hvlm-ndif-ci}"
# root (CI) makes the namespace directly; anyone else through a user namespace (-r).
UNSHARE=(unshare -n)
[ "$(id -u)" = 0 ] || UNSHARE=(unshare -rn)
rc=0
"${UNSHARE[@]}" -- bash -c '
  ip link set lo up || exit 1
  rc=0
  "$0" -m pytest -q -p no:cacheprovider tests/test_ndif_remote.py "${@}" || rc=$?
  # The fixture stops the stack; this catches anything left should pytest have died.
  bash scripts/ndif/stop.sh >/dev/null 2>&1
  exit $rc
' "$PYTHON" "$@" || rc=$?

if [ -f "$HOOKED_VLM_NDIF_STATE/numbers.json" ]; then
  echo "[ndif-ci] measured: $(tr -d '\n ' <"$HOOKED_VLM_NDIF_STATE/numbers.json")"
fi
echo "[ndif-ci] install + start + tests took $(( $(date +%s) - t0 )) s (rc=$rc)"
exit "$rc"
