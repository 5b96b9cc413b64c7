"""Throughput of a pool of worker processes on each durable backend: keyed events with
``partitions=16`` (per-key order across the pool) against the same events without keys and
without partitions (no order kept), with 1, 2 and 4 processes.

Each worker is a separate process running one subscription of the group "pool" with
``concurrency=4``; its handler stands for an agent waiting on a tool or a model: it awaits
2 ms, so one process can handle at most about 2,000 events a second and the pool's figure
shows how the work spreads. The workers are started and ready before the events are
published (1,000 per ``publish_many``); the clock runs from the first publish to the last
event handled (each worker appends a line per event to a file of its own).

Usage (from the repository root; Redis, NATS JetStream and RabbitMQ on localhost)::

    .venv/bin/python bench/bench_keyed_pool.py [--events 6000] [--repeats 3]
        [--backends sqlite,redis,nats,amqp] [--processes 1,2,4] [--markdown FILE]
        [--trace DIR]

``--trace DIR`` keeps, for each run in a folder of its own, when each worker handled each
event and the workers' debug log (the partitions' moves, the router's batches), and prints
per run each process's events per second and the router's copying: where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

from eventwire import Event, EventBus  # noqa: E402

KEYS = 100
PARTITIONS = 16
CONCURRENCY = 4
WORK_SECONDS = 0.002
URLS = {
    "redis": "redis://127.0.0.1:6379/0",
    "nats": "nats://127.0.0.1:4222",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
}


async def worker(url: str, output: str, keyed: bool, trace: str | None) -> None:
    if trace:  # the partitions' comings and goings and the router's batches, timed
        logging.basicConfig(
            filename=f"{trace}/worker-{os.getpid()}.log",
            level=logging.DEBUG,
            format="%(created).3f %(message)s",
        )
        for noisy in ("aiormq", "aio_pika", "nats", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bus = EventBus(url)

    async def work(event: Event[int]) -> None:
        await asyncio.sleep(WORK_SECONDS)
        # When it was handled, for a look at how each process's share goes over time.
        os.write(fd, b"%.3f\n" % time.time())

    bus.subscribe(
        "pool.work",
        work,
        name=f"w{os.getpid()}",
        group="pool",
        concurrency=CONCURRENCY,
        partitions=PARTITIONS if keyed else None,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with bus:
        for subscription in bus.subscriptions.values():
            await subscription.ready()
        print("ready", flush=True)
        await stop.wait()


def url_for(backend: str, directory: Path) -> str:
    namespace = f"kp{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        return f"sqlite:///{directory}/{namespace}.db"
    return f"{URLS[backend]}?namespace={namespace}"


def handled(outputs: list[Path]) -> int:
    return sum(path.read_bytes().count(b"\n") for path in outputs if path.exists())


async def one_run(
    backend: str, processes: int, keyed: bool, events: int, directory: Path, trace: Path | None
) -> float:
    """Events handled per second by `processes` workers."""
    url = url_for(backend, directory)
    outputs = [directory / f"{uuid.uuid4().hex}.txt" for _ in range(processes)]
    mode = "keyed" if keyed else "unkeyed"
    started = [
        subprocess.Popen(  # noqa: ASYNC220 - started at once, awaited below
            [sys.executable, __file__, "--worker", url, str(output), mode, str(trace or "")],
            cwd=REPO_DIR,
            stdout=subprocess.PIPE,
        )
        for output in outputs
    ]
    try:
        for process in started:
            assert process.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)
            assert line.strip() == b"ready", line
        batch = [
            Event("pool.work", n, key=f"conversation-{n % KEYS}" if keyed else None)
            for n in range(events)
        ]
        async with EventBus(url) as bus:
            began, began_at = time.perf_counter(), time.time()
            for start in range(0, events, 1000):
                await bus.publish_many(batch[start : start + 1000])
            async with asyncio.timeout(600):
                while handled(outputs) < events:  # noqa: ASYNC110 - other processes' files
                    await asyncio.sleep(0.01)
            seconds = time.perf_counter() - began
    finally:
        await asyncio.to_thread(stop, started)
    # Only once the workers are gone: a namespace destroyed under them fails their fetches.
    async with EventBus(url) as bus:
        await bus.backend.destroy()
    if trace is not None:
        for process, output in zip(started, outputs, strict=True):
            shutil.copy(output, trace / f"handled-{process.pid}.txt")
        print(summary(trace, began_at), flush=True)
    return events / seconds


def summary(trace: Path, began_at: float) -> str:
    """Each worker's events per second of the run, and what its router copied, how fast."""
    lines = [f"  {trace}:"]
    for handled_file in sorted(trace.glob("handled-*.txt")):
        pid = handled_file.stem.removeprefix("handled-")
        times = [float(t) - began_at for t in handled_file.read_text().split()]
        per_second = [0] * (int(max(times, default=0)) + 1)
        for at in times:
            per_second[int(at)] += 1
        lines.append(f"    pid {pid}: {len(times)} events, per second {per_second}")
        batches = routed = 0
        copy_time = 0.0
        last = 0.0
        log = trace / f"worker-{pid}.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            found = re.search(r"routed (\d+): copied in ([\d.]+)s", line)
            if found:
                batches += 1
                routed += int(found[1])
                copy_time += float(found[2])
                last = float(line.split()[0]) - began_at
        if routed:
            lines.append(
                f"    pid {pid} routed {routed} in {batches} batches, the last at "
                f"{last:.2f}s; copying took {copy_time:.2f}s"
            )
    return "\n".join(lines)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def main(args: argparse.Namespace) -> None:
    backends = args.backends.split(",")
    counts = [int(n) for n in args.processes.split(",")]
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        for backend in backends:
            medians: dict[tuple[int, bool], float] = {}
            for processes in counts:
                for keyed in (False, True):
                    rates = []
                    for repeat in range(args.repeats):
                        trace = None
                        if args.trace:
                            mode = "keyed" if keyed else "unkeyed"
                            trace = Path(args.trace) / f"{backend}-{processes}-{mode}-{repeat}"
                            trace.mkdir(parents=True, exist_ok=True)
                        rates.append(
                            await one_run(backend, processes, keyed, args.events, directory, trace)
                        )
                    medians[processes, keyed] = statistics.median(rates)
                    print(
                        f"{backend} {processes} process(es) {'keyed' if keyed else 'unkeyed'}: "
                        + ", ".join(f"{r:,.0f}" for r in rates)
                        + " events/s",
                        flush=True,
                    )
            for processes in counts:
                unkeyed_rate, keyed_rate = medians[processes, False], medians[processes, True]
                one = medians[counts[0], True]
                rows.append(
                    f"| `{backend}://` | {processes} | {unkeyed_rate:,.0f} | {keyed_rate:,.0f} | "
                    f"{keyed_rate / unkeyed_rate:.2f}x | {keyed_rate / one:.2f}x |"
                )
    table = "\n".join(
        [
            f"{args.events:,} events, {KEYS} keys over {PARTITIONS} partitions, handler awaits "
            f"{WORK_SECONDS * 1000:g} ms, concurrency={CONCURRENCY} per process; medians of "
            f"{args.repeats} runs; {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}.",
            "",
            "| Backend | Processes | Unkeyed events/s | Keyed (`partitions=16`) events/s | "
            "Keyed / unkeyed | Keyed vs 1 process |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print()
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as out:  # noqa: ASYNC230 - once, at the end
            out.write(table + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        asyncio.run(worker(sys.argv[2], sys.argv[3], sys.argv[4] == "keyed", sys.argv[5] or None))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,redis,nats,amqp")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--markdown")
    parser.add_argument("--trace", help="a folder to keep each run's timings and logs in")
    asyncio.run(main(parser.parse_args()))
