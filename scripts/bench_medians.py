#!/usr/bin/env python3
"""Medians of the JSON reports written by scripts/bench.sh, as Markdown tables.

Usage: scripts/bench_medians.py OUT_DIR

Each metric's median is taken on its own over the runs of a case (so one row may mix runs).
"""

import glob
import json
import os
import statistics
import sys
from collections import defaultdict


def get(d, path):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d or d[key] is None:
            return None
        d = d[key]
    return d


PUBLISH = [
    ("msg/s", "messages_per_s"),
    ("p50 µs", "latency.p50_us"),
    ("p90 µs", "latency.p90_us"),
    ("p99 µs", "latency.p99_us"),
    ("max µs", "latency.max_us"),
    ("errors", "errors"),
    ("hub µs CPU/msg", "hub.cpu_us_per_message"),
    ("hub cores", "hub.cpu_busy"),
    ("loadgen µs CPU/msg", "loadgen.cpu_us_per_message"),
    ("loadgen cores", "loadgen.cpu_busy"),
    ("hub peak RSS MiB", "hub.rss_kib_peak"),
    ("cpu0 busy", "machine_busy.cpu0"),
    ("cpu1 busy", "machine_busy.cpu1"),
]

FANOUT = [
    ("deliveries/s", "deliveries.per_s"),
    ("received", "deliveries.received"),
    ("expected", "deliveries.expected"),
    ("lost", "deliveries.lost"),
    ("dup", "deliveries.duplicates"),
    ("ooo", "deliveries.out_of_order"),
    ("p50 µs", "latency.p50_us"),
    ("p90 µs", "latency.p90_us"),
    ("p99 µs", "latency.p99_us"),
    ("p99.9 µs", "latency.p99_9_us"),
    ("max µs", "latency.max_us"),
    ("publish msg/s", "publish.messages_per_s"),
    ("ack p50 µs", "publish.ack_latency.p50_us"),
    ("sched lag p99 µs", "publish.schedule_lag.p99_us"),
    ("connect wall s", "connect.wall_s"),
    ("connect p99 µs", "connect.per_connection.p99_us"),
    ("hub µs CPU/delivery", "hub.cpu_us_per_delivery"),
    ("hub cores", "hub.cpu_busy"),
    ("loadgen µs CPU/delivery", "loadgen.cpu_us_per_delivery"),
    ("loadgen cores", "loadgen.cpu_busy"),
    ("hub peak RSS MiB", "hub.rss_kib_peak"),
    ("cpu0 busy", "machine_busy.cpu0"),
    ("cpu1 busy", "machine_busy.cpu1"),
]


def fmt(label, value):
    if value is None:
        return "–"
    if "RSS MiB" in label:
        return f"{value / 1024:.1f}"
    if isinstance(value, float) and value < 10:
        return f"{value:.2f}"
    return f"{value:,.0f}"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
        case = os.path.basename(path).rsplit(".", 2)[0]
        try:
            with open(path) as f:
                runs[case].append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
    for case, reports in runs.items():
        columns = PUBLISH if reports[0].get("scenario") == "publish" else FANOUT
        print(f"\n### {case} (median of {len(reports)})\n")
        print("| metric | median | runs |")
        print("|---|---|---|")
        for label, path in columns:
            values = [v for v in (get(r, path) for r in reports) if v is not None]
            if not values:
                continue
            median = statistics.median(values)
            each = ", ".join(fmt(label, v) for v in values)
            print(f"| {label} | {fmt(label, median)} | {each} |")


if __name__ == "__main__":
    main()
