#!/usr/bin/env bash
# Two Tidings nodes on one redis-server (all on loopback), against one embedded node, in the
# same run: publish throughput, and fan-out where subscribers are on node A and the publisher
# on node B (every delivery crossed Redis pub/sub). Nothing is pinned: four processes share
# the machine's cores, so compare the rows of one run, not runs of different days.
#
# Usage: ./scripts/bench_cluster.sh [OUT_DIR]      env: REPEAT=3 BASE_PORT=18300
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-target/bench-results/cluster-$(date -u +%Y%m%dT%H%M%SZ)}
REPEAT=${REPEAT:-3}
BASE=${BASE_PORT:-18300}
BIN=./target/release/tidings
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cargo build --release --quiet
command -v redis-server >/dev/null || { echo "redis-server is missing (scripts/test.sh installs it)" >&2; exit 1; }
printf '# bench: no jobs, no feeds\n' >"$OUT/hub.toml"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
trap cleanup EXIT

wait_http() { for _ in $(seq 100); do curl -fs "$1/healthz" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

start_redis() {
  rm -rf "$OUT/redis" && mkdir -p "$OUT/redis"
  redis-server --port "$((BASE + 9))" --bind 127.0.0.1 --save "" --appendonly no --dir "$OUT/redis" \
    --logfile "$OUT/redis/log" --daemonize no >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$((BASE + 9))" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "redis-server did not start" >&2; exit 1
}

start_node() { # port engine
  rm -rf "$OUT/data-$1"
  "$BIN" serve --config "$OUT/hub.toml" --listen "127.0.0.1:$1" --data "$OUT/data-$1" --engine "$2" \
    >>"$OUT/node-$1.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$1"
}

run() { # name server bench-args…
  local name=$1 server=$2; shift 2
  for i in $(seq "$REPEAT"); do
    if ! "$BIN" --server "$server" bench "$@" >"$OUT/$name.$i.json" 2>"$OUT/$name.$i.txt"; then
      echo "$name run $i was incomplete" >&2
    fi
    echo "$name.$i: $(head -n1 "$OUT/$name.$i.txt")"
  done
}

A="http://127.0.0.1:$BASE" B="http://127.0.0.1:$((BASE + 1))"

if [ -z "${SKIP_EMBEDDED:-}" ]; then
# One embedded node.
start_node "$BASE" embedded
run embedded-publish-c16 "$A" publish --concurrency 16 --messages 20000 --size 100
run embedded-fanout-paced "$A" fanout --subscribers 100 --messages 3000 --size 100 --rate 1000 --timeout 120
run embedded-fanout-max "$A" fanout --subscribers 100 --messages 5000 --size 100 --timeout 120
cleanup
fi

# Two Redis nodes: subscribers on A, publisher on B.
start_redis
R="redis://127.0.0.1:$((BASE + 9))/0"
start_node "$BASE" "$R"
start_node "$((BASE + 1))" "$R"
run redis-publish-c16 "$B" publish --concurrency 16 --messages 20000 --size 100
run redis-fanout-paced "$A" fanout --subscribers 100 --messages 3000 --size 100 --rate 1000 --publish-server "$B" --timeout 120
run redis-fanout-max "$A" fanout --subscribers 100 --messages 5000 --size 100 --publish-server "$B" --timeout 120
echo "results in $OUT"
