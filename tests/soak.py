"""The soak: a steady publisher, two `eventwire run` consumers of `tests/soak_app.py`, one of
them SIGKILLed and started again every few seconds, and one restart of the broker midway.
Shared by the short form in the suite (`tests/conformance/test_soak.py`) and the long form in
`bench/bench_soak.py`.

The driver publishes one event at a time, awaited, at a steady rate, and keeps each event
whose `publish` returned. When publishing stops it waits (bounded) until both subscriptions
have handled every one of them, stops the consumers with SIGTERM, and counts: lost (returned,
never handled: the contract says 0), duplicated (handled more than once: at-least-once allows
it), latency from the publish call to the first handling, and the consumers' resident memory
sampled from /proc while it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eventwire import EventBus, PublishTimeoutError
from tests.services import PrivateServer, private_server
from tests.soak_app import OUTPUT_VARIABLE, SUBSCRIPTIONS, TOPIC

ROOT = Path(__file__).resolve().parents[1]
EVENTWIRE = str(Path(sys.executable).parent / "eventwire")
DURABLE = ("sqlite", "redis", "nats", "amqp")
# The private broker each backend restarts (SQLite has none: its file stays).
SERVER_OF = {"redis": "redis", "nats": "nats", "amqp": "rabbitmq"}
KEYS = 16


class SoakError(Exception):
    """The soak could not go on: a consumer did not start, a process did not stop."""


@dataclass(frozen=True, slots=True)
class SoakConfig:
    seconds: float = 20.0  # of publishing
    rate: float = 100.0  # publishes per second, one awaited at a time
    kill_every: float = 3.0  # seconds between SIGKILLs of the victim consumer
    restart: bool = True  # restart the broker once, midway (when there is one)
    sample_every: float = 1.0  # seconds between memory samples
    settle_timeout: float = 90.0  # bound on waiting for the last events after publishing
    grace: float = 5.0  # `eventwire run --grace` of the consumers


@dataclass(slots=True)
class SoakResult:
    backend: str
    seconds: float
    returned: int = 0  # publishes that returned: the events owed to each subscription
    unconfirmed: int = 0  # publishes that raised PublishTimeoutError (not promised)
    publish_errors: dict[str, int] = field(default_factory=dict)  # any other exception
    kills: int = 0
    restarts: int = 0
    # `eventwire run` starts that exited (status 2) against a broker still recovering from
    # its restart, each followed by another try, as a supervisor would
    failed_starts: list[str] = field(default_factory=list)
    lost: dict[str, int] = field(default_factory=dict)  # per subscription
    duplicated: dict[str, int] = field(default_factory=dict)  # events handled more than once
    handlings: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p99, max
    settle_seconds: float = 0.0  # from the last publish until everything was handled
    # (seconds since start, "survivor" or "victim", pid, VmRSS in KiB, CPU seconds so far)
    memory: list[tuple[float, str, int, int, float]] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)  # after the final SIGTERM
    left_running: int = 0  # processes the driver had to SIGKILL at the end (should be 0)

    @property
    def total_lost(self) -> int:
        return sum(self.lost.values())

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"total_lost": self.total_lost}


@contextlib.contextmanager
def soak_broker(backend: str, data: Path) -> Iterator[tuple[str, PrivateServer | None]]:
    """The URL to soak on and the private server to restart: a SQLite file in `data`, or a
    broker of the soak's own (skips when its program is not installed)."""
    if backend == "sqlite":
        yield f"sqlite:///{data}/soak.db", None
        return
    with private_server(SERVER_OF[backend], data) as server:
        yield server.url, server


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def usage(pid: int) -> tuple[int, float] | None:
    """VmRSS in KiB and CPU seconds (user + system) of a live process, from /proc; None once
    it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
        rss = next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        return rss, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    except (OSError, ValueError, StopIteration):
        return None


class Handlings:
    """The consumers' shared output file, read as it grows: for each subscription, each event
    number's handlings as (publish time, handle time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.seen: dict[str, dict[int, list[tuple[float, float]]]] = {s: {} for s in SUBSCRIPTIONS}
        self.count = 0

    def read(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as file:
            file.seek(self.offset)
            chunk = file.read()
        end = chunk.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += end
        for line in chunk[:end].decode().splitlines():
            name, n, _pid, published, handled = line.split()
            self.seen[name].setdefault(int(n), []).append((float(published), float(handled)))
            self.count += 1

    def missing(self, returned: dict[int, float]) -> dict[str, int]:
        return {name: sum(n not in seen for n in returned) for name, seen in self.seen.items()}


class Consumer:
    """One `eventwire run tests.soak_app:build` process, its output in files."""

    def __init__(self, role: str, url: str, workdir: Path, output: Path, grace: float) -> None:
        self.role = role
        self.url = url
        self.workdir = workdir
        self.output = output
        self.grace = grace
        self.incarnation = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.every: list[subprocess.Popen[bytes]] = []

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.role}-{self.incarnation}.log"

    def spawn(self) -> None:
        self.incarnation += 1
        env = os.environ | {OUTPUT_VARIABLE: str(self.output)}
        env.pop("EVENTWIRE_URL", None)
        with self.log.open("wb") as log:
            command = [EVENTWIRE, "run", "tests.soak_app:build", "--url", self.url]
            self.process = subprocess.Popen(
                [*command, "--grace", str(self.grace)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.every.append(self.process)

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until it printed its status line (its subscriptions exist on the broker)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while b"eventwire: running" not in self.log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SoakError(
                    f"{self.role} consumer did not start (status {self.process.poll()}): "
                    + self.log.read_text(errors="replace")[-2000:]
                )
            await asyncio.sleep(0.05)  # another process's output: nothing to await

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, 10)

    async def stop(self) -> int | None:
        """SIGTERM, and its exit status once it is gone (None: it had to be killed)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, self.grace + 15)
        except subprocess.TimeoutExpired:
            return None

    def reap(self) -> int:
        """SIGKILL whatever is still running; how many were."""
        alive = [p for p in self.every if p.poll() is None]
        for process in alive:
            process.kill()
            process.wait(10)
        return len(alive)


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Soak:
    """One soak run on one backend."""

    def __init__(
        self,
        backend: str,
        url: str,
        server: PrivateServer | None,
        workdir: Path,
        config: SoakConfig,
        progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.url = url
        self.server = server
        self.config = config
        self.progress = progress
        output = workdir / "handled.txt"
        self.handlings = Handlings(output)
        self.survivor = Consumer("survivor", url, workdir, output, config.grace)
        self.victim = Consumer("victim", url, workdir, output, config.grace)
        self.result = SoakResult(backend=backend, seconds=config.seconds)
        self.returned: dict[int, float] = {}  # event number -> publish time
        self.publishing = True
        self.started = time.monotonic()
        self.restarted_at = -math.inf

    async def run(self) -> SoakResult:
        tasks: list[asyncio.Task[None]] = []
        try:
            for consumer in (self.survivor, self.victim):
                consumer.spawn()
            await asyncio.gather(self.survivor.ready(), self.victim.ready())
            self.started = time.monotonic()
            tasks.append(asyncio.create_task(self.sample_memory()))
            tasks.append(chaos := asyncio.create_task(self.chaos()))
            await self.publish()
            self.publishing = False
            await chaos
            await self.settle()
            await self.stop_consumers()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.result.left_running = self.survivor.reap() + self.victim.reap()
        self.handlings.read()
        self.count()
        return self.result

    async def publish(self) -> None:
        """One awaited publish at a time, at `rate` a second; a slot missed while a publish
        waited (the broker restarting) is skipped, not made up with a burst."""
        config = self.config
        async with EventBus(self.url, publish_timeout=30.0, close_grace=2.0) as bus:
            n, due = 0, time.monotonic()
            end = self.started + config.seconds
            while (now := time.monotonic()) < end:
                if due > now:
                    await asyncio.sleep(due - now)
                due = max(due + 1 / config.rate, time.monotonic())
                published = time.time()
                try:
                    await bus.publish(TOPIC, {"n": n, "t": published}, key=f"k{n % KEYS}")
                except PublishTimeoutError:
                    self.result.unconfirmed += 1
                except Exception as error:  # a finding, not a reason to lose the run
                    kind = type(error).__name__
                    self.result.publish_errors[kind] = self.result.publish_errors.get(kind, 0) + 1
                else:
                    self.returned[n] = published
                n += 1
        self.result.returned = len(self.returned)

    async def chaos(self) -> None:
        """SIGKILL the victim every `kill_every` seconds and start it again; restart the
        broker once, midway. One at a time, so a consumer never starts against a broker
        that is down (`eventwire run` exits when it cannot reach one)."""
        config = self.config
        restart_due = config.restart and self.server is not None
        next_kill = self.started + config.kill_every
        while self.publishing:
            elapsed = time.monotonic() - self.started
            if restart_due and elapsed >= config.seconds / 2:
                restart_due = False
                self.progress(f"restarting the broker at {elapsed:.0f}s")
                assert self.server is not None
                await self.server.restart()
                self.restarted_at = time.monotonic()
                self.result.restarts += 1
            elif time.monotonic() >= next_kill:
                await self.victim.kill()
                self.result.kills += 1
                await self.respawn_victim()
                next_kill = time.monotonic() + config.kill_every
            await asyncio.sleep(0.05)  # a clock to watch: nothing to await

    async def respawn_victim(self) -> None:
        """Start the victim again; within a minute of a broker restart, try again when it
        exits for want of a broker (RabbitMQ accepts connections before its streams are
        back)."""
        while True:
            self.victim.spawn()
            try:
                await self.victim.ready()
                return
            except SoakError as error:
                recovering = time.monotonic() - self.restarted_at < 60
                if self.victim.process is None or self.victim.process.poll() != 2:
                    raise
                if not recovering:
                    raise
                at = time.monotonic() - self.started
                self.result.failed_starts.append(f"{at:.1f}s: {str(error).splitlines()[-1]}")
                self.progress(f"a consumer start failed at {at:.1f}s; trying again")
            await asyncio.sleep(0.5)  # a supervisor's pause before the next try

    async def settle(self) -> None:
        """Wait until both subscriptions handled every returned publish, or the bound."""
        stopped = time.monotonic()
        deadline = stopped + self.config.settle_timeout
        while True:
            self.handlings.read()
            missing = self.handlings.missing(self.returned)
            if not any(missing.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)  # another process's file: nothing to await
        self.result.settle_seconds = round(time.monotonic() - stopped, 2)
        self.progress(f"settled in {self.result.settle_seconds}s, missing {missing}")

    async def stop_consumers(self) -> None:
        codes = await asyncio.gather(self.survivor.stop(), self.victim.stop())
        self.result.exit_codes = {"survivor": codes[0], "victim": codes[1]}

    async def sample_memory(self) -> None:
        while True:
            at = round(time.monotonic() - self.started, 1)
            for consumer in (self.survivor, self.victim):
                process = consumer.process
                used = usage(process.pid) if process is not None else None
                if process is not None and used is not None:
                    self.result.memory.append((at, consumer.role, process.pid, *used))
            await asyncio.sleep(self.config.sample_every)

    def count(self) -> None:
        result, seen = self.result, self.handlings.seen
        result.handlings = self.handlings.count
        result.lost = self.handlings.missing(self.returned)
        result.duplicated = {
            name: sum(len(times) > 1 for times in by_n.values()) for name, by_n in seen.items()
        }
        latencies = sorted(
            (min(handled for _, handled in by_n[n]) - published) * 1000
            for by_n in seen.values()
            for n, published in self.returned.items()
            if n in by_n
        )
        result.latency_ms = {
            "p50": round(percentile(latencies, 0.50), 1),
            "p99": round(percentile(latencies, 0.99), 1),
            "max": round(latencies[-1], 1) if latencies else float("nan"),
            "mean": round(statistics.fmean(latencies), 1) if latencies else float("nan"),
        }


async def soak(
    backend: str,
    workdir: Path,
    config: SoakConfig,
    progress: Callable[[str], None] = lambda line: None,
) -> SoakResult:
    """Run one soak on `backend` with its own broker (or SQLite file) in `workdir`."""
    with soak_broker(backend, workdir) as (url, server):
        return await Soak(backend, url, server, workdir, config, progress).run()
