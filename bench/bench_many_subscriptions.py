"""Many subscriptions in one process (issue 11 item 4): what 10, 1,000 and 10,000 durable
subscriptions cost on each backend.

Usage (from the repository root)::

    .venv/bin/python bench/bench_many_subscriptions.py [--quick] [--backends memory,sqlite,...]
        [--counts 10,1000,10000] [--amqp-max N] [--shared] [--cap SECONDS]
        [--markdown FILE] [--json FILE]

Each configuration (backend, number of subscriptions) runs in a fresh subprocess: one bus
with N subscriptions, N - 1 on a topic of their own (``many.<i>``) and one on ``many.>``
(every event). It measures the time to start the bus (which opens every subscription), the
process's CPU time while idle over 5 s as a percentage of one core, and the latency of one
awaited publish to one subscription's topic until its handler ran (median and p99 over 200
events, each published once the previous one was handled), then the time to close.

Redis and NATS run on a private server started for each configuration (so that 10,000
consumers disturb nobody else, and the server's own CPU while idle is that of this bus
alone); ``--shared`` uses the services on localhost instead. RabbitMQ uses the one on
localhost (its CPU while idle is reported too: nothing else uses it meanwhile): ``amqp``
with quorum queues, only up to ``--amqp-max`` subscriptions (default 100: creating 1,000
quorum queues on a server allowed 1,024 open files left it unresponsive, see the report),
and ``amqp-classic`` with classic queues (``?queues=classic``). A configuration that
takes longer than ``--cap`` seconds is stopped and reported as such; what it created is
removed by the parent (the namespace is the parent's choice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"

BACKENDS = ("memory", "sqlite", "redis", "nats", "amqp", "amqp-classic")
COUNTS = (10, 1_000, 10_000)
QUICK_COUNTS = (10, 1_000)
EVENTS = 200
QUICK_EVENTS = 50
IDLE_SECONDS = 16.0
QUICK_IDLE_SECONDS = 3.0
# Before the idle window: startup work still finishing (every subscription's first fetch,
# presence) settles, 1 s more per 1,000 subscriptions, and idle subscriptions' fetches reach
# their longest wait (1 s doubling to 16 s after empty fetches: 31 s); --quick skips that.
SETTLE_SECONDS = 1.5
SETTLE_PER_SUBSCRIPTION = 0.001
STEADY_SECONDS = 32.0
PAUSE_SECONDS = 1.0
CAP_SECONDS = 600.0
AMQP_MAX = 100
SHARED = {
    "redis": "redis://127.0.0.1:6379/0",
    "nats": "nats://127.0.0.1:4222",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
    # Classic queues instead of quorum queues (?queues=classic).
    "amqp-classic": "amqp://guest:guest@127.0.0.1:5672/?queues=classic",
}
SERVER_PROGRAMS = {"redis": "redis-server", "nats": "nats-server"}


# -- one configuration, in a subprocess ------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    url: str, count: int, events: int, idle: float, broker_pid: int | None
) -> dict[str, Any]:
    from eventwire import Event, EventBus

    result: dict[str, Any] = {"subscriptions": count}
    handled: dict[str, float] = {}
    waiting: dict[str, asyncio.Event] = {}

    def handler(name: str) -> Any:
        async def handle(event: Event[Any]) -> None:
            handled[name] = time.perf_counter()
            signal_ = waiting.get(name)
            if signal_ is not None:
                signal_.set()

        return handle

    bus = EventBus(url)
    for number in range(count - 1):
        bus.subscribe(f"many.{number}", handler(f"s{number}"), name=f"s{number}")
    bus.subscribe("many.>", handler("every"), name="every")
    started, cpu = time.perf_counter(), time.process_time()
    await bus.start()
    result["start_s"] = time.perf_counter() - started
    result["start_cpu_s"] = time.process_time() - cpu
    print(f"started in {result['start_s']:.1f}s", file=sys.stderr, flush=True)
    try:
        steady = STEADY_SECONDS if idle >= IDLE_SECONDS else 0.0
        await asyncio.sleep(max(SETTLE_SECONDS + SETTLE_PER_SUBSCRIPTION * count, steady))
        broker_before = None if broker_pid is None else cpu_seconds(broker_pid)
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.sleep(idle)
        wall = time.perf_counter() - wall
        result["idle_cpu_pct"] = 100 * (time.process_time() - cpu) / wall
        print(f"idle {result['idle_cpu_pct']:.1f}% of a core", file=sys.stderr, flush=True)
        if broker_before is not None and broker_pid is not None:
            after = cpu_seconds(broker_pid)
            if after is not None:
                result["broker_idle_cpu_pct"] = 100 * (after - broker_before) / wall
        chooser = random.Random(11)

        async def latency(pause: float) -> float:
            number = chooser.randrange(count - 1) if count > 1 else 0
            name = f"s{number}"
            await asyncio.sleep(pause)
            came = waiting[name] = asyncio.Event()
            sent = time.perf_counter()
            await bus.publish(f"many.{number}", number)
            async with asyncio.timeout(60):
                await came.wait()
            del waiting[name]
            return (handled[name] - sent) * 1000

        latencies = sorted([await latency(0.0) for _ in range(events)])
        result["latency_p50_ms"] = statistics.median(latencies)
        result["latency_p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        # Each publish after a pause: to a subscription that had nothing to do for a while,
        # with 10 subscriptions as with 10,000.
        paused = [await latency(PAUSE_SECONDS) for _ in range(max(events // 10, 5))]
        result["paused_latency_p50_ms"] = statistics.median(paused)
    finally:
        closing = time.perf_counter()
        await bus.close()
        result["close_s"] = time.perf_counter() - closing
    return result


def run_worker(url: str, count: int, events: int, idle: float, broker_pid: int | None) -> None:
    metrics = asyncio.run(measure(url, count, events, idle, broker_pid))
    print(json.dumps(metrics))


# -- the parent: servers, subprocesses, cleanup --------------------------------------------


def rabbitmq_pid() -> int | None:
    """The process id of the local RabbitMQ node (its Erlang VM), if there is one."""
    found = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True)
    pids = found.stdout.split()
    return int(pids[0]) if len(pids) == 1 else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """A private redis-server or nats-server for one configuration."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
        port, data = str(self.port), str(self.data)
        if kind == "redis":
            command = ["redis-server", "--port", port, "--bind", "127.0.0.1", "--save", ""]
            command += ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", data]
            command += ["--maxclients", "20000"]
            self.url = f"redis://127.0.0.1:{port}/0"
        else:
            command = ["nats-server", "-a", "127.0.0.1", "-p", port, "-js", "-sd", data]
            self.url = f"nats://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{kind} server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.data, ignore_errors=True)


async def destroy(url: str) -> None:
    """Remove what a configuration stored (as tests/conformance/conftest.py does)."""
    sys.path.insert(0, str(REPO_DIR))
    from eventwire.backends import open_backend

    backend = open_backend(url)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(300):
            await backend.connect()
            await backend.destroy()
    with contextlib.suppress(Exception):
        await backend.close()


def with_namespace(url: str, namespace: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}namespace={namespace}"


def configuration(backend: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in a subprocess, capped at `args.cap` seconds; always cleans up."""
    if backend == "amqp" and count > args.amqp_max:
        return {
            "subscriptions": count,
            "skipped": f"not run: over --amqp-max={args.amqp_max} quorum queues on the shared "
            "RabbitMQ (1,000 left it unresponsive)",
        }
    server: Server | None = None
    scratch = Path(tempfile.mkdtemp(prefix="bench-many-"))
    namespace = f"bench{uuid.uuid4().hex[:10]}"
    broker_pid: int | None = None
    if backend == "memory":
        url = "memory://"
    elif backend == "sqlite":
        url = f"sqlite:///{scratch}/bus.db"
    elif backend in SERVER_PROGRAMS and not args.shared and shutil.which(SERVER_PROGRAMS[backend]):
        server = Server(backend)
        url = with_namespace(server.url, namespace)
        broker_pid = server.process.pid
    else:
        url = with_namespace(SHARED[backend], namespace)
        if backend.startswith("amqp"):
            # The machine's RabbitMQ: idle while the bench runs, so its CPU is this bus's.
            broker_pid = rabbitmq_pid()
    events = QUICK_EVENTS if args.quick else EVENTS
    idle = QUICK_IDLE_SECONDS if args.quick else IDLE_SECONDS
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", url, str(count)]
    command += ["--events", str(events), "--idle", str(idle)]
    if broker_pid is not None:
        command += ["--broker-pid", str(broker_pid)]
    started = time.perf_counter()
    worker = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_DIR,
        start_new_session=True,
    )
    try:
        out, err = worker.communicate(timeout=args.cap)
        took = time.perf_counter() - started
        if worker.returncode == 0:
            result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        else:
            lines = err.strip().splitlines()
            phases = [line for line in lines if line.startswith(("started in", "idle "))]
            last = lines[-1] if lines else "(no output)"
            result = {
                "subscriptions": count,
                "error": f"exit {worker.returncode} after {', '.join(phases) or 'no phase'}: "
                f"{last}",
            }
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        _, err = worker.communicate()
        took = time.perf_counter() - started
        reached = [line for line in err.splitlines() if line.startswith("started in")]
        result = {
            "subscriptions": count,
            "error": f"stopped after the {args.cap:.0f} s cap"
            + (f" ({reached[-1]})" if reached else " (still starting)"),
        }
    result["wall_s"] = took
    cleaning = time.perf_counter()
    if backend in ("redis", "nats", "amqp", "amqp-classic") and server is None:
        asyncio.run(destroy(url))
    if server is not None:
        server.stop()
    shutil.rmtree(scratch, ignore_errors=True)
    result["cleanup_s"] = time.perf_counter() - cleaning
    return result


def cell(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{unit}"


def markdown(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [
        "# Many subscriptions in one process",
        "",
        f"`{' '.join(['bench/bench_many_subscriptions.py', *sys.argv[1:]])}` on "
        f"{platform.machine()} with {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" {time.strftime('%Y-%m-%d %H:%M')}. One bus with N durable subscriptions (N - 1 on "
        "`many.<i>`, one on `many.>`); idle CPU is the process's CPU time, once idle fetches "
        "wait their longest (32 s after start; --quick: sooner), over "
        f"{QUICK_IDLE_SECONDS if args.quick else IDLE_SECONDS:g} s as % of one core; latency "
        "is one awaited publish to one subscription's topic until its handler ran, "
        f"{QUICK_EVENTS if args.quick else EVENTS} events one after another, then a tenth as "
        f"many each after a {PAUSE_SECONDS:g} s pause (p50 after a pause). Broker idle CPU: "
        "the private redis-server / nats-server of the run, or the local RabbitMQ node "
        "(– where shared with other work).",
        "",
        "| backend | subscriptions | start (s) | idle CPU (% core) | broker idle CPU (%) "
        "| latency p50 (ms) | latency p99 (ms) | p50 after a pause (ms) | close (s) | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for backend, rows in results.items():
        for row in rows:
            note = row.get("error") or row.get("skipped") or ""
            lines.append(
                f"| {backend} | {row['subscriptions']:,} | {cell(row.get('start_s'))} "
                f"| {cell(row.get('idle_cpu_pct'))} | {cell(row.get('broker_idle_cpu_pct'))} "
                f"| {cell(row.get('latency_p50_ms'), 2)} | {cell(row.get('latency_p99_ms'), 2)} "
                f"| {cell(row.get('paused_latency_p50_ms'), 2)} "
                f"| {cell(row.get('close_s'))} | {note} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("URL", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=EVENTS, help=argparse.SUPPRESS)
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help=argparse.SUPPRESS)
    parser.add_argument("--broker-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="10 and 1,000; 50 events; 3 s idle")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--counts", default=None, help="e.g. 10,1000,10000")
    parser.add_argument("--amqp-max", type=int, default=AMQP_MAX)
    parser.add_argument("--shared", action="store_true", help="Redis/NATS on localhost")
    parser.add_argument("--cap", type=float, default=CAP_SECONDS, help="seconds per config")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "bench_many_subscriptions.md")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_many_subscriptions.json")
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker[0], int(args.worker[1]), args.events, args.idle, args.broker_pid)
        return
    counts = (
        [int(c) for c in args.counts.split(",")]
        if args.counts
        else list(QUICK_COUNTS if args.quick else COUNTS)
    )
    results: dict[str, list[dict[str, Any]]] = {}
    for backend in args.backends.split(","):
        for count in counts:
            row = configuration(backend, count, args)
            results.setdefault(backend, []).append(row)
            print(f"{backend:<7} {count:>6,}  {json.dumps(row)}", file=sys.stderr, flush=True)
    args.markdown.write_text(markdown(results, args))
    args.json.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=2) + "\n")
    print(args.markdown.read_text())


if __name__ == "__main__":
    main()
