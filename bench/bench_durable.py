"""Durable runs (issue 12): what a journaled step adds, on each backend with a journal.

Usage (from the repository root; Redis and NATS JetStream on localhost)::

    .venv/bin/python bench/bench_durable.py [--steps N] [--backends memory,sqlite,redis,nats]
        [--markdown FILE]

One durable handler runs N steps one after another (each awaited before the next: the way an
agent calls its model and tools), each calling a function that returns at once, so the time
measured is the journal's: the step's record written and read back. Then the same run is
delivered again and every step replays from the journal (the time to resume). Reported: the
median and p99 of one step's time, the replay time per step, and the whole replay.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

from eventwire import Event, EventBus, Retry, Run  # noqa: E402
from eventwire.backends import open_backend  # noqa: E402

URLS = {
    "memory": "memory://",
    "sqlite": "sqlite:///{dir}/bus.db",
    "redis": "redis://127.0.0.1:6379/0?namespace={ns}",
    "nats": "nats://127.0.0.1:4222?namespace={ns}",
}


async def measure(url: str, steps: int) -> dict[str, Any]:
    step_times: list[float] = []
    replay: list[float] = []
    done = asyncio.Event()

    async def answer(number: int) -> int:
        return number

    async def agent(event: Event[int], run: Run) -> None:
        began = time.perf_counter()
        for number in range(event.payload):
            started = time.perf_counter()
            await run.step("call", answer, number)
            step_times.append(time.perf_counter() - started)
        replay.append(time.perf_counter() - began)
        if len(replay) == 1:
            raise RuntimeError("once more: the second try replays every step")
        done.set()

    async with EventBus(url) as bus:
        bus.subscribe(
            "bench.run", agent, durable=True, retry=Retry(attempts=2, backoff=0.0), name="agent"
        )
        await bus.publish("bench.run", steps)
        async with asyncio.timeout(600):
            await done.wait()
    first = sorted(step_times[:steps])
    return {
        "step_p50_us": statistics.median(first) * 1e6,
        "step_p99_us": first[int(len(first) * 0.99)] * 1e6,
        "replay_per_step_us": replay[1] / steps * 1e6,
        "replay_ms": replay[1] * 1e3,
    }


async def destroy(url: str) -> None:
    if url.startswith(("redis", "nats")):
        backend = open_backend(url)
        await backend.connect()
        await backend.destroy()
        await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--backends", default="memory,sqlite,redis,nats")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        scratch = tempfile.mkdtemp(prefix="bench-durable-")
        url = URLS[backend].format(dir=scratch, ns=f"bench{uuid.uuid4().hex[:8]}")
        try:
            result = asyncio.run(measure(url, args.steps))
        finally:
            asyncio.run(destroy(url))
        rows.append((backend, result))
        print(backend, {k: round(v, 1) for k, v in result.items()}, file=sys.stderr, flush=True)
    lines = [
        "# Durable runs: what a journaled step costs",
        "",
        f"`bench/bench_durable.py --steps {args.steps} --backends {args.backends}` on "
        f"{platform.machine()} with {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}. One run of {args.steps} steps, each awaited before "
        "the next, each calling a function that returns at once; then the run again, every "
        "step replayed from the journal.",
        "",
        "| backend | step p50 (µs) | step p99 (µs) | replay per step (µs) "
        "| replay of the run (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for backend, result in rows:
        lines.append(
            f"| {backend} | {result['step_p50_us']:.0f} | {result['step_p99_us']:.0f} | "
            f"{result['replay_per_step_us']:.1f} | {result['replay_ms']:.1f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        args.markdown.write_text(report)


if __name__ == "__main__":
    main()
