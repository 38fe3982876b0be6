#!/usr/bin/env python3
"""Plots the fan-out sweep of a scripts/bench.sh results directory as one PNG.

Usage: scripts/plot_bench.py OUT_DIR [OUT_DIR…] [PNG]     (default PNG: OUT_DIR/bench-plot.png)

Two panels over the subscriber counts of the sweep (cases `sweep-SERVER-N`: one channel, N
subscribers, one closed-loop publisher): deliveries/s, and p99 publish→delivery latency. One
line per server (Tidings WS, Nchan, Socket.IO, Redis): the median of the runs, with error bars
from the smallest to the largest run.

Needs matplotlib. Without it, the script creates a virtualenv in target/pyvenv, installs
matplotlib there from PyPI and runs itself again with it (or: apt-get install
python3-matplotlib).
"""

import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, "..", "target", "pyvenv")


def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return
    except ImportError:
        pass
    python = os.path.join(VENV, "bin", "python3")
    if os.environ.get("PLOT_BENCH_REEXEC"):
        sys.exit("matplotlib is missing from target/pyvenv; install it (pip) or apt-get install python3-matplotlib")
    if not os.path.exists(python):
        print(f"creating {VENV} for matplotlib", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    check = subprocess.run([python, "-c", "import matplotlib"], capture_output=True)
    if check.returncode != 0:
        print("installing matplotlib into target/pyvenv (pip)", file=sys.stderr)
        subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q", "matplotlib"], check=True)
    env = dict(os.environ, PLOT_BENCH_REEXEC="1")
    os.execve(python, [python, os.path.abspath(__file__)] + sys.argv[1:], env)


SERIES = [
    # (label, colour, marker)
    ("Tidings WS", "tab:blue", "o"),
    ("Nchan", "tab:green", "s"),
    ("Socket.IO", "tab:orange", "^"),
    ("Redis", "tab:red", "D"),
]


def sweep_points(runs, get, server_label):
    """{server: {N: [report, …]}} from the fan-out sweep cases."""
    points = {}
    for case, reports in runs.items():
        if not case.startswith("sweep-") or reports[0].get("scenario") != "fanout":
            continue
        n = get(reports[0], "params.subscribers")
        if n is None:
            continue
        points.setdefault(server_label(reports[0]), {}).setdefault(n, []).extend(reports)
    return points


def median_and_bars(reports, path, get, scale=1.0):
    """xs-aligned (median, below, above) of `path` over the reports, or None without values."""
    values = [get(r, path) for r in reports]
    values = [v * scale for v in values if v is not None]
    if not values:
        return None
    m = statistics.median(values)
    return m, m - min(values), max(values) - m


def main():
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        sys.exit(__doc__)
    png = None
    if len(args) >= 2 and args[-1].endswith(".png"):
        png = args.pop()
    png = png or os.path.join(args[0], "bench-plot.png")
    ensure_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, HERE)
    from bench_medians import get, load_runs, server_label

    points = sweep_points(load_runs(args), get, server_label)
    if not points:
        sys.exit(f"no fan-out sweep runs (sweep-*.json) in {', '.join(args)}")
    fig, (ax_rate, ax_p99) = plt.subplots(1, 2, figsize=(12, 4.8))
    known = [s[0] for s in SERIES]
    extra = [(label, None, "x") for label in sorted(points) if label not in known]
    for label, colour, marker in SERIES + extra:
        by_n = points.get(label)
        if not by_n:
            continue
        for ax, path, scale in ((ax_rate, "deliveries.per_s", 1.0), (ax_p99, "latency.p99_us", 1e-3)):
            xs, ys, lo, hi = [], [], [], []
            for n in sorted(by_n):
                stat = median_and_bars(by_n[n], path, get, scale)
                if stat is None:
                    continue
                xs.append(n)
                ys.append(stat[0])
                lo.append(stat[1])
                hi.append(stat[2])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], label=label, color=colour, marker=marker, capsize=4)
    all_n = sorted({n for by_n in points.values() for n in by_n})
    runs = max(len(r) for by_n in points.values() for r in by_n.values())
    for ax, title, ylabel in (
        (ax_rate, "Fan-out throughput", "deliveries/s"),
        (ax_p99, "p99 publish→delivery latency (at max rate)", "p99 latency (ms)"),
    ):
        ax.set_title(title)
        ax.set_xlabel("subscribers on one channel")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        ax.set_xticks(all_n)
        ax.set_xticklabels([f"{n / 1000:g}k" if n >= 1000 else str(n) for n in all_n])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"One channel, N subscribers, one closed-loop publisher, 100-byte messages; "
        f"median of up to {runs} runs, bars min–max",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"plot written to {png}")


if __name__ == "__main__":
    main()
