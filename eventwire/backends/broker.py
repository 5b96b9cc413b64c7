"""What every broker backend shares: `BrokerBackend` implements the bus's `Backend` interface
once, on top of the bytes-level methods each broker module provides (`publish` encoded
envelopes, open a durable `Consumer`, list and delete consumers).

Publishes are encoded, batched while a batch is in flight (`BatchPublisher`) and return once
the broker has stored them. Each durable consumer this process runs is fed by one `Feeder`,
which fills the inboxes of the subscriptions behind it (one, or the members of a group in this
process) from the broker, never more than a bounded window at a time, keeps the leases of what
it holds alive, and acknowledges each event once its handler succeeded or it was
dead-lettered. What it still holds when it stops goes back to the broker.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, ClassVar

from msgspec.structs import force_setattr

from eventwire.backends.base import (
    DLQ_CONSUMER,
    TOOLING_PREFIX,
    Backend,
    BackendCapabilityError,
    Backoff,
    Consumer,
    ConsumerInfo,
    ConsumerSpec,
    Delivery,
    Message,
    is_tooling,
)
from eventwire.backends.partitions import GroupView, PartitionedConsumer, partition_names
from eventwire.backends.session import GIVE_BACK_TIMEOUT, ConsumerSession
from eventwire.deadletter import DLQ_PATTERN
from eventwire.envelope import EnvelopeError, encode
from eventwire.envelope import decode as decode_envelope
from eventwire.errors import PublishTimeoutError
from eventwire.event import Event
from eventwire.observe import handling_record, notify
from eventwire.requests import REPLY_PREFIX
from eventwire.routing import member_for_key
from eventwire.subscription import Subscription
from eventwire.topics import is_topic, pattern_matches, validate_topic

logger = logging.getLogger("eventwire")

# Most deliveries one consumer holds in this process at once (queued and in flight). The rest
# of its backlog stays in the broker, free for the consumer's other processes.
FETCH_WINDOW = 512
# Fewer events than this in a fetch is a trickle (see `Feeder._fetch_loop`).
_TRICKLE = 16
# Seconds a fetch waits for the first event; after fetches that found nothing, it waits twice
# as long each time, up to `_IDLE_FETCH_WAIT`: a fetch returns as soon as an event comes, and
# idle subscriptions by the thousand then cost next to nothing going round their loops.
_FETCH_WAIT = 1.0
_IDLE_FETCH_WAIT = 16.0
# Topics whose match against a pattern one feeder remembers, before starting over.
_MATCH_CACHE_LIMIT = 10_000
# Waiting publishes sent to the broker in one round trip.
PUBLISH_BATCH = 1000
# A process says which durable consumers it runs this often; one not heard from for
# PRESENCE_TTL seconds is gone (killed, frozen, cut off), and drain() and request() stop
# waiting for the consumers only it ran.
PRESENCE_EVERY = 1.0
PRESENCE_TTL = 5.0
# How long a look at who is present is reused (drain() polls much faster than beats come).
_PRESENCE_CACHE = 0.25


# What a message's headers say of an envelope to other systems: its body is JSON (FastStream
# and others decode it by this), and the W3C trace context, when the event has one, is added.
_JSON_HEADERS: Mapping[str, str] = MappingProxyType({"content-type": "application/json"})


@dataclass(frozen=True, slots=True)
class Presence:
    """Who runs one durable consumer: live processes, and when one was last heard from."""

    processes: int
    last_seen: float


class BrokerBackend(Backend):
    """A backend on a message broker; subclasses implement the bytes-level methods."""

    tracks_presence: ClassVar[bool] = False
    """True when the broker module records which processes run each consumer (`beat`)."""

    orders_keys_itself: ClassVar[bool] = False
    """True when the broker keeps same-key deliveries in order across processes by itself
    (SQLite): ``partitions=`` then changes nothing. Otherwise a partitioned consumer is a
    `PartitionedConsumer`, which needs `sync_group`."""

    def __init__(self, url: Any) -> None:
        super().__init__(url)
        # Durable consumer name -> the feeder this process runs for it.
        self._feeders: dict[str, Feeder] = {}
        self._publisher: BatchPublisher | None = None
        self._started = False
        # This process, as its presence records name it.
        self.process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._heart: asyncio.Task[None] | None = None
        self._beating = False
        self._announced: tuple[str, ...] = ()
        self._presence_cache: tuple[float, dict[str, Presence]] | None = None

    # -- what each broker module implements ---------------------------------------------

    @abc.abstractmethod
    async def publish(self, messages: Sequence[Message]) -> None:
        """Return once every message is stored by the broker (commit, XADD reply, PubAck,
        publisher confirm). Retries through lost connections until cancelled (the bus bounds
        it with its `publish_timeout`)."""

    @abc.abstractmethod
    async def consumer(self, spec: ConsumerSpec) -> Consumer:
        """Open (creating if new) the durable consumer `spec.name`. Raise `ValueError` if
        it exists with another pattern; raise `BackendCapabilityError` for a `start` the
        broker cannot replay from."""

    async def create_consumer(self, spec: ConsumerSpec) -> None:
        """Make sure the durable consumer `spec.name` exists, taking nothing from it. A broker
        whose `consumer` starts taking messages at once overrides this."""
        consumer = await self.consumer(spec)
        await consumer.close()

    async def beat(self, process: str, consumers: Sequence[str]) -> None:
        """Record that `process` runs `consumers` now (every `PRESENCE_EVERY` seconds).
        A broker that knows its consumers' processes itself (`ConsumerInfo.processes`)
        needs nothing here."""

    async def leave(self, process: str, consumers: Sequence[str]) -> None:
        """`process` stopped running `consumers` (it closed)."""

    async def presences(self) -> dict[str, list[float]]:
        """When each process running each consumer was last heard from: consumer name ->
        the times (Unix) of the latest beat of each process that ran it."""
        return {}

    async def record_handled(self, consumer: str, event_ids: Sequence[str]) -> None:
        """Keep `event_ids` as handled by durable consumer `consumer` (idempotent
        subscriptions), for at least `base.HANDLED_KEPT`. Backends that keep them implement
        this and `seen_handled`; another backend may keep them for a broker that cannot
        (``amqp://...?handled=<url>``)."""
        raise BackendCapabilityError(f"the {self.scheme}:// backend cannot keep handled event ids")

    async def seen_handled(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        """Which of `event_ids` `record_handled` kept for `consumer`."""
        raise BackendCapabilityError(f"the {self.scheme}:// backend cannot keep handled event ids")

    async def forget_handled(self, consumer: str) -> None:
        """Forget every id `record_handled` kept for `consumer` (it was deleted)."""
        raise BackendCapabilityError(f"the {self.scheme}:// backend cannot keep handled event ids")

    async def first_to_report(self, message_id: str, reporter: str) -> bool:
        """Whether `reporter` (a durable consumer) is the one to dead-letter the unreadable
        message `message_id`, which has no topic and so reached every subscription (a Redis
        entry without one): the backend lets the first claim it, and that one again if the
        message comes back. Other brokers route by topic."""
        return True

    def where_handled_go(self) -> str:
        """What to add to the URL so that handled ids are kept (for error messages)."""
        return ""

    def records_handled(self) -> bool:
        """Whether ``idempotent=True`` subscriptions can run on this backend as configured."""
        return self.capabilities.idempotent

    async def sync_group(
        self, group: str, process: str, want: Collection[str], ttl: float
    ) -> GroupView:
        """One look at the table of partitioned consumer `group` on the broker, in one
        atomic step: `process` is alive for `ttl` seconds more; of the slots in `want` it
        holds (or takes, when free or run out) each for `ttl` seconds more; it lets go of
        the others it held. Returns the live members and the slots `process` holds."""
        raise BackendCapabilityError(
            f"the {self.scheme}:// backend cannot spread a subscription over partitions"
        )

    async def leave_group(self, group: str, process: str) -> None:
        """`process` leaves partitioned consumer `group`: its member entry and leases go."""

    # -- serving a bus ------------------------------------------------------------------

    async def start(self) -> None:
        await self.connect()
        self._publisher = BatchPublisher(self, self.services.publish_timeout)
        try:
            await self._keep_dead_letters()
            for feeder in list(self._feeders.values()):
                await feeder.open()
        except BaseException:
            await self.close()
            raise
        self._started = True
        for feeder in self._feeders.values():
            feeder.start()
        if self.tracks_presence:
            await self._announce()  # before start() returns: others see it running at once
            self._beating = True
            self._heart = asyncio.get_running_loop().create_task(
                self._keep_beating(), name="eventwire:presence"
            )

    async def _announce(self) -> None:
        """Say which consumers this process runs now, and which it stopped running."""
        running = tuple(
            sorted(name for f in self._feeders.values() if f.members for name in f.names)
        )
        try:
            if running or self._announced:
                await self.beat(self.process, running)
                still = set(running)  # a tuple's `in` made this quadratic in subscriptions
                gone = [name for name in self._announced if name not in still]
                if gone:
                    await self.leave(self.process, gone)
                self._announced = running
        except Exception:
            logger.warning("eventwire: announcing this process failed", exc_info=True)

    async def _keep_beating(self) -> None:
        # Also a flag: the broker's client may swallow a cancellation racing its own timeout.
        while self._beating:
            await asyncio.sleep(PRESENCE_EVERY)
            if self._beating:
                await self._announce()

    async def _stop_beating(self) -> None:
        self._beating = False
        heart, self._heart = self._heart, None
        if heart is not None:
            heart.cancel()
            await asyncio.wait([heart])
        if self._announced:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(GIVE_BACK_TIMEOUT):
                    await self.leave(self.process, self._announced)
            self._announced = ()

    async def _keep_dead_letters(self) -> None:
        # Dead letters are kept by a consumer nobody fetches from, so that `eventwire dlq`
        # finds every one since the namespace's first start, on every broker.
        spec = ConsumerSpec(
            name=DLQ_CONSUMER,
            pattern=DLQ_PATTERN,
            start="earliest" if self.capabilities.replay else "latest",
            ack_wait=self.services.redeliver_after,
        )
        await self.create_consumer(spec)

    async def stop_fetching(self) -> None:
        # At once: stopping may wait for what stands at the broker (a NATS pull request).
        await asyncio.gather(*(feeder.stop_fetching() for feeder in list(self._feeders.values())))

    async def stop(self) -> None:
        try:
            await self._stop_beating()
            for feeder in list(self._feeders.values()):
                await feeder.close()
            if self._publisher is not None:
                await self._publisher.close()
        finally:
            self._started = False
            await self.close()

    # -- events -------------------------------------------------------------------------

    def _message(self, event: Event[Any]) -> Message:
        validate_topic(event.topic)
        # Encoded first: a payload with no JSON form fails here, before anything is sent.
        body = encode(event, max_bytes=self.services.max_event_bytes)
        trace = event.trace_context
        headers = _JSON_HEADERS if not trace else {**_JSON_HEADERS, **trace}
        return Message(event.id, event.topic, event.key, body, headers)

    def send(self, event: Event[Any], cause: Event[Any] | None) -> Awaitable[None]:
        publisher = self._publisher
        if publisher is None:
            raise RuntimeError(f"the {self.scheme}:// backend is not started")
        return self._confirmed(event, publisher.store(self._message(event)))

    async def _confirmed(self, event: Event[Any], stored: Awaitable[None]) -> None:
        try:
            await stored
        except TimeoutError:
            raise self._not_stored(event) from None

    def _not_stored(self, event: Event[Any]) -> PublishTimeoutError:
        return PublishTimeoutError(
            f"publish to {event.topic!r} was not confirmed stored by {self.url.redacted} "
            f"within publish_timeout={self.services.publish_timeout}s (is the broker "
            "reachable?); it may or may not have been stored"
        )

    async def send_many(self, events: Sequence[Event[Any]], cause: Event[Any] | None) -> None:
        publisher = self._publisher
        if publisher is None:
            raise RuntimeError(f"the {self.scheme}:// backend is not started")
        messages = [self._message(event) for event in events]
        stored = [publisher.enqueue(message) for message in messages]
        for event, future in zip(events, stored, strict=True):
            try:
                # Stored in order, one batch after another: most of these are already done.
                await future
            except TimeoutError:
                for rest in stored:
                    rest.cancel()  # those not sent yet are withdrawn
                raise self._not_stored(event) from None

    async def flush(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()

    # -- subscriptions ------------------------------------------------------------------

    def attach(self, subscription: Subscription) -> Awaitable[None] | None:
        if subscription.idempotent and not self.records_handled():
            raise BackendCapabilityError(
                f"subscription {subscription.name!r} is idempotent=True, but the "
                f"{self.scheme}:// backend cannot record handled event ids"
                + self.where_handled_go()
            )
        name = subscription.group or subscription.name
        feeder = self._feeders.get(name)
        partitions = 0 if self.orders_keys_itself else subscription.partitions or 0
        if feeder is not None:
            if feeder.spec.partitions != partitions:
                raise ValueError(
                    f"group {name!r} already runs with partitions={feeder.spec.partitions or None}"
                    f" in this process, so {subscription.name!r} cannot join it with "
                    f"partitions={subscription.partitions}: give every member the same"
                )
            decoder = feeder.members[0].options.decoder if feeder.members else None
            if feeder.members and decoder != subscription.options.decoder:
                raise ValueError(
                    f"group {name!r} already runs with decoder={decoder!r} in this process, "
                    f"so {subscription.name!r} cannot join it with "
                    f"decoder={subscription.options.decoder!r}: give every member the same"
                )
            if feeder.spec.pattern != subscription.pattern:
                raise ValueError(
                    f"group {name!r} already subscribes to {feeder.spec.pattern!r} in this "
                    f"process; on {self.scheme}:// a group is one durable consumer with one "
                    f"pattern, so {subscription.name!r} cannot join it with "
                    f"{subscription.pattern!r}: use the same pattern, or another group"
                )
            feeder.add(subscription)
            return None
        spec = ConsumerSpec(
            name=name,
            pattern=subscription.pattern,
            start=subscription.start,
            ack_wait=self.services.redeliver_after,
            ephemeral=subscription.pattern.startswith(REPLY_PREFIX),
            group=subscription.group is not None,
            partitions=partitions,
        )
        feeder = Feeder(self, spec)
        feeder.add(subscription)
        self._feeders[name] = feeder
        return self._open_running(feeder) if self._started else None

    async def _open_running(self, feeder: Feeder) -> None:
        try:
            await feeder.open()
        except BaseException:
            if self._feeders.get(feeder.spec.name) is feeder:
                del self._feeders[feeder.spec.name]
            raise
        if self._started and feeder.members:
            feeder.start()
            if self.tracks_presence:
                await self._announce()

    async def detach(self, subscription: Subscription) -> None:
        feeder = self._feeder_of(subscription)
        if feeder is None:
            return
        feeder.remove(subscription)
        if not feeder.members:
            await feeder.stop_fetching()

    def give_back(self, subscription: Subscription, events: Sequence[Event[Any]]) -> None:
        feeder = self._feeder_of(subscription)
        for event in events:
            subscription.release(event)
            if feeder is not None:
                feeder.give_back(event)

    async def release(self, subscription: Subscription, *, forget: bool) -> None:
        feeder = self._feeder_of(subscription)
        if feeder is None or feeder.members:
            return
        if self._feeders.get(feeder.spec.name) is feeder:
            del self._feeders[feeder.spec.name]
        await feeder.close(forget=forget)

    def _feeder_of(self, subscription: Subscription) -> Feeder | None:
        return self._feeders.get(subscription.group or subscription.name)

    async def subscriptions(self) -> list[ConsumerInfo]:
        """Every durable consumer of the namespace with its backlog, how many processes run
        it now and when one was last heard from (`eventwire subscriptions`)."""
        infos = await self.consumers()
        if not self.tracks_presence:
            return infos
        seen = await self._presence()
        return [_with_presence(info, seen.get(info.name)) for info in infos]

    async def _presence(self) -> dict[str, Presence]:
        now = time.monotonic()
        cached = self._presence_cache
        if cached is not None and now - cached[0] < _PRESENCE_CACHE:
            return cached[1]
        wall = time.time()
        presence = {
            name: Presence(sum(1 for t in times if wall - t < PRESENCE_TTL), max(times))
            for name, times in (await self.presences()).items()
            if times
        }
        self._presence_cache = (now, presence)
        return presence

    def _runs_here(self, name: str) -> bool:
        feeder = self._feeders.get(name) or self._feeders.get(name.partition("#")[0])
        return feeder is not None and bool(feeder.members) and name in feeder.names

    async def _live(self) -> list[ConsumerInfo]:
        """Consumers some process runs now (this one included), tools' own excepted."""
        return [
            info
            for info in await self.subscriptions()
            if not is_tooling(info) and (info.live or self._runs_here(info.name))
        ]

    async def receivers(self, topic: str) -> list[str]:
        return sorted(
            {info.name for info in await self._live() if pattern_matches(info.pattern, topic)}
        )

    async def outstanding(self) -> list[str]:
        return [
            f"{info.name} ({info.outstanding}{', more arriving' if info.arriving else ''})"
            for info in await self._live()
            if info.outstanding or info.arriving
        ]


def _with_presence(info: ConsumerInfo, presence: Presence | None) -> ConsumerInfo:
    if presence is None:
        if info.processes is not None or info.name.startswith(TOOLING_PREFIX):
            return info
        # Never announced: no process has run it since presence was recorded.
        return replace(info, processes=0)
    processes = presence.processes if info.processes is None else info.processes
    return replace(info, processes=processes, last_active=presence.last_seen)


class BatchPublisher:
    """Stores events through a backend, sending those published meanwhile in one batch while
    a batch is in flight: concurrent publishers share round trips (group commit).

    Each publish has a deadline (`timeout` seconds, None for none): one that is not stored by
    then raises `TimeoutError`, and only it: the others of its batch keep their own. One timer
    serves a whole batch, so that the common case costs no timer per event."""

    def __init__(self, backend: BrokerBackend, timeout: float | None) -> None:
        self._backend = backend
        self._timeout = timeout
        self._waiting: list[tuple[Message, asyncio.Future[None], float | None]] = []
        self._sender: asyncio.Task[None] | None = None
        # A message sent by its own publisher (`store` while nothing was in flight).
        self._sending_one = False
        # Whether publishes were lately made while others were in flight: then each one
        # joins a batch, as concurrent publishers share round trips best that way.
        self._concurrent = False
        self._sent_one: asyncio.Future[None] | None = None

    def store(self, message: Message) -> Awaitable[None]:
        """Store one message: sent at once by the caller's own task when nothing is in
        flight and publishes come one at a time (no batch to join: no task, no future),
        else queued for the next batch, which goes out once what is in flight is stored."""
        if self._sender is None and not self._sending_one and not self._concurrent:
            return self._send_one(message)
        return self.enqueue(message)

    async def _send_one(self, message: Message) -> None:
        self._sending_one = True
        try:
            async with asyncio.timeout(self._timeout):
                await self._backend.publish([message])
        finally:
            self._sending_one = False
            # Those queued meanwhile go after it, never beside it: the broker gets the
            # messages in the order they were published.
            self._concurrent = bool(self._waiting)
            if self._waiting and self._sender is None:
                self._start_sender()
            sent, self._sent_one = self._sent_one, None
            if sent is not None and not sent.done():
                sent.set_result(None)

    def enqueue(self, message: Message) -> asyncio.Future[None]:
        """Queue `message`; the future resolves once it is stored. Cancelled before its
        batch is sent, it is not sent; cancelled after, it may have been stored."""
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        self._waiting.append((message, stored, deadline))
        if self._sender is None and not self._sending_one:
            self._start_sender()
        return stored

    def _start_sender(self) -> None:
        self._sender = asyncio.get_running_loop().create_task(
            self._send(), name="eventwire:publisher"
        )

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                now = loop.time()
                batch: list[tuple[Message, asyncio.Future[None], float | None]] = []
                taken = 0
                for message, stored, deadline in self._waiting:
                    if len(batch) == PUBLISH_BATCH:
                        break
                    taken += 1
                    if stored.done():
                        continue  # its publisher was cancelled: withdrawn
                    if deadline is not None and deadline <= now:
                        stored.set_exception(TimeoutError())
                        continue
                    batch.append((message, stored, deadline))
                del self._waiting[:taken]
                if batch:
                    self._concurrent = len(batch) > 1
                    await self._send_batch(batch)
        finally:
            self._sender = None

    async def _send_batch(
        self, batch: list[tuple[Message, asyncio.Future[None], float | None]]
    ) -> None:
        """Send `batch` until stored, each publish failing at its own deadline: the batch
        goes on for the others (one joined just now has its whole timeout), and is given up
        once the last of them has failed."""
        loop = asyncio.get_running_loop()
        known = [deadline for _, _, deadline in batch if deadline is not None]
        latest = max(known) if len(known) == len(batch) else None  # None: one has no timeout
        expiry: asyncio.TimerHandle | None = None

        def expire() -> None:
            nonlocal expiry
            now, due = loop.time(), None
            for _, stored, deadline in batch:
                if deadline is None or stored.done():
                    continue
                if deadline <= now:
                    stored.set_exception(TimeoutError())
                elif due is None or deadline < due:
                    due = deadline
            expiry = None if due is None else loop.call_at(due, expire)

        if known and min(known) != latest:
            expiry = loop.call_at(min(known), expire)  # one timer a batch, not one a publish
        try:
            async with asyncio.timeout_at(latest):
                await self._backend.publish([message for message, _, _ in batch])
        except Exception as error:
            failure = TimeoutError() if isinstance(error, TimeoutError) else error
            for _, stored, _ in batch:
                if not stored.done():
                    stored.set_exception(failure)
        else:
            for _, stored, _ in batch:
                if not stored.done():
                    stored.set_result(None)
        finally:
            if expiry is not None:
                expiry.cancel()

    async def close(self) -> None:
        """Wait for what is being sent."""
        if self._sending_one:
            if self._sent_one is None:
                self._sent_one = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._sent_one)
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)


class Feeder:
    """Feeds the subscriptions behind one durable consumer in this process (one
    subscription, or the members of a group) and acknowledges what they finished, through
    one `ConsumerSession` (fetching, leases, acknowledgements, giving back).

    In a group, same-key events always go to the same member, as in process: per-key order
    holds across the group."""

    def __init__(self, backend: BrokerBackend, spec: ConsumerSpec) -> None:
        self.backend = backend
        self.spec = spec
        self.members: list[Subscription] = []
        self.window = FETCH_WINDOW
        self.session: ConsumerSession | None = None
        self._room = asyncio.Event()
        self._next_member = 0
        # topic -> whether it matches the pattern (brokers may over-deliver)
        self._matches: dict[str, bool] = {}
        self.duplicates = 0

    @property
    def held(self) -> int:
        return 0 if self.session is None else self.session.held

    def add(self, subscription: Subscription) -> None:
        self.members.append(subscription)
        subscription.lease = self
        self.window = min(min(m.max_pending for m in self.members), FETCH_WINDOW)

    def remove(self, subscription: Subscription) -> None:
        if subscription in self.members:
            self.members.remove(subscription)

    @property
    def names(self) -> list[str]:
        """The durable consumers this feeder runs: its own, and a partitioned one's parts."""
        if not self.spec.partitions:
            return [self.spec.name]
        return [self.spec.name, *partition_names(self.spec.name, self.spec.partitions)]

    async def open(self) -> None:
        consumer: Consumer
        if self.spec.partitions:
            partitioned = PartitionedConsumer(self.backend, self.spec, self.window)
            await partitioned.open()
            consumer = partitioned
        else:
            consumer = await self.backend.consumer(self.spec)
        self.session = ConsumerSession(consumer, self.spec)

    def start(self) -> None:
        assert self.session is not None
        self.session.run(self._fetch_loop, name=f"eventwire:{self.spec.name}:fetch")

    async def stop_fetching(self) -> None:
        if self.session is not None:
            await self.session.stop_running()

    async def close(self, *, forget: bool = False) -> None:
        """Acknowledge what was finished, give back what was not, close the consumer;
        `forget` also deletes the durable consumer from the broker."""
        session, self.session = self.session, None
        if session is None:
            return
        try:
            await session.close()
            if forget:
                for name in self.names:
                    await self.backend.delete_consumer(name)
        except Exception:
            logger.exception("eventwire: closing the consumer of %s failed", self.spec.name)

    # -- fetching ---------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        session = self.session
        assert session is not None
        backoff = Backoff()
        trickle = True  # the last fetch brought few events (or none)
        wait = _FETCH_WAIT
        while not session.stopped:
            free = self.window - session.held
            if free < max(1, self.window // 4):
                # Fetch in batches: wait until a quarter of the window is free again.
                self._room.clear()
                await self._room.wait()
                continue
            deliveries = await session.fetch(free, wait, with_acks=trickle)
            wait = _FETCH_WAIT if deliveries else min(wait * 2, _IDLE_FETCH_WAIT)
            if not self.members:
                await session.give_back_now(deliveries)
                return
            try:
                await self._admit(session, deliveries)
            except Exception:
                # Not taken in: they come again once their leases run out.
                logger.warning(
                    "eventwire: taking in events for %s failed; retrying in %.1fs",
                    self.spec.name,
                    backoff.pause,
                    exc_info=True,
                )
                await backoff.wait()
                continue
            backoff.reset()
            trickle = len(deliveries) < _TRICKLE
            if deliveries and trickle:
                # A trickle: one turn of the loop for the handlers first, and what quick ones
                # finish is acknowledged along with the next fetch, in its round trip. Under
                # load the next fetch goes at once, and acknowledgements on their own beside it.
                await asyncio.sleep(0)

    def _wants(self, subscription: Subscription, event: Event[Any]) -> bool:
        """Whether `event` is for this consumer: brokers may over-deliver (a `#` matching no
        token, `>` reaching `_` topics); request replies go to their requester alone; a
        retried dead letter goes to its one subscription."""
        topic = event.topic
        matches = self._matches.get(topic)
        if matches is None:
            pattern = self.spec.pattern
            matches = (
                is_topic(topic)
                and pattern_matches(pattern, topic)
                and (not topic.startswith(REPLY_PREFIX) or pattern.startswith(REPLY_PREFIX))
            )
            if len(self._matches) >= _MATCH_CACHE_LIMIT:
                self._matches.clear()
            self._matches[topic] = matches
        target = event.target
        return matches and (
            target is None or target == subscription.name or target == subscription.group
        )

    def _member_for(self, event: Event[Any]) -> Subscription:
        members = self.members
        if len(members) == 1:
            return members[0]
        if event.target is not None:
            for member in members:
                if member.name == event.target:
                    return member
        if event.key is not None:
            return members[member_for_key(event.key, len(members))]
        # Otherwise the next member with room, in turn.
        count = len(members)
        start = self._next_member
        for offset in range(count):
            member = members[(start + offset) % count]
            if len(member.inbox) < member.inbox.capacity:
                self._next_member = (start + offset + 1) % count
                return member
        self._next_member = (start + 1) % count
        return members[start % count]

    async def _sort(
        self, session: ConsumerSession, deliveries: list[Delivery]
    ) -> tuple[list[tuple[Event[Any], Delivery, Subscription]], list[Delivery]]:
        """The deliveries decoded and each given to its member, and those to acknowledge
        without handling (not for this consumer, or dead-lettered as another producer's)."""
        skipped: list[Delivery] = []
        admitted: list[tuple[Event[Any], Delivery, Subscription]] = []
        for delivery in deliveries:
            event, decoded = self._decoded(session, delivery)
            if isinstance(event, Exception):
                misplaced: Exception | None = event
            else:
                member = self._member_for(event)
                if self._wants(member, event):
                    admitted.append((event, delivery, member))
                    continue
                # Another producer's message, read by the decoder, is simply not for it.
                problem = None if decoded else _misplaced(event, delivery)
                misplaced = None if problem is None else EnvelopeError(problem)
            if misplaced is None:
                # Not for this subscription: another's topic, or a retried dead letter meant
                # for another subscription.
                skipped.append(delivery)
            elif await self._dead_letter_foreign(session, delivery, misplaced):
                skipped.append(delivery)  # another producer's: never acknowledged untraced
            else:
                await session.consumer.nak(delivery, 1.0)
        return admitted, skipped

    async def _admit(self, session: ConsumerSession, deliveries: list[Delivery]) -> None:
        services = self.backend.services
        admitted, skipped = await self._sort(session, deliveries)
        if admitted and any(member.idempotent for _, _, member in admitted):
            ids = [event.id for event, _, _ in admitted]
            # Before and after: a record confirmed during the look-up leaves the session.
            recording = session.handled_here(ids)
            done = await session.consumer.handled(ids) | recording | session.handled_here(ids)
            if done:
                self.duplicates += len(done)
                skipped.extend(d for e, d, _ in admitted if e.id in done)
                if services.observers:
                    for event, _, member in admitted:
                        if event.id in done:
                            record = handling_record(member, event, 0, "skipped", 0.0, None)
                            notify(services.observers, "skipped", member, event, record)
                admitted = [(e, d, m) for e, d, m in admitted if e.id not in done]
        if skipped:
            session.ack_later(skipped)
        epoch = services.tracker.current
        woken: set[int] = set()
        for event, delivery, member in admitted:
            force_setattr(event, "drain_epoch", epoch)
            epoch.pending += 1
            session.hold(event, delivery)
            inbox = member.inbox
            inbox.append(event)
            if inbox.idle is not None and id(inbox) not in woken:
                woken.add(id(inbox))
                inbox.wake_all()

    def _decoded(
        self, session: ConsumerSession, delivery: Delivery
    ) -> tuple[Event[Any] | Exception, bool]:
        """The event in `delivery`: its envelope, else what the members' decoder reads in it
        (another producer's message: True beside it), else why neither could be read."""
        try:
            return decode_envelope(delivery.body), False
        except Exception as first:  # whatever decoding raised: this message alone fails
            error: Exception = first
            message = session.consumer.foreign(delivery)
            if message.body is not delivery.body:
                # The body as the producer wrote it (a Redis entry of another shape): an
                # envelope there is eventwire's event; else its own error says why not.
                try:
                    return decode_envelope(message.body), False
                except Exception as again:  # as above
                    error = again if message.body else EnvelopeError("it has no body")
            decoder = self.members[0].decoder if self.members else None
            if decoder is None:
                return error, False
            try:
                event = decoder(message)
            except Exception as refused:  # the decoder's refusal, whatever it raised
                return EnvelopeError(
                    f"not an eventwire envelope ({error}), and the subscription's decoder did "
                    f"not read it: {type(refused).__name__}: {refused}"
                ), False
            if not isinstance(event, Event):
                return TypeError(
                    f"the subscription's decoder returned a {type(event).__name__}, not an Event"
                ), False
            if not pattern_matches(self.spec.pattern, event.topic) or not is_topic(event.topic):
                return EnvelopeError(
                    f"the subscription's decoder read it as an event on {event.topic!r}, "
                    f"which is not a topic its pattern {self.spec.pattern!r} matches"
                ), False
            return event, True

    async def _dead_letter_foreign(
        self, session: ConsumerSession, delivery: Delivery, error: Exception
    ) -> bool:
        """A message that is not an eventwire envelope: to the DLQ with the reason and all
        it holds, by each subscription its topic reached. One with no topic (a Redis entry
        without one) reaches every subscription: the first to claim it dead-letters it."""
        member = self.members[0]
        message = session.consumer.foreign(delivery)
        if (
            not delivery.topic
            and message.message_id is not None
            and not await self.backend.first_to_report(message.message_id, self.spec.name)
        ):
            return True  # another subscription dead-letters it
        member.failed += 1
        member.dead_lettered += 1
        why = str(error) if str(error) else type(error).__name__
        return await self.backend.services.dead_letters.foreign(
            member, message.topic, message.body, why, message.headers
        )

    # -- finishing (the subscriptions' `Lease`) ------------------------------------------

    async def record_handled(self, event: Event[Any]) -> None:
        """Idempotent subscriptions: record at once that `event` was handled, before its
        (batched) acknowledgement, so that a redelivery after a crash in between is skipped.
        Recording may fail (broker down): the event is then acknowledged with its id later."""
        if self.session is not None:
            await self.session.record_handled(event.id)

    def settled(self, event: Event[Any], finished: bool) -> None:
        """Called by the worker once `event` was handled or dead-lettered (`finished`), or
        could not be dead-lettered (it goes back to the broker for a later attempt)."""
        delivery = self._settle(event, finished)
        if delivery is not None:
            assert self.session is not None
            self.session.ack_later([delivery])

    async def settled_now(self, event: Event[Any], finished: bool) -> None:
        """`settled`, for an event whose restart was counted: acknowledged before this
        returns (and so before the worker starts the next event), which forgets its count.
        Batched, the ack of an event handled right before a poison event would die with the
        process each time, and the count of its restarts would grow as the poison's does."""
        delivery = self._settle(event, finished)
        if delivery is not None:
            assert self.session is not None
            await self.session.ack_now(delivery)

    def _settle(self, event: Event[Any], finished: bool) -> Delivery | None:
        """Release `event`; the delivery to acknowledge, if any."""
        session = self.session
        if session is None:
            return None
        acknowledge = None
        if finished:
            alive = session.lease_alive(event)
            delivery = session.release(event)
            if delivery is None:
                return None
            if alive is not None:
                acknowledge = delivery
            else:
                # The handler outlived the lease (the process was stopped while it ran): the
                # broker may have given the event to another process, and a late ack would
                # finish it there, even if that process fails it. It is delivered again.
                logger.warning(
                    "eventwire: %s finished %s %s after its lease may have run out (was "
                    "the process stopped?): not acknowledged, it is delivered again",
                    self.spec.name,
                    event.topic,
                    event.id,
                )
        elif not session.give_back(event, 1.0):
            return None
        if session.held <= self.window - max(1, self.window // 4):
            self._room.set()
        return acknowledge

    def give_back(self, event: Event[Any]) -> None:
        """A queued event its subscription will not handle: back to the broker now."""
        if self.session is not None and self.session.give_back(event, 0.0):
            self._room.set()

    def holds(self, event: Event[Any]) -> bool | None:
        """Called by a worker before it handles `event`: whether this process surely still
        holds its lease (None: it does, and the event came back from an earlier delivery:
        the worker counts its `restarts`). If the lease may have run out (the process was
        stopped past it), the broker may have leased the event to another process, which
        may be handling it: it is not handled here (False), and goes back to the broker
        with every other event whose lease may have run out, and every later event of
        their keys (handled here first, they would overtake them)."""
        session = self.session
        if session is None:
            return True
        delivery = session.lease_alive(event)
        if delivery is not None:
            return True if delivery.attempt == 1 else None
        if session.is_held(event):
            self._give_back_lost(session)
        return False

    async def restarts(self, event: Event[Any]) -> int:
        """Record that handling of `event` (which came back) starts again, before it does:
        if that kills the process, the count survives it. The count of restarts recorded
        for it, this one included; 0 if the broker cannot be reached to record it."""
        session = self.session
        delivery = None if session is None else session.lease_alive(event)
        if session is None or delivery is None:
            return 0
        try:
            return await session.consumer.restarted(delivery)
        except Exception:
            # Handled unrecorded rather than held up: at least once still holds, only the
            # cap on a poison event waits for the broker to be back.
            logger.warning(
                "eventwire: %s could not record a restart of %s %s",
                self.spec.name,
                event.topic,
                event.id,
                exc_info=True,
            )
            return 0

    def _give_back_lost(self, session: ConsumerSession) -> None:
        # The lost ones are let go, not given back: their leases ran out at the broker (or
        # will before long), and the broker may have leased them to another process, whose
        # delivery a give-back might disturb (not every broker checks who gives back). The
        # later events of their keys are still this process's: given back, to come after.
        lost = {id(key): key for key, _ in session.lost()}
        keys = {key.key for key in lost.values() if isinstance(key, Event) and key.key is not None}
        behind = [
            key
            for key, _ in session.held_items()
            if id(key) not in lost and isinstance(key, Event) and key.key in keys
        ]
        logger.warning(
            "eventwire: %s held %d event(s) past their lease (was the process stopped?): "
            "they are not handled here but delivered again, as are %d later event(s) of "
            "their keys",
            self.spec.name,
            len(lost),
            len(behind),
        )
        for key in lost.values():
            session.release(key)
        # Back after the lost ones' leases have surely run out: given back at once, a broker
        # would hand them out again before the lost ones, which they must not overtake.
        for key in behind:
            session.give_back(key, self.spec.ack_wait)
        self._room.set()


def _misplaced(event: Event[Any], delivery: Delivery) -> str | None:
    """Why a decoded envelope cannot be one eventwire published where the broker delivered
    it (its topic is invalid, or another than the message's own), or None."""
    if not is_topic(event.topic):
        return f"its envelope's topic {event.topic!r} is not a valid topic"
    if event.topic != delivery.topic:
        return (
            f"its envelope says topic {event.topic!r}, but it was published on {delivery.topic!r}"
        )
    return None
