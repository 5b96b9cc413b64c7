"""What observability costs: eventwire's recorder and OpenTelemetry tracing, side by side with
the OpenTelemetry support built into autogen-core and FastStream, and what reading a bus's
metrics costs (``bus.stats()``, a Prometheus scrape).

Usage (from the repository root)::

    .venv/bin/python bench/bench_observability.py [--runs N] [--quick] \
        [--markdown FILE] [--json FILE]

Every measurement runs in a fresh subprocess. A short verification pass first counts the
spans each traced setup exports per chain (a synchronous processor and an exporter that keeps
them). Then each run measures every case, in an order reversed every other run; the report
gives medians over the runs, and each ratio or overhead is taken within a run, against the
same library untraced. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import secrets
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_core import PROBE_ITERATIONS, cpu_model, cpu_probe_ms, git_revision, memory_total
from common import Metrics, worker_metrics
from observability.chain import ChainSizes
from observability.otel import QUEUE_SIZE

REDIS_URL = "redis://127.0.0.1:6379/0"
WORKER_TIMEOUT_SECONDS = 300


@dataclass(frozen=True, slots=True)
class Case:
    """One measured setup: a library in a tracing mode, on one transport."""

    key: str
    library: str
    group: str  # "memory" (in process), "redis", or "read" (stats and scrapes)
    mode: str
    label: str


CASES = (
    Case("ew-off", "eventwire", "memory", "off", "eventwire, no observer"),
    Case("ew-observer", "eventwire", "memory", "observer", "eventwire, a do-nothing `Observer`"),
    Case("ew-record", "eventwire", "memory", "record", 'eventwire, `bus.record(">")`'),
    Case("ew-api", "eventwire", "memory", "api", "eventwire, tracing, API only"),
    Case("ew-sdk", "eventwire", "memory", "sdk", "eventwire, tracing, SDK"),
    Case("ag-off", "autogen-core", "memory", "off", "autogen-core, tracing disabled"),
    Case("ag-api", "autogen-core", "memory", "api", "autogen-core, API only (its default)"),
    Case("ag-sdk", "autogen-core", "memory", "sdk", "autogen-core, SDK"),
    Case("ewr-off", "eventwire", "redis", "off", "eventwire on Redis, no tracing"),
    Case("ewr-api", "eventwire", "redis", "api", "eventwire on Redis, tracing, API only"),
    Case("ewr-sdk", "eventwire", "redis", "sdk", "eventwire on Redis, tracing, SDK"),
    Case("fs-off", "FastStream", "redis", "off", "FastStream Redis, no middleware"),
    Case("fs-api", "FastStream", "redis", "api", "FastStream Redis, telemetry, API only"),
    Case("fs-sdk", "FastStream", "redis", "sdk", "FastStream Redis, telemetry, SDK"),
    Case("stats", "eventwire", "read", "stats", "`bus.stats()`"),
    Case("collect", "eventwire", "read", "collect", "`EventwireCollector.collect()`"),
    Case("scrape", "eventwire", "read", "scrape", "Prometheus scrape (`generate_latest`)"),
    Case("native", "prometheus_client", "read", "native", "same series, prometheus_client"),
)
BY_KEY = {case.key: case for case in CASES}
GROUPS = ("memory", "redis", "read")
TRACED = tuple(case for case in CASES if case.mode == "sdk")

# Chains per measurement: (timed roots, untimed warm-up roots, publishes in flight).
CHAIN_SIZES = {
    ("eventwire", "memory"): (ChainSizes(20_000, 1_000), ChainSizes(2_000, 200)),
    # autogen-core handles some 10k messages/s untraced.
    ("autogen-core", "memory"): (ChainSizes(3_000, 300), ChainSizes(500, 50)),
    ("eventwire", "redis"): (ChainSizes(5_000, 500, 100), ChainSizes(500, 100, 100)),
    ("FastStream", "redis"): (ChainSizes(5_000, 500, 100), ChainSizes(500, 100, 100)),
}
VERIFY_ROOTS = 200
# Calls per read measurement: (full, quick).
READ_CALLS = {"stats": (200, 20), "collect": (10, 2), "scrape": (5, 2), "native": (5, 2)}


# -- one measurement, in a subprocess -------------------------------------------------------


def chain_sizes(case: Case, quick: bool, verify: bool) -> ChainSizes:
    full, small = CHAIN_SIZES[(case.library, case.group)]
    sizes = small if quick else full
    if verify:
        return ChainSizes(VERIFY_ROOTS, 0, sizes.concurrency)
    return sizes


async def measure(case: Case, quick: bool, verify: bool) -> Metrics:
    if case.group == "read":
        from observability import scrape

        return await scrape.run(case.mode, READ_CALLS[case.mode][1 if quick else 0])
    sizes = chain_sizes(case, quick, verify)
    namespace = f"obsbench_{os.getpid()}_{secrets.token_hex(4)}"
    if case.library == "eventwire":
        from observability import impl_eventwire

        url = "memory://" if case.group == "memory" else f"{REDIS_URL}?namespace={namespace}"
        return await impl_eventwire.run(url, case.mode, sizes, verify)
    if case.library == "autogen-core":
        from observability import impl_autogen

        return await impl_autogen.run(case.mode, sizes, verify)
    from observability import impl_faststream

    return await impl_faststream.run(REDIS_URL, namespace, case.mode, sizes, verify)


def run_worker(key: str, quick: bool, verify: bool) -> None:
    """Run one measurement in this process and print its metrics as JSON."""
    probe = cpu_probe_ms()
    metrics = asyncio.run(measure(BY_KEY[key], quick, verify))
    metrics["probe_ms"] = probe
    print(json.dumps(metrics))


def measure_in_subprocess(key: str, quick: bool, verify: bool = False) -> dict[str, Any]:
    args = ["--worker", key, *(["--quick"] if quick else []), *(["--verify"] if verify else [])]
    result: dict[str, Any] = worker_metrics(
        str(Path(__file__).resolve()), args, timeout=WORKER_TIMEOUT_SECONDS, label=key
    )
    return result


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def shown(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def verify_spans(quick: bool) -> dict[str, dict[str, Any]]:
    """Spans and traces per chain of every SDK setup, from one pass that keeps every span."""
    found = {}
    for case in TRACED:
        found[case.key] = measure_in_subprocess(case.key, quick, verify=True)
        log(f"[verify] {case.key:<8} {shown(found[case.key])}")
    return found


Samples = dict[str, list[dict[str, Any]]]


def run_order(run: int) -> list[Case]:
    """Each group's cases in `CASES` order on even runs and reversed on odd ones."""
    order = []
    for group in GROUPS:
        cases = [case for case in CASES if case.group == group]
        order.extend(cases if run % 2 == 0 else cases[::-1])
    return order


def collect(runs: int, quick: bool) -> Samples:
    samples: Samples = {}
    for run in range(runs):
        for case in run_order(run):
            started = time.perf_counter()
            metrics = measure_in_subprocess(case.key, quick)
            samples.setdefault(case.key, []).append(metrics)
            log(
                f"[run {run + 1}/{runs}] {case.key:<9} {shown(metrics)} "
                f"({time.perf_counter() - started:.1f}s)"
            )
    return samples


# -- summary -------------------------------------------------------------------------------


def values(samples: Samples, key: str, metric: str) -> list[float]:
    return [float(m[metric]) for m in samples.get(key, [])]


def off_key(case: Case) -> str:
    return next(c.key for c in CASES if c.library == case.library and c.group == case.group)


def per_run(samples: Samples, key: str, versus: str, how: str) -> list[float]:
    """Within each run: `key`'s rate ÷ `versus`'s (``ratio``), or the wall time (``overhead``)
    or CPU time (``cpu``) per chain that `key` adds over `versus`, in µs."""
    if how == "cpu":
        mine = values(samples, key, "cpu_us_per_chain")
        return [
            a - b for a, b in zip(mine, values(samples, versus, "cpu_us_per_chain"), strict=True)
        ]
    mine, theirs = values(samples, key, "rate"), values(samples, versus, "rate")
    if how == "ratio":
        return [a / b for a, b in zip(mine, theirs, strict=True)]
    return [1e6 / a - 1e6 / b for a, b in zip(mine, theirs, strict=True)]


def rate_text(rate: float) -> str:
    return f"{rate / 1e3:,.1f} k" if rate >= 1e4 else f"{rate:,.0f}"


def median_range(each_run: list[float]) -> str:
    """The median, and in brackets the lowest and highest run."""
    middle = statistics.median(each_run)
    return f"{middle:,.1f} ({min(each_run):,.0f} – {max(each_run):,.0f})"


def chain_table(samples: Samples, spans: dict[str, dict[str, Any]], group: str) -> str:
    lines = [
        "| Setup | chains/s ↑ | × untraced | added wall µs per chain ↓ "
        "| added CPU µs per chain ↓ | spans per chain | added CPU µs per span "
        "| traces per chain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in (c for c in CASES if c.group == group):
        rate = statistics.median(values(samples, case.key, "rate"))
        cells = [case.label, rate_text(rate)]
        base = off_key(case)
        if case.key == base:
            cpu = statistics.median(values(samples, case.key, "cpu_us_per_chain"))
            cells += ["1", "–", f"– ({cpu:,.0f} in all)", "0", "–", "–"]
        else:
            ratio = statistics.median(per_run(samples, case.key, base, "ratio"))
            cpu_runs = per_run(samples, case.key, base, "cpu")
            cells += [
                f"{ratio:.2f}×",
                median_range(per_run(samples, case.key, base, "overhead")),
                median_range(cpu_runs),
            ]
            verified = spans.get(case.key)
            if verified is not None:
                per_chain = verified["spans_per_root"]
                cells += [
                    f"{per_chain:g}",
                    f"{statistics.median(cpu_runs) / per_chain:,.1f}",
                    f"{verified['traces_per_root']:g}",
                ]
            else:
                cells += ["0", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(samples: Samples, spans: dict[str, dict[str, Any]], group: str) -> str:
    """eventwire against the peer of `group`: medians over the runs of per-run figures."""
    ours = "ew" if group == "memory" else "ewr"
    peer = "ag" if group == "memory" else "fs"
    name = BY_KEY[f"{peer}-off"].library
    lines = [f"| | eventwire | {name} | eventwire vs {name} |", "|---|---|---|---|"]
    for mode, title in (("off", "chains/s untraced"), ("sdk", "chains/s traced (SDK)")):
        mine, theirs = f"{ours}-{mode}", f"{peer}-{mode}"
        ratio = statistics.median(per_run(samples, mine, theirs, "ratio"))
        lines.append(
            f"| {title} | {rate_text(statistics.median(values(samples, mine, 'rate')))} "
            f"| {rate_text(statistics.median(values(samples, theirs, 'rate')))} "
            f"| {ratio:.2f}× the throughput |"
        )
    ours_spans = spans[f"{ours}-sdk"]["spans_per_root"]
    peer_spans = spans[f"{peer}-sdk"]["spans_per_root"]
    for how, unit in (("overhead", "wall"), ("cpu", "CPU")):
        for mode, title in (("api", "API only"), ("sdk", "SDK")):
            mine = statistics.median(per_run(samples, f"{ours}-{mode}", f"{ours}-off", how))
            theirs = statistics.median(per_run(samples, f"{peer}-{mode}", f"{peer}-off", how))
            lines.append(
                f"| added {unit} µs per chain, {title} | {mine:,.1f} | {theirs:,.1f} "
                f"| {less_or_more(theirs / mine) if mine > 0 < theirs else 'n/a (noise)'} |"
            )
    lines.append(
        f"| spans per chain (SDK) | {ours_spans:g} | {peer_spans:g} | "
        f"{'same' if ours_spans == peer_spans else 'differ: compare per span'} |"
    )
    mine = statistics.median(per_run(samples, f"{ours}-sdk", f"{ours}-off", "cpu")) / ours_spans
    theirs = statistics.median(per_run(samples, f"{peer}-sdk", f"{peer}-off", "cpu")) / peer_spans
    lines.append(
        f"| added CPU µs per span (SDK) | {mine:,.1f} | {theirs:,.1f} "
        f"| {less_or_more(theirs / mine)} |"
    )
    return "\n".join(lines)


def less_or_more(peer_over_ours: float) -> str:
    """How eventwire's added time compares, from the peer's ÷ eventwire's."""
    if peer_over_ours >= 1:
        return f"{peer_over_ours:.1f}× less"
    return f"{1 / peer_over_ours:.1f}× more"


def spans_note(spans: dict[str, dict[str, Any]]) -> str:
    lines = []
    for key, verified in spans.items():
        names = ", ".join(f"`{name}`" for name in verified["span_names"])
        lines.append(f"- {BY_KEY[key].label}: {names}")
    return "\n".join(lines)


def exported_note(samples: Samples, spans: dict[str, dict[str, Any]]) -> str:
    """Whether the timed SDK runs exported every span (a full batch queue drops some)."""
    parts = []
    for case in TRACED:
        exported = values(samples, case.key, "exported_per_root")
        expected = spans[case.key]["spans_per_root"]
        parts.append(
            f"{case.label}: {min(exported):g}–{max(exported):g} exported per chain "
            f"(verified: {expected:g})"
        )
    return "Spans exported in the timed runs: " + "; ".join(parts) + "."


def read_table(samples: Samples) -> str:
    lines = ["| What (1,000 subscriptions) | µs per call ↓ | output |", "|---|---|---|"]
    for case in (c for c in CASES if c.group == "read"):
        measured = samples[case.key]
        cost = statistics.median(values(samples, case.key, "us_per_call"))
        output = "–"
        if "bytes" in measured[0]:
            output = f"{measured[0]['samples']:,.0f} samples, {measured[0]['bytes'] / 1e6:.1f} MB"
        lines.append(f"| {case.label} | {cost:,.0f} | {output} |")
    return "\n".join(lines)


def spread_table(samples: Samples) -> str:
    lines = ["| Setup | chains/s, min – max |", "|---|---|"]
    for case in CASES:
        if case.group == "read":
            low, high = (
                min(values(samples, case.key, "us_per_call")),
                max(values(samples, case.key, "us_per_call")),
            )
            lines.append(f"| {case.label} (µs per call) | {low:,.0f} – {high:,.0f} |")
            continue
        rates = values(samples, case.key, "rate")
        lines.append(f"| {case.label} | {rate_text(min(rates))} – {rate_text(max(rates))} |")
    return "\n".join(lines)


def probe_note(samples: Samples) -> str:
    probes = sorted(m["probe_ms"] for runs in samples.values() for m in runs)
    low, mid, high = probes[0], statistics.median(probes), probes[-1]
    return (
        f"Machine steadiness: a fixed {PROBE_ITERATIONS:,}-iteration Python loop, timed just "
        f"before each of the {len(probes)} measurements, took {low:.1f} – {high:.1f} ms "
        f"(median {mid:.1f} ms): the CPU's speed changed by up to {high / low:.1f}× during "
        "the session. Ratios and added times are taken within each run for that reason."
    )


def sizes_note(quick: bool) -> str:
    lines = []
    for (library, group), (full, small) in CHAIN_SIZES.items():
        sizes = small if quick else full
        how = (
            "one `await` at a time"
            if sizes.concurrency == 1
            else f"{sizes.concurrency} at a time (`asyncio.gather`)"
        )
        where = "in process" if group == "memory" else "on Redis"
        lines.append(
            f"- {library} {where}: {sizes.roots:,} chains timed after {sizes.warmup:,} "
            f"warm-up chains; root events published {how}"
        )
    lines.append(f"- Verification pass: {VERIFY_ROOTS} chains per SDK setup, no warm-up")
    calls = ", ".join(
        f"{key} {READ_CALLS[key][1 if quick else 0]}" for key in ("stats", "collect", "scrape")
    )
    lines.append(f"- Reads: calls per measurement: {calls} (the same for the native one)")
    return "\n".join(lines)


# -- environment ---------------------------------------------------------------------------

DISTRIBUTIONS = (
    "eventwire",
    "autogen-core",
    "faststream",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "prometheus-client",
    "redis",
)


def redis_version() -> str:
    from redis import Redis

    try:
        client = Redis.from_url(REDIS_URL)
        version = str(client.info("server").get("redis_version", "?"))
        client.close()
        return f"Redis {version}"
    except Exception as error:
        return f"Redis unreachable ({type(error).__name__})"


def environment(runs: int, quick: bool) -> str:
    versions = ", ".join(f"{d} {importlib.metadata.version(d)}" for d in DISTRIBUTIONS)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    command = shlex.join([".venv/bin/python", "bench/bench_observability.py", *sys.argv[1:]])
    return "\n".join(
        [
            f"- Machine: {os.cpu_count()} cores, {cpu_model()}, {memory_total()} RAM, "
            f"{platform.system()} {platform.release()}",
            f"- Python {platform.python_version()} ({platform.python_implementation()}), "
            "default asyncio event loop",
            f"- Libraries: {versions}; {redis_version()} on the same machine",
            f"- eventwire revision: {git_revision()}",
            f"- Load average at start: {load}",
            f"- Command: `{command}` ({runs} run(s){', quick sizes' if quick else ''})",
        ]
    )


def report(samples: Samples, spans: dict[str, dict[str, Any]], env: str, quick: bool) -> str:
    runs = len(samples["ew-off"])
    return "\n\n".join(
        [
            "## Environment",
            env,
            "## Workload",
            "One publisher, a two-hop chain: `user.query` → a handler publishes "
            "`research.complete` → a handler that counts. A *chain* is one root event: 2 "
            "publishes and 2 handlings. Timed from the first root publish until the last "
            "chain was handled and, with the SDK, every span was exported "
            "(`force_flush`). SDK: `TracerProvider` + `BatchSpanProcessor` (defaults, but a "
            f"queue of {QUEUE_SIZE:,} spans so that none is dropped) + an exporter that "
            "counts spans and drops them. API only: tracing on, no SDK provider, so spans are "
            "non-recording.",
            sizes_note(quick),
            f"## In process (median of {runs} run(s))",
            "× untraced and the added times are medians of per-run figures against the "
            "same library's first row; in brackets, the lowest and highest run (a range "
            "that spans 0 is noise). Wall: from the rates, 1/rate − 1/rate untraced. CPU: "
            "the measuring process's CPU time (every thread, the span processor's too) per "
            "chain, minus the untraced one; the untraced row shows its whole CPU time per "
            "chain. Against a broker, wall time also holds waits on the broker, so CPU is "
            "the steadier measure of what tracing adds. Per span: added CPU µs per chain ÷ "
            "spans per chain. Spans and traces per chain come from the verification pass.",
            chain_table(samples, spans, "memory"),
            comparison_table(samples, spans, "memory"),
            f"## On Redis (median of {runs} run(s))",
            "FastStream has no in-process broker for applications (its `TestRedisBroker` is "
            "a test double), so it is compared on Redis Streams, against eventwire on Redis.",
            chain_table(samples, spans, "redis"),
            comparison_table(samples, spans, "redis"),
            "### Spans each SDK setup makes",
            spans_note(spans),
            exported_note(samples, spans),
            f"## Reading metrics (median of {runs} run(s))",
            read_table(samples),
            "### Spread (min – max over the runs)",
            spread_table(samples),
            probe_note(samples),
        ]
    )


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (3)")
    parser.add_argument(
        "--quick", action="store_true", help="smaller workloads, 1 run unless --runs: smoke test"
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--json", type=Path, help="also write every run's raw metrics here")
    parser.add_argument("--worker", metavar="CASE", help="internal")
    parser.add_argument("--verify", action="store_true", help="internal")
    args = parser.parse_args(argv)
    if args.worker is not None and args.worker not in BY_KEY:
        parser.error(f"unknown case {args.worker}")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        run_worker(args.worker, args.quick, args.verify)
        return 0
    env = environment(args.runs, args.quick)
    started = time.perf_counter()
    spans = verify_spans(args.quick)
    samples = collect(args.runs, args.quick)
    text = report(samples, spans, env, args.quick)
    text += f"\n\nTotal benchmark time: {time.perf_counter() - started:.0f} s.\n"
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
    if args.json is not None:
        raw = {"verification": spans, "runs": samples}
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
