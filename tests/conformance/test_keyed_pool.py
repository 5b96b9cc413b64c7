"""A keyed pool across real processes (``partitions=``): 4 processes of one group, 20,000
events on 50 keys, one process SIGKILLed mid-stream and another started. Every key's events
are handled in publish order, none is lost, and with ``idempotent=True`` none is handled
twice (but an event whose handler finished just as its process died, before its id was
recorded: at most one per event the killed process had in flight)."""

from __future__ import annotations

import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from eventwire import Event, EventBus
from tests.conformance.test_crash import poll, processes, spawn, wait_ready  # noqa: F401

DURABLE = ("sqlite", "redis", "nats", "amqp")
EVENTS = 20_000
KEYS = 50
WORKERS = 4
PARTITIONS = 8
# Events a worker has in flight at most (its subscription's concurrency).
IN_FLIGHT = 8


@pytest.fixture(params=DURABLE)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def handled(output: Path) -> list[tuple[str, int]]:
    if not output.exists():
        return []
    lines = output.read_text().splitlines()
    return [(key, int(number)) for key, number, _ in (line.split() for line in lines if line)]


def count(output: Path) -> int:
    return output.read_bytes().count(b"\n") if output.exists() else 0


@pytest.mark.timeout(400)
async def test_a_keyed_pool_keeps_order_and_loses_nothing_when_a_process_dies(
    bus_url: str,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],  # noqa: F811
) -> None:
    output = tmp_path / "handled.txt"
    worker = ["tests.conformance.pool_worker", bus_url, str(output), str(PARTITIONS)]
    async with EventBus(bus_url) as bus:
        idempotent = bus.capabilities.idempotent
        flags = ["--idempotent"] if idempotent else []
        pool = [spawn(processes, *worker, *flags) for _ in range(WORKERS)]
        for process in pool:
            await wait_ready(process)
        events = [Event("pool.work", n, key=f"customer-{n % KEYS}") for n in range(EVENTS)]
        for start in range(0, EVENTS, 1000):
            await bus.publish_many(events[start : start + 1000])
        await poll(lambda: count(output) >= EVENTS // 3, timeout=120)
        pool[1].send_signal(signal.SIGKILL)
        pool[1].wait(timeout=10)
        killed_at = count(output)
        late = spawn(processes, *worker, *flags)
        await wait_ready(late)
        await poll(lambda: len({n for _, n in handled(output)}) == EVENTS, timeout=240)
        await bus.drain(timeout=60)
        for process in [*pool[:1], *pool[2:], late]:
            process.send_signal(signal.SIGTERM)
        for process in [*pool[:1], *pool[2:], late]:
            assert process.wait(timeout=20) == 0
    assert killed_at < EVENTS, "the kill landed in the middle of the stream"
    seen: dict[str, list[int]] = defaultdict(list)
    repeated: list[int] = []
    for key, number in handled(output):
        if number in seen[key]:
            repeated.append(number)
        else:
            seen[key].append(number)
    for n in range(KEYS):
        key = f"customer-{n}"
        expected = list(range(n, EVENTS, KEYS))
        got = seen[key]
        if got != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), len(got)
            )
            pytest.fail(
                f"{key}: {len(got)} of {len(expected)} handled; from #{at} handled "
                f"{got[at : at + 5]}, published {expected[at : at + 5]}"
            )
    if idempotent:
        assert len(repeated) <= IN_FLIGHT, repeated
