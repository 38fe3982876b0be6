#!/usr/bin/env bash
# The benchmark matrix of docs/BENCHMARKS.md. Every run gets a fresh hub (empty data directory)
# pinned to one CPU, and the load generator (`tidings bench`) pinned to another; each case runs
# REPEAT times. JSON reports and summary lines go to OUT; scripts/bench_medians.py tabulates them.
#
# Usage: ./scripts/bench.sh [OUT_DIR]
#   env: REPEAT=3  PORT=18181  HUB_CPU=0  LOAD_CPU=1  DATA=/tmp/bench-data
#        ONLY=substring   run only the cases whose name contains it (e.g. ONLY=fanout)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
REPEAT=${REPEAT:-3}
PORT=${PORT:-18181}
HUB_CPU=${HUB_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
DATA=${DATA:-/tmp/bench-data}
BIN=./target/release/tidings
export RUST_BACKTRACE=0

mkdir -p "$OUT"
cargo build --release --quiet
{ git rev-parse HEAD; git status --short; } >"$OUT/commit.txt" 2>/dev/null || true
# An empty configuration: without any file the hub starts its demo job and feed poller, which
# would run (and publish) during the measurements.
printf '# tidings bench: no jobs, no feeds, defaults otherwise\n' >"$OUT/hub.toml"

hub_pid=""
stop_hub() {
  if [ -n "$hub_pid" ]; then
    kill "$hub_pid" 2>/dev/null || true
    wait "$hub_pid" 2>/dev/null || true
    hub_pid=""
  fi
}
trap stop_hub EXIT

start_hub() { # $1: sync mode (full|normal)
  rm -rf "$DATA"
  TIDINGS__SERVER__SYNC="$1" taskset -c "$HUB_CPU" "$BIN" serve --config "$OUT/hub.toml" --listen "127.0.0.1:$PORT" --data "$DATA" \
    >>"$OUT/hub.log" 2>&1 &
  hub_pid=$!
  for _ in $(seq 100); do
    if curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  echo "the hub did not start; see $OUT/hub.log" >&2
  exit 1
}

# Waits (up to QUIET_WAIT seconds, default 120) until the machine is idle: less than 0.15 of a
# core busy over one second. Other processes on a small machine move the numbers a lot; each
# report's `machine_busy` shows how much else ran during the run anyway.
wait_quiet() {
  local deadline=$((SECONDS + ${QUIET_WAIT:-120}))
  while [ $SECONDS -lt $deadline ]; do
    local a b
    a=$(head -n1 /proc/stat)
    sleep 1
    b=$(head -n1 /proc/stat)
    if awk -v a="$a" -v b="$b" 'BEGIN {
        split(a, x); split(b, y); busy = 0; total = 0
        for (i = 2; i <= 9; i++) { d = y[i] - x[i]; total += d; if (i != 5 && i != 6) busy += d }
        exit !(total > 0 && busy / total * 2 < 0.15) }'; then
      return 0
    fi
  done
  echo "the machine did not become idle; measuring anyway" >&2
}

run_case() { # name sync-mode bench-arguments…
  local name=$1 sync=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [[ "$name" != *"$ONLY"* ]]; then
    return 0
  fi
  for i in $(seq "$REPEAT"); do
    wait_quiet
    start_hub "$sync"
    sleep 1
    cat /proc/loadavg >"$OUT/$name.$i.loadavg"
    if ! taskset -c "$LOAD_CPU" "$BIN" --server "http://127.0.0.1:$PORT" bench "$@" --server-pid "$hub_pid" \
      >"$OUT/$name.$i.json" 2>"$OUT/$name.$i.txt"; then
      echo "$name run $i was incomplete:" >&2
    fi
    echo "$name.$i: $(head -n1 "$OUT/$name.$i.txt")"
    stop_hub
  done
}

run_case publish-c1-full full publish --concurrency 1 --messages 10000 --size 100
run_case publish-c64-full full publish --concurrency 64 --messages 100000 --size 100
run_case publish-c1-normal normal publish --concurrency 1 --messages 40000 --size 100
run_case publish-c64-normal normal publish --concurrency 64 --messages 100000 --size 100
run_case fanout-ws1000-max full fanout --subscribers 1000 --messages 2000 --size 100 --timeout 120
run_case fanout-ws1000-paced100 full fanout --subscribers 1000 --messages 1000 --size 100 --rate 100 --timeout 120
run_case fanout-sse100-max full fanout --transport sse --subscribers 100 --messages 5000 --size 100 --timeout 120
# One closed-loop publisher bounds the case above (its ack latency); four show the hub's capacity.
run_case fanout-sse100-max-4pub full fanout --transport sse --subscribers 100 --messages 10000 --size 100 --publishers 4 --timeout 120
run_case webhooks-16ch full webhooks --messages 20000 --channels 16 --size 100 --timeout 120
run_case webhooks-1ch full webhooks --messages 5000 --channels 1 --size 100 --timeout 120
# Hub memory per idle subscribed WebSocket (each on its own channel), and all still answering.
run_case idle-ws1000 full idle --connections 1000 --hold 5 --timeout 60
# The latency definition: 1,000 subscribers, one channel, 100 msg/s for 10 s.
run_case latency-ws1000-r100 full latency --subscribers 1000 --rate 100 --duration 10 --size 100 --timeout 60
run_case channels-1000x10 full channels --channels 1000 --rounds 10 --size 100 --publishers 16 --timeout 120
# 1,000 clients at once, each catching up on the last 100 messages of one channel.
run_case resume-sse1000 full resume --clients 1000 --backlog 100 --older 100 --transport sse --timeout 120
run_case resume-ws1000 full resume --clients 1000 --backlog 100 --older 100 --transport ws --timeout 120

echo "results in $OUT"
