"""Statistics of buses running in other processes, over their own broker.

Each process that runs a `StatsResponder` (``eventwire run`` starts one on every broker
backend) keeps an ephemeral consumer of its own on the reserved topic ``_bus.stats.request``,
so every process receives every request. It answers each one by publishing a snapshot of its
subscriptions' counters to the request's ``reply_to`` topic. `StatsClient` (behind
``eventwire stats``) publishes one request, collects the snapshots that arrive within a
timeout, and adds the broker's own view: how many events each durable subscription still owes,
which needs no process to answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

from eventwire.backends import open_backend
from eventwire.backends.base import Consumer, ConsumerInfo, ConsumerSpec, Message
from eventwire.backends.broker import BrokerBackend
from eventwire.backends.session import ConsumerSession
from eventwire.bus import DLQ_CONSUMER, REPLY_PREFIX
from eventwire.envelope import EnvelopeError, decode, encode
from eventwire.event import Event

if TYPE_CHECKING:
    from eventwire.bus import EventBus
    from eventwire.subscription import SubscriptionStats

logger = logging.getLogger("eventwire")

STATS_REQUEST_TOPIC = "_bus.stats.request"
"""Where `StatsClient` asks every process for its statistics."""
_CONSUMER_PREFIX = "_eventwire.stats."
_FETCH_WAIT = 1.0
_PUBLISH_TIMEOUT = 5.0


def subscription_stats(stats: SubscriptionStats) -> dict[str, Any]:
    """One subscription's counters and percentiles as plain JSON values."""
    handling = stats.handling
    return {
        "name": stats.name,
        "pattern": stats.pattern,
        "group": stats.group,
        "handled": stats.handled,
        "failed": stats.failed,
        "retried": stats.retried,
        "dead_lettered": stats.dead_lettered,
        "dropped": stats.dropped,
        "in_flight": stats.in_flight,
        "queued": stats.queued,
        "handling_seconds": stats.handling_seconds,
        "handling": {
            "count": handling.count,
            "p50": handling.p50,
            "p90": handling.p90,
            "p99": handling.p99,
            "max": handling.max,
        },
    }


class _Service:
    """``async with`` runs `start` and `close`."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class StatsResponder(_Service):
    """Answers ``eventwire stats`` for `bus` (on a broker backend) while it runs.

    Start it after the bus and close it before the bus (``async with StatsResponder(bus):``);
    ``eventwire run`` does both. It costs one ephemeral consumer, removed on close."""

    def __init__(self, bus: EventBus) -> None:
        backend = bus.backend
        if not isinstance(backend, BrokerBackend):
            raise ValueError(
                "the in-process bus (memory://) cannot be asked from other processes; "
                "read bus.stats() in the process itself"
            )
        self.bus = bus
        self._backend: BrokerBackend = backend
        self.id = secrets.token_hex(6)
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self._started = time.time()
        self._session: ConsumerSession | None = None
        self._consumer: Consumer | None = None
        self.answered = 0

    def process(self) -> dict[str, Any]:
        """Who answers: process id, host, pid, start time, bus URL (without password)."""
        return {
            "id": self.id,
            "hostname": self.hostname,
            "pid": self.pid,
            "started_at": datetime.fromtimestamp(self._started, UTC).isoformat(),
            "uptime_seconds": round(time.time() - self._started, 3),
            "url": self.bus.safe_url,
        }

    def snapshot(self) -> dict[str, Any]:
        """This process and its subscriptions' statistics, as plain JSON values."""
        return {
            "process": self.process(),
            "subscriptions": [
                subscription_stats(stats)
                for name, stats in self.bus.stats().items()
                if not name.startswith("_bus.")  # the bus's own reply inbox
            ],
        }

    async def start(self) -> None:
        """Open the consumer (requests published from now on are answered) and serve."""
        if self._session is not None:
            return
        spec = ConsumerSpec(
            name=f"{_CONSUMER_PREFIX}{self.id}",
            pattern=STATS_REQUEST_TOPIC,
            start="latest",
            ephemeral=True,
        )
        self._consumer = await self._backend.consumer(spec)
        # Fetching retries through a broker that is away: the backends reconnect by themselves.
        self._session = ConsumerSession(self._consumer, spec)
        self._session.run(self._serve, name="eventwire:stats")

    async def close(self) -> None:
        """Stop answering and remove the consumer. Idempotent."""
        session, self._session = self._session, None
        self._consumer = None
        if session is not None:
            try:
                await session.close()
            except Exception as error:
                logger.warning("eventwire: could not remove the stats consumer: %s", error)

    async def _serve(self) -> None:
        session = self._session
        assert session is not None
        async for deliveries in session.batches(16, _FETCH_WAIT):
            for delivery in deliveries:
                try:
                    await self._answer(delivery.body)
                except Exception as error:
                    # Unanswered, the request's client times out waiting: nothing to redo.
                    logger.warning(
                        "eventwire: stats responder: %s: %s", type(error).__name__, error
                    )
            session.ack_later(deliveries)

    async def _answer(self, body: bytes) -> None:
        try:
            request = decode(body)
        except EnvelopeError:
            return  # not ours to understand; acknowledged with the rest
        reply_to = request.reply_to
        if reply_to is None or not reply_to.startswith(REPLY_PREFIX):
            return
        answer: Event[Any] = Event(reply_to, {"request": request.id, **self.snapshot()})
        message = Message(answer.id, answer.topic, None, encode(answer, max_bytes=None))
        async with asyncio.timeout(_PUBLISH_TIMEOUT):
            await self._backend.publish([message])
        self.answered += 1


@dataclass
class StatsReport:
    """What `StatsClient.collect` gathered: every answering process's snapshot, and every
    durable subscription as the broker sees it."""

    url: str
    processes: list[dict[str, Any]]
    """Snapshots (see `StatsResponder.snapshot`), ordered by host and pid."""
    consumers: list[ConsumerInfo]
    """Durable subscriptions (by group, else name) and their outstanding events."""
    dead_letters: int | None
    """Dead letters the broker keeps for ``eventwire dlq``; None if it keeps none yet."""
    dead_letters_exact: bool = True
    """False when `dead_letters` is only an upper bound (the broker was still counting)."""
    collected_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def running(self, consumer: str) -> int:
        """How many answering processes run the durable subscription `consumer`."""
        return sum(
            any((s["group"] or s["name"]) == consumer for s in process["subscriptions"])
            for process in self.processes
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON values."""
        return {
            "url": self.url,
            "collected_at": self.collected_at.isoformat(),
            "processes": self.processes,
            "subscriptions": [
                {
                    "name": info.name,
                    "pattern": info.pattern,
                    "outstanding": info.outstanding,
                    "processes": self.running(info.name),
                }
                for info in self.consumers
            ],
            "dead_letters": self.dead_letters,
            "dead_letters_exact": self.dead_letters_exact,
        }


class StatsClient(_Service):
    """Asks every process on a broker for its statistics (see `StatsResponder`).

    ``async with StatsClient(url) as client: report = await client.collect()``. Connecting
    raises `BackendConnectionError` if the broker is unreachable, `ValueError` for a bad or
    ``memory://`` URL."""

    def __init__(self, url: str) -> None:
        backend = open_backend(url)
        if not isinstance(backend, BrokerBackend):
            raise ValueError(
                "memory:// is the in-process bus: it lives inside its own process, which no "
                "other process can ask"
            )
        self.backend: BrokerBackend = backend
        self.reply_topic = f"{REPLY_PREFIX}{secrets.token_hex(6)}"
        self._replies: ConsumerSession | None = None

    async def start(self) -> None:
        """Connect and open this client's reply inbox."""
        await self.backend.connect()
        spec = ConsumerSpec(
            name=self.reply_topic, pattern=self.reply_topic, start="latest", ephemeral=True
        )
        try:
            # No retries: collecting is bounded by its timeout.
            self._replies = ConsumerSession(await self.backend.consumer(spec), spec, retry=False)
        except BaseException:
            await self.backend.close()
            raise

    async def close(self) -> None:
        """Remove the reply inbox and disconnect."""
        replies, self._replies = self._replies, None
        try:
            if replies is not None:
                with contextlib.suppress(Exception):
                    await replies.close()
        finally:
            await self.backend.close()

    async def collect(self, timeout: float = 1.5) -> StatsReport:
        """Ask every process, wait up to `timeout` seconds for their answers (less when every
        process the broker lists has answered), and read the broker's view."""
        if self._replies is None:
            raise RuntimeError("use StatsClient in 'async with'")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request: Event[Any] = Event(STATS_REQUEST_TOPIC, None, reply_to=self.reply_topic)
        async with asyncio.timeout(max(timeout, _PUBLISH_TIMEOUT)):
            await self.backend.publish(
                [Message(request.id, request.topic, None, encode(request, max_bytes=None))]
            )
            before = await self.backend.consumers()
        # Brokers that list ephemeral consumers tell how many answers to expect; a process
        # that died without removing its consumer just makes the wait run to the timeout.
        expected = sum(1 for info in before if info.name.startswith(_CONSUMER_PREFIX))
        answers: dict[str, dict[str, Any]] = {}
        while not (expected and len(answers) >= expected):
            left = deadline - loop.time()
            if left <= 0:
                break
            deliveries = await self._replies.fetch(64, left)
            for delivery in deliveries:
                answer = _answer_to(request.id, delivery.body)
                if answer is not None:
                    answers[answer["process"]["id"]] = answer
            if deliveries:
                await self._replies.ack(deliveries)
        async with asyncio.timeout(_PUBLISH_TIMEOUT):
            infos = await self.backend.consumers()
        processes = sorted(
            answers.values(),
            key=lambda p: (p["process"]["hostname"], p["process"]["pid"]),
        )
        letters = next((i for i in infos if i.name == DLQ_CONSUMER), None)
        return StatsReport(
            url=self.backend.url.redacted,
            processes=processes,
            consumers=sorted((i for i in infos if _is_subscription(i)), key=lambda i: i.name),
            dead_letters=None if letters is None else letters.outstanding,
            dead_letters_exact=letters is None or letters.exact,
        )


def _answer_to(request_id: str, body: bytes) -> dict[str, Any] | None:
    """The snapshot in a reply to request `request_id`; None for anything else (a late reply
    to an earlier request, or what another producer put on the topic)."""
    try:
        payload = decode(body).payload
    except EnvelopeError:
        return None
    if not isinstance(payload, dict) or payload.get("request") != request_id:
        return None
    process, subscriptions = payload.get("process"), payload.get("subscriptions")
    if not isinstance(process, dict) or not isinstance(subscriptions, list):
        return None
    pid = process.get("pid")
    return {
        "process": {
            **process,
            "id": str(process.get("id")),
            "hostname": str(process.get("hostname", "?")),
            "pid": pid if isinstance(pid, int) else 0,
        },
        "subscriptions": subscriptions,
    }


def _is_subscription(info: ConsumerInfo) -> bool:
    """False for the bus's own consumers: dead letters, stats requests, request replies."""
    return not (
        info.name == DLQ_CONSUMER
        or info.name.startswith(_CONSUMER_PREFIX)
        or info.pattern.startswith(REPLY_PREFIX)
    )


__all__ = [
    "STATS_REQUEST_TOPIC",
    "StatsClient",
    "StatsReport",
    "StatsResponder",
    "subscription_stats",
]
