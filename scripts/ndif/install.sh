#!/usr/bin/env bash
# Install the real NDIF 0.1.2 server stack for hooked_vlm, CPU only, into its own venv.
#
#   bash scripts/ndif/install.sh            # venv at .venv-ndif (override with NDIF_VENV)
#
# What it installs:
#   * redis-server from Debian (apt), if no redis-server is on PATH;
#   * a Python 3.11 venv with CPU torch 2.13.0, ndif[api,ray]==0.1.2, nnsight==0.8.1 (pinned to
#     the client's version: the wire format is nnsight's own classes), moto[server] as the S3
#     store, and hooked-vlm itself (editable) so the server can import our Remotable and the
#     controller / model-actor extension classes.
# ndif declares Python >=3.12 but runs under 3.11; --ignore-requires-python allows it, and
# --only-binary=:all: keeps pip from building sdists (numpy<2.5: 2.5 has no 3.11 wheel).
# `torch==2.13.0` resolves to the local CPU wheel (pip find-links); an unpinned torch would pull a
# multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${NDIF_VENV:-$ROOT/.venv-ndif}"
PY="${NDIF_PYTHON:-$(command -v python3.11 || command -v python3)}"
t0=$(date +%s)
LOG="$(mktemp)"
# pip, with the noise of the machine's unreachable extra file:// indexes filtered out; keeps pip's
# exit status.
pipv() {
  local rc=0
  "$VENV/bin/python" -m pip "$@" >"$LOG" 2>&1 || rc=$?
  grep -v -e "^WARNING: Location" -e "BuildBackendWarning" "$LOG" | grep -E "ERROR|error:" || true
  [ "$rc" = 0 ] || { echo "[ndif-install] pip $* failed (rc=$rc); full log:" >&2; cat "$LOG" >&2; }
  return "$rc"
}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "[ndif-install] apt-get install redis-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  # Debian's package starts a system redis on 127.0.0.1:6379 where systemd runs; we run our own
  # inside the namespace, so a host-side one does not matter (different network namespace).
fi
command -v redis-server >/dev/null || { echo "redis-server missing after install" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pipv install -q --upgrade "pip>=24"
if ! "$VENV/bin/python" -c "import ndif, nnsight, torch, moto, ray" >/dev/null 2>&1; then
  echo "[ndif-install] pip install ndif stack into $VENV"
  # transformer-lens needs transformers-stream-generator, published only as an sdist (tiny, pure
  # Python): build it first, without its deps, so the main install can stay binary-only.
  pipv install -q --no-deps "transformers-stream-generator>=0.0.5,<0.1"
  pipv install -q --ignore-requires-python --only-binary=:all: \
    "numpy<2.5" "torch==2.13.0" "ndif[api,ray]==0.1.2" "nnsight==0.8.1" "moto[server]" \
    "transformers>=5.23,<6" "transformer-lens>=4.3,<5" "einops>=0.7" "jaxtyping>=0.2.28" \
    "safetensors>=0.4" "pillow>=10" "tqdm>=4.66" "pytest>=8"
fi
# anyio at the version the PYMOUNT workaround was checked with (scripts/ndif/gunicorn_conf.py).
pipv install -q "anyio==4.16.0"
echo "[ndif-install] pip install -e . (hooked-vlm) into $VENV"
pipv install -q --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for p in ["ndif", "nnsight", "torch", "ray", "moto", "transformers", "hooked-vlm"]:
    print(f"[ndif-install] {p}=={md.version(p)}")
import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__
assert md.version("nnsight") == "0.8.1"
# The >1 MiB body workaround: anyio's asyncio backend imported before nnsight works.
import anyio._backends._asyncio, nnsight, anyio, asyncio
assert asyncio.run(anyio.to_thread.run_sync(lambda: 1)) == 1
print("[ndif-install] anyio-before-nnsight import order: ok")
PY
echo "[ndif-install] done in $(( $(date +%s) - t0 )) s"
