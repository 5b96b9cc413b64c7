"""Broker benchmarks: eventwire on each durable backend against the broker's own Python client
and against FastStream, with the same delivery guarantees.

Usage (from the repository root, with Redis, NATS JetStream and RabbitMQ on localhost)::

    .venv/bin/python bench/bench_backends.py [--runs N] [--quick] [--events N]
        [--modes throughput,serial,latency,windowed] [--markdown FILE] [--json FILE]

One publisher and one durable subscriber in one process, 1 KB JSON payloads, confirmed
publishes, acknowledged after handling. Four modes (columns of the report), each measured in
a fresh subprocess per (backend, implementation):

- throughput: chunks of 500 publishes, two in flight; events/s from the first publish to the
  last handled message, and latency (publish call to handler) p50/p99 under that full load;
- serial ("one at a time"): `await publish(...)` in a loop, each awaited before the next, the
  subscriber handling meanwhile; events/s;
- latency: one event at a time, the next published once the handler got the last; p50, p90
  and p99 of publish call to handler, in µs;
- windowed: 100 concurrent one-message publish calls (a sliding window); events/s.

Runs are interleaved: run i measures every implementation on every backend before run i + 1
starts, in an order reversed every other run. The report gives the median over the runs of
each figure and of each ratio of eventwire to a peer measured in the same run, and checks
the project's targets. See bench/backends/README.md for what each implementation does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backends import BACKENDS, IMPLS, MODULES, NOT_APPLICABLE
from backends.workload import (
    AMQP_URL,
    MODES,
    NATS_URL,
    PAYLOAD_BYTES,
    QUERY_VARIABLE,
    REDIS_URL,
    WINDOWED_IN_FLIGHT,
    workload_for,
)
from bench_core import cpu_model, cpu_probe_ms, git_revision, memory_total
from common import worker_metrics

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

# Timed events per measurement, by mode.
FULL_EVENTS = {"throughput": 100_000, "serial": 5_000, "latency": 1_000, "windowed": 20_000}
QUICK_EVENTS = {"throughput": 10_000, "serial": 1_000, "latency": 200, "windowed": 5_000}
# Per backend, when fewer throughput events than FULL_EVENTS are needed to keep a full session
# within ~15 minutes (rates are per second, so the figures stay comparable). None needs it
# now: the throughput mode takes some 12 minutes on 2 cores, RabbitMQ (2-4k events/s) half.
FULL_EVENTS_FOR: dict[str, int] = {}
DEFAULT_RUNS = 3
MODE_LABELS = {
    "throughput": "throughput",
    "serial": "one at a time",
    "latency": "latency",
    "windowed": f"windowed ({WINDOWED_IN_FLIGHT} in flight)",
}
WORKER_TIMEOUT_SECONDS = 600

BACKEND_LABELS = {
    "sqlite": "SQLite",
    "redis": "Redis Streams",
    "nats": "NATS JetStream",
    "amqp": "RabbitMQ",
}
IMPL_LABELS = {"eventwire": "eventwire", "raw": "raw client", "faststream": "FastStream"}
RAW_CLIENTS = {"sqlite": "sqlite3", "redis": "redis-py", "nats": "nats-py", "amqp": "aio-pika"}
DISTRIBUTIONS = ("eventwire", "redis", "nats-py", "aio-pika", "faststream", "msgspec")

Samples = dict[tuple[str, str], list[dict[str, float]]]


def events_for(backend: str, mode: str, args: argparse.Namespace) -> int:
    """Events per measurement of `mode` on `backend`: `--events`, else the mode's default."""
    if args.events is not None:
        return int(args.events)
    if args.quick:
        return QUICK_EVENTS[mode]
    if mode == "throughput":
        return FULL_EVENTS_FOR.get(backend, FULL_EVENTS[mode])
    return FULL_EVENTS[mode]


# -- one measurement, in a subprocess -------------------------------------------------------


def run_worker(backend: str, impl: str, mode: str, events: int) -> None:
    """Run one measurement in this process and print its metrics as JSON."""
    module = importlib.import_module(f"backends.{MODULES[impl]}")
    probe = cpu_probe_ms()
    metrics: dict[str, float] = asyncio.run(module.run(backend, workload_for(mode, events)))
    metrics[f"{mode}_probe_ms"] = probe
    print(json.dumps(metrics))


def measure_in_subprocess(backend: str, impl: str, mode: str, events: int) -> dict[str, float]:
    metrics: dict[str, float] = worker_metrics(
        str(Path(__file__).resolve()),
        ["--worker", backend, impl, "--mode", mode, "--events", str(events)],
        timeout=WORKER_TIMEOUT_SECONDS,
        label=f"{backend} {impl} {mode}",
    )
    return metrics


def progress_text(mode: str, metrics: dict[str, float]) -> str:
    """One measurement's headline figures, for the progress log."""
    if mode == "throughput":
        return (
            f"{metrics['rate']:>9,.0f} events/s  p50 {metrics['p50_ms']:7.2f} ms  "
            f"p99 {metrics['p99_ms']:7.2f} ms"
        )
    if mode == "latency":
        return (
            f"p50 {metrics['latency_p50_us']:7,.0f} µs  p90 {metrics['latency_p90_us']:7,.0f} µs"
            f"  p99 {metrics['latency_p99_us']:7,.0f} µs"
        )
    return f"{metrics[f'{mode}_rate']:>9,.0f} events/s"


def run_order(run: int) -> tuple[str, ...]:
    """eventwire between its two peers, and no implementation always first or last."""
    order = ("raw", "eventwire", "faststream")
    return order if run % 2 == 0 else order[::-1]


Events = dict[str, dict[str, int]]  # backend -> mode -> events per measurement


def collect(
    runs: int, events: Events, backends: Sequence[str], impls: Sequence[str]
) -> tuple[Samples, dict[str, float]]:
    """Every measurement once per run; run i of every pair is entry i of its list, holding
    the figures of every mode. Also the wall time each backend took over the whole session."""
    samples: Samples = {}
    spent: dict[str, float] = {}
    for run in range(runs):
        for backend in backends:
            for impl in run_order(run):
                if impl not in impls or (backend, impl) in NOT_APPLICABLE:
                    continue
                figures: dict[str, float] = {}
                for mode, count in events[backend].items():
                    started = time.perf_counter()
                    metrics = measure_in_subprocess(backend, impl, mode, count)
                    took = time.perf_counter() - started
                    spent[backend] = spent.get(backend, 0.0) + took
                    figures.update(metrics)
                    print(
                        f"[run {run + 1}/{runs}] {backend:<6} {impl:<10} {mode:<10} "
                        f"{progress_text(mode, metrics)}  ({took:.1f}s)",
                        file=sys.stderr,
                        flush=True,
                    )
                samples.setdefault((backend, impl), []).append(figures)
    return samples, spent


# -- summary -------------------------------------------------------------------------------


def values(samples: Samples, backend: str, impl: str, metric: str) -> list[float]:
    return [metrics[metric] for metrics in samples.get((backend, impl), []) if metric in metrics]


def paired_ratios(samples: Samples, backend: str, versus: str, metric: str) -> list[float]:
    """eventwire ÷ `versus` within each run: measured seconds apart, so a slow phase of the
    machine tends to hit both."""
    mine = values(samples, backend, "eventwire", metric)
    theirs = values(samples, backend, versus, metric)
    if not mine or not theirs:
        return []
    return [a / b for a, b in zip(mine, theirs, strict=True) if b]


def median(measured: Sequence[float]) -> float | None:
    return statistics.median(measured) if measured else None


def rate_text(value: float) -> str:
    return f"{value / 1e3:,.1f} k"


def impl_label(backend: str, impl: str) -> str:
    if impl == "raw":
        return f"raw client ({RAW_CLIENTS[backend]})"
    return IMPL_LABELS[impl]


def has(samples: Samples, metric: str) -> bool:
    """Whether any measurement of the session produced `metric` (its mode was run)."""
    return any(metric in m for runs in samples.values() for m in runs)


def ratio_text(samples: Samples, backend: str, impl: str, metric: str) -> str:
    """The median per-run ratio eventwire ÷ `impl` of `metric`, or – for eventwire itself."""
    ratio = median(paired_ratios(samples, backend, impl, metric))
    return "–" if impl == "eventwire" or ratio is None else f"{ratio:.2f}×"


def table_rows(
    samples: Samples,
    backends: Sequence[str],
    impls: Sequence[str],
    key: str,
    cells: Callable[[str, str], list[str] | None],
    width: int,
) -> list[str]:
    """One row per (backend, implementation) that was measured (`key` present), or that does
    not exist; `cells` gives a measured row's cells."""
    rows = []
    for backend in backends:
        for impl in impls:
            if (backend, impl) in NOT_APPLICABLE:
                row: list[str] | None = [NOT_APPLICABLE[(backend, impl)]] + ["–"] * (width - 1)
            elif not values(samples, backend, impl, key):
                continue
            else:
                row = cells(backend, impl)
            if row is None:
                continue
            label = impl_label(backend, impl)
            rows.append(f"| {BACKEND_LABELS[backend]} | {label} | " + " | ".join(row) + " |")
    return rows


def results_table(samples: Samples, backends: Sequence[str], impls: Sequence[str]) -> str:
    def cells(backend: str, impl: str) -> list[str] | None:
        rate = median(values(samples, backend, impl, "rate"))
        p50 = median(values(samples, backend, impl, "p50_ms"))
        p99 = median(values(samples, backend, impl, "p99_ms"))
        if rate is None or p50 is None or p99 is None:
            return None
        return [
            rate_text(rate),
            f"{p50:,.1f}",
            f"{p99:,.1f}",
            ratio_text(samples, backend, impl, "rate"),
        ]

    lines = [
        "| Backend | Implementation | Events/s ↑ | p50 latency (ms) ↓ | p99 latency (ms) ↓ "
        "| eventwire ÷ this, events/s |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + table_rows(samples, backends, impls, "rate", cells, 4))


# The agent-path columns: (metric, heading, how a median is shown).
AGENT_COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("serial_rate", "One at a time, events/s ↑", lambda v: f"{v:,.0f}"),
    ("latency_p50_us", "Latency p50 (µs) ↓", lambda v: f"{v:,.0f}"),
    ("latency_p90_us", "p90 (µs) ↓", lambda v: f"{v:,.0f}"),
    ("latency_p99_us", "p99 (µs) ↓", lambda v: f"{v:,.0f}"),
    (
        "windowed_rate",
        f"Windowed ({WINDOWED_IN_FLIGHT} in flight), events/s ↑",
        lambda v: rate_text(v),
    ),
)
# Ratios eventwire ÷ peer shown beside them.
AGENT_RATIOS = (
    ("serial_rate", "one at a time"),
    ("latency_p50_us", "p50"),
    ("windowed_rate", "windowed"),
)


def agent_table(samples: Samples, backends: Sequence[str], impls: Sequence[str]) -> str:
    """The serial, latency and windowed modes: the columns measured, side by side."""
    columns = [column for column in AGENT_COLUMNS if has(samples, column[0])]
    ratios = [ratio for ratio in AGENT_RATIOS if has(samples, ratio[0])]

    def cells(backend: str, impl: str) -> list[str] | None:
        row = []
        for metric, _, show in columns:
            middle = median(values(samples, backend, impl, metric))
            row.append("–" if middle is None else show(middle))
        for metric, _ in ratios:
            row.append(ratio_text(samples, backend, impl, metric))
        return row

    headings = [heading for _, heading, _ in columns]
    headings += [f"eventwire ÷ this, {label}" for _, label in ratios]
    lines = [
        "| Backend | Implementation | " + " | ".join(headings) + " |",
        "|---|---|" + "---|" * len(headings),
    ]
    key = columns[0][0]
    return "\n".join(lines + table_rows(samples, backends, impls, key, cells, len(headings)))


# Spread table columns: (metric, heading, how a value is shown).
SPREAD_COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("rate", "Events/s", rate_text),
    ("p50_ms", "p50 (ms)", lambda v: f"{v:,.1f}"),
    ("p99_ms", "p99 (ms)", lambda v: f"{v:,.1f}"),
    ("publish_rate", "Publish side, events/s", rate_text),
    ("serial_rate", "One at a time, events/s", lambda v: f"{v:,.0f}"),
    ("latency_p50_us", "Latency p50 (µs)", lambda v: f"{v:,.0f}"),
    ("latency_p99_us", "Latency p99 (µs)", lambda v: f"{v:,.0f}"),
    ("windowed_rate", "Windowed, events/s", rate_text),
)


def spread_table(samples: Samples, backends: Sequence[str], impls: Sequence[str]) -> str:
    columns = [column for column in SPREAD_COLUMNS if has(samples, column[0])]

    def cells(backend: str, impl: str) -> list[str] | None:
        row = []
        for metric, _, show in columns:
            measured = values(samples, backend, impl, metric)
            row.append(f"{show(min(measured))} – {show(max(measured))}" if measured else "–")
        return row

    lines = [
        "| Backend | Implementation | " + " | ".join(h for _, h, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    rows = table_rows(samples, backends, impls, columns[0][0], cells, len(columns))
    # A pair that does not exist adds nothing to a spread table.
    return "\n".join(lines + [row for row in rows if "n/a" not in row])


@dataclass(frozen=True, slots=True)
class Target:
    goal: str
    measured: str
    runs_passing: int
    runs: int
    result: str  # PASS, FAIL or n/a


@dataclass(frozen=True, slots=True)
class Check:
    """A target on the median per-run ratio eventwire ÷ `versus` of `metric`."""

    metric: str
    versus: str
    goal: str
    holds: Callable[[float], bool]
    backends: tuple[str, ...] = BACKENDS


CHECKS = (
    # Issue 3: throughput with 1,000 publishes in flight.
    Check("rate", "raw", "eventwire ≥ 0.5× raw client throughput", lambda r: r >= 0.5),
    Check("rate", "faststream", "eventwire throughput above FastStream", lambda r: r > 1.0),
    # Issue 10: the path agents use.
    Check("serial_rate", "raw", "one at a time ≥ 0.8× raw client", lambda r: r >= 0.8),
    Check("serial_rate", "faststream", "one at a time above FastStream", lambda r: r > 1.0),
    Check("latency_p50_us", "raw", "latency p50 ≤ 1.5× raw client's", lambda r: r <= 1.5),
    Check(
        "windowed_rate",
        "raw",
        "windowed ≥ 1.0× raw client",
        lambda r: r >= 1.0,
        ("redis", "nats", "amqp"),
    ),
    Check("windowed_rate", "raw", "windowed ≥ 0.6× raw client", lambda r: r >= 0.6, ("sqlite",)),
)


def evaluate_targets(samples: Samples, backends: Sequence[str]) -> list[Target]:
    """The targets of every mode measured, per backend. A target passes when the median of
    the per-run ratios meets it."""
    targets = []
    for check in CHECKS:
        if not has(samples, check.metric):
            continue
        for backend in backends:
            if backend not in check.backends:
                continue
            title = f"{BACKEND_LABELS[backend]}: {check.goal}"
            if (backend, check.versus) in NOT_APPLICABLE:
                reason = NOT_APPLICABLE[(backend, check.versus)]
                targets.append(Target(title, reason, 0, 0, "n/a"))
                continue
            ratios = paired_ratios(samples, backend, check.versus, check.metric)
            if not ratios:
                continue
            middle = statistics.median(ratios)
            targets.append(
                Target(
                    title,
                    f"{middle:.2f}× (runs: {min(ratios):.2f} – {max(ratios):.2f}×)",
                    sum(map(check.holds, ratios)),
                    len(ratios),
                    "PASS" if check.holds(middle) else "FAIL",
                )
            )
    return targets


def targets_table(targets: Sequence[Target]) -> str:
    lines = ["| Target | Measured (median) | Runs meeting it | Result |", "|---|---|---|---|"]
    for target in targets:
        verdict = "**FAIL**" if target.result == "FAIL" else target.result
        runs = f"{target.runs_passing}/{target.runs}" if target.runs else "–"
        lines.append(f"| {target.goal} | {target.measured} | {runs} | {verdict} |")
    return "\n".join(lines)


def probe_note(samples: Samples) -> str:
    probes = sorted(
        value
        for runs in samples.values()
        for m in runs
        for name, value in m.items()
        if name.endswith("probe_ms")
    )
    low, mid, high = probes[0], statistics.median(probes), probes[-1]
    return (
        f"Machine steadiness: a fixed pure-Python loop timed at the start of each of the "
        f"{len(probes)} measurements took {low:.1f} – {high:.1f} ms (median {mid:.1f} ms)."
    )


# -- environment ---------------------------------------------------------------------------


async def broker_versions() -> dict[str, str]:
    """The server version of each broker, or why it could not be read."""
    import aio_pika
    import nats
    from redis.asyncio import Redis

    versions: dict[str, str] = {"sqlite": f"SQLite {sqlite_version()}"}
    try:
        client = Redis.from_url(REDIS_URL)
        info = await client.info("server")
        await client.aclose()
        versions["redis"] = f"Redis {info.get('redis_version', '?')}"
    except Exception as error:
        versions["redis"] = f"Redis unreachable ({type(error).__name__})"
    try:
        nc = await nats.connect(NATS_URL, max_reconnect_attempts=0)
        server = nc.connected_server_version
        versions["nats"] = f"NATS {server.major}.{server.minor}.{server.patch}"
        await nc.close()
    except Exception as error:
        versions["nats"] = f"NATS unreachable ({type(error).__name__})"
    try:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            underlay = await channel.get_underlay_channel()
            properties = underlay.connection.server_properties
            version = properties.get("version", "?")
            if isinstance(version, bytes):
                version = version.decode()
            versions["amqp"] = f"RabbitMQ {version}"
    except Exception as error:
        versions["amqp"] = f"RabbitMQ unreachable ({type(error).__name__})"
    return versions


def sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


def library_versions() -> dict[str, str]:
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment(args: argparse.Namespace) -> dict[str, Any]:
    command = shlex.join([".venv/bin/python", "bench/bench_backends.py", *sys.argv[1:]])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory": memory_total(),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "libraries": library_versions(),
        "brokers": asyncio.run(broker_versions()),
        "eventwire_revision": git_revision(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "command": command,
        "runs": args.runs,
        "events": events_per_measurement(args),
        "eventwire_query": args.eventwire_query,
    }


def events_per_measurement(args: argparse.Namespace) -> Events:
    return {
        backend: {mode: events_for(backend, mode, args) for mode in args.modes}
        for backend in args.backends
    }


def environment_text(env: dict[str, Any]) -> str:
    libraries = ", ".join(f"{name} {version}" for name, version in env["libraries"].items())
    brokers = ", ".join(env["brokers"][backend] for backend in BACKENDS)
    return "\n".join(
        [
            f"- Machine: {env['cpus']} CPUs, {env['cpu_model']}, {env['memory']} RAM, {env['os']}"
            " (the brokers run on the same machine)",
            f"- Python {env['python']}, default asyncio event loop",
            f"- Libraries: {libraries}",
            f"- Brokers: {brokers}",
            f"- eventwire revision: {env['eventwire_revision']}",
            f"- Load average at start: {', '.join(map(str, env['load_average']))}",
            f"- Command: `{env['command']}` ({env['runs']} run(s))",
        ]
    )


def sizes_text(events: Events, mode: str) -> str:
    """Events per measurement of `mode` on each backend, with the warm-up."""
    counts = {backend: modes[mode] for backend, modes in events.items()}

    def size(count: int) -> str:
        return f"{count:,} events + {workload_for(mode, count).warmup:,} warm-up"

    if len(set(counts.values())) == 1:
        return size(next(iter(counts.values())))
    return "; ".join(f"{BACKEND_LABELS[b]} {size(count)}" for b, count in counts.items())


def workload_text(events: Events) -> str:
    modes = list(next(iter(events.values())))
    throughput = workload_for("throughput", 1)
    lines = [
        f"- Each event is {PAYLOAD_BYTES:,} bytes of JSON carrying the time of its publish "
        "call. 1 publisher and 1 durable subscriber in one process (and event loop); a "
        "publish returns once the broker confirmed it stored the message; the subscriber "
        "acknowledges after its handler ran; every message handled exactly once (checked). "
        "Each mode is measured in its own process, after a warm-up done the same way and "
        "handled before timing starts",
        f"- Raw and FastStream subscribers fetch (or prefetch) {throughput.batch} messages at "
        "a time; eventwire uses its defaults (fetch window 512; RabbitMQ prefetch 64)",
    ]
    if "throughput" in modes:
        lines.append(
            f"- Throughput ({sizes_text(events, 'throughput')}): chunks of "
            f"{throughput.chunk} publishes, {throughput.lanes} chunks in flight (up to "
            f"{throughput.window:,} publishes waiting for the broker). eventwire sends a "
            "chunk with one `publish_many`, the raw SQLite and Redis clients with one "
            "transaction / pipeline, the others as concurrent publishes (`asyncio.gather`). "
            "Events ÷ time from the first timed publish to the last handled event. Latency: "
            "publish call to handler under that full load: when publishing outpaces "
            "handling, it is mostly the backlog's wait, and it grows with the number of events"
        )
    if "serial" in modes:
        lines.append(
            f"- One at a time ({sizes_text(events, 'serial')}): `await publish(...)` "
            "in a loop, each publish awaited before the next (eventwire: `await "
            "bus.publish(topic, payload)`), the subscriber handling meanwhile; events ÷ time "
            "from the first publish to the last handled event"
        )
    if "latency" in modes:
        lines.append(
            f"- Latency ({sizes_text(events, 'latency')}): one event at a time, the "
            "next published once the handler got the last; from the publish call to the "
            "start of the handler, with nothing queued ahead"
        )
    if "windowed" in modes:
        windowed = workload_for("windowed", 1)
        lines.append(
            f"- Windowed ({sizes_text(events, 'windowed')}): {windowed.window} "
            "one-message publish calls in flight at once, a new one starting as soon as one "
            "returns (eventwire: `bus.publish`, not `publish_many`). The raw SQLite and "
            f"Redis clients and FastStream on Redis send chunks of {windowed.chunk} in one "
            f"transaction / pipeline, {windowed.lanes} in flight"
        )
    return "\n".join(lines)


def report(
    samples: Samples,
    env: dict[str, Any],
    backends: Sequence[str],
    impls: Sequence[str],
    targets: Sequence[Target],
) -> str:
    parts = [
        "## Environment",
        environment_text(env),
        "## Workload",
        workload_text(env["events"]),
        f"## Results (median of {env['runs']} run(s))",
        "↑ higher is better, ↓ lower is better. Ratio columns: the median over the runs of "
        "eventwire's figure divided by that implementation's, measured in the same run "
        "(for latency, below 1 means eventwire is faster).",
    ]
    if has(samples, "rate"):
        parts += ["### Throughput", results_table(samples, backends, impls)]
    if any(has(samples, metric) for metric, _, _ in AGENT_COLUMNS):
        parts += [
            "### The agent path: one publish at a time, latency, 100 concurrent publishes",
            agent_table(samples, backends, impls),
        ]
    parts += [
        "### Spread (min – max over the runs)",
        spread_table(samples, backends, impls),
        probe_note(samples),
        "## Targets",
        "A target is met when the median of the per-run ratios meets it.",
        targets_table(targets),
    ]
    return "\n\n".join(parts)


# Figures whose eventwire ÷ peer ratio the JSON summary gives.
RATIO_METRICS = (
    "rate",
    "p50_ms",
    "p99_ms",
    "serial_rate",
    "latency_p50_us",
    "latency_p90_us",
    "latency_p99_us",
    "windowed_rate",
)


def summary(
    samples: Samples, backends: Sequence[str], impls: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Medians and median ratios, per `backend impl`, for the JSON output."""
    out: dict[str, dict[str, Any]] = {}
    for backend in backends:
        for impl in impls:
            runs = samples.get((backend, impl))
            if not runs:
                continue
            entry: dict[str, Any] = {
                metric: statistics.median(m[metric] for m in runs) for metric in runs[0]
            }
            if impl != "eventwire":
                for metric in RATIO_METRICS:
                    ratios = paired_ratios(samples, backend, impl, metric)
                    if ratios:
                        entry[f"eventwire_over_this_{metric}"] = statistics.median(ratios)
            out[f"{backend} {impl}"] = entry
    return out


# -- command line --------------------------------------------------------------------------

EPILOG = f"""modes (--modes; each one is a column of the report, measured in its own process):
  throughput  chunks of 500 publishes, 2 in flight (eventwire: publish_many per chunk);
              events/s, and publish-to-handler latency p50/p99 (ms) under that load
  serial      one publish at a time: `await publish(...)` in a loop, each awaited before
              the next, the subscriber handling meanwhile; events/s
  latency     one event at a time, the next published once the handler got the last;
              publish-to-handler p50/p90/p99 (µs)
  windowed    {WINDOWED_IN_FLIGHT} concurrent one-message publish calls (eventwire: bus.publish,
              not publish_many); sqlite3, redis-py and FastStream-on-Redis send chunks
              of 50, 2 in flight; events/s
events per measurement, default (--quick): {
    "; ".join(f"{m} {FULL_EVENTS[m]:,} ({QUICK_EVENTS[m]:,})" for m in MODES[:2])
}
  {"; ".join(f"{m} {FULL_EVENTS[m]:,} ({QUICK_EVENTS[m]:,})" for m in MODES[2:])}
every mode: 1 KiB JSON payload, confirmed publish, ack after handling, one process; each
figure is the median of --runs runs. Details: bench/backends/README.md"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=None, help=f"runs ({DEFAULT_RUNS})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer events per measurement (see below) and 1 run unless --runs: smoke test",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help="events per measurement, every backend and mode (default: per mode, below)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated subset of the modes ({','.join(MODES)})",
    )
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated subset of backends"
    )
    parser.add_argument(
        "--impls", default=",".join(IMPLS), help="comma-separated subset of implementations"
    )
    parser.add_argument(
        "--eventwire-query",
        default="",
        help="URL options added to eventwire's bus URLs, e.g. history=1d (RabbitMQ's history "
        "stream): what an option costs",
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--json", type=Path, help="also write the raw and summary figures here")
    parser.add_argument(
        "--worker",
        nargs=2,
        metavar=("BACKEND", "IMPL"),
        help="run one measurement in this process (of --mode, default throughput) and print "
        "its figures as JSON: for profiling",
    )
    parser.add_argument("--mode", default="throughput", help="the mode of a --worker measurement")
    args = parser.parse_args(argv)
    if args.eventwire_query:
        # Read by the eventwire workers (backends/impl_eventwire.py), which inherit it.
        os.environ[QUERY_VARIABLE] = args.eventwire_query
    args.backends = [b for b in args.backends.split(",") if b]
    args.impls = [i for i in args.impls.split(",") if i]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [b for b in args.backends if b not in BACKENDS]
    unknown += [i for i in args.impls if i not in IMPLS]
    unknown += [m for m in [*args.modes, args.mode] if m not in MODES]
    if args.worker is not None:
        unknown += [args.worker[0]] if args.worker[0] not in BACKENDS else []
        unknown += [args.worker[1]] if args.worker[1] not in IMPLS else []
    if unknown:
        parser.error(f"unknown backend, implementation or mode: {', '.join(unknown)}")
    if not args.modes:
        parser.error(f"--modes needs at least one of {', '.join(MODES)}")
    if args.events is not None and args.events < 1:
        parser.error("--events must be at least 1")
    if args.runs is None:
        args.runs = 1 if args.quick else DEFAULT_RUNS
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    # Reports list implementations and modes in a fixed order.
    args.impls = [impl for impl in IMPLS if impl in args.impls]
    args.modes = [mode for mode in MODES if mode in args.modes]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        backend, impl = args.worker
        run_worker(backend, impl, args.mode, events_for(backend, args.mode, args))
        return 0
    env = environment(args)
    started = time.perf_counter()
    events = events_per_measurement(args)
    samples, spent = collect(args.runs, events, args.backends, args.impls)
    targets = evaluate_targets(samples, args.backends) if "eventwire" in args.impls else []
    text = report(samples, env, args.backends, args.impls, targets)
    total = time.perf_counter() - started
    per_backend = ", ".join(f"{BACKEND_LABELS[b]} {s:.0f} s" for b, s in spent.items())
    text += f"\n\nTotal benchmark time: {total:.0f} s ({per_backend}).\n"
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json is not None:
        document = {
            "environment": env,
            "workloads": {
                backend: {mode: asdict(workload_for(mode, n)) for mode, n in modes.items()}
                for backend, modes in events.items()
            },
            "runs": {f"{b} {i}": runs for (b, i), runs in samples.items()},
            "summary": summary(samples, args.backends, args.impls),
            "targets": [asdict(target) for target in targets],
            "seconds": {"total": total, **spent},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
