#!/usr/bin/env bash
# Feed entries/s: `tidings bench feeds` (parse only, and parse + dedupe + store) against Python
# feedparser (parse only) on the same documents. Installs feedparser into target/pyvenv once.
#
# Usage: ./scripts/bench_feeds.sh [CORPUS_DIR] [extra `tidings bench feeds` options…]
#   env: ROUNDS=3  LIMIT=  (first N documents only)
set -euo pipefail
cd "$(dirname "$0")/.."

CORPUS=${1:-../shared/feed-corpus}
shift || true
ROUNDS=${ROUNDS:-3}
LIMIT_ARGS=()
if [ -n "${LIMIT:-}" ]; then LIMIT_ARGS=(--limit "$LIMIT"); fi
VENV=target/pyvenv

if ! "$VENV/bin/python" -c 'import feedparser' >/dev/null 2>&1; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet feedparser
fi
cargo build --release --quiet

tidings=$(./target/release/tidings bench feeds --corpus "$CORPUS" --rounds "$ROUNDS" "${LIMIT_ARGS[@]}" "$@")
python=$("$VENV/bin/python" scripts/feedparser_bench.py --corpus "$CORPUS" --rounds "$ROUNDS" "${LIMIT_ARGS[@]}")
echo "tidings:    $tidings"
echo "feedparser: $python"
TIDINGS_JSON=$tidings PY_JSON=$python python3 - <<'PY'
import json, os
t = json.loads(os.environ["TIDINGS_JSON"])
p = json.loads(os.environ["PY_JSON"])
fp = p["entries_per_s"] or 1
parse = t["parse"]["entries_per_s"]
store = t["parse_dedupe_store"]["entries_per_s"]
print(f"documents {t['documents']} (feedparser {p['documents']}), entries/round tidings {t['entries_per_round']} feedparser {p['entries_per_round']}")
print(f"entries/s: feedparser {fp:,.0f}; tidings parse {parse:,.0f} ({parse / fp:.1f}x); "
      f"tidings parse+dedupe+store {store:,.0f} ({store / fp:.1f}x)")
PY
