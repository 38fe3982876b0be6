#!/usr/bin/env python3
"""Medians of the JSON reports written by scripts/bench.sh, as Markdown tables.

Usage: scripts/bench_medians.py [--cleanest K] OUT_DIR [OUT_DIR…]

First the comparison tables (Tidings against the peers: the fan-out sweep over subscriber
counts, the latency case, idle memory per connection), then one table per case. Every cell is
the median of the runs with their min–max in brackets. Runs of the same case from every OUT_DIR
are pooled. With --cleanest K, only the K runs with
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

IDLE = [
    ("connected", "connect.connected"),
    ("failed", "connect.failed"),
    ("KiB/conn", "hub_rss_kib_per_connection"),
    ("hub RSS growth MiB", "hub_rss_kib_growth"),
    ("hub µs CPU/connect", "hub_cpu_us_per_connect"),
    ("connect wall s", "connect.wall_s"),
    ("connect p50 µs", "connect.per_connection.p50_us"),
    ("connect p99 µs", "connect.per_connection.p99_us"),
    ("pongs", "ping.pongs"),
    ("ping p99 µs", "ping.rtt.p99_us"),
    ("closed early", "closed_early_total"),
    ("cpu0 busy", "machine_busy.cpu0"),
    ("cpu1 busy", "machine_busy.cpu1"),
]

RESUME = [
    ("complete", "clients.complete"),
    ("incomplete", "clients.incomplete"),
    ("all done s", "all_done_s"),
    ("per client p50 µs", "per_client.p50_us"),
    ("per client p99 µs", "per_client.p99_us"),
    ("deliveries/s", "deliveries.per_s"),
    ("lost", "deliveries.lost"),
    ("dup", "deliveries.duplicates"),
    ("connect p99 µs", "connect.p99_us"),
    ("hub µs CPU/delivery", "hub.cpu_us_per_delivery"),
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
    if "MiB" in label:
        return f"{value / 1024:.1f}"
    if "KiB" in label:
        return f"{value:.1f}"
    if isinstance(value, float) and abs(value) < 10:
        return f"{value:.2f}"
    return f"{value:,.0f}"


def spread(label, values):
    """`median (min–max)` of the values present, `–` without any."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    median = fmt(label, statistics.median(values))
    if len(values) == 1:
        return median
    return f"{median} ({fmt(label, min(values))}–{fmt(label, max(values))})"


PEER_NAMES = {"nchan": "Nchan", "socketio": "Socket.IO", "redis": "Redis"}


def server_label(report):
    """Who was measured: `Tidings WS`, `Tidings SSE`, `Nchan`, `Socket.IO`, `Redis`."""
    peer = report.get("peer")
    if peer:
        return PEER_NAMES.get(peer, peer)
    return f"Tidings {(report.get('transport') or 'ws').upper()}"


def load_runs(dirs):
    """{case: [report, …]} from the `CASE.RUN.json` files of every directory."""
    runs = defaultdict(list)
    for out in dirs:
        for path in sorted(glob.glob(os.path.join(out, "*.json"))):
            case = os.path.basename(path).rsplit(".", 2)[0]
            try:
                with open(path) as f:
                    runs[case].append(json.load(f))
            except (OSError, ValueError) as e:
                print(f"skipping {path}: {e}", file=sys.stderr)
    return runs


SERVER_ORDER = ["Tidings WS", "Tidings SSE", "Nchan", "Socket.IO", "Redis"]


def server_key(label):
    return (SERVER_ORDER.index(label) if label in SERVER_ORDER else len(SERVER_ORDER), label)


def comparison(runs, prefix, scenario, size_path, columns, title):
    """One row per case named PREFIX…: server, size, then each column's median (min–max)."""
    rows = []
    for case, reports in runs.items():
        if not case.startswith(prefix) or reports[0].get("scenario") != scenario:
            continue
        label = server_label(reports[0])
        rows.append((server_key(label), get(reports[0], size_path) or 0, label, case, reports))
    if not rows:
        return
    print(f"\n### {title}\n")
    print("| server | N | " + " | ".join(c[0] for c in columns) + " | runs |")
    print("|---|---|" + "---|" * len(columns) + "---|")
    for _, n, label, case, reports in sorted(rows, key=lambda r: r[:2]):
        cells = [spread(c[0], [get(r, c[1]) for r in reports]) for c in columns]
        print(f"| {label} | {n:,} | " + " | ".join(cells) + f" | {len(reports)} |")


def comparisons(runs):
    # The server's CPU is `hub.…` in every report, the hub's or the peer's.
    comparison(runs, "sweep-", "fanout", "params.subscribers", [
        ("deliveries/s", "deliveries.per_s"),
        ("lost", "deliveries.lost"),
        ("p50 µs", "latency.p50_us"),
        ("p99 µs", "latency.p99_us"),
        ("server µs CPU/delivery", "hub.cpu_us_per_delivery"),
        ("server peak RSS MiB", "hub.rss_kib_peak"),
        ("connect wall s", "connect.wall_s"),
    ], "Fan-out sweep: one channel, N subscribers, one closed-loop publisher")
    comparison(runs, "latency-", "latency", "params.subscribers", [
        ("p50 µs", "latency.p50_us"),
        ("p90 µs", "latency.p90_us"),
        ("p99 µs", "latency.p99_us"),
        ("p99.9 µs", "latency.p99_9_us"),
        ("server µs CPU/delivery", "hub.cpu_us_per_delivery"),
        ("achieved msg/s", "achieved_rate_per_s"),
        ("lost", "deliveries.lost"),
    ], "Latency: N subscribers, paced publisher")
    comparison(runs, "idle-", "idle", "params.connections", [
        ("KiB/conn", "hub_rss_kib_per_connection"),
        ("connected", "connect.connected"),
        ("connect p99 µs", "connect.per_connection.p99_us"),
        ("server µs CPU/connect", "hub_cpu_us_per_connect"),
        ("pongs", "ping.pongs"),
        ("closed early", "closed_early_total"),
    ], "Idle: N subscribed connections")
    comparison(runs, "resume-", "resume", "params.clients", [
        ("all done s", "all_done_s"),
        ("per client p99 µs", "per_client.p99_us"),
        ("deliveries/s", "deliveries.per_s"),
        ("incomplete", "clients.incomplete"),
        ("server µs CPU/delivery", "hub.cpu_us_per_delivery"),
    ], "Resume: N clients catching up at once")


def main():
    args = sys.argv[1:]
    cleanest = None
    if len(args) >= 2 and args[0] == "--cleanest":
        cleanest = int(args[1])
        args = args[2:]
    if not args:
        sys.exit(__doc__)
    runs = load_runs(args)
    comparisons(runs)
    for case in sorted(runs):
        reports = sorted(runs[case], key=lambda r: other_load(r) or 0.0)
        used = reports[:cleanest] if cleanest else reports
        rest = reports[len(used):]
        columns = {"publish": PUBLISH, "webhooks": WEBHOOKS, "idle": IDLE, "resume": RESUME}.get(
            reports[0].get("scenario"), FANOUT
        )
        title = f"median of the {len(used)} quietest of {len(reports)} runs" if rest else f"median of {len(used)}"
        print(f"\n### {case} ({title})\n")
        print("| metric | median (min–max) | runs used | other runs |")
        print("|---|---|---|---|")
        for label, path in columns + [("other load (cores)", None)]:
            pick = lambda r: other_load(r) if path is None else get(r, path)  # noqa: E731
            values = [v for v in map(pick, used) if v is not None]
            if not values:
                continue
            median = spread(label, values)
            each = ", ".join(fmt(label, v) for v in values)
            others = ", ".join(fmt(label, v) for v in map(pick, rest) if v is not None)
            print(f"| {label} | {median} | {each} | {others} |")


if __name__ == "__main__":
    main()
