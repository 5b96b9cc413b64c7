"""The chain on FastStream's Redis broker (Redis Streams, one consumer group per stream),
traced by its `RedisTelemetryMiddleware`.

FastStream has no in-process broker for applications: its ``TestRedisBroker`` is a test
double that patches the broker, so the comparison is made on Redis, against eventwire on
Redis. Settings as in the broker benchmark (``bench/backends/impl_faststream.py``): no access
log (``logger=None``), each message acknowledged after its handler
(``AckPolicy.NACK_ON_ERROR``). The first handler forwards with the ``@broker.publisher``
decorator, FastStream's way to chain.

Modes: ``off`` (no middleware), ``api`` (the middleware, no SDK: non-recording spans),
``sdk`` (``RedisTelemetryMiddleware(tracer_provider=...)``). The middleware also records
publish/process duration histograms through the global meter provider, which is the API's
no-op one here.
"""

from __future__ import annotations

from typing import Any

from common import Metrics
from faststream import AckPolicy
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.opentelemetry import RedisTelemetryMiddleware
from redis.asyncio import Redis

from observability.chain import ChainSizes, Tally, time_chains
from observability.otel import Setup

MODES = ("off", "api", "sdk")


async def run(url: str, namespace: str, mode: str, sizes: ChainSizes, verify: bool) -> Metrics:
    setup = Setup(mode, verify=verify)  # type: ignore[arg-type]
    middlewares = (
        [] if mode == "off" else [RedisTelemetryMiddleware(tracer_provider=setup.provider)]
    )
    # Each concurrent publish holds a pooled connection, and each subscriber one more.
    broker = RedisBroker(
        url,
        logger=None,  # type: ignore[arg-type]  # None: no access log
        middlewares=middlewares,
        max_connections=2 * sizes.concurrency + 8,
    )
    tally = Tally()
    queries = f"{namespace}.user.query"
    results = f"{namespace}.research.complete"

    def stream(name: str) -> StreamSub:
        return StreamSub(
            name,
            group="bench",
            consumer="consumer",
            max_records=max(sizes.concurrency, 1),
            polling_interval=1000,
        )

    @broker.subscriber(stream=stream(queries), ack_policy=AckPolicy.NACK_ON_ERROR)
    @broker.publisher(stream=results)
    async def on_query(body: dict[str, Any]) -> dict[str, Any]:
        return body

    @broker.subscriber(stream=stream(results), ack_policy=AckPolicy.NACK_ON_ERROR)
    async def on_research(body: dict[str, Any]) -> None:
        tally.hit()

    async def publish_root(index: int) -> None:
        await broker.publish({"n": index}, stream=queries)

    await broker.start()
    try:
        metrics = await time_chains(publish_root, tally, sizes, setup)
    finally:
        await broker.stop()
        cleaner = Redis.from_url(url)
        await cleaner.delete(queries, results)
        await cleaner.aclose()
    metrics.update(setup.span_metrics(sizes.warmup + sizes.roots))
    if verify:
        names = [name.replace(namespace, "<ns>") for name in setup.span_names()]
        metrics["span_names"] = names  # type: ignore[assignment]
    setup.shutdown()
    return metrics
