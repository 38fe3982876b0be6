#!/usr/bin/env bash
# The benchmark matrix of docs/BENCHMARKS.md. Every run gets a fresh hub (empty data directory)
# pinned to one CPU, and the load generator (`tidings bench`) pinned to another; each case runs
# REPEAT times. JSON reports and summary lines go to OUT; scripts/bench_medians.py tabulates them.
#
# Usage: ./scripts/bench.sh [OUT_DIR]
#   env: REPEAT=3  PORT=18181  HUB_CPU=0  LOAD_CPU=1  DATA=/tmp/bench-data
#        ONLY="substring …"   run only the cases whose name contains one of them
#                             (e.g. ONLY=fanout, ONLY="sweep- -redis")
#
# The comparison with the peers (scripts/peers.sh; each run gets a freshly started peer pinned
# to HUB_CPU, the load generator on LOAD_CPU, like the hub):
#        PEERS="nchan socketio redis"   which peers (PEERS="" for none)
#        SWEEP="1000 5000 10000 19000"  subscriber counts of the fanout sweep (Tidings WS and
#                                       every peer; cases sweep-SERVER-N)
#        SWEEP_DELIVERIES=600000        deliveries per sweep run: messages = this / N (≥ 20),
#                                       so a run takes ≲ 20 s at ≥ 30k deliveries/s
#        LAT_SUBS=1000 LAT_RATE=100 LAT_DURATION=10   the latency case of each peer
#        IDLE_N=19000                   idle connections (Tidings and each peer)
#        PLOT=path.png                  where scripts/plot_bench.py writes the plot (default
#                                       OUT/bench-plot.png; PLOT="" for none)
#
# "20k" is 19,000: every process here may hold 20,000 open files (the hard limit), and each
# connection is one file on both sides, plus the publisher's and the process's own. One load
# generator holds 19,000 subscribers (`check_open_files` keeps 256 files of headroom), so the
# sweep does not split the load over several processes (fanout's subscribers and publisher
# share one channel name, made unique per process, so it could not anyway).
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
# The job `tidings bench joblog` runs (src/bench/joblog.rs CONFIG_SNIPPET); it has no schedule,
# so it runs only when that scenario starts it.
cat >"$OUT/hub.toml" <<'TOML'
# tidings bench: no feeds, one job that runs only when `tidings bench joblog` starts it
[[jobs]]
name = "bench-joblog"
command = ["sh", "-c", "exec seq 1 \"$TIDINGS_PARAM_LINES\""]
params = ["lines"]
timeout = "10m"
TOML

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

# Whether case $1 is selected by ONLY (any of its space-separated substrings).
selected() {
  [ -z "${ONLY:-}" ] && return 0
  local want
  for want in $ONLY; do
    [[ "$1" == *"$want"* ]] && return 0
  done
  return 1
}

run_case() { # name sync-mode bench-arguments…
  local name=$1 sync=$2
  shift 2
  selected "$name" || return 0
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
# 8 source addresses: 10,000 connects per run leave 10,000 ports in TIME_WAIT, and a crowded port
# range makes the load generator's own connect() slow (the kernel searches for a free port).
run_case resume-ws10000 full resume --clients 10000 --backlog 100 --older 100 --transport ws --source-ips 8 --timeout 120
run_case joblog-500k-w10 full joblog --lines 500000 --viewers 10 --timeout 120

# Feeds: in-process (no hub), against Python feedparser on the same documents.
if selected feeds; then
  for i in $(seq "$REPEAT"); do
    wait_quiet
    ROUNDS=3 taskset -c "$LOAD_CPU" ./scripts/bench_feeds.sh >"$OUT/feeds.$i.txt" 2>&1 ||
      echo "feeds run $i failed (see $OUT/feeds.$i.txt)" >&2
    echo "feeds.$i: $(tail -n1 "$OUT/feeds.$i.txt")"
  done
fi

# --- Peers -----------------------------------------------------------------------------------
PEERS=${PEERS-nchan socketio redis}
SWEEP=${SWEEP:-1000 5000 10000 19000}
SWEEP_DELIVERIES=${SWEEP_DELIVERIES:-600000}
LAT_SUBS=${LAT_SUBS:-1000}
LAT_RATE=${LAT_RATE:-100}
LAT_DURATION=${LAT_DURATION:-10}
IDLE_N=${IDLE_N:-19000}
# More connections than one source address comfortably has ephemeral ports for, run after run
# (TIME_WAIT): idle spreads its client side over 127.0.0.2…
IDLE_SOURCE_IPS=${IDLE_SOURCE_IPS:-4}

peer_running=""
stop_peer() {
  if [ -n "$peer_running" ]; then
    ./scripts/peers.sh stop "$peer_running" >/dev/null 2>&1 || true
    peer_running=""
  fi
}
trap 'stop_hub; stop_peer' EXIT

peer_port() {
  case $1 in nchan) echo 8091 ;; socketio) echo 8092 ;; redis) echo 8093 ;; esac
}

run_peer_case() { # name peer bench-arguments…
  local name=$1 peer=$2
  shift 2
  selected "$name" || return 0
  local port
  port=$(peer_port "$peer")
  for i in $(seq "$REPEAT"); do
    wait_quiet
    if ! PEER_CPU=$HUB_CPU ./scripts/peers.sh start "$peer" "$port" 2>>"$OUT/peers.log"; then
      echo "$name.$i: $peer did not start (see $OUT/peers.log); skipped" >&2
      continue
    fi
    peer_running=$peer
    sleep 1
    cat /proc/loadavg >"$OUT/$name.$i.loadavg"
    if ! taskset -c "$LOAD_CPU" "$BIN" --server "http://127.0.0.1:$port" bench "$@" --peer "$peer" \
      --server-pid "$(./scripts/peers.sh pid "$peer")" >"$OUT/$name.$i.json" 2>"$OUT/$name.$i.txt"; then
      echo "$name run $i was incomplete:" >&2
    fi
    echo "$name.$i: $(head -n1 "$OUT/$name.$i.txt")"
    stop_peer
  done
}

sweep_messages() { # subscribers
  local m=$((SWEEP_DELIVERIES / $1))
  echo $((m < 20 ? 20 : m))
}

# The subscriber-count sweep: one closed-loop publisher (as fanout-ws1000-max), N subscribers.
for n in $SWEEP; do
  run_case "sweep-tidings-ws$n" full fanout --subscribers "$n" --messages "$(sweep_messages "$n")" \
    --size 100 --timeout 120
done
run_case "idle-tidings-ws$IDLE_N" full idle --connections "$IDLE_N" --source-ips "$IDLE_SOURCE_IPS" \
  --hold 5 --timeout 120
for peer in $PEERS; do
  for n in $SWEEP; do
    run_peer_case "sweep-$peer-$n" "$peer" fanout --subscribers "$n" \
      --messages "$(sweep_messages "$n")" --size 100 --timeout 120
  done
  run_peer_case "latency-$peer-s$LAT_SUBS-r$LAT_RATE" "$peer" latency --subscribers "$LAT_SUBS" \
    --rate "$LAT_RATE" --duration "$LAT_DURATION" --size 100 --timeout 60
  run_peer_case "idle-$peer-n$IDLE_N" "$peer" idle --connections "$IDLE_N" \
    --source-ips "$IDLE_SOURCE_IPS" --hold 5 --timeout 120
done

PLOT=${PLOT-$OUT/bench-plot.png}
if [ -n "$PLOT" ]; then
  ./scripts/plot_bench.py "$OUT" "$PLOT" || echo "plotting failed (see above)" >&2
fi
echo "results in $OUT"
