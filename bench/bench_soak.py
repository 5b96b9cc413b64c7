"""The soak, long form (issue 11): per durable backend, a publisher and two `eventwire run`
consumers for `--seconds`, one consumer SIGKILLed and started again every few seconds, the
broker (a private one) restarted once midway; then lost, duplicated, latency and the
consumers' memory over time. The short form is `tests/conformance/test_soak.py`; both run
`tests/soak.py`.

Usage (from the repository root; needs redis-server, nats-server and rabbitmq-server
installed, not running: each backend gets a broker of its own on a free port)::

    .venv/bin/python bench/bench_soak.py [--seconds 120] [--backends sqlite,redis,nats,amqp]
        [--rate 200] [--kill-every 3] [--markdown FILE] [--json FILE]

Backends run one after another. Exits 1 if any returned publish was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent)]  # the repository root, for tests.soak

from bench_backends import broker_versions, library_versions  # noqa: E402
from bench_core import cpu_model, git_revision, memory_total  # noqa: E402

from tests.soak import DURABLE, SoakConfig, SoakResult, soak  # noqa: E402

NAMES = {"sqlite": "SQLite", "redis": "Redis Streams", "nats": "NATS JetStream", "amqp": "RabbitMQ"}
# Memory is reported at these steps (seconds since publishing started).
REPORT_EVERY = 15.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="publishing time per backend")
    parser.add_argument("--backends", default=",".join(DURABLE))
    parser.add_argument("--rate", type=float, default=200.0, help="publishes per second")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills")
    parser.add_argument("--markdown", type=Path, default=BENCH_DIR / "results/bench_soak.md")
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results/bench_soak.json")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = set(args.backends) - set(DURABLE)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(DURABLE)}")
    return args


def progress(line: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


async def run_one(backend: str, args: argparse.Namespace) -> SoakResult:
    config = SoakConfig(
        seconds=args.seconds,
        rate=args.rate,
        kill_every=args.kill_every,
        sample_every=REPORT_EVERY / 3,
        settle_timeout=120.0,
    )
    with tempfile.TemporaryDirectory(prefix=f"soak-{backend}-") as workdir:
        return await soak(backend, Path(workdir), config, progress)


def memory_steps(result: SoakResult, role: str) -> list[tuple[float, int, float]]:
    """(seconds, RSS KiB, CPU s) of `role`'s samples: the first, the first at or after each
    REPORT_EVERY step, and the last."""
    samples = [(at, rss, cpu) for at, who, _pid, rss, cpu in result.memory if who == role]
    if not samples:
        return []
    chosen, step = [samples[0]], REPORT_EVERY
    for sample in samples[1:]:
        if sample[0] >= step:
            chosen.append(sample)
            step = (sample[0] // REPORT_EVERY + 1) * REPORT_EVERY
    if chosen[-1] is not samples[-1]:
        chosen.append(samples[-1])
    return chosen


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def per_subscription(values: dict[str, int]) -> str:
    return " / ".join(str(v) for v in values.values())


def results_table(results: Sequence[SoakResult]) -> str:
    rows = [
        "| Backend | returned publishes | kills | broker restarts | lost | duplicated "
        "(serial / keyed) | latency p50 / p99 / max (ms) | last event handled after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        latency = r.latency_ms
        rows.append(
            f"| {NAMES[r.backend]} | {r.returned:,} | {r.kills} | {r.restarts} | "
            f"**{r.total_lost}** | {per_subscription(r.duplicated)} | "
            f"{latency['p50']:,} / {latency['p99']:,} / {latency['max']:,} | "
            f"{r.settle_seconds:g} s |"
        )
    return "\n".join(rows)


def memory_table(results: Sequence[SoakResult]) -> str:
    """The survivor's RSS (MiB) at each step, and what the killed one reached."""
    rows = []
    for r in results:
        steps = memory_steps(r, "survivor")
        rss = ", ".join(f"{at:.0f}s {mib(kib)}" for at, kib, _ in steps)
        cpu = steps[-1][2] if steps else float("nan")
        victims = [kib for _, who, _pid, kib, _ in r.memory if who == "victim"]
        victim = f"{mib(min(victims))}–{mib(max(victims))}" if victims else "n/a"
        rows.append(f"| {NAMES[r.backend]} | {rss} | {cpu:.1f} | {victim} |")
    return "\n".join(
        [
            "| Backend | surviving consumer's RSS (MiB) over time | its CPU (s) | "
            "killed consumer's RSS (MiB), min–max |",
            "|---|---|---|---|",
            *rows,
        ]
    )


def notes(results: Sequence[SoakResult]) -> str:
    lines = []
    for r in results:
        found = []
        if r.unconfirmed:
            found.append(f"{r.unconfirmed} publishes timed out (not promised, not counted)")
        if r.publish_errors:
            found.append(f"publishes raised {r.publish_errors}")
        if r.failed_starts:
            found.append(
                f"{len(r.failed_starts)} consumer start(s) failed just after the broker "
                f"restart and were tried again: {r.failed_starts[0]}"
            )
        if r.exit_codes != {"survivor": 0, "victim": 0} or r.left_running:
            found.append(f"exit statuses {r.exit_codes}, {r.left_running} left running")
        if found:
            lines.append(f"- {NAMES[r.backend]}: " + "; ".join(found))
    return "\n".join(lines) or "- Nothing else: every publish returned, every consumer ended clean."


def environment(args: argparse.Namespace) -> dict[str, Any]:
    brokers = asyncio.run(broker_versions())
    machine = f"{os.cpu_count()} CPUs, {cpu_model()}, {memory_total()} RAM"
    return {
        "machine": f"{machine}, {platform.system()} {platform.release()}",
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "libraries": {
            k: v for k, v in library_versions().items() if k not in ("faststream", "msgspec")
        },
        "brokers": {b: brokers.get(b, "?") for b in args.backends},
        "eventwire_revision": git_revision(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "command": shlex.join([".venv/bin/python", "bench/bench_soak.py", *sys.argv[1:]]),
        "seconds": args.seconds,
        "rate": args.rate,
        "kill_every": args.kill_every,
    }


def report(env: dict[str, Any], results: Sequence[SoakResult]) -> str:
    libraries = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    brokers = ", ".join(env["brokers"].values())
    return f"""# Soak: kills and a broker restart under a steady load

## Environment

- Machine: {env["machine"]} (brokers, publisher and consumers all on this machine)
- Python {env["python"]}; {libraries}
- Brokers (a private server per backend, the same programs): {brokers}
- eventwire revision: {env["eventwire_revision"]}; load average at start: \
{", ".join(map(str, env["load_average"]))}
- Command: `{env["command"]}`

## Workload

- Per backend, {env["seconds"]:g} s of publishing: one awaited `publish` at a time, \
{env["rate"]:g} a second (a slot missed while a publish waits is skipped), each event with one \
of 16 keys; every publish that returned is owed to both subscriptions.
- Two consumers, `eventwire run tests.soak_app:build`: two durable subscriptions to the topic, \
one handling an event at a time, one 4 at a time (same-key events in order), each handler \
sleeping 1 ms and appending a line to a file (O_APPEND: a SIGKILL loses no record); \
`redeliver_after=2`.
- One consumer (the victim) SIGKILLed every {env["kill_every"]:g} s once the previous one \
was up, and started again; the other (the survivor) runs throughout. The broker stopped \
(SIGTERM) and started again on the same data once, at half time (SQLite: no broker; its file \
stays).
- Then publishing stops; the driver waits (at most 120 s) until both subscriptions handled \
every returned publish, and stops the consumers with SIGTERM.
- Lost: returned publishes a subscription never handled. Duplicated: events a subscription \
handled more than once (at-least-once allows it). Latency: publish call to the first \
handling, over both subscriptions, kills and restart included. Memory: VmRSS from /proc, \
sampled every {REPORT_EVERY / 3:g} s.

## Results

{results_table(results)}

## Memory over time

{memory_table(results)}

## Notes

{notes(results)}
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = environment(args)
    results: list[SoakResult] = []
    started = time.monotonic()
    for backend in args.backends:
        print(f"soak on {backend}, {args.seconds:g} s", file=sys.stderr, flush=True)
        result = asyncio.run(run_one(backend, args))
        results.append(result)
        progress(
            f"lost {result.total_lost}, duplicated {result.duplicated}, "
            f"latency {result.latency_ms}, kills {result.kills}, restarts {result.restarts}"
        )
    env["total_seconds"] = round(time.monotonic() - started, 1)
    text = report(env, results)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text, encoding="utf-8")
    document = {
        "environment": env,
        "results": {r.backend: r.as_json() for r in results},
        "survivor_rss_mib": {
            r.backend: [[at, round(kib / 1024, 1)] for at, kib, _ in memory_steps(r, "survivor")]
            for r in results
        },
    }
    args.json.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(text)
    return 1 if any(r.total_lost for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
