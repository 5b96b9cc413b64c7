"""The workload on eventwire: `EventBus(<broker URL>)`, one durable subscription. One message
is `await bus.publish(topic, payload)`; a chunk (throughput mode) is one
`await bus.publish_many(...)` call; the windowed mode keeps 100 `bus.publish` calls in flight."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import Metrics

from backends.workload import (
    AMQP_URL,
    NATS_URL,
    QUERY_VARIABLE,
    REDIS_URL,
    TOPIC,
    Publisher,
    Recorder,
    Workload,
    measure,
    message,
    settle,
    unique_name,
)
from eventwire import Event, EventBus

# Closing after `destroy()` may log about consumers that no longer exist: expected.
logging.getLogger("eventwire").setLevel(logging.ERROR)


@contextlib.contextmanager
def bus_url(backend: str) -> Iterator[str]:
    """The URL of a fresh, unique place on `backend`'s broker (a temporary file for SQLite),
    with the options of ``--eventwire-query``."""
    with _bus_url(backend) as url:
        extra = os.environ.get(QUERY_VARIABLE, "")
        yield f"{url}{'&' if '?' in url else '?'}{extra}" if extra else url


@contextlib.contextmanager
def _bus_url(backend: str) -> Iterator[str]:
    namespace = unique_name("bench_ew")
    if backend == "sqlite":
        folder = tempfile.mkdtemp(prefix="eventwire-bench-")
        try:
            yield f"sqlite:///{Path(folder, 'bus.db')}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    elif backend == "redis":
        yield f"{REDIS_URL}?namespace={namespace}"
    elif backend == "nats":
        yield f"{NATS_URL}?namespace={namespace}"
    elif backend == "amqp":
        yield f"{AMQP_URL}?namespace={namespace}"
    else:
        raise ValueError(f"unknown backend {backend!r}")


async def run(backend: str, workload: Workload) -> Metrics:
    recorder = Recorder(workload)

    async def handler(event: Event[Any]) -> None:
        recorder.handled(event.payload["sent_ns"])

    async def publish_one() -> None:
        await bus.publish(TOPIC, message())

    async def publish_chunk(count: int) -> None:
        # A chunk in one call, as the raw clients send a chunk in one pipeline/transaction.
        await bus.publish_many([(TOPIC, message()) for _ in range(count)])

    with bus_url(backend) as url:
        bus = EventBus(url)
        bus.subscribe(TOPIC, handler, name="bench")
        async with bus:
            destination = bus.backend
            assert destination is not None
            try:
                metrics = await measure(Publisher(publish_one, publish_chunk), recorder, workload)
                await settle(recorder)
            finally:
                await destination.destroy()
    return metrics
