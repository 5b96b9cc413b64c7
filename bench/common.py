"""Pieces shared by every implementation of the benchmark workloads.

Each ``impl_<library>.py`` module defines the same coroutines, ``w1`` ... ``w4`` and ``mem``,
taking a `Sizes` and returning `Metrics`. The helpers here do the timing and the bookkeeping
the same way for all of them, so that only the library calls differ.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import subprocess
import sys
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from time import perf_counter_ns
from typing import Any

Metrics = dict[str, float]
# An async subscriber: it gets the payload, or for eventwire the `Event`.
Handler = Callable[[Any], Awaitable[None]]

# W1 publishes to one topic with this many subscribers.
W1_SUBSCRIBERS = 3
# The slow subscriber of W3 spends this long on every event.
SLOW_HANDLER_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work one measurement does."""

    w1_events: int
    w2_chains: int
    w3_events: int
    w4_topics: int
    w4_events: int
    mem_events: int


FULL = Sizes(
    w1_events=100_000,
    w2_chains=2_000,
    w3_events=1_000,
    w4_topics=10_000,
    w4_events=100_000,
    mem_events=1_000_000,
)
QUICK = Sizes(
    w1_events=10_000,
    w2_chains=300,
    w3_events=200,
    w4_topics=1_000,
    w4_events=10_000,
    mem_events=100_000,
)
# Slow or memory-hungry peers do less work, so that a full run stays within minutes. Rates are
# per second and memory is per event, so the figures stay comparable.
FEWER: dict[str, dict[str, int]] = {
    # autogen-core delivers some 10-20k messages/s.
    "autogen": {"w1_events": 10_000, "w4_events": 20_000, "mem_events": 20_000},
    # pyee makes a task per delivery: 1M of them take 2.5 GB and a minute under tracemalloc.
    "pyee": {"mem_events": 100_000},
}
FEWER_QUICK: dict[str, dict[str, int]] = {
    "autogen": {"w1_events": 2_000, "w4_events": 2_000, "mem_events": 5_000},
    "pyee": {"mem_events": 20_000},
}


def sizes_for(library: str, quick: bool) -> Sizes:
    if quick:
        return replace(QUICK, **FEWER_QUICK.get(library, {}))
    return replace(FULL, **FEWER.get(library, {}))


class BenchError(RuntimeError):
    """A measurement did not do the work it was meant to (lost or extra deliveries)."""


def expect(what: str, actual: object, expected: object) -> None:
    if actual != expected:
        raise BenchError(f"{what}: expected {expected!r}, got {actual!r}")


def percentile(samples: list[int], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[rank - 1])


class Stopwatch:
    """Wall time of a measured section, with garbage from setup collected first."""

    def __init__(self) -> None:
        self.started = 0
        self.elapsed_ns = 0

    def start(self) -> None:
        gc.collect()
        self.started = perf_counter_ns()

    def stop(self) -> float:
        """Stop; the elapsed time in seconds."""
        self.elapsed_ns = perf_counter_ns() - self.started
        return self.elapsed_ns / 1e9


def rate(deliveries: int, seconds: float) -> Metrics:
    return {"rate": deliveries / seconds, "seconds": seconds}


def w1_rate(counts: list[int], events: int, seconds: float) -> Metrics:
    """W1: check that every subscriber counted every event; deliveries per second."""
    expect("W1 deliveries per subscriber", counts, [events] * W1_SUBSCRIBERS)
    return rate(W1_SUBSCRIBERS * events, seconds)


def w4_rate(delivered: int, events: int, seconds: float) -> Metrics:
    """W4: check that each event was delivered once; deliveries per second."""
    expect("W4 deliveries", delivered, events)
    return rate(events, seconds)


def counting_handler(counts: list[int], index: int) -> Handler:
    """W1, W4: a subscriber that counts its deliveries in `counts[index]`."""

    async def handler(message: Any) -> None:
        counts[index] += 1

    return handler


class Countdown:
    """`done` is set once `tick()` has been called `total` times."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.done = asyncio.Event()

    def tick(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set()


async def slow_handler(message: Any) -> None:
    """W3: the slow subscriber."""
    await asyncio.sleep(SLOW_HANDLER_SECONDS)


def ticking_handler(fast: Countdown) -> Handler:
    """W3: a fast subscriber, which ticks `fast` once per event. Each call makes a new
    function (pyee keeps one entry per function)."""

    async def handler(message: Any) -> None:
        fast.tick()

    return handler


def blocking_handler(blocked: asyncio.Event) -> Handler:
    """Memory: a subscriber that sets `blocked` when it gets its first event and then never
    returns, so that every later event stays queued."""
    gate = asyncio.Event()

    async def handler(message: Any) -> None:
        blocked.set()
        await gate.wait()

    return handler


class Probe:
    """Times one chain at a time: `arm()` before the first publish, `hit()` in the last
    handler of the chain, which records when it ran."""

    def __init__(self) -> None:
        self._done: asyncio.Future[int] | None = None

    def arm(self) -> asyncio.Future[int]:
        self._done = asyncio.get_running_loop().create_future()
        return self._done

    def hit(self) -> None:
        assert self._done is not None
        self._done.set_result(perf_counter_ns())


async def time_chains(
    start_chain: Callable[[int], Awaitable[object]], probe: Probe, chains: int
) -> Metrics:
    """W2: latency from the first publish of a chain until its last handler runs.

    One chain at a time; the first tenth (at least 10) are warm-up and not counted.
    """
    warmup = max(10, chains // 10)
    samples: list[int] = []
    gc.collect()
    for index in range(warmup + chains):
        done = probe.arm()
        started = perf_counter_ns()
        await start_chain(index)
        finished = await done
        if index >= warmup:
            samples.append(finished - started)
    return {
        "p50_us": percentile(samples, 50) / 1e3,
        "p99_us": percentile(samples, 99) / 1e3,
    }


async def time_beside_slow(
    publish: Callable[[int], Awaitable[object]], events: int, fast: Countdown
) -> Metrics:
    """W3: time until the fast subscribers have handled every event, and the longest that
    a single publish call took."""
    worst = 0
    watch = Stopwatch()
    await asyncio.sleep(0)  # let the workers start: setup, not timed
    watch.start()
    for index in range(events):
        before = perf_counter_ns()
        await publish(index)
        worst = max(worst, perf_counter_ns() - before)
    await fast.done.wait()
    watch.stop()
    return {"fast_ms": watch.elapsed_ns / 1e6, "max_publish_us": worst / 1e3}


async def traced_bytes_per_event(
    fill: Callable[[], Awaitable[object]], events: int, queued: Callable[[], int]
) -> Metrics:
    """Memory: bytes allocated (tracemalloc) while `fill()` queues `events` events that stay
    queued, per event. `queued()` says how many wait, to check that none was handled."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    await fill()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    expect("events waiting after the fill", queued(), events)
    return {"bytes_per_event": (after - before) / events}


def worker_metrics(script: str, args: list[str], *, timeout: float, label: str) -> Any:
    """Run `script` (a benchmark's own file) in a fresh interpreter with `args`; return the
    JSON document its last stdout line holds. Exits naming `label` if the worker fails."""
    done = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(script).resolve().parent.parent,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{label} failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])
