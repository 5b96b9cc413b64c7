"""Many runs parked at once hold no memory in the process (each is a few records in the
journal), survive their bus, and all resolve in the next one.

What the process holds is measured on Python's heap (tracemalloc): its resident size also
grows while the brokers' clients and SQLite's page caches fill (a few MB, then flat), which
bench/durable_crash.py shows over 10,000 waits.

``EVENTWIRE_PENDING_WAITS`` sets how many (600 in the suite; bench/durable_crash.py runs
10,000), and ``EVENTWIRE_PENDING_REPORT`` a file where the figures are written as JSON."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from eventwire import Event, EventBus, Run

WAITS = int(os.environ.get("EVENTWIRE_PENDING_WAITS", "600"))
WARM_UP = 200
# A coroutine parked in memory holds its frames, the event and a future: kilobytes. A run
# parked in the journal holds nothing here; the bound leaves room for what is in flight
# when each half is measured (up to max_pending events, acknowledgements on their way,
# a broker client's buffers).
MOST_BYTES_PER_WAIT = 500


def heap_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def resident_bytes() -> int:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Counts:
    def __init__(self) -> None:
        self.parked = 0
        self.resolved = 0
        self.all_parked = asyncio.Event()
        self.all_resolved = asyncio.Event()
        self.target = 0

    async def agent(self, event: Event[int], run: Run) -> None:
        await run.step("plan", lambda: f"plan {event.payload}")
        if run.tries == 1 and not run.parks:
            self.parked += 1  # counted before parking: the wait below parks it
            if self.parked >= self.target:
                self.all_parked.set()
        approval = await run.wait_for("task.approved", match={"task": event.payload}, timeout=3600)
        assert approval is not None
        self.resolved += 1
        if self.resolved >= self.target:
            self.all_resolved.set()


def subscribe(bus: EventBus, counts: Counts) -> None:
    bus.subscribe(
        "task.asked",
        counts.agent,
        durable=True,
        waits=["task.approved"],
        name="agent",
        concurrency=32,
        # What the process holds at once while events are handled: bounded by this, not by
        # how many runs wait.
        max_pending=50,
    )


async def parked_runs(bus: EventBus, counts: Counts, first: int, count: int) -> None:
    counts.target = first + count
    counts.all_parked.clear()
    await bus.publish_many([("task.asked", task) for task in range(first, first + count)])
    async with asyncio.timeout(60 + count / 20):
        await counts.all_parked.wait()
        await bus.drain()


@pytest.mark.parametrize("backend_name", ["sqlite", "redis", "nats"])
async def test_parked_runs_hold_no_memory_and_all_resolve_after_a_restart(
    bus_url: str, tmp_path: Path
) -> None:
    counts = Counts()
    async with EventBus(bus_url) as bus:
        subscribe(bus, counts)
        for subscription in bus.subscriptions.values():
            await subscription.ready()
        await parked_runs(bus, counts, 0, WARM_UP)  # caches, connections, code paths
        resident = resident_bytes()
        half = WAITS // 2
        tracemalloc.start()
        try:
            started = time.perf_counter()
            # Two halves: what the process holds while it works (events in hand, buffers)
            # is there after each; what it holds per parked run grows from one to the next.
            await parked_runs(bus, counts, WARM_UP, half)
            heap = heap_bytes()
            await parked_runs(bus, counts, WARM_UP + half, WAITS - half)
            grown = heap_bytes() - heap
            parking_seconds = time.perf_counter() - started
        finally:
            tracemalloc.stop()
        resident_grown = resident_bytes() - resident
    assert counts.parked == WARM_UP + WAITS
    assert grown < MOST_BYTES_PER_WAIT * half, f"{grown} bytes held for {half} more waits"
    # A new bus (a restarted process): every parked run is resumed by its approval.
    resumed = Counts()
    resumed.target = WARM_UP + WAITS
    async with EventBus(bus_url) as bus:
        subscribe(bus, resumed)
        for subscription in bus.subscriptions.values():
            await subscription.ready()
        started = time.perf_counter()
        total = WARM_UP + WAITS
        for first in range(0, total, 500):
            batch = range(first, min(first + 500, total))
            await bus.publish_many([("task.approved", {"task": task}) for task in batch])
        async with asyncio.timeout(120 + total / 10):
            await resumed.all_resolved.wait()
        resolving_seconds = time.perf_counter() - started
    assert resumed.resolved == total
    assert resumed.parked == 0  # nothing ran from the top as a new run
    report = os.environ.get("EVENTWIRE_PENDING_REPORT")
    if report:
        figures = {
            "backend": bus_url.partition(":")[0],
            "waits": WAITS,
            "heap bytes per wait": round(grown / half, 1),
            "resident growth MB": round(resident_grown / 2**20, 1),
            "parked per second": round(WAITS / parking_seconds),
            "resolved per second": round(total / resolving_seconds),
        }
        with Path(report).open("a") as out:  # noqa: ASYNC230 - one line, at the end
            out.write(json.dumps(figures) + "\n")
