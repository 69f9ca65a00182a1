# Shared settings for the hooked_vlm NDIF scripts (sourced, not run).
#
# Every endpoint is on 127.0.0.1. The scripts refuse to start unless they run inside a network
# namespace whose only interface is `lo` (see start.sh), so no traffic can reach another address.

NDIF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export NDIF_VENV="${NDIF_VENV:-$NDIF_ROOT/.venv-ndif}"
# Short path: Ray puts unix sockets under its temp dir (107-byte limit).
export HOOKED_VLM_NDIF_STATE="${HOOKED_VLM_NDIF_STATE:-/tmp/hvlm-ndif}"

# Credentials: generated once per state folder (mode 0600) unless given. Redis requires its
# password; moto's S3 accepts any keys (a real S3 store would check them: see README "Trust model").
ndif_secret() {  # name -> a random hex secret kept in $HOOKED_VLM_NDIF_STATE/secrets/name
  local file="$HOOKED_VLM_NDIF_STATE/secrets/$1"
  if [ ! -s "$file" ]; then
    mkdir -p "$HOOKED_VLM_NDIF_STATE/secrets" && chmod 700 "$HOOKED_VLM_NDIF_STATE/secrets"
    (umask 077; od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$file")
  fi
  cat "$file"
}
export NDIF_API_HOST="${NDIF_API_HOST:-127.0.0.1}"
export NDIF_API_PORT="${NDIF_API_PORT:-8001}"
export NDIF_API_URL="http://127.0.0.1:${NDIF_API_PORT}"
export NDIF_REDIS_PORT="${NDIF_REDIS_PORT:-6379}"
export NDIF_REDIS_PASSWORD="${NDIF_REDIS_PASSWORD:-$(ndif_secret redis)}"
# health_check_interval: a pooled connection idle for over 1 s is PINGed before use and replaced if
# dead, so the first requests after a Redis restart do not fail on stale connections.
export NDIF_REDIS_URL="redis://:${NDIF_REDIS_PASSWORD}@127.0.0.1:${NDIF_REDIS_PORT}/0?health_check_interval=1"
export NDIF_S3_PORT="${NDIF_S3_PORT:-9000}"
export NDIF_OBJECT_STORE_URL="http://127.0.0.1:${NDIF_S3_PORT}"
export NDIF_OBJECT_STORE_ACCESS_KEY="${NDIF_OBJECT_STORE_ACCESS_KEY:-hvlm-$(ndif_secret s3-access | cut -c1-12)}"
export NDIF_OBJECT_STORE_SECRET_KEY="${NDIF_OBJECT_STORE_SECRET_KEY:-$(ndif_secret s3-secret)}"
export NDIF_RAY_HEAD_PORT="${NDIF_RAY_HEAD_PORT:-6385}"
export NDIF_RAY_CLIENT_PORT="${NDIF_RAY_CLIENT_PORT:-10001}"
export NDIF_RAY_DASHBOARD_PORT="${NDIF_RAY_DASHBOARD_PORT:-8265}"
export NDIF_RAY_ADDRESS="ray://127.0.0.1:${NDIF_RAY_CLIENT_PORT}"
export NDIF_RAY_TEMP_DIR="$HOOKED_VLM_NDIF_STATE/ray"

# Extension points: our controller (nnsight 0.8.1 keyword fix) and CPU model actor.
export NDIF_CONTROLLER_IMPORT_PATH="hooked_vlm.nnsight_ext.ndif_server.CPUControllerActor"
export NDIF_MODEL_IMPORT_PATH="hooked_vlm.nnsight_ext.ndif_server.CPUModelActor"
export NDIF_DEFAULT_MODEL_ACTOR_CLASS="$NDIF_MODEL_IMPORT_PATH"
# fp32 so remote values equal local ones; no padding of the (fake) GPU budget; deployments may be
# evicted at once; no hub.
export NDIF_DEFAULT_DTYPE="${NDIF_DEFAULT_DTYPE:-float32}"
export NDIF_DEFAULT_PADDING_BIAS="${NDIF_DEFAULT_PADDING_BIAS:-0}"
export NDIF_MINIMUM_DEPLOYMENT_TIME_SECONDS="${NDIF_MINIMUM_DEPLOYMENT_TIME_SECONDS:-0}"
# Limits (README "Limits"): request-body cap (MiB), per-request execution timeout (s), and the
# autoscaler that starts a second replica when the queue head waits (a long job does not block
# short ones for longer than threshold + one deploy).
export HOOKED_VLM_NDIF_MAX_REQUEST_MB="${HOOKED_VLM_NDIF_MAX_REQUEST_MB:-512}"
export NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS="${NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS:-300}"
export NDIF_AUTOSCALING_INTERVAL_S="${NDIF_AUTOSCALING_INTERVAL_S:-1}"
export NDIF_AUTOSCALING_WAIT_THRESHOLD_S="${NDIF_AUTOSCALING_WAIT_THRESHOLD_S:-2}"
export NDIF_AUTOSCALING_BACKOFF_S="${NDIF_AUTOSCALING_BACKOFF_S:-10}"
export NDIF_AUTOSCALING_MAX_REPLICAS="${NDIF_AUTOSCALING_MAX_REPLICAS:-2}"
# The dispatcher re-checks the ray:connected flag once per idle fetch (recovery after a Redis restart).
export NDIF_QUEUE_FETCH_TIMEOUT_S="${NDIF_QUEUE_FETCH_TIMEOUT_S:-2}"
export GRPC_ENABLE_FORK_SUPPORT=0
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export RAY_USAGE_STATS_ENABLED=0
# Ray 2.60 turns on token auth and by default keeps the token in ~/.ray/auth_token, one file shared by
# every Ray cluster of the user: another stack on the machine replaced it and our restarted controller
# was refused (InvalidAuthToken). Each stack gets its own token instead, from its state folder.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN="${RAY_AUTH_TOKEN:-$(ndif_secret ray-token)}"
export HOOKED_VLM_NDIF_THREADS="${HOOKED_VLM_NDIF_THREADS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# Start redis (persistent: append-only file under $STATE/redis; password from secrets). Used by
# start.sh and by faults.py's Redis-restart check.
ndif_start_redis() {
  mkdir -p "$HOOKED_VLM_NDIF_STATE/redis" "$HOOKED_VLM_NDIF_STATE/logs" "$HOOKED_VLM_NDIF_STATE/pids"
  setsid redis-server --bind 127.0.0.1 --port "$NDIF_REDIS_PORT" --save "" \
    --appendonly yes --appendfsync everysec --dir "$HOOKED_VLM_NDIF_STATE/redis" \
    --requirepass "$NDIF_REDIS_PASSWORD" --protected-mode yes --daemonize no \
    >>"$HOOKED_VLM_NDIF_STATE/logs/redis.log" 2>&1 </dev/null &
  echo $! >"$HOOKED_VLM_NDIF_STATE/pids/redis"
}

# True when this process's network namespace has no interface but `lo`.
ndif_loopback_only() {
  local ifaces
  ifaces="$(awk -F: 'NR>2 {gsub(/ /, "", $1); print $1}' /proc/self/net/dev | sort -u | tr '\n' ' ')"
  [ "$ifaces" = "lo " ]
}
