#!/usr/bin/env bash
# Start the real NDIF 0.1.2 server stack (CPU only) serving hooked_vlm models, all on 127.0.0.1.
#
# Run it INSIDE a network namespace that has only the loopback interface, together with the
# clients that talk to it; it refuses to run anywhere else:
#
#   unshare -n -- bash -c 'bash scripts/ndif/start.sh && <client commands> ; bash scripts/ndif/stop.sh'
# or, for an interactive session that outlives one command tree:
#   ip netns add hvlm-ndif
#   ip netns exec hvlm-ndif bash scripts/ndif/start.sh
#   ip netns exec hvlm-ndif .venv/bin/python my_experiment.py     # NDIF_HOST=http://127.0.0.1:8001
#   ip netns exec hvlm-ndif bash scripts/ndif/stop.sh
#
# Order: redis (queue, pub/sub) -> moto (S3 object store, stands in for rustfs) -> Ray head with a
# declared (fake) GPU -> ndif controller actor (our CPUControllerActor) -> gunicorn API (with the
# queue dispatcher). Then polls /connected until the API reaches Ray. Prints the start time.
# Logs and PIDs go to $HOOKED_VLM_NDIF_STATE (default /tmp/hvlm-ndif). Stop with stop.sh, run in
# the same namespace (it ends every process of the namespace but its own callers).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if ! ndif_loopback_only; then
  echo "[ndif] refusing to start: this network namespace has interfaces besides lo" >&2
  echo "[ndif] run it as: unshare -n -- bash -c 'bash scripts/ndif/start.sh && ...'" >&2
  exit 2
fi
if [ ! -x "$NDIF_VENV/bin/ndif" ]; then
  echo "[ndif] no NDIF install at $NDIF_VENV: run bash scripts/ndif/install.sh" >&2
  exit 2
fi
ip link set lo up 2>/dev/null || true
# An API key is required beyond loopback (anyone reaching the API runs code on this machine).
if ! bind_error=$(python3 -c "import os, runpy; g = runpy.run_path('$NDIF_ROOT/hooked_vlm/nnsight_ext/ndif_guard.py'); g['check_bind'](os.environ['NDIF_API_HOST'], os.environ.get(g['API_KEY_ENV']))" 2>&1); then
  printf '%s\n' "$bind_error" | tail -n 1 >&2
  exit 2
fi

t0=$(date +%s.%N)
STATE="$HOOKED_VLM_NDIF_STATE"
if [ -d "$STATE/pids" ] && ls "$STATE"/pids/* >/dev/null 2>&1; then
  echo "[ndif] a previous stack left PIDs in $STATE/pids; stopping it first"
  bash "$(dirname "${BASH_SOURCE[0]}")/stop.sh" || true
fi
# Redis (append-only file) and the object store (snapshot taken by stop.sh) persist under $STATE, so
# results and pending jobs survive a restart. HOOKED_VLM_NDIF_FRESH=1 wipes them first.
if [ "${HOOKED_VLM_NDIF_FRESH:-0}" = "1" ]; then
  echo "[ndif] HOOKED_VLM_NDIF_FRESH=1: wiping $STATE (results, pending jobs, credentials)"
  rm -rf "$STATE"
  unset NDIF_REDIS_PASSWORD NDIF_OBJECT_STORE_ACCESS_KEY NDIF_OBJECT_STORE_SECRET_KEY RAY_AUTH_TOKEN
  source "$(dirname "${BASH_SOURCE[0]}")/env.sh"   # new credentials
fi
rm -rf "$NDIF_RAY_TEMP_DIR" "$STATE/logs"   # Ray's sessions and old logs are per run
mkdir -p "$STATE/logs" "$STATE/pids" "$STATE/redis" "$STATE/s3" "$NDIF_RAY_TEMP_DIR"
export PATH="$NDIF_VENV/bin:$PATH"
export VIRTUAL_ENV="$NDIF_VENV"
cd "$STATE"   # ndif and gunicorn read a .env from the working directory; keep it ours

spawn() {  # name, command... : detached in its own session, PID recorded
  local name="$1"; shift
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/pids/$name"
}

wait_port() {  # port, seconds, name
  local deadline=$(( $(date +%s) + $2 ))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "[ndif] $3 did not open 127.0.0.1:$1 within $2 s; log:" >&2
      tail -n 30 "$STATE/logs/$3.log" >&2 || true
      exit 1
    fi
    sleep 0.2
  done
}

echo "[ndif] redis on 127.0.0.1:$NDIF_REDIS_PORT"
ndif_start_redis
echo "[ndif] moto S3 on 127.0.0.1:$NDIF_S3_PORT"
spawn s3 moto_server -H 127.0.0.1 -p "$NDIF_S3_PORT"
wait_port "$NDIF_REDIS_PORT" 30 redis
wait_port "$NDIF_S3_PORT" 60 s3
python "$NDIF_ROOT/scripts/ndif/s3_snapshot.py" restore "$STATE/s3" \
  || { echo "[ndif] restoring the object store from $STATE/s3 failed" >&2; exit 1; }

# The cluster only places models on nodes with a GPU resource, sized by cuda_memory_bytes. Declare
# one (bookkeeping only: the CPU model actor never touches a device). Logical CPUs are declared
# above the real 2 so the controller and model actors (1 CPU each) never wait for one.
CPU_MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 1024 ))
RESOURCES="{\"head\": 10, \"cuda_memory_bytes\": ${NDIF_FAKE_GPU_BYTES:-8000000000}, \"cpu_memory_bytes\": $CPU_MEM}"
echo "[ndif] ray head on 127.0.0.1:$NDIF_RAY_HEAD_PORT (client :$NDIF_RAY_CLIENT_PORT), resources $RESOURCES"
RAY_ADDRESS= ray start --head --disable-usage-stats \
  --node-ip-address=127.0.0.1 --port="$NDIF_RAY_HEAD_PORT" \
  --ray-client-server-port="$NDIF_RAY_CLIENT_PORT" \
  --num-cpus="${NDIF_RAY_NUM_CPUS:-8}" --num-gpus=1 --resources="$RESOURCES" \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$NDIF_RAY_DASHBOARD_PORT" \
  --temp-dir="$NDIF_RAY_TEMP_DIR" >"$STATE/logs/ray.log" 2>&1 \
  || { echo "[ndif] ray start failed:" >&2; tail -n 40 "$STATE/logs/ray.log" >&2; exit 1; }

echo "[ndif] controller ($NDIF_CONTROLLER_IMPORT_PATH, actor $NDIF_MODEL_IMPORT_PATH)"
RAY_ADDRESS="127.0.0.1:$NDIF_RAY_HEAD_PORT" python -m ndif.services.ray.deployments.controller.controller \
  >"$STATE/logs/controller.log" 2>&1 \
  || { echo "[ndif] controller launch failed:" >&2; tail -n 40 "$STATE/logs/controller.log" >&2; exit 1; }

echo "[ndif] API (gunicorn) on $NDIF_API_HOST:$NDIF_API_PORT (cap ${HOOKED_VLM_NDIF_MAX_REQUEST_MB} MiB, timeout ${NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS} s, API key $([ -n "${HOOKED_VLM_NDIF_API_KEY:-}" ] && echo required || echo "off: loopback only"))"
HOOKED_VLM_NDIF_BOOT_ID="$(python -c 'import uuid; print(uuid.uuid4().hex)')"
export HOOKED_VLM_NDIF_BOOT_ID
spawn api gunicorn --config "$NDIF_ROOT/scripts/ndif/gunicorn_conf.py" hooked_vlm.nnsight_ext.ndif_api:app

deadline=$(( $(date +%s) + ${NDIF_START_TIMEOUT:-240} ))
KEY_HEADER=(); [ -n "${HOOKED_VLM_NDIF_API_KEY:-}" ] && KEY_HEADER=(-H "ndif-api-key: $HOOKED_VLM_NDIF_API_KEY")
until [ "$(curl -s -o /dev/null -w '%{http_code}' "${KEY_HEADER[@]}" "$NDIF_API_URL/connected" 2>/dev/null)" = "200" ]; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "[ndif] API not connected to Ray after ${NDIF_START_TIMEOUT:-240} s; api log:" >&2
    tail -n 40 "$STATE/logs/api.log" >&2 || true
    exit 1
  fi
  if ! kill -0 "$(cat "$STATE/pids/api")" 2>/dev/null; then
    echo "[ndif] API exited; log:" >&2; tail -n 40 "$STATE/logs/api.log" >&2; exit 1
  fi
  sleep 0.5
done
elapsed=$(python -c "import time; print(f'{time.time() - $t0:.1f}')")
echo "$elapsed" >"$STATE/start_seconds"
echo "[ndif] up: $NDIF_API_URL/connected after ${elapsed} s (logs in $STATE/logs)"
