"""What every implementation of the broker benchmark shares: brokers, payload, publishing
window and timing, so that only the library calls differ between the `impl_*.py` modules.

The workload: one publisher and one durable subscriber in one process and event loop. The
publisher keeps a window of publishes in flight (`publish_pipelined`); a publish counts once
the broker has stored the message. Each message is a 1 KB JSON document that carries the
`perf_counter_ns()` of its publish call; the handler reads it back to time end-to-end latency.
A warm-up (connections, consumer, first batches) is handled first and not timed.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import msgspec
from common import BenchError, Metrics, percentile

REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

# URL options added to eventwire's bus URLs (`bench_backends.py --eventwire-query`).
QUERY_VARIABLE = "EVENTWIRE_BENCH_QUERY"

TOPIC = "bench.x"
PAYLOAD_BYTES = 1024
# No handled event for this long while some are missing: the measurement failed.
STALL_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Workload:
    """How much one measurement does, and how the publisher pipelines."""

    events: int
    warmup: int
    # The publisher awaits `chunk` publishes at once (`asyncio.gather`), in `lanes` concurrent
    # lanes: up to chunk × lanes publishes are in flight.
    chunk: int = 500
    lanes: int = 2
    # Deliveries a raw consumer fetches (and acknowledges) per round trip, or its prefetch.
    batch: int = 512

    @property
    def window(self) -> int:
        return self.chunk * self.lanes


def unique_name(prefix: str) -> str:
    """A broker-safe name no other run (or other user of the broker) has."""
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


# -- payload ---------------------------------------------------------------------------------


def _padding() -> str:
    """Filler that makes the JSON document of `message()` exactly PAYLOAD_BYTES long."""
    overhead = len(msgspec.json.encode({"sent_ns": perf_counter_ns(), "data": ""}))
    return "x" * (PAYLOAD_BYTES - overhead)


PADDING = _padding()


def message() -> dict[str, Any]:
    """The application's message, stamped with the time of its publish call."""
    return {"sent_ns": perf_counter_ns(), "data": PADDING}


def message_bytes() -> bytes:
    """`message()` as JSON bytes: what the raw clients send."""
    return msgspec.json.encode(message())


def sent_ns_of(body: bytes) -> int:
    """The publish time in a raw message (decoding the whole document, as an app would)."""
    document: dict[str, Any] = msgspec.json.decode(body)
    return int(document["sent_ns"])


# -- timing ----------------------------------------------------------------------------------


class Recorder:
    """Counts handled messages; after the warm-up, records each one's latency."""

    def __init__(self, workload: Workload) -> None:
        self.warmup = workload.warmup
        self.expected = workload.warmup + workload.events
        self.count = 0
        self.latencies: list[int] = []
        self.last_ns = 0
        self.warm = asyncio.Event()
        self.done = asyncio.Event()
        if self.warmup == 0:
            self.warm.set()

    def handled(self, sent_ns: int) -> None:
        now = perf_counter_ns()
        self.count = count = self.count + 1
        if count > self.warmup:
            self.latencies.append(now - sent_ns)
            self.last_ns = now
            if count == self.expected:
                self.done.set()
        elif count == self.warmup:
            self.warm.set()

    async def wait(self, flag: asyncio.Event, what: str) -> None:
        """Wait for `flag`; fail if no message arrives for STALL_SECONDS meanwhile."""
        seen = -1
        while not flag.is_set():
            if self.count == seen:
                raise BenchError(
                    f"{what}: stalled at {self.count:,} of {self.expected:,} handled messages "
                    f"for {STALL_SECONDS:.0f} s"
                )
            seen = self.count
            try:
                async with asyncio.timeout(STALL_SECONDS):
                    await flag.wait()
            except TimeoutError:
                pass


PublishChunk = Callable[[int], Awaitable[object]]


def one_by_one(publish: Callable[[], Awaitable[object]]) -> PublishChunk:
    """A chunk publisher for an API that publishes one message per call: `count` calls in
    flight at once (`asyncio.gather`)."""

    async def publish_chunk(count: int) -> None:
        await asyncio.gather(*(publish() for _ in range(count)))

    return publish_chunk


async def publish_pipelined(publish_chunk: PublishChunk, total: int, workload: Workload) -> None:
    """Publish `total` messages in chunks of `workload.chunk`, `workload.lanes` chunks in
    flight at once."""
    left = total

    async def lane() -> None:
        nonlocal left
        while left > 0:
            count = min(workload.chunk, left)
            left -= count
            await publish_chunk(count)

    await asyncio.gather(*(lane() for _ in range(workload.lanes)))


async def measure(publish_chunk: PublishChunk, recorder: Recorder, workload: Workload) -> Metrics:
    """Warm up, then time `workload.events` publishes until the last one is handled."""
    await publish_pipelined(publish_chunk, workload.warmup, workload)
    await recorder.wait(recorder.warm, "warm-up")
    gc.collect()
    started = perf_counter_ns()
    await publish_pipelined(publish_chunk, workload.events, workload)
    published = perf_counter_ns()
    await recorder.wait(recorder.done, "measurement")
    seconds = (recorder.last_ns - started) / 1e9
    return {
        "rate": workload.events / seconds,
        "p50_ms": percentile(recorder.latencies, 50) / 1e6,
        "p99_ms": percentile(recorder.latencies, 99) / 1e6,
        "seconds": seconds,
        "publish_rate": workload.events / ((published - started) / 1e9),
    }


async def settle(recorder: Recorder, seconds: float = 0.2) -> None:
    """After the measurement: give a stray redelivery a moment to show up, then check that
    every message was handled exactly once."""
    await asyncio.sleep(seconds)
    if recorder.count != recorder.expected:
        raise BenchError(
            f"handled {recorder.count:,} messages, expected exactly {recorder.expected:,}"
        )
