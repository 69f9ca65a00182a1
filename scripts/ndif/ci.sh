#!/usr/bin/env bash
# CI entry point for the real-NDIF integration tests (called by .ci/run):
#
#   bash scripts/ndif/ci.sh
#
# 1. installs the NDIF server stack into .venv-ndif and redis-server via apt (scripts/ndif/install.sh);
# 2. inside a fresh network namespace that has only `lo` (`unshare -n`): starts the stack with fresh
#    state (scripts/ndif/start.sh), runs tests/test_ndif_remote.py against it, then the fault suite
#    (scripts/ndif/faults.py: actor kill, Redis restart, stack restart with pending jobs, oversized and
#    malformed requests, a long job), and stops it, so nothing outlives this script and no packet
#    can leave loopback;
# 3. prints the measured numbers (server start, first deploys, median round trip).
#
# Env: HOOKED_VLM_SKIP_NDIF=1 skips everything (reported as skipped, exit 0);
#      HOOKED_VLM_NDIF_FAULTS=0 leaves out the fault suite;
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

# A state folder per checkout (two checkouts on one machine never share one), short for Ray's sockets.
# One this script chose is removed after a passing run (a failed run keeps it: its logs say why).
[ -n "${HOOKED_VLM_NDIF_STATE:-}" ] && OWN_STATE=0 || OWN_STATE=1
export HOOKED_VLM_NDIF_STATE="${HOOKED_VLM_NDIF_STATE:-/tmp/hvlm-ndif-ci-$(printf %s "$ROOT" | md5sum | cut -c1-8)}"
# The stack under test: an API key (so the key check is exercised), a 64 MiB request cap and a 15 s
# execution timeout (small, so the cap and the timeout are tested quickly; defaults are 512 MiB / 300 s).
export HOOKED_VLM_NDIF_API_KEY="${HOOKED_VLM_NDIF_API_KEY:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"
export HOOKED_VLM_NDIF_MAX_REQUEST_MB="${HOOKED_VLM_NDIF_MAX_REQUEST_MB:-64}"
export NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS="${NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS:-15}"
export HOOKED_VLM_NDIF_URL="http://127.0.0.1:${NDIF_API_PORT:-8001}"
# root (CI) makes the namespace directly; anyone else through a user namespace (-r).
UNSHARE=(unshare -n)
[ "$(id -u)" = 0 ] || UNSHARE=(unshare -rn)
rc=0
"${UNSHARE[@]}" -- bash -c '
  ip link set lo up || exit 1
  PYTHON="$0"; shift
  rc=0
  echo "[ndif-ci] starting the stack (fresh state in $HOOKED_VLM_NDIF_STATE)"
  if HOOKED_VLM_NDIF_FRESH=1 bash scripts/ndif/start.sh; then
    echo "[ndif-ci] remote tests: tests/test_ndif_remote.py"
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ndif_remote.py "$@" || rc=$?
    if [ "${HOOKED_VLM_NDIF_FAULTS:-1}" = "1" ]; then
      echo "[ndif-ci] fault suite: scripts/ndif/faults.py"
      "$PYTHON" scripts/ndif/faults.py --out "$HOOKED_VLM_NDIF_STATE/faults.json" || rc=$?
    fi
  else
    rc=1
  fi
  # Nothing of the stack outlives this namespace.
  bash scripts/ndif/stop.sh >/dev/null 2>&1
  exit $rc
' "$PYTHON" "$@" || rc=$?

if [ -f "$HOOKED_VLM_NDIF_STATE/start_seconds" ]; then
  echo "[ndif-ci] last server start took $(cat "$HOOKED_VLM_NDIF_STATE/start_seconds") s"
fi
if [ -f "$HOOKED_VLM_NDIF_STATE/numbers.json" ]; then
  echo "[ndif-ci] measured: $(tr -d '\n ' <"$HOOKED_VLM_NDIF_STATE/numbers.json")"
fi
echo "[ndif-ci] install + start + tests + faults took $(( $(date +%s) - t0 )) s (rc=$rc)"
if [ "$rc" = 0 ] && [ "$OWN_STATE" = 1 ]; then
  rm -rf "$HOOKED_VLM_NDIF_STATE"
else
  echo "[ndif-ci] state, logs and Ray's files kept in $HOOKED_VLM_NDIF_STATE"
fi
exit "$rc"
