"""Core benchmarks: eventwire against pyee, blinker, autogen-core and a plain asyncio baseline.

Usage (from the repository root)::

    .venv/bin/python bench/bench_core.py [--runs N] [--quick] [--markdown FILE] [--json FILE]

Every (library, workload) measurement runs in a fresh subprocess with a fresh event loop. Runs
are interleaved: run i measures every library on every workload before run i + 1 starts, in
an order that is reversed every other run. The report gives the median over the runs of each
figure and of each ratio to the baseline measured in the same run, and checks the project's
targets. See bench/README.md for what each workload does.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import SLOW_HANDLER_SECONDS, Metrics, sizes_for, worker_metrics

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

LIBRARIES = ("baseline", "eventwire", "blinker", "pyee", "autogen")
LABELS = {
    "baseline": "baseline",
    "eventwire": "eventwire",
    "blinker": "blinker",
    "pyee": "pyee",
    "autogen": "autogen-core",
}
DISTRIBUTIONS = {
    "eventwire": "eventwire",
    "blinker": "blinker",
    "pyee": "pyee",
    "autogen": "autogen-core",
}
WORKLOADS = ("w1", "w2", "w3", "w4", "mem")
NOT_APPLICABLE = {
    ("blinker", "w3"): "n/a: runs handlers inline",
    ("blinker", "mem"): "n/a: nothing queues",
}
# A publish that waited for the slow W3 subscriber would take at least one of its sleeps.
BLOCKED_PUBLISH_US = SLOW_HANDLER_SECONDS * 1e6
WORKER_TIMEOUT_SECONDS = 900
# Each worker times this many iterations of a plain loop before its measurement (about 10 ms),
# to show how steady the machine's speed was over the session.
PROBE_ITERATIONS = 300_000


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table: a metric of a workload."""

    workload: str
    metric: str
    title: str
    higher_is_better: bool


ROWS = (
    Row("w1", "rate", "W1 1 topic × 3 subscribers: deliveries/s", True),
    Row("w2", "p50_us", "W2 two-hop chain latency p50 (µs)", False),
    Row("w2", "p99_us", "W2 two-hop chain latency p99 (µs)", False),
    Row("w3", "fast_ms", "W3 fast subscribers done beside a slow one (ms)", False),
    Row("w3", "max_publish_us", "W3 longest single publish call (µs)", False),
    Row("w4", "rate", "W4 one subscriber per topic, many topics: deliveries/s", True),
    Row("mem", "bytes_per_event", "Memory: bytes per queued event", False),
)

Samples = dict[tuple[str, str], list[Metrics]]


# -- one measurement, in a subprocess -------------------------------------------------------


def cpu_probe_ms() -> float:
    """Time a fixed pure-Python loop: how fast the machine is running right now."""
    started = time.perf_counter()
    total = 0
    for i in range(PROBE_ITERATIONS):
        total += i
    return (time.perf_counter() - started) * 1e3


def run_worker(library: str, workload: str, quick: bool) -> None:
    """Run one measurement in this process and print its metrics as JSON."""
    module = importlib.import_module(f"impl_{library}")
    measure = getattr(module, workload)
    probe = cpu_probe_ms()
    metrics: Metrics = asyncio.run(measure(sizes_for(library, quick)))
    metrics["probe_ms"] = probe
    print(json.dumps(metrics))


def measure_in_subprocess(library: str, workload: str, quick: bool) -> Metrics:
    args = ["--worker", library, workload, *(["--quick"] if quick else [])]
    metrics: Metrics = worker_metrics(
        str(Path(__file__).resolve()),
        args,
        timeout=WORKER_TIMEOUT_SECONDS,
        label=f"{library} {workload}",
    )
    return metrics


def run_order(run: int) -> tuple[str, ...]:
    """Libraries in the order of `LIBRARIES` on even runs and reversed on odd ones: eventwire
    always sits next to the baseline and blinker, and no library is always first or last."""
    return LIBRARIES if run % 2 == 0 else LIBRARIES[::-1]


def collect(runs: int, quick: bool) -> Samples:
    """Every measurement once per run; run i of every library is entry i of its list."""
    samples: Samples = {}
    for run in range(runs):
        for workload in WORKLOADS:
            for library in run_order(run):
                if (library, workload) in NOT_APPLICABLE:
                    continue
                started = time.perf_counter()
                metrics = measure_in_subprocess(library, workload, quick)
                samples.setdefault((library, workload), []).append(metrics)
                shown = ", ".join(f"{k}={v:,.1f}" for k, v in metrics.items())
                print(
                    f"[run {run + 1}/{runs}] {workload:<3} {library:<9} {shown} "
                    f"({time.perf_counter() - started:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    return samples


# -- summary -------------------------------------------------------------------------------


def values(samples: Samples, library: str, workload: str, metric: str) -> list[float]:
    return [metrics[metric] for metrics in samples.get((library, workload), [])]


def paired_ratios(
    samples: Samples, library: str, versus: str, workload: str, metric: str
) -> list[float]:
    """`library` ÷ `versus` within each run: the two were measured seconds apart, so a slow
    phase of the machine tends to hit both."""
    mine = values(samples, library, workload, metric)
    theirs = values(samples, versus, workload, metric)
    return [a / b for a, b in zip(mine, theirs, strict=True) if b]


def format_value(row: Row, value: float) -> str:
    if row.metric == "rate":
        return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} k"
    if row.metric == "bytes_per_event":
        return f"{value:,.0f}"
    if row.metric == "fast_ms":
        return f"{value:,.2f}"
    return f"{value:,.1f}"


def metric_table(
    samples: Samples, cell: Callable[[Row, str, list[float]], str], arrows: bool
) -> str:
    """A line per `ROWS` entry and a column per library; `cell(row, library, measured)` gives
    each cell from that library's figures over the runs. `arrows` marks the better way."""
    header = "| Workload (metric) | " + " | ".join(LABELS[lib] for lib in LIBRARIES) + " |"
    lines = [header, "|---" * (len(LIBRARIES) + 1) + "|"]
    for row in ROWS:
        cells = [
            cell(row, library, values(samples, library, row.workload, row.metric))
            for library in LIBRARIES
        ]
        title = f"{row.title} {'↑' if row.higher_is_better else '↓'}" if arrows else row.title
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_table(samples: Samples) -> str:
    def median_cell(row: Row, library: str, measured: list[float]) -> str:
        if not measured:
            return NOT_APPLICABLE.get((library, row.workload), "–")
        cell = format_value(row, statistics.median(measured))
        ratios = paired_ratios(samples, library, "baseline", row.workload, row.metric)
        if library != "baseline" and ratios:
            cell += f" ({statistics.median(ratios):.2f}×)"
        return cell

    return metric_table(samples, median_cell, arrows=True)


def spread_table(samples: Samples) -> str:
    def range_cell(row: Row, library: str, measured: list[float]) -> str:
        if not measured:
            return "–"
        return f"{format_value(row, min(measured))} – {format_value(row, max(measured))}"

    return metric_table(samples, range_cell, arrows=False)


def probe_note(samples: Samples) -> str:
    probes = sorted(m["probe_ms"] for runs in samples.values() for m in runs)
    low, mid, high = probes[0], statistics.median(probes), probes[-1]
    return (
        f"Machine steadiness: a fixed {PROBE_ITERATIONS:,}-iteration Python loop, timed just "
        f"before each of the {len(probes)} measurements, took {low:.1f} – {high:.1f} ms "
        f"(median {mid:.1f} ms), so the CPU's speed changed by up to {high / low:.1f}× during "
        "the session. That is why ratios are taken within each run and the runs alternate "
        "the order of the libraries."
    )


@dataclass(frozen=True, slots=True)
class RatioTarget:
    """eventwire's `metric` on `workload` divided by `versus`'s must satisfy `holds`."""

    goal: str
    workload: str
    metric: str
    versus: str
    holds: Callable[[float], bool]


# Issue 10's "no step back" targets (memory became a backend and the bus was split).
RATIO_TARGETS = (
    RatioTarget("W1 eventwire ≥ 0.8× baseline", "w1", "rate", "baseline", lambda r: r >= 0.8),
    RatioTarget("W1 eventwire ≥ 1.2× blinker", "w1", "rate", "blinker", lambda r: r >= 1.2),
    RatioTarget("W1 eventwire ≥ 40× autogen-core", "w1", "rate", "autogen", lambda r: r >= 40),
    RatioTarget("W4 eventwire ≥ 0.65× baseline", "w4", "rate", "baseline", lambda r: r >= 0.65),
    RatioTarget("W2 eventwire p50 ≤ 2× baseline", "w2", "p50_us", "baseline", lambda r: r <= 2),
    RatioTarget(
        "W3 eventwire fast subscribers done within 2× the baseline's time",
        "w3",
        "fast_ms",
        "baseline",
        lambda r: r <= 2,
    ),
)
MAX_BYTES_PER_EVENT = 220


@dataclass(frozen=True, slots=True)
class Target:
    goal: str
    measured: str
    runs_passing: int
    runs: int
    passed: bool


def evaluate_targets(samples: Samples) -> list[Target]:
    targets = []
    for target in RATIO_TARGETS:
        ratios = paired_ratios(samples, "eventwire", target.versus, target.workload, target.metric)
        middle = statistics.median(ratios)
        targets.append(
            Target(
                target.goal,
                f"{middle:.2f}× (runs: {min(ratios):.2f} – {max(ratios):.2f}×)",
                sum(map(target.holds, ratios)),
                len(ratios),
                target.holds(middle),
            )
        )
    publishes = values(samples, "eventwire", "w3", "max_publish_us")
    unblocked = [us < BLOCKED_PUBLISH_US for us in publishes]
    targets.append(
        Target(
            f"W3 eventwire publish never blocked (every call < {BLOCKED_PUBLISH_US / 1e3:.0f} ms)",
            f"longest call {max(publishes):,.1f} µs",
            sum(unblocked),
            len(unblocked),
            all(unblocked),
        )
    )
    memory = values(samples, "eventwire", "mem", "bytes_per_event")
    targets.append(
        Target(
            f"Memory eventwire ≤ {MAX_BYTES_PER_EVENT} bytes per queued event",
            f"{statistics.median(memory):.0f} B",
            sum(b <= MAX_BYTES_PER_EVENT for b in memory),
            len(memory),
            statistics.median(memory) <= MAX_BYTES_PER_EVENT,
        )
    )
    return targets


def targets_table(targets: Sequence[Target]) -> str:
    lines = ["| Target | Measured (median) | Runs meeting it | Result |", "|---|---|---|---|"]
    for target in targets:
        verdict = "PASS" if target.passed else "**FAIL**"
        lines.append(
            f"| {target.goal} | {target.measured} | {target.runs_passing}/{target.runs} "
            f"| {verdict} |"
        )
    return "\n".join(lines)


SIZE_LINES = (
    ("w1_events", "W1: {} events"),
    ("w2_chains", "W2: {} chains timed, one at a time, after a tenth as many warm-up chains"),
    ("w3_events", "W3: {} events"),
    ("w4_events", "W4: {} events, round-robin over the topics"),
    ("w4_topics", "W4: {} topics"),
    ("mem_events", "Memory: {} events waiting"),
)


def sizes_note(quick: bool) -> str:
    default = sizes_for("eventwire", quick)
    lines = []
    for field, text in SIZE_LINES:
        value = getattr(default, field)
        fewer = [
            f"{LABELS[library]}: {getattr(sizes_for(library, quick), field):,}"
            for library in LIBRARIES
            if getattr(sizes_for(library, quick), field) != value
        ]
        lines.append("- " + text.format(f"{value:,}") + (f" ({'; '.join(fewer)})" if fewer else ""))
    return "\n".join(lines)


# -- environment ---------------------------------------------------------------------------


def proc_value(name: str, key: str) -> str | None:
    """What follows the colon on the first line of /proc/`name` that starts with `key`."""
    try:
        lines = Path("/proc", name).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    return proc_value("cpuinfo", "model name") or platform.processor() or "unknown"


def memory_total() -> str:
    kib = proc_value("meminfo", "MemTotal:")  # "16318756 kB"
    return f"{int(kib.split()[0]) / 1024**2:.1f} GiB" if kib else "unknown"


def git_revision() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=REPO_DIR, check=False
        )
        return done.stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "eventwire"):
        revision += " + uncommitted changes in eventwire/"
    return revision


def environment(runs: int, quick: bool) -> str:
    versions = ", ".join(
        f"{LABELS[name]} {importlib.metadata.version(dist)}" for name, dist in DISTRIBUTIONS.items()
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    command = shlex.join([".venv/bin/python", "bench/bench_core.py", *sys.argv[1:]])
    return "\n".join(
        [
            f"- Machine: {os.cpu_count()} CPUs, {cpu_model()}, {memory_total()} RAM, "
            f"{platform.system()} {platform.release()}",
            f"- Python {platform.python_version()} ({platform.python_implementation()}), "
            "default asyncio event loop",
            f"- Libraries: {versions}",
            f"- eventwire revision: {git_revision()}",
            f"- Load average at start: {load}",
            f"- Command: `{command}` ({runs} run(s){', quick sizes' if quick else ''})",
        ]
    )


def report(samples: Samples, env: str, quick: bool, runs: int) -> str:
    return "\n\n".join(
        [
            "## Environment",
            env,
            "## Sizes",
            sizes_note(quick),
            f"## Results (median of {runs} run(s))",
            "↑ higher is better, ↓ lower is better. Rates are per second for every library. "
            "In brackets: the median over the runs of the ratio to the baseline measured in "
            "the same run.",
            results_table(samples),
            "### Spread (min – max over the runs)",
            spread_table(samples),
            probe_note(samples),
            "## Targets",
            "A ratio target is met when the median of the per-run ratios meets it; the publish "
            "target must hold in every run.",
            targets_table(evaluate_targets(samples)),
        ]
    )


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (5)")
    parser.add_argument(
        "--quick", action="store_true", help="smaller workloads, 1 run unless --runs: smoke test"
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--json", type=Path, help="also write every run's raw metrics here")
    parser.add_argument("--worker", nargs=2, metavar=("LIBRARY", "WORKLOAD"), help="internal")
    args = parser.parse_args(argv)
    if args.worker is not None:
        library, workload = args.worker
        if library not in LIBRARIES or workload not in WORKLOADS:
            parser.error(f"unknown measurement {library} {workload}")
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        library, workload = args.worker
        run_worker(library, workload, args.quick)
        return 0
    env = environment(args.runs, args.quick)
    started = time.perf_counter()
    samples = collect(args.runs, args.quick)
    text = report(samples, env, args.quick, args.runs)
    text += f"\n\nTotal benchmark time: {time.perf_counter() - started:.0f} s.\n"
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
    if args.json is not None:
        raw = {f"{lib} {workload}": runs for (lib, workload), runs in samples.items()}
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
