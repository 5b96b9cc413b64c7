"""Real processes killed with SIGKILL: no event whose publish returned is ever lost."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from eventwire import Event, EventBus
from eventwire.backends.broker import BrokerBackend

DURABLE = ("sqlite", "redis", "nats", "amqp", "amqp-classic")
ROOT = Path(__file__).resolve().parents[2]
EVENTS = 10_000


@pytest.fixture(params=DURABLE)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def spawn(started: list[subprocess.Popen[bytes]], *args: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    started.append(process)
    return process


async def wait_ready(process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
    assert line.strip() == b"ready", process.stderr.read() if process.stderr else line


async def poll(condition: Callable[[], bool], timeout: float) -> None:
    """Check `condition` every 20 ms (it reads a file another process writes) until it holds;
    fail after `timeout`."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - another process's file has no event to await
            await asyncio.sleep(0.02)


def size(output: Path) -> int:
    return output.stat().st_size if output.exists() else 0


def handled(output: Path) -> list[int]:
    if not output.exists():
        return []
    return [int(line) for line in output.read_text().split()]


async def test_a_consumer_killed_mid_stream_loses_nothing(
    bus_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    output = tmp_path / "handled.txt"
    async with EventBus(bus_url) as bus:
        assert isinstance(bus.backend, BrokerBackend)
        idempotent = bus.backend.capabilities.idempotent
        flags = ["--idempotent"] if idempotent else []
        first = spawn(processes, "tests.conformance.crash_worker", bus_url, str(output), *flags)
        await wait_ready(first)
        for start in range(0, EVENTS, 500):
            await asyncio.gather(*(bus.publish("crash.work", n) for n in range(start, start + 500)))
        # Each line is at most 5 bytes: a size check instead of reading the file each time.
        await poll(lambda: size(output) >= EVENTS // 5 * 5, timeout=60)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = len(handled(output))
        second = spawn(processes, "tests.conformance.crash_worker", bus_url, str(output), *flags)
        await wait_ready(second)
        await poll(lambda: len(set(handled(output))) == EVENTS, timeout=90)
        await bus.drain(timeout=30)
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=10)
    counts = Counter(handled(output))
    assert set(counts) == set(range(EVENTS)), "every event handled at least once"
    twice = [n for n, c in counts.items() if c > 1]
    assert killed_at < EVENTS, "the kill landed in the middle of the stream"
    if idempotent:
        # Only an event whose handler finished just as the kill came, before its id was
        # recorded, can run again.
        assert len(twice) <= 1, twice


@pytest.mark.parametrize("backend_name", ["sqlite"])
async def test_sqlite_publisher_killed_mid_burst_loses_no_returned_publish(
    bus_url: str, processes: list[subprocess.Popen[bytes]]
) -> None:
    # A subscription that exists before the burst, so that it is owed every event.
    seen: set[int] = set()
    reader = EventBus(bus_url)
    reader.subscribe("burst.n", lambda e: None, name="reader")
    async with reader:
        pass
    publisher = spawn(processes, "tests.conformance.burst_publisher", bus_url)
    assert publisher.stdout is not None
    returned: list[int] = []
    while len(returned) < 3000:
        line = await asyncio.wait_for(asyncio.to_thread(publisher.stdout.readline), timeout=30)
        assert line, publisher.stderr.read() if publisher.stderr else "publisher exited"
        returned.append(int(line))
    publisher.send_signal(signal.SIGKILL)
    publisher.wait(timeout=10)
    reopened = EventBus(bus_url)

    async def read(event: Event[int]) -> None:
        seen.add(event.payload)

    reopened.subscribe("burst.n", read, name="reader")
    async with reopened:
        await reopened.drain(timeout=30)
    assert set(returned) <= seen
