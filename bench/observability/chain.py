"""The traced workload every library runs: one publisher, a two-hop chain.

``user.query`` → a handler publishes ``research.complete`` → a handler that counts. The
publisher publishes `roots` queries (after `warmup` untimed ones), one ``await`` at a time
in process, or `concurrency` at a time (``asyncio.gather``) against a broker; the time runs
until the last ``research.complete`` was handled and, when an SDK is set up, every span was
exported. Each root event is 2 publishes and 2 handlings. Besides the rate, the process's
CPU time per chain is measured over the same span of time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from common import Metrics, Stopwatch, expect

from observability.otel import Setup

# Nothing handled for this long while some chains are unfinished: the measurement failed.
STALL_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class ChainSizes:
    roots: int
    warmup: int
    concurrency: int = 1


class Tally:
    """Counts the chains that reached their last handler (`hit`, named like the core
    benchmark's `Probe.hit`, so its autogen agents can call it)."""

    def __init__(self) -> None:
        self.count = 0
        self._target = 0
        self._reached = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count == self._target:
            self._reached.set()

    async def reach(self, target: int) -> None:
        if self.count >= target:
            return
        self._target = target
        self._reached.clear()
        await asyncio.wait_for(self._reached.wait(), STALL_SECONDS)


async def publish_all(
    publish_root: Callable[[Any], Awaitable[object]], start: int, count: int, concurrency: int
) -> None:
    if concurrency == 1:
        for index in range(start, start + count):
            await publish_root(index)
        return
    for first in range(start, start + count, concurrency):
        last = min(first + concurrency, start + count)
        await asyncio.gather(*(publish_root(index) for index in range(first, last)))


async def time_chains(
    publish_root: Callable[[Any], Awaitable[object]],
    tally: Tally,
    sizes: ChainSizes,
    setup: Setup,
) -> Metrics:
    """Warm up, then time `sizes.roots` chains; roots (chains) per second."""
    await publish_all(publish_root, 0, sizes.warmup, sizes.concurrency)
    await tally.reach(sizes.warmup)
    setup.flush()
    watch = Stopwatch()
    watch.start()
    cpu_started = time.process_time()
    await publish_all(publish_root, sizes.warmup, sizes.roots, sizes.concurrency)
    await tally.reach(sizes.warmup + sizes.roots)
    setup.flush()
    cpu_seconds = time.process_time() - cpu_started
    seconds = watch.stop()
    expect("chains handled", tally.count, sizes.warmup + sizes.roots)
    return {
        "rate": sizes.roots / seconds,
        "seconds": seconds,
        # This process's CPU time, all threads (the span processor's too), per chain: on a
        # broker, wall time also holds waits for the broker, which tracing does not add to.
        "cpu_us_per_chain": cpu_seconds / sizes.roots * 1e6,
    }
