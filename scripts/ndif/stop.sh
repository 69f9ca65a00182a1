#!/usr/bin/env bash
# Stop the NDIF stack that start.sh started.
#
# The stack lives in its own network namespace (start.sh refuses to run outside a loopback-only
# one), and every process in that namespace belongs to it or to its clients. Ray and redis rename
# their processes (which also overwrites what /proc shows of their environment) and Ray's daemons
# are re-parented to init, so neither a process tree nor an environment tag finds them all; the
# namespace does. This script ends, by PID, every process in its own network namespace except
# itself and its ancestors (the shell or test process that called it): SIGTERM, then SIGKILL
# after a grace period. It refuses to run in a namespace with any interface besides lo, so it can
# never touch processes of the host namespace.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if ! ndif_loopback_only; then
  echo "[ndif] refusing: stop.sh runs inside the stack's loopback-only network namespace" >&2
  echo "[ndif] (e.g. ip netns exec hvlm-ndif bash scripts/ndif/stop.sh)" >&2
  exit 2
fi
ours="$(readlink /proc/self/ns/net)"

keep=" "
p=$$
while [ -n "$p" ] && [ "$p" != "0" ]; do
  keep="$keep$p "
  p="$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null)"
done

stack_pids() {
  local pid
  for dir in /proc/[0-9]*; do
    pid="${dir#/proc/}"
    case "$keep" in *" $pid "*) continue ;; esac
    [ "$pid" = "$BASHPID" ] && continue
    [ "$(readlink "$dir/ns/net" 2>/dev/null)" = "$ours" ] || continue
    # Kernel threads and processes already gone have no exe; skip them.
    [ -e "$dir/exe" ] || continue
    echo "$pid"
  done
}

# Keep the object store's contents (moto holds them in memory) for the next start.sh.
if (exec 3<>"/dev/tcp/127.0.0.1/$NDIF_S3_PORT") 2>/dev/null && [ -x "$NDIF_VENV/bin/python" ]; then
  timeout 120 "$NDIF_VENV/bin/python" "$NDIF_ROOT/scripts/ndif/s3_snapshot.py" save "$HOOKED_VLM_NDIF_STATE/s3" \
    || echo "[ndif] warning: could not snapshot the object store; results stored there will be lost" >&2
fi

pids="$(stack_pids | tr '\n' ' ')"
if [ -z "${pids// /}" ]; then
  echo "[ndif] nothing to stop in this namespace"
else
  echo "[ndif] stopping $(echo $pids | wc -w) processes"
  kill -TERM $pids 2>/dev/null || true
  alive=""
  for _ in $(seq 1 40); do
    alive=""
    for p in $pids; do [ -e "/proc/$p" ] && [ "$(awk '/^State:/ {print $2}' "/proc/$p/status" 2>/dev/null)" != "Z" ] && alive="$alive $p"; done
    [ -z "$alive" ] && break
    sleep 0.25
  done
  if [ -n "$alive" ]; then
    echo "[ndif] SIGKILL to$alive"
    kill -KILL $alive 2>/dev/null || true
  fi
fi
rm -f "$HOOKED_VLM_NDIF_STATE"/pids/* 2>/dev/null || true
