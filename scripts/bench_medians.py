#!/usr/bin/env python3
"""Medians of the JSON reports written by scripts/bench.sh, as Markdown tables.

Usage: scripts/bench_medians.py [--cleanest K] OUT_DIR [OUT_DIR…]

Runs of the same case from every OUT_DIR are pooled. With --cleanest K, only the K runs with
the least other load on the machine (cores busy with anything but the hub and the load
generator, from each report's `machine_busy`) are used; the others are still listed. Each
metric's median is taken on its own (so one row may mix runs).
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

WEBHOOKS = [
    ("deliveries/s", "deliveries_per_s"),
    ("delivered", "delivered"),
    ("acked", "acked"),
    ("dup", "duplicates"),
    ("ooo", "out_of_order"),
    ("bad signatures", "bad_signatures"),
    ("publish s", "publish_s"),
    ("p50 µs", "latency.p50_us"),
    ("p99 µs", "latency.p99_us"),
    ("hub µs CPU/delivery", "hub.cpu_us_per_delivery"),
    ("hub cores", "hub.cpu_busy"),
    ("hub peak RSS MiB", "hub.rss_kib_peak"),
    ("cpu0 busy", "machine_busy.cpu0"),
    ("cpu1 busy", "machine_busy.cpu1"),
]


def other_load(report):
    """Cores busy with anything but the hub and the load generator during the run."""
    busy = get(report, "machine_busy.all_cores")
    hub = get(report, "hub.cpu_busy") or 0
    loadgen = get(report, "loadgen.cpu_busy") or 0
    return None if busy is None else max(0.0, busy - hub - loadgen)


def fmt(label, value):
    if value is None:
        return "–"
    if "RSS MiB" in label:
        return f"{value / 1024:.1f}"
    if isinstance(value, float) and value < 10:
        return f"{value:.2f}"
    return f"{value:,.0f}"


def main():
    args = sys.argv[1:]
    cleanest = None
    if len(args) >= 2 and args[0] == "--cleanest":
        cleanest = int(args[1])
        args = args[2:]
    if not args:
        sys.exit(__doc__)
    runs = defaultdict(list)
    for out in args:
        for path in sorted(glob.glob(os.path.join(out, "*.json"))):
            case = os.path.basename(path).rsplit(".", 2)[0]
            try:
                with open(path) as f:
                    runs[case].append(json.load(f))
            except (OSError, ValueError) as e:
                print(f"skipping {path}: {e}", file=sys.stderr)
    for case in sorted(runs):
        reports = sorted(runs[case], key=lambda r: other_load(r) or 0.0)
        used = reports[:cleanest] if cleanest else reports
        rest = reports[len(used):]
        columns = {"publish": PUBLISH, "webhooks": WEBHOOKS}.get(reports[0].get("scenario"), FANOUT)
        title = f"median of the {len(used)} quietest of {len(reports)} runs" if rest else f"median of {len(used)}"
        print(f"\n### {case} ({title})\n")
        print("| metric | median | runs used | other runs |")
        print("|---|---|---|---|")
        for label, path in columns + [("other load (cores)", None)]:
            pick = lambda r: other_load(r) if path is None else get(r, path)  # noqa: E731
            values = [v for v in map(pick, used) if v is not None]
            if not values:
                continue
            median = statistics.median(values)
            each = ", ".join(fmt(label, v) for v in values)
            others = ", ".join(fmt(label, v) for v in map(pick, rest) if v is not None)
            print(f"| {label} | {fmt(label, median)} | {each} | {others} |")


if __name__ == "__main__":
    main()
