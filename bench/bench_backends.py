"""Broker benchmarks: eventwire on each durable backend against the broker's own Python client
and against FastStream, with the same delivery guarantees.

Usage (from the repository root, with Redis, NATS JetStream and RabbitMQ on localhost)::

    .venv/bin/python bench/bench_backends.py [--runs N] [--quick] [--events N]
        [--markdown FILE] [--json FILE]

One publisher and one durable subscriber in one process, 1 KB JSON payloads: throughput from
the first publish to the last handled message, and end-to-end latency (publish call to
handler) p50/p99. Every (backend, implementation) measurement runs in a fresh subprocess.
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
    NATS_URL,
    PAYLOAD_BYTES,
    QUERY_VARIABLE,
    REDIS_URL,
    Workload,
)
from bench_core import cpu_model, cpu_probe_ms, git_revision, memory_total
from common import worker_metrics

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

FULL_EVENTS = 100_000
QUICK_EVENTS = 10_000
# Per backend, when fewer events than FULL_EVENTS are needed to keep a full session within
# ~15 minutes (rates are per second, so the figures stay comparable). None needs it now: a
# full session takes some 12 minutes on 2 cores, RabbitMQ (2-4k events/s) half of it.
FULL_EVENTS_FOR: dict[str, int] = {}
DEFAULT_RUNS = 3
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


def workload_for(events: int) -> Workload:
    # A warm-up of a tenth of the events, at least one publishing window, at most 5,000.
    return Workload(events=events, warmup=min(5_000, max(1_000, events // 10)))


def events_for(backend: str, args: argparse.Namespace) -> int:
    """Events per measurement on `backend`: `--events`, else the default for the mode."""
    if args.events is not None:
        return int(args.events)
    if args.quick:
        return QUICK_EVENTS
    return FULL_EVENTS_FOR.get(backend, FULL_EVENTS)


# -- one measurement, in a subprocess -------------------------------------------------------


def run_worker(backend: str, impl: str, events: int) -> None:
    """Run one measurement in this process and print its metrics as JSON."""
    module = importlib.import_module(f"backends.{MODULES[impl]}")
    probe = cpu_probe_ms()
    metrics: dict[str, float] = asyncio.run(module.run(backend, workload_for(events)))
    metrics["probe_ms"] = probe
    print(json.dumps(metrics))


def measure_in_subprocess(backend: str, impl: str, events: int) -> dict[str, float]:
    metrics: dict[str, float] = worker_metrics(
        str(Path(__file__).resolve()),
        ["--worker", backend, impl, "--events", str(events)],
        timeout=WORKER_TIMEOUT_SECONDS,
        label=f"{backend} {impl}",
    )
    return metrics


def run_order(run: int) -> tuple[str, ...]:
    """eventwire between its two peers, and no implementation always first or last."""
    order = ("raw", "eventwire", "faststream")
    return order if run % 2 == 0 else order[::-1]


def collect(
    runs: int, events: dict[str, int], backends: Sequence[str], impls: Sequence[str]
) -> tuple[Samples, dict[str, float]]:
    """Every measurement once per run; run i of every pair is entry i of its list. Also the
    wall time each backend took over the whole session."""
    samples: Samples = {}
    spent: dict[str, float] = {}
    for run in range(runs):
        for backend in backends:
            for impl in run_order(run):
                if impl not in impls or (backend, impl) in NOT_APPLICABLE:
                    continue
                started = time.perf_counter()
                metrics = measure_in_subprocess(backend, impl, events[backend])
                took = time.perf_counter() - started
                spent[backend] = spent.get(backend, 0.0) + took
                samples.setdefault((backend, impl), []).append(metrics)
                print(
                    f"[run {run + 1}/{runs}] {backend:<6} {impl:<10} "
                    f"{metrics['rate']:>9,.0f} events/s  p50 {metrics['p50_ms']:7.2f} ms  "
                    f"p99 {metrics['p99_ms']:7.2f} ms  ({took:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    return samples, spent


# -- summary -------------------------------------------------------------------------------


def values(samples: Samples, backend: str, impl: str, metric: str) -> list[float]:
    return [metrics[metric] for metrics in samples.get((backend, impl), [])]


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


def results_table(samples: Samples, backends: Sequence[str], impls: Sequence[str]) -> str:
    lines = [
        "| Backend | Implementation | Events/s ↑ | p50 latency (ms) ↓ | p99 latency (ms) ↓ "
        "| eventwire ÷ this, events/s |",
        "|---|---|---|---|---|---|",
    ]
    for backend in backends:
        for impl in impls:
            if (backend, impl) in NOT_APPLICABLE:
                cells = [NOT_APPLICABLE[(backend, impl)], "–", "–", "–"]
            else:
                rate = median(values(samples, backend, impl, "rate"))
                p50 = median(values(samples, backend, impl, "p50_ms"))
                p99 = median(values(samples, backend, impl, "p99_ms"))
                if rate is None or p50 is None or p99 is None:
                    continue
                ratio = median(paired_ratios(samples, backend, impl, "rate"))
                cells = [
                    rate_text(rate),
                    f"{p50:,.1f}",
                    f"{p99:,.1f}",
                    "–" if impl == "eventwire" or ratio is None else f"{ratio:.2f}×",
                ]
            label = impl_label(backend, impl)
            lines.append(f"| {BACKEND_LABELS[backend]} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread_table(samples: Samples, backends: Sequence[str], impls: Sequence[str]) -> str:
    lines = [
        "| Backend | Implementation | Events/s | p50 (ms) | p99 (ms) | Publish side, events/s |",
        "|---|---|---|---|---|---|",
    ]
    for backend in backends:
        for impl in impls:
            rates = values(samples, backend, impl, "rate")
            if not rates:
                continue

            def span(metric: str, text: Callable[[float], str]) -> str:
                measured = values(samples, backend, impl, metric)  # noqa: B023
                return f"{text(min(measured))} – {text(max(measured))}"

            cells = [
                span("rate", rate_text),
                span("p50_ms", lambda v: f"{v:,.1f}"),
                span("p99_ms", lambda v: f"{v:,.1f}"),
                span("publish_rate", rate_text),
            ]
            label = impl_label(backend, impl)
            lines.append(f"| {BACKEND_LABELS[backend]} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Target:
    goal: str
    measured: str
    runs_passing: int
    runs: int
    result: str  # PASS, FAIL or n/a


def evaluate_targets(samples: Samples, backends: Sequence[str]) -> list[Target]:
    """Per backend: eventwire ≥ 0.5× the raw client's throughput, and above FastStream's.
    A target passes when the median of the per-run ratios meets it."""
    checks: tuple[tuple[str, str, Callable[[float], bool]], ...] = (
        ("raw", "eventwire ≥ 0.5× raw client throughput", lambda r: r >= 0.5),
        ("faststream", "eventwire throughput above FastStream", lambda r: r > 1.0),
    )
    targets = []
    for versus, goal, holds in checks:
        for backend in backends:
            title = f"{BACKEND_LABELS[backend]}: {goal}"
            if (backend, versus) in NOT_APPLICABLE:
                targets.append(Target(title, NOT_APPLICABLE[(backend, versus)], 0, 0, "n/a"))
                continue
            ratios = paired_ratios(samples, backend, versus, "rate")
            if not ratios:
                continue
            middle = statistics.median(ratios)
            targets.append(
                Target(
                    title,
                    f"{middle:.2f}× (runs: {min(ratios):.2f} – {max(ratios):.2f}×)",
                    sum(map(holds, ratios)),
                    len(ratios),
                    "PASS" if holds(middle) else "FAIL",
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
    probes = sorted(m["probe_ms"] for runs in samples.values() for m in runs)
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
        "events": {backend: events_for(backend, args) for backend in args.backends},
        "eventwire_query": args.eventwire_query,
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


def workload_text(events: dict[str, int]) -> str:
    sizes = "; ".join(
        f"{BACKEND_LABELS[backend]} {count:,} (+ {workload_for(count).warmup:,} warm-up)"
        for backend, count in events.items()
    )
    fewer = [BACKEND_LABELS[b] for b, n in events.items() if n != max(events.values())]
    workload = workload_for(max(events.values()))
    return "\n".join(
        [
            f"- Events per measurement: {sizes}. Each is {PAYLOAD_BYTES:,} bytes of JSON "
            "carrying its publish time; the warm-up is handled before timing starts"
            + (
                f". {', '.join(fewer)}: fewer events, to keep the session within ~15 minutes "
                "(rates are per second)"
                if fewer
                else ""
            ),
            "- 1 publisher and 1 durable subscriber in one process (and event loop); every "
            "message handled exactly once (checked)",
            f"- Publisher: chunks of {workload.chunk} publishes awaited together "
            f"(`asyncio.gather`), {workload.lanes} chunks in flight: up to "
            f"{workload.window:,} publishes waiting for the broker's confirmation. The raw "
            "SQLite and Redis clients send each chunk as one transaction / one pipeline",
            f"- Raw and FastStream subscribers fetch (or prefetch) {workload.batch} messages at "
            "a time; eventwire uses its defaults (fetch window 512; RabbitMQ prefetch 64)",
            "- Throughput: events ÷ time from the first timed publish to the last handled "
            "event. Latency: from the publish call to the start of the handler, under that "
            "full load: when publishing outpaces handling, it is mostly the backlog's wait, "
            "and it grows with the number of events",
        ]
    )


def report(
    samples: Samples,
    env: dict[str, Any],
    backends: Sequence[str],
    impls: Sequence[str],
    targets: Sequence[Target],
) -> str:
    return "\n\n".join(
        [
            "## Environment",
            environment_text(env),
            "## Workload",
            workload_text(env["events"]),
            f"## Results (median of {env['runs']} run(s))",
            "↑ higher is better, ↓ lower is better. Last column: the median over the runs of "
            "eventwire's throughput divided by that implementation's, measured in the same run.",
            results_table(samples, backends, impls),
            "### Spread (min – max over the runs)",
            spread_table(samples, backends, impls),
            probe_note(samples),
            "## Targets",
            "A target is met when the median of the per-run ratios meets it.",
            targets_table(targets),
        ]
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
                for metric in ("rate", "p50_ms", "p99_ms"):
                    ratios = paired_ratios(samples, backend, impl, metric)
                    if ratios:
                        entry[f"eventwire_over_this_{metric}"] = statistics.median(ratios)
            out[f"{backend} {impl}"] = entry
    return out


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help=f"runs ({DEFAULT_RUNS})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_EVENTS:,} events per measurement and 1 run unless --runs: smoke test",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help=f"events per measurement, every backend ({FULL_EVENTS:,})",
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
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "IMPL"), help="internal")
    args = parser.parse_args(argv)
    if args.eventwire_query:
        # Read by the eventwire workers (backends/impl_eventwire.py), which inherit it.
        os.environ[QUERY_VARIABLE] = args.eventwire_query
    args.backends = [b for b in args.backends.split(",") if b]
    args.impls = [i for i in args.impls.split(",") if i]
    unknown = [b for b in args.backends if b not in BACKENDS]
    unknown += [i for i in args.impls if i not in IMPLS]
    if args.worker is not None:
        unknown += [args.worker[0]] if args.worker[0] not in BACKENDS else []
        unknown += [args.worker[1]] if args.worker[1] not in IMPLS else []
    if unknown:
        parser.error(f"unknown backend or implementation: {', '.join(unknown)}")
    if args.events is not None and args.events < 1:
        parser.error("--events must be at least 1")
    if args.runs is None:
        args.runs = 1 if args.quick else DEFAULT_RUNS
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    # Reports list implementations in a fixed order.
    args.impls = [impl for impl in IMPLS if impl in args.impls]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        backend, impl = args.worker
        run_worker(backend, impl, events_for(backend, args))
        return 0
    env = environment(args)
    started = time.perf_counter()
    events = {backend: events_for(backend, args) for backend in args.backends}
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
            "workloads": {b: asdict(workload_for(n)) for b, n in events.items()},
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
