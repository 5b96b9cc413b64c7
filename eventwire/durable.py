"""How the bus runs on a broker backend: publishes are stored before they return, and each
subscription is fed from its durable consumer and acknowledges what it finished.

The subscription's inbox, workers, retry and dead-lettering are the same as in memory; a
`Feeder` fills the inbox from the broker (never more than a bounded window at a time), keeps
the leases of what it holds alive, and acknowledges each event once its handler succeeded or
it was dead-lettered. What it still holds when it stops goes back to the broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from eventwire.backends.base import Backend, Consumer, ConsumerSpec, Delivery, Message
from eventwire.envelope import EnvelopeError, decode
from eventwire.event import Event
from eventwire.observe import handling_record, notify
from eventwire.topics import is_reserved, is_topic, pattern_matches

if TYPE_CHECKING:
    from eventwire.bus import EventBus
    from eventwire.subscription import Subscription

logger = logging.getLogger("eventwire")

# Most deliveries one subscription holds in this process at once (queued and in flight). The
# rest of its backlog stays in the broker, free for the subscription's other processes.
FETCH_WINDOW = 512
# Topics whose match against a pattern one feeder remembers, before starting over.
_MATCH_CACHE_LIMIT = 10_000
# Waiting publishes sent to the broker in one round trip.
PUBLISH_BATCH = 1000
# Pause after a failed fetch or acknowledgement, doubled up to the maximum.
_RETRY_PAUSE = 0.1
_RETRY_PAUSE_MAX = 5.0
# How long closing waits to hand unfinished deliveries back to the broker.
_GIVE_BACK_TIMEOUT = 5.0


class BatchPublisher:
    """Stores events through a backend, sending those published meanwhile in one batch while
    a batch is in flight: concurrent publishers share round trips (group commit).

    Each publish has a deadline (`timeout` seconds, None for none): one that is not stored by
    then raises `TimeoutError`. Deadlines are enforced per batch, not per publish, so that
    the common case costs no timer per event."""

    def __init__(self, backend: Backend, timeout: float | None) -> None:
        self._backend = backend
        self._timeout = timeout
        self._waiting: list[tuple[Message, asyncio.Future[None], float | None]] = []
        self._sender: asyncio.Task[None] | None = None

    def enqueue(self, message: Message) -> asyncio.Future[None]:
        """Queue `message`; the future resolves once it is stored. Cancelled before its
        batch is sent, it is not sent; cancelled after, it may have been stored."""
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        self._waiting.append((message, stored, deadline))
        if self._sender is None:
            self._sender = loop.create_task(self._send(), name="eventwire:publisher")
        return stored

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                now = loop.time()
                batch: list[tuple[Message, asyncio.Future[None]]] = []
                earliest: float | None = None
                taken = 0
                for message, stored, deadline in self._waiting:
                    if len(batch) == PUBLISH_BATCH:
                        break
                    taken += 1
                    if stored.done():
                        continue  # its publisher was cancelled: withdrawn
                    if deadline is not None:
                        if deadline <= now:
                            stored.set_exception(TimeoutError())
                            continue
                        earliest = deadline if earliest is None else min(earliest, deadline)
                    batch.append((message, stored))
                del self._waiting[:taken]
                if not batch:
                    continue
                try:
                    async with asyncio.timeout_at(earliest):
                        await self._backend.publish([message for message, _ in batch])
                except Exception as error:
                    failure = TimeoutError() if isinstance(error, TimeoutError) else error
                    for _, stored in batch:
                        if not stored.done():
                            stored.set_exception(failure)
                else:
                    for _, stored in batch:
                        if not stored.done():
                            stored.set_result(None)
        finally:
            self._sender = None

    async def close(self) -> None:
        """Wait for what is being sent; nothing new is taken."""
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)


class Feeder:
    """Feeds one subscription from its durable consumer and acknowledges what it finished."""

    def __init__(self, bus: EventBus, subscription: Subscription, spec: ConsumerSpec) -> None:
        self.bus = bus
        self.subscription = subscription
        self.spec = spec
        self.window = min(subscription.max_pending, FETCH_WINDOW)
        self.consumer: Consumer | None = None
        # id(event) -> (event, its delivery): everything this process holds of the consumer.
        self._held: dict[int, tuple[Event[Any], Delivery]] = {}
        self._acks: list[Delivery] = []
        self._handled_ids: list[str] = []
        self._acker: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._leaser: asyncio.Task[None] | None = None
        self._leasing = False
        self._stopped = False
        # topic -> whether it matches the pattern (brokers may over-deliver)
        self._matches: dict[str, bool] = {}
        self.duplicates = 0

    @property
    def held(self) -> int:
        return len(self._held)

    async def open(self) -> None:
        self.consumer = await self.bus._backend_or_fail().consumer(self.spec)

    def start(self) -> None:
        self._stopped = False
        loop = asyncio.get_running_loop()
        name = self.subscription.name
        self._tasks = [loop.create_task(self._fetch_loop(), name=f"eventwire:{name}:fetch")]
        # Until close(): what this process holds needs its leases also while it finishes.
        self._leasing = True
        self._leaser = loop.create_task(self._keep_leases(), name=f"eventwire:{name}:leases")

    async def stop_fetching(self) -> None:
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            # A client library may swallow a cancellation that races with its own timeout;
            # the loop then ends at its next turn, when it sees `_stopped`.
            await asyncio.wait(tasks)

    async def close(self, *, forget: bool = False) -> None:
        """Acknowledge what was finished, give back what was not, close the consumer;
        `forget` also deletes the durable consumer from the broker."""
        await self.stop_fetching()
        if self._leaser is not None:
            self._leasing = False
            self._leaser.cancel()
            await asyncio.wait([self._leaser])
            self._leaser = None
        await self._flush_acks()
        consumer, self.consumer = self.consumer, None
        if consumer is None:
            return
        left = [delivery for _, delivery in self._held.values()]
        self._held.clear()
        if left:
            # Given back at once for another process to take; if the broker is unreachable
            # they come back by themselves once their lease runs out.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_GIVE_BACK_TIMEOUT):
                    await asyncio.gather(
                        *(consumer.nak(delivery, 0.0) for delivery in left),
                        return_exceptions=True,
                    )
        try:
            await consumer.close()
            if forget:
                await self.bus._backend_or_fail().delete_consumer(self.spec.name)
        except Exception:
            logger.exception("eventwire: closing the consumer of %s failed", self.spec.name)

    # -- fetching ---------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self.consumer is not None
        pause = _RETRY_PAUSE
        while not self._stopped:
            free = self.window - len(self._held)
            if free < max(1, self.window // 4):
                # Fetch in batches: wait until a quarter of the window is free again.
                self._room.clear()
                await self._room.wait()
                continue
            try:
                deliveries = await self.consumer.fetch(free, 1.0)
                if self._stopped:
                    await asyncio.gather(
                        *(self.consumer.nak(delivery, 0.0) for delivery in deliveries),
                        return_exceptions=True,
                    )
                    return
                await self._admit(deliveries)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning(
                    "eventwire: fetching for %s failed; retrying in %.1fs",
                    self.subscription.name,
                    pause,
                    exc_info=True,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_PAUSE_MAX)
                continue
            pause = _RETRY_PAUSE

    async def _admit(self, deliveries: list[Delivery]) -> None:
        assert self.consumer is not None
        subscription = self.subscription
        skipped: list[Delivery] = []
        admitted: list[tuple[Event[Any], Delivery]] = []
        for delivery in deliveries:
            try:
                event = decode(delivery.body)
            except EnvelopeError as error:
                if await self.bus._dead_letter_foreign(subscription, delivery, error):
                    skipped.append(delivery)
                else:
                    await self.consumer.nak(delivery, 1.0)
                continue
            # The broker may over-deliver (a `#` matching no token, `>` reaching `_` topics).
            matches = self._matches.get(event.topic)
            if matches is None:
                matches = pattern_matches(subscription.pattern, event.topic)
                if len(self._matches) >= _MATCH_CACHE_LIMIT:
                    self._matches.clear()
                self._matches[event.topic] = matches
            if matches and (
                event._target is None
                or event._target == subscription.name
                or event._target == subscription.group
            ):
                admitted.append((event, delivery))
            else:
                # Not for this subscription: another's topic, or a retried dead letter meant
                # for another subscription.
                skipped.append(delivery)
        if subscription.idempotent and admitted:
            done = await self.consumer.handled([event.id for event, _ in admitted])
            if done:
                self.duplicates += len(done)
                skipped.extend(d for e, d in admitted if e.id in done)
                if self.bus._observers:
                    for event, _ in admitted:
                        if event.id in done:
                            record = handling_record(subscription, event, 0, "skipped", 0.0, None)
                            notify(self.bus._observers, "skipped", subscription, event, record)
                admitted = [(e, d) for e, d in admitted if e.id not in done]
        if skipped:
            self._acks.extend(skipped)
            self._schedule_acks()
        inbox = subscription._inbox
        epoch = self.bus._epoch
        for event, delivery in admitted:
            event._epoch = epoch
            epoch.pending += 1
            self._held[id(event)] = (event, delivery)
            inbox.append(event)
        if admitted and inbox.idle is not None:
            subscription._wake_all()

    async def _keep_leases(self) -> None:
        assert self.consumer is not None
        every = max(self.spec.ack_wait / 3, 0.05)
        # Also a flag: the broker's client may swallow a cancellation racing its own timeout.
        while self._leasing:
            await asyncio.sleep(every)
            if self._held and self._leasing:
                try:
                    await self.consumer.extend([delivery for _, delivery in self._held.values()])
                except Exception:
                    logger.warning(
                        "eventwire: extending leases for %s failed",
                        self.subscription.name,
                        exc_info=True,
                    )

    # -- finishing --------------------------------------------------------------------------

    async def record_handled(self, event: Event[Any]) -> None:
        """Idempotent subscriptions: record at once that `event` was handled, before its
        (batched) acknowledgement, so that a redelivery after a crash in between is skipped.
        Recording may fail (broker down): the event is then acknowledged with its id later."""
        if self.consumer is None:
            return
        try:
            await self.consumer.ack([], handled_ids=[event.id])
        except Exception:
            logger.warning("eventwire: recording %s as handled failed", event.id, exc_info=True)
            self._handled_ids.append(event.id)

    def settled(self, event: Event[Any], finished: bool) -> None:
        """Called by the worker once `event` was handled or dead-lettered (`finished`), or
        could not be dead-lettered (it goes back to the broker for a later attempt)."""
        held = self._held.pop(id(event), None)
        if held is None:
            return
        delivery = held[1]
        if finished:
            self._acks.append(delivery)
            self._schedule_acks()
        elif self.consumer is not None:
            consumer = self.consumer
            task = asyncio.get_running_loop().create_task(consumer.nak(delivery, 1.0))
            self.bus._track(task)
        if len(self._held) <= self.window - max(1, self.window // 4):
            self._room.set()

    def _schedule_acks(self) -> None:
        if self._acker is None:
            self._acker = asyncio.get_running_loop().create_task(
                self._flush_acks(), name=f"eventwire:{self.subscription.name}:acks"
            )

    async def _flush_acks(self) -> None:
        pause = _RETRY_PAUSE
        try:
            while self._acks and self.consumer is not None:
                acks, self._acks = self._acks, []
                handled, self._handled_ids = self._handled_ids, []
                try:
                    await self.consumer.ack(acks, handled_ids=handled)
                except Exception:
                    # Unacknowledged work is delivered again (at least once), never lost.
                    logger.warning(
                        "eventwire: acknowledging %d event(s) for %s failed; retrying",
                        len(acks),
                        self.subscription.name,
                        exc_info=True,
                    )
                    self._acks[:0] = acks
                    self._handled_ids[:0] = handled
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _RETRY_PAUSE_MAX)
        finally:
            if asyncio.current_task() is self._acker:
                self._acker = None


def foreign_dead_letter(delivery: Delivery, error: EnvelopeError) -> tuple[str, dict[str, Any]]:
    """The DLQ topic and payload for a message that is not a valid envelope."""
    topic = delivery.topic
    valid = is_topic(topic) and not is_reserved(topic)
    dlq_topic = f"_dlq.{topic}" if valid else "_dlq._malformed"
    try:
        text: str | None = delivery.body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    payload: dict[str, Any] = {
        "topic": topic,
        "body": text,
        "body_base64": None if text is not None else base64.b64encode(delivery.body).decode(),
        "error": str(error),
    }
    return dlq_topic, payload
