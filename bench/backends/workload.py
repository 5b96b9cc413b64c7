"""What every implementation of the broker benchmark shares: brokers, payload, publishing
modes and timing, so that only the library calls differ between the `impl_*.py` modules.

The workload: one publisher and one durable subscriber in one process and event loop; a
publish counts once the broker has stored the message. Each message is a 1 KB JSON document
that carries the `perf_counter_ns()` of its publish call; the handler reads it back to time
end-to-end latency. A warm-up (connections, consumer, first batches) is handled first, the
same way as the timed part, and not timed. The publisher works in one of four modes (`MODES`):

- ``throughput``: chunks of 500 in flight, two at a time (`publish_pipelined`), each chunk in
  the client's batch call where it has one (pipeline, transaction, ``publish_many``);
- ``serial``: one publish at a time, each awaited before the next (``await publish()`` in a
  loop), while the subscriber handles them: what an agent publishing its results gets;
- ``latency``: one event at a time, the next published only once the handler got the last:
  publish call to handler, with nothing queued ahead of it;
- ``windowed``: 100 concurrent one-message publish calls (a sliding window: a new call starts
  as soon as one returns); clients whose way to have many publishes in flight is a batch
  (sqlite3's transaction, redis-py's pipeline, FastStream's on Redis) send chunks of 50, two
  in flight.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter_ns, process_time_ns
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

# How the publisher publishes; see the module docstring.
MODES = ("throughput", "serial", "latency", "windowed")
# Publishes in flight in the windowed mode.
WINDOWED_IN_FLIGHT = 100


@dataclass(frozen=True, slots=True)
class Workload:
    """How much one measurement does, and how the publisher publishes."""

    events: int
    warmup: int
    mode: str = "throughput"
    # The pipelined publisher awaits `chunk` publishes at once (`asyncio.gather`, or one batch
    # call), in `lanes` concurrent lanes: up to chunk × lanes publishes are in flight. The
    # windowed mode's sliding window keeps exactly that many one-message calls in flight.
    chunk: int = 500
    lanes: int = 2
    # Deliveries a raw consumer fetches (and acknowledges) per round trip, or its prefetch.
    batch: int = 512

    @property
    def window(self) -> int:
        return self.chunk * self.lanes


def workload_for(mode: str, events: int) -> Workload:
    """The workload of `mode` with `events` timed events, after a warm-up of a tenth as many
    (at least one publishing window, at most 5,000)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "windowed":
        chunk, lanes = WINDOWED_IN_FLIGHT // 2, 2
    else:
        chunk, lanes = 500, 2
    floor = {"throughput": 1_000, "windowed": WINDOWED_IN_FLIGHT}.get(mode, 50)
    warmup = min(5_000, max(floor, events // 10))
    return Workload(events=events, warmup=warmup, mode=mode, chunk=chunk, lanes=lanes)


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
        # The latency mode's wait for the one message in flight.
        self.next_handled: asyncio.Future[None] | None = None
        if self.warmup == 0:
            self.warm.set()

    def handled(self, sent_ns: int) -> None:
        now = perf_counter_ns()
        waiter = self.next_handled
        if waiter is not None:
            self.next_handled = None
            waiter.set_result(None)
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

    def expect_next(self) -> asyncio.Future[None]:
        """A future resolved when the next message is handled (the latency mode)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.next_handled = waiter
        return waiter

    async def wait_next(self, waiter: asyncio.Future[None]) -> None:
        """Wait for `expect_next()`'s future; fail after STALL_SECONDS."""
        try:
            async with asyncio.timeout(STALL_SECONDS):
                await waiter
        except TimeoutError:
            raise BenchError(
                f"latency: message {self.count + 1:,} of {self.expected:,} not handled within "
                f"{STALL_SECONDS:.0f} s"
            ) from None


PublishOne = Callable[[], Awaitable[object]]
PublishChunk = Callable[[int], Awaitable[object]]


def one_by_one(publish: PublishOne) -> PublishChunk:
    """A chunk publisher for an API that publishes one message per call: `count` calls in
    flight at once (`asyncio.gather`)."""

    async def publish_chunk(count: int) -> None:
        await asyncio.gather(*(publish() for _ in range(count)))

    return publish_chunk


@dataclass(frozen=True, slots=True)
class Publisher:
    """How an implementation publishes: `one` message per call (returns once stored), and
    optionally a `chunk` of them in one batch call (pipeline, transaction, publish_many).
    `windowed_in_chunks`: the windowed mode sends chunks rather than concurrent `one` calls,
    for a client whose natural way to have many publishes in flight is a batch."""

    one: PublishOne
    chunk: PublishChunk | None = None
    windowed_in_chunks: bool = False
    chunked: PublishChunk = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunked", self.chunk or one_by_one(self.one))


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


async def publish_sliding(publish: PublishOne, total: int, workload: Workload) -> None:
    """Publish `total` messages with `workload.window` calls in flight: each of that many
    publishers starts its next call as soon as its last one returned."""
    left = total

    async def publisher() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await publish()

    await asyncio.gather(*(publisher() for _ in range(min(workload.window, total))))


async def publish_serially(publish: PublishOne, total: int) -> None:
    """One publish at a time, each awaited before the next."""
    for _ in range(total):
        await publish()


async def publish_and_wait_each(publish: PublishOne, total: int, recorder: Recorder) -> None:
    """One message at a time: the next is published once the handler got the last."""
    for _ in range(total):
        handled = recorder.expect_next()
        await publish()
        await recorder.wait_next(handled)


def publishing(
    publisher: Publisher, workload: Workload
) -> Callable[[int, Recorder], Awaitable[None]]:
    """The publishing loop of `workload.mode`: publishes a given number of messages."""
    mode = workload.mode
    if mode == "throughput" or (mode == "windowed" and publisher.windowed_in_chunks):
        return lambda total, _: publish_pipelined(publisher.chunked, total, workload)
    if mode == "windowed":
        return lambda total, _: publish_sliding(publisher.one, total, workload)
    if mode == "serial":
        return lambda total, _: publish_serially(publisher.one, total)
    if mode == "latency":
        return lambda total, recorder: publish_and_wait_each(publisher.one, total, recorder)
    raise ValueError(f"unknown mode {mode!r}")


async def measure(publisher: Publisher, recorder: Recorder, workload: Workload) -> Metrics:
    """Warm up, then time `workload.events` publishes until the last one is handled, in the
    workload's mode. The metrics are named after the mode (see `metrics_of`)."""
    publish = publishing(publisher, workload)
    await publish(workload.warmup, recorder)
    await recorder.wait(recorder.warm, "warm-up")
    gc.collect()
    cpu_started = process_time_ns()
    started = perf_counter_ns()
    await publish(workload.events, recorder)
    published = perf_counter_ns()
    await recorder.wait(recorder.done, "measurement")
    metrics = metrics_of(workload, recorder, started, published)
    # CPU time of this process per event (publisher and subscriber both): what the library
    # costs, little disturbed by other load on the machine, unlike rates and latencies.
    cpu_key = "cpu_us" if workload.mode == "throughput" else f"{workload.mode}_cpu_us"
    metrics[cpu_key] = (process_time_ns() - cpu_started) / 1e3 / workload.events
    return metrics


def metrics_of(workload: Workload, recorder: Recorder, started: int, published: int) -> Metrics:
    """The figures of one measurement. throughput: ``rate``, ``p50_ms``, ``p99_ms`` (latency
    under full load), ``publish_rate``; serial and windowed: ``<mode>_rate``; latency:
    ``latency_p50_us``, ``latency_p90_us``, ``latency_p99_us`` and ``latency_rate`` (events
    per second one at a time, the inverse of the mean round trip)."""
    seconds = (recorder.last_ns - started) / 1e9
    rate = workload.events / seconds
    publish_rate = workload.events / ((published - started) / 1e9)
    latencies = recorder.latencies
    mode = workload.mode
    if mode == "throughput":
        return {
            "rate": rate,
            "p50_ms": percentile(latencies, 50) / 1e6,
            "p99_ms": percentile(latencies, 99) / 1e6,
            "seconds": seconds,
            "publish_rate": publish_rate,
        }
    if mode == "latency":
        return {
            "latency_p50_us": percentile(latencies, 50) / 1e3,
            "latency_p90_us": percentile(latencies, 90) / 1e3,
            "latency_p99_us": percentile(latencies, 99) / 1e3,
            "latency_rate": rate,
            "latency_seconds": seconds,
        }
    return {
        f"{mode}_rate": rate,
        f"{mode}_p50_ms": percentile(latencies, 50) / 1e6,
        f"{mode}_seconds": seconds,
        f"{mode}_publish_rate": publish_rate,
    }


async def settle(recorder: Recorder, seconds: float = 0.2) -> None:
    """After the measurement: give a stray redelivery a moment to show up, then check that
    every message was handled exactly once."""
    await asyncio.sleep(seconds)
    if recorder.count != recorder.expected:
        raise BenchError(
            f"handled {recorder.count:,} messages, expected exactly {recorder.expected:,}"
        )
