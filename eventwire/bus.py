"""The event bus: publish events on topics, subscribe handlers to patterns."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import secrets
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from time import time_ns
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from eventwire.backends import open_backend, resolve_url
from eventwire.backends.base import (
    MEMORY_CAPABILITIES,
    Backend,
    BackendCapabilityError,
    Capabilities,
    ConsumerInfo,
    ConsumerSpec,
    Delivery,
    Message,
    Start,
)
from eventwire.context import current_event, current_subscription
from eventwire.durable import BatchPublisher, Feeder, foreign_dead_letter
from eventwire.envelope import DEFAULT_MAX_BYTES, EnvelopeError, encode
from eventwire.errors import (
    BusClosedError,
    BusNotRunningError,
    HandlerError,
    InboxFullError,
    InvalidTopicError,
    NoReplyError,
    PublishTimeoutError,
    RemoteHandlerError,
)
from eventwire.event import _ATOMIC as ATOMIC_TYPES
from eventwire.event import _EMPTY_METADATA as EMPTY_METADATA
from eventwire.event import Event, new_event
from eventwire.event import _build as build_event
from eventwire.event import _event_class as event_class
from eventwire.event import _freeze as freeze_metadata
from eventwire.event import _sequence as event_sequence
from eventwire.observe import Observer, notify, notify_finished
from eventwire.payloads import make_converter, payload_type_of
from eventwire.retry import Retry
from eventwire.subscription import (
    DEFAULT_MAX_PENDING,
    OVERFLOW_POLICIES,
    Handler,
    Inbox,
    Overflow,
    Subscription,
    SubscriptionStats,
    _Unsubscribed,
)
from eventwire.topics import (
    SINGLE,
    TAIL,
    TopicTrie,
    pattern_matches,
    validate_pattern,
    validate_topic,
)

if TYPE_CHECKING:
    from eventwire.agent import Agent
    from eventwire.record import Recorder

logger = logging.getLogger("eventwire")

H = TypeVar("H", bound=Callable[..., Any])
A = TypeVar("A", bound="Agent")
Obs = TypeVar("Obs", bound=Observer)

# Past this many distinct topics the route cache starts over, so that an unbounded topic space
# (ids in topic names) cannot grow memory without bound.
_ROUTE_CACHE_LIMIT = 100_000

_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"

# Topics of request replies: one per requesting bus.
_REPLY_PREFIX = "_bus.reply."
# Patterns of per-process consumers (replies, stats requests), which drain() does not wait for.
_PROCESS_PATTERNS = (_REPLY_PREFIX, "_bus.stats.")

# Broker backends: the durable consumer that keeps every dead letter of the namespace until
# `eventwire dlq` retries or purges it. Nothing in the bus fetches from it.
DLQ_CONSUMER = "_eventwire.dlq"
# Names of consumers opened by eventwire's tools (dead letters, stats, history readers).
TOOLING_PREFIX = "_eventwire."
DLQ_PATTERN = "_dlq.>"

# Read by EventBus() when no URL is given, so that one app runs unchanged on any backend.
URL_ENVIRONMENT_VARIABLE = "EVENTWIRE_URL"


class _Epoch:
    """Deliveries owed for events published between two `drain()` calls, and their causes."""

    __slots__ = ("pending", "retired", "waiters")

    def __init__(self) -> None:
        self.pending = 0
        # Set once drain() has seen it settle: later publishes must not count against it.
        self.retired = False
        self.waiters: list[asyncio.Future[None]] = []

    def settle(self, error: BaseException | None = None) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    async def wait(self) -> None:
        if self.pending:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter


class _GroupRoute:
    """Competing consumers of one group that match one topic: each event goes to one."""

    __slots__ = ("members", "next")

    def __init__(self, members: list[Subscription]) -> None:
        self.members = members
        self.next = 0

    def pick(self, key: str | None) -> Inbox:
        members = self.members
        count = len(members)
        if key is not None:
            # Same key, same member: per-key order holds across the group. crc32, not hash():
            # the same in every process, whatever its hash seed.
            return members[zlib.crc32(key.encode()) % count]._inbox
        start = self.next
        for offset in range(count):
            inbox = members[(start + offset) % count]._inbox
            if len(inbox) < inbox.capacity:
                self.next = (start + offset + 1) % count
                return inbox
        self.next = (start + 1) % count
        return members[start]._inbox


def _release(epoch: _Epoch, deliveries: int) -> None:
    epoch.pending -= deliveries
    if not epoch.pending and epoch.waiters:
        epoch.settle()


class _Stall:
    """A publish that found a full inbox with overflow='block' and must wait to go on."""

    __slots__ = ("count", "epoch", "event", "index", "targets")

    def __init__(
        self,
        event: Event[Any],
        targets: tuple[Inbox, ...] | list[Inbox],
        index: int,
        count: int,
        epoch: _Epoch,
    ) -> None:
        self.event = event
        self.targets = targets
        self.index = index
        self.count = count
        self.epoch = epoch


class _GroupedRoute:
    """A route with competing groups. Routes without groups are plain tuples of inboxes,
    one object less for publish to look through."""

    __slots__ = ("groups", "inboxes")

    def __init__(self, inboxes: tuple[Inbox, ...], groups: tuple[_GroupRoute, ...]):
        self.inboxes = inboxes
        self.groups = groups

    def targets(self, key: str | None) -> list[Inbox]:
        return [*self.inboxes, *(group.pick(key) for group in self.groups)]


_Route = tuple[Inbox, ...] | _GroupedRoute


class _PendingRequest:
    __slots__ = ("delivered", "error", "expected", "finished", "future", "topic")

    def __init__(self, future: asyncio.Future[Any], topic: str) -> None:
        self.future = future
        self.topic = topic
        self.expected: int | None = None
        self.delivered: list[str] = []
        self.finished = 0
        self.error: tuple[str, BaseException] | None = None

    def outcome(self, subscription: str, result: Any, error: BaseException | None) -> None:
        if self.future.done():
            return
        self.finished += 1
        if error is None and result is not None:
            self.future.set_result(result)
            return
        if error is not None and self.error is None:
            self.error = (subscription, error)
        self.check_complete()

    def check_complete(self) -> None:
        if self.future.done() or self.expected is None or self.finished < self.expected:
            return
        if self.error is not None:
            name, error = self.error
            kind = getattr(error, "error_type", None) or type(error).__name__
            failure = HandlerError(
                f"request on {self.topic!r} failed in handler {name!r}: {kind}: {error}",
                subscription=name,
                error=f"{kind}: {error}",
            )
            failure.__cause__ = error
            self.future.set_exception(failure)
        else:
            self.future.set_exception(
                NoReplyError(
                    f"request on {self.topic!r}: every handler that received it "
                    f"({', '.join(self.delivered)}) finished without returning a reply "
                    "(a handler's non-None return value is its reply)"
                )
            )


@dataclass(frozen=True, slots=True)
class UnhandledEvent:
    """An event that `close()` had to abandon."""

    subscription: str
    event: Event[Any]
    state: Literal["queued", "in_flight"]


@dataclass(frozen=True, slots=True)
class CloseReport:
    """What `close()` could not finish within its grace period."""

    unhandled: tuple[UnhandledEvent, ...] = ()

    @property
    def clean(self) -> bool:
        """True when every accepted event was handled or dead-lettered."""
        return not self.unhandled


class EventBus:
    """Publish events on topics; subscribe handlers to topic patterns.

    ``EventBus()`` is the in-process bus (``memory://``), unless the ``EVENTWIRE_URL``
    environment variable names another. Use it as
    ``async with bus:``: that starts the workers, and on exit waits for queued work (up to
    `close_grace` seconds) and closes. `publish_timeout` bounds how long `publish` waits for
    room in a full inbox (None waits for ever). `tracing=True` makes an OpenTelemetry span of
    every publish and handling attempt (`eventwire.tracing`; needs ``eventwire[otel]``);
    `lineage=True` stores a record of every handling attempt on the broker, for
    ``eventwire trace`` (`eventwire.lineage`).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        publish_timeout: float | None = 30.0,
        close_grace: float = 10.0,
        redeliver_after: float = 30.0,
        max_event_bytes: int | None = DEFAULT_MAX_BYTES,
        tracing: bool = False,
        lineage: bool = False,
    ) -> None:
        if url is None:
            url = os.environ.get(URL_ENVIRONMENT_VARIABLE) or "memory://"
        self.url = resolve_url(url)
        self._backend: Backend | None = open_backend(self.url)
        if not redeliver_after > 0:
            raise ValueError(f"redeliver_after must be > 0 seconds, got {redeliver_after!r}")
        self.redeliver_after = redeliver_after
        self.max_event_bytes = max_event_bytes
        if publish_timeout is not None and publish_timeout <= 0:
            raise ValueError(f"publish_timeout must be > 0 seconds or None, got {publish_timeout}")
        if close_grace < 0:
            raise ValueError(f"close_grace must be >= 0 seconds, got {close_grace}")
        self.publish_timeout = publish_timeout
        self.close_grace = close_grace
        self._subscriptions: dict[str, Subscription] = {}
        self._trie: TopicTrie[Subscription] = TopicTrie()
        self._routes: dict[str, _Route] = {}
        self._state = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._epoch = _Epoch()
        self._epochs: list[_Epoch] = [self._epoch]
        self._requests: dict[str, _PendingRequest] = {}
        self._reply_topic = f"{_REPLY_PREFIX}{secrets.token_hex(6)}"
        # Unsubscribed subscriptions whose workers still finish queued events.
        self._draining: set[Subscription] = set()
        self._agents: dict[str, Agent] = {}
        self._close_report: CloseReport | None = None
        self._closed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        # Broker backends only.
        self._publisher: BatchPublisher | None = None
        self._opening: set[asyncio.Task[None]] = set()
        self._reply_subscription: Subscription | None = None
        # See `observe`. A list mutated in place: workers keep a reference to it.
        self._observers: list[Observer] = []
        # True when a publish does more than queue in process (a broker or observers): one
        # test on the in-process hot path instead of two.
        self._indirect = self._backend is not None
        if tracing:
            from eventwire.tracing import Tracing

            self.observe(Tracing())
        self.lineage = lineage
        if lineage:
            from eventwire.lineage import LineageRecorder

            self.observe(LineageRecorder(self))

    def __repr__(self) -> str:
        return f"<EventBus {self.safe_url} {self._state}, {len(self._subscriptions)} subscriptions>"

    @property
    def safe_url(self) -> str:
        """The bus URL with any password replaced by ``***``: safe to print and log."""
        return self._backend.url.redacted if self._backend is not None else self.url

    @property
    def capabilities(self) -> Capabilities:
        """What this bus's backend guarantees beyond the common contract (README table)."""
        return self._backend.capabilities if self._backend is not None else MEMORY_CAPABILITIES

    @property
    def backend(self) -> Backend | None:
        """The broker backend, or None for the in-process bus."""
        return self._backend

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between `start()` and the beginning of `close()`."""
        return self._state == _RUNNING

    async def start(self) -> None:
        """Start every subscription's workers. Idempotent."""
        if self._state == _RUNNING:
            return
        if self._state != _NEW:
            raise BusClosedError("this EventBus was closed and cannot restart; create a new one")
        self._loop = asyncio.get_running_loop()
        if self._backend is not None:
            await self._backend.connect()
            self._publisher = BatchPublisher(self._backend, self.publish_timeout)
            try:
                await self._keep_dead_letters(self._backend)
                for subscription in list(self._subscriptions.values()):
                    await self._open_feeder(subscription)
            except BaseException:
                await self._backend.close()
                raise
        self._state = _RUNNING
        for subscription in list(self._subscriptions.values()):
            subscription._start(self._loop)
            if subscription._feeder is not None:
                subscription._feeder.start()
        for agent in list(self._agents.values()):
            await agent.on_start()

    async def _keep_dead_letters(self, backend: Backend) -> None:
        # Dead letters are kept by a consumer nobody fetches from, so that `eventwire dlq`
        # finds every one since the namespace's first start, on every broker.
        spec = ConsumerSpec(
            name=DLQ_CONSUMER,
            pattern=DLQ_PATTERN,
            start="earliest" if backend.capabilities.replay else "latest",
            ack_wait=self.redeliver_after,
        )
        consumer = await backend.consumer(spec)
        await consumer.close()

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> CloseReport:
        """Stop accepting events from outside handlers, let queued and in-flight work finish
        for up to `grace` seconds (default `close_grace`), then cancel what is left.

        Handlers still running may publish follow-up events during the grace period. Returns
        a `CloseReport` naming every event that was not handled; they are logged too.
        """
        if self._close_report is not None:
            return self._close_report
        if self._state == _CLOSING:
            await self._closed.wait()
            assert self._close_report is not None
            return self._close_report
        if current_event.get() is not None:
            raise RuntimeError(
                "close() was called from inside a handler, and it waits for every handler to "
                "finish, that one included; signal your main task to close the bus instead"
            )
        if self._state == _NEW:
            self._state = _CLOSED
            self._close_report = CloseReport()
            self._closed.set()
            return self._close_report
        grace = self.close_grace if grace is None else grace
        # Agents say goodbye while they may still publish.
        for agent in list(self._agents.values()):
            try:
                await agent.on_stop()
            except Exception:
                logger.exception("eventwire: %s.on_stop() failed", agent.name)
        self._state = _CLOSING
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(grace):
                # Broker backends: fetch no more; finish what this process holds.
                for subscription in list(self._subscriptions.values()):
                    if subscription._feeder is not None:
                        await subscription._feeder.stop_fetching()
                for epoch in list(self._epochs):
                    await epoch.wait()
        except TimeoutError:
            pass
        finally:
            # Also when close() itself is cancelled: the bus must not stay half closed.
            report = await self._stop_all()
            waited = loop.time() - started
        if report.unhandled:
            unhandled = report.unhandled
            logger.warning(
                "eventwire: closed with %d unhandled event(s) after waiting %.2fs "
                "(grace %.2fs)%s: %s",
                len(unhandled),
                waited,
                grace,
                "" if self._backend is None else f"; returned to {self.safe_url} for redelivery",
                ", ".join(f"{u.subscription}<-{u.event.topic} ({u.state})" for u in unhandled[:10])
                + (" ..." if len(unhandled) > 10 else ""),
            )
        return report

    async def _stop_all(self) -> CloseReport:
        unhandled: list[UnhandledEvent] = []
        workers: list[asyncio.Task[None]] = []
        for subscription in [*self._subscriptions.values(), *self._draining]:
            for event, state in subscription._stop_now():
                unhandled.append(UnhandledEvent(subscription.name, event, state))  # type: ignore[arg-type]
            workers.extend(subscription._workers)
        feeders = [
            s._feeder
            for s in [*self._subscriptions.values(), *self._draining]
            if s._feeder is not None
        ]
        self._draining.clear()
        if workers:
            # Bounded: a handler that swallows its cancellation must not hang close().
            _, stubborn = await asyncio.wait(workers, timeout=1.0)
            for task in stubborn:
                logger.error("eventwire: %s ignored cancellation at close", task.get_name())
        if self._backend is not None:
            await self._close_backend(feeders)
        for pending in self._requests.values():
            if not pending.future.done():
                pending.future.set_exception(
                    BusClosedError(
                        f"the bus closed before request on {pending.topic!r} got a reply"
                    )
                )
        abandoned = (
            BusClosedError(f"the bus closed with {len(unhandled)} event(s) unhandled")
            if unhandled
            else None
        )
        for epoch in self._epochs:
            epoch.pending = 0
            epoch.settle(abandoned)  # a drain() still waiting learns the work was abandoned
        self._state = _CLOSED
        self._close_report = CloseReport(tuple(unhandled))
        self._closed.set()
        return self._close_report

    async def _close_backend(self, feeders: list[Feeder]) -> None:
        """Acknowledge what was handled, give back what was not, disconnect."""
        assert self._backend is not None
        for task in list(self._opening):
            task.cancel()
        try:
            for feeder in feeders:
                await feeder.close()
            if self._publisher is not None:
                await self._publisher.close()
        finally:
            await self._backend.close()

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task alive until done, and log it if it fails."""
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("eventwire: %s failed", task.get_name(), exc_info=task.exception())

    # -- subscribing --------------------------------------------------------------------

    @overload
    def subscribe(
        self,
        pattern: str,
        handler: None = None,
        *,
        name: str | None = None,
        group: str | None = None,
        concurrency: int = 1,
        retry: Retry | None = None,
        timeout: float | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        overflow: Overflow = "block",
        start: Start = "latest",
        idempotent: bool = False,
        publishes: Sequence[str] = (),
    ) -> Callable[[H], H]: ...

    @overload
    def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        name: str | None = None,
        group: str | None = None,
        concurrency: int = 1,
        retry: Retry | None = None,
        timeout: float | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        overflow: Overflow = "block",
        start: Start = "latest",
        idempotent: bool = False,
        publishes: Sequence[str] = (),
    ) -> Subscription: ...

    def subscribe(
        self,
        pattern: str,
        handler: Handler | None = None,
        *,
        name: str | None = None,
        group: str | None = None,
        concurrency: int = 1,
        retry: Retry | None = None,
        timeout: float | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        overflow: Overflow = "block",
        start: Start = "latest",
        idempotent: bool = False,
        publishes: Sequence[str] = (),
    ) -> Subscription | Callable[[H], H]:
        """Subscribe `handler` to every topic matching `pattern`.

        Called with a handler, returns the `Subscription`; without one, works as a decorator
        that returns the function unchanged (its subscription is in `bus.subscriptions`).
        `name` (default: the handler's ``module.qualname``) identifies the subscription;
        `group` makes subscriptions sharing it competing consumers; `concurrency` allows that
        many events in flight (same-`key` events stay one at a time, in order); `retry` and
        `timeout` govern failures; `max_pending` bounds the inbox and `overflow` says what a
        publish does when it is full: ``"block"`` waits, ``"drop_oldest"`` drops the oldest
        queued event (counted), ``"error"`` raises `InboxFullError`.

        On a broker backend the subscription is durable: `name` (or `group`) is its identity
        on the broker, every process running it shares its events, and it resumes after a
        restart. A new one starts with events published from now on (``start="latest"``), or
        replays what the broker holds: ``start="earliest"`` or a timezone-aware `datetime`.
        `idempotent` records handled event ids in the broker, so that an event delivered again
        after its handler succeeded (the process died before acknowledging it) is skipped.
        There, `max_pending` bounds how many events this process holds at once; the rest of
        the backlog waits in the broker, and `overflow` does not apply.

        `publishes` declares the topics the handler publishes (e.g.
        ``publishes=["research.complete"]``), for ``eventwire topology`` and ``asyncapi``;
        topics it is seen publishing at run time are added in `Subscription.published_topics`.
        """
        options: dict[str, Any] = dict(
            name=name,
            group=group,
            concurrency=concurrency,
            retry=retry,
            timeout=timeout,
            max_pending=max_pending,
            overflow=overflow,
            start=start,
            idempotent=idempotent,
            publishes=publishes,
        )
        if handler is None:
            validate_pattern(pattern)

            def decorator(function: H) -> H:
                subscription = self._subscribe(pattern, function, **options)
                with contextlib.suppress(AttributeError, TypeError):
                    function.__eventwire_subscription__ = subscription  # type: ignore[attr-defined]
                return function

            return decorator
        return self._subscribe(pattern, handler, **options)

    def _subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        name: str | None,
        group: str | None,
        concurrency: int,
        retry: Retry | None,
        timeout: float | None,
        max_pending: int,
        overflow: Overflow,
        source: str | None = None,
        start: Start = "latest",
        idempotent: bool = False,
        publishes: Sequence[str] = (),
    ) -> Subscription:
        if self._state in (_CLOSING, _CLOSED):
            raise BusClosedError(f"cannot subscribe to {pattern!r}: the bus is {self._state}")
        validate_pattern(pattern)
        _check_handler(handler)
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(
                f"overflow must be one of {', '.join(map(repr, OVERFLOW_POLICIES))}, "
                f"got {overflow!r}"
            )
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry(...), got {type(retry).__name__}")
        if group is not None and (not isinstance(group, str) or not group):
            raise ValueError(f"group must be a non-empty str or None, got {group!r}")
        self._check_start(start)
        declared = _check_publishes(publishes)
        if name is None:
            name = self._unique_default_name(_default_name(handler))
        elif not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        elif name in self._subscriptions:
            raise ValueError(
                f"a subscription named {name!r} already exists on this bus; pass another "
                "name=, or the same group= to make them competing consumers"
            )
        payload_type = payload_type_of(handler)
        converter = make_converter(payload_type, name) if payload_type is not None else None
        subscription = Subscription(
            self,
            pattern,
            handler,
            name=name,
            group=group,
            concurrency=concurrency,
            retry=retry,
            timeout=timeout,
            max_pending=max_pending,
            overflow=overflow,
            source=source or name,
            converter=converter,
            start=start,
            idempotent=bool(idempotent),
            publishes=declared,
        )
        self._subscriptions[name] = subscription
        if self._backend is not None:
            subscription._feeder = Feeder(self, subscription, self._consumer_spec(subscription))
            if self._state == _RUNNING:
                # Opened before any later publish of this process goes out (publish waits
                # for it), so a new subscription sees every event published after it.
                opening = asyncio.get_running_loop().create_task(
                    self._open_and_start(subscription), name=f"eventwire:{name}:open"
                )
                self._opening.add(opening)
                opening.add_done_callback(self._opening.discard)
                subscription._opening = opening
                self._track(opening)
            return subscription
        self._trie.add(pattern, subscription)
        self._refresh_routes(pattern)
        if self._state == _RUNNING:
            assert self._loop is not None
            subscription._start(self._loop)
        return subscription

    def _check_start(self, start: Start) -> None:
        if isinstance(start, datetime):
            if start.tzinfo is None:
                raise ValueError(
                    "start= datetime must be timezone-aware, e.g. datetime.now(timezone.utc)"
                )
        elif start not in ("latest", "earliest"):
            raise ValueError(f"start must be 'latest', 'earliest' or a datetime, got {start!r}")
        if start == "latest":
            return
        if self._backend is None:
            raise BackendCapabilityError(
                f"start={start!r} replays history, and the in-process bus keeps none; use a "
                "durable backend such as 'sqlite:///bus.db', or start='latest'"
            )
        if not self._backend.capabilities.replay:
            raise BackendCapabilityError(
                f"start={start!r} replays history, which the {self._backend.scheme}:// backend "
                "cannot do (see the capability table in the README); use start='latest'"
            )

    def _consumer_spec(self, subscription: Subscription) -> ConsumerSpec:
        return ConsumerSpec(
            name=subscription.group or subscription.name,
            pattern=subscription.pattern,
            start=subscription.start,
            ack_wait=self.redeliver_after,
            ephemeral=subscription.pattern.startswith(_REPLY_PREFIX),
        )

    async def _open_feeder(self, subscription: Subscription) -> None:
        feeder = subscription._feeder
        assert feeder is not None
        backend = self._backend_or_fail()
        if subscription.idempotent and not backend.capabilities.idempotent:
            raise BackendCapabilityError(
                f"subscription {subscription.name!r} is idempotent=True, but the "
                f"{backend.scheme}:// backend cannot record handled event ids"
            )
        await feeder.open()

    async def _open_and_start(self, subscription: Subscription) -> None:
        try:
            await self._open_feeder(subscription)
        except Exception:
            logger.exception(
                "eventwire: could not open the durable subscription %s on %s",
                subscription.name,
                self._backend_or_fail().url.redacted,
            )
            subscription._active = False
            self._subscriptions.pop(subscription.name, None)
            raise
        if self._state == _RUNNING and subscription._active:
            assert self._loop is not None
            assert subscription._feeder is not None
            subscription._start(self._loop)
            subscription._feeder.start()

    def _backend_or_fail(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("this bus runs in-process and has no broker backend")
        return self._backend

    def _unique_default_name(self, base: str) -> str:
        if base not in self._subscriptions:
            return base
        number = 2
        while f"{base}#{number}" in self._subscriptions:
            number += 1
        return f"{base}#{number}"

    def _remove_subscription(self, subscription: Subscription) -> None:
        if self._subscriptions.get(subscription.name) is subscription:
            del self._subscriptions[subscription.name]
        if subscription._workers and not all(task.done() for task in subscription._workers):
            self._draining.add(subscription)
            gathered = asyncio.gather(*subscription._workers, return_exceptions=True)
            gathered.add_done_callback(lambda _: self._draining.discard(subscription))
        if subscription._feeder is not None:
            return  # not in the trie: its events come from the broker
        self._trie.remove(subscription.pattern, subscription)
        self._refresh_routes(subscription.pattern)

    @property
    def subscriptions(self) -> Mapping[str, Subscription]:
        """Active subscriptions by name (a live, read-only view)."""
        return MappingProxyType(self._subscriptions)

    def register(self, agent: A) -> A:
        """Subscribe every ``@on`` method of `agent`, as ``<agent name>.<method name>``."""
        from eventwire.agent import Agent

        if not isinstance(agent, Agent):
            raise TypeError(f"register() takes an Agent, got {type(agent).__name__}")
        if agent.name in self._agents:
            raise ValueError(
                f"an agent named {agent.name!r} is already registered on this bus; "
                "give each agent a distinct name="
            )
        agent._attach(self)
        self._agents[agent.name] = agent
        if self._state == _RUNNING:
            assert self._loop is not None
            self._track(
                self._loop.create_task(agent.on_start(), name=f"eventwire:{agent.name}.on_start")
            )
        return agent

    def stats(self) -> dict[str, SubscriptionStats]:
        """Per-subscription counters and handling-time percentiles, by subscription name."""
        return {name: sub.stats for name, sub in self._subscriptions.items()}

    def observe(self, observer: Obs) -> Obs:
        """Call `observer` (an `eventwire.observe.Observer`) on every publish and handling
        attempt from now on; returns it. Remove it with `unobserve`."""
        if not isinstance(observer, Observer):
            raise TypeError(
                f"observe() takes an eventwire.observe.Observer, got {type(observer).__name__}"
            )
        if observer not in self._observers:
            self._observers.append(observer)
            self._indirect = True
        return observer

    def unobserve(self, observer: Observer) -> None:
        """Stop calling `observer`. No error if it was not observing."""
        with contextlib.suppress(ValueError):
            self._observers.remove(observer)
        self._indirect = self._backend is not None or bool(self._observers)

    @property
    def observers(self) -> tuple[Observer, ...]:
        """The observers registered with `observe`, in order."""
        return tuple(self._observers)

    def record(self, pattern: str = ">") -> Recorder:
        """A recorder of the events on topics matching `pattern` and of their handling, for
        tests: ``async with bus.record("research.>") as seen: ... await seen.wait_for(...)``.
        See `eventwire.record.Recorder` and docs/testing.md."""
        from eventwire.record import Recorder

        return Recorder(self, pattern)

    # -- routing ------------------------------------------------------------------------

    def _refresh_routes(self, pattern: str) -> None:
        """Bring the route cache up to date after `pattern` gained or lost a subscription."""
        if SINGLE in pattern or TAIL in pattern:
            self._routes.clear()
        else:
            # An exact pattern is a topic: resolve it now, so that the first publish to a
            # declared topic pays no more than any other.
            self._routes.pop(pattern, None)
            self._route(pattern)

    def _route(self, topic: str) -> _Route:
        cached = self._routes.get(topic)
        if cached is not None:
            return cached
        validate_topic(topic)
        solo: list[Inbox] = []
        grouped: dict[str, list[Subscription]] = {}
        for subscription in self._trie.match(topic):
            if subscription.group is None:
                solo.append(subscription._inbox)
            else:
                grouped.setdefault(subscription.group, []).append(subscription)
        route: _Route = (
            _GroupedRoute(tuple(solo), tuple(_GroupRoute(m) for m in grouped.values()))
            if grouped
            else tuple(solo)
        )
        if len(self._routes) >= _ROUTE_CACHE_LIMIT:
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _check_accepting(self, parent: Event[Any] | None) -> None:
        if self._state == _RUNNING:
            return
        if self._state == _CLOSING and parent is not None:
            return  # follow-ups of in-flight work are still accepted during the grace period
        if self._state == _NEW:
            raise BusNotRunningError(
                "the bus is not running: use `async with bus:` or `await bus.start()` "
                "before publishing"
            )
        raise BusClosedError(f"cannot publish: the bus is {self._state}")

    async def publish(
        self,
        topic_or_event: str | Event[Any],
        payload: Any = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> Event[Any]:
        """Publish an `Event`, or build one from ``(topic, payload, metadata=, key=)``.

        Returns the published event once it is queued for every matching subscription
        (waiting for room where an inbox is full and its overflow policy is ``"block"``).
        Handlers never run inside this call.
        """
        parent = current_event.get()
        if self._state is not _RUNNING:
            self._check_accepting(parent)
        event: Event[Any]
        if type(topic_or_event) is str:
            if parent is None:
                # new_event() inlined: the root publish is the hottest path of the library.
                event = build_event(
                    Event
                    if type(payload) in ATOMIC_TYPES and not metadata
                    else event_class(payload, metadata),
                    topic_or_event,
                    payload,
                    freeze_metadata(metadata) if metadata else EMPTY_METADATA,
                    key,
                    None,
                    time_ns(),
                    next(event_sequence),
                )
            else:
                subscription = current_subscription.get()
                if subscription is not None:
                    source = subscription.source
                    subscription.published_topics.add(topic_or_event)
                else:
                    source = None
                event = new_event(topic_or_event, payload, metadata, key, parent, source)
        else:
            event = self._adopt(topic_or_event, payload, metadata, key, parent)
        if self._indirect:
            if self._observers:
                await self._publish_observed(event, parent)
                return event
            if self._opening:
                await self._store(event)
                return event
            # _store() inlined: one coroutine less per publish on the durable hot path.
            stored = self._send(event)
            try:
                await stored
            except TimeoutError:
                raise self._not_stored(event) from None
            return event
        queued = self._enqueue(event, parent)
        if type(queued) is _Stall:
            await self._enqueue_waiting(queued)
        return event

    async def _publish_observed(self, event: Event[Any], parent: Event[Any] | None) -> None:
        observers = tuple(self._observers)
        tokens = notify(observers, "publish_started", event)
        try:
            await self._dispatch(event, parent)
        except BaseException as error:
            notify_finished(observers, "publish_finished", tokens, event, error)
            raise
        notify_finished(observers, "publish_finished", tokens, event, None)

    async def publish_many(self, items: Iterable[Event[Any] | tuple[str, Any]]) -> list[Event[Any]]:
        """Publish several events in order: each item an `Event` or a ``(topic, payload)``
        pair. Returns the published events once all are queued (in-process) or stored by
        the broker, which receives them in as few round trips as it can take.

        Every event is checked first (and, on a broker, encoded), so a bad one (an invalid
        topic; on a broker also an unencodable payload) raises with none of them published.
        """
        parent = current_event.get()
        if self._state is not _RUNNING:
            self._check_accepting(parent)
        subscription = current_subscription.get() if parent is not None else None
        source = subscription.source if subscription is not None else None
        events: list[Event[Any]] = []
        for item in items:
            if isinstance(item, tuple):
                topic, payload = item
                validate_topic(topic)
                events.append(new_event(topic, payload, None, None, parent, source))
                if subscription is not None:
                    subscription.published_topics.add(topic)
            else:
                events.append(self._adopt(item, None, None, None, parent))
        if self._observers:
            for event in events:
                validate_topic(event._topic)
            # One publish after another, each seen by the observers (its own span).
            for event in events:
                await self._publish_observed(event, parent)
            return events
        if self._backend is None:
            for event in events:
                queued = self._enqueue(event, parent)
                if type(queued) is _Stall:
                    await self._enqueue_waiting(queued)
            return events
        assert self._publisher is not None
        messages = [
            Message(event.id, event._topic, event._key, self._encode(event)) for event in events
        ]
        if self._opening:
            await asyncio.gather(*self._opening, return_exceptions=True)
        stored = [self._publisher.enqueue(message) for message in messages]
        for event, future in zip(events, stored, strict=True):
            try:
                # Stored in order, one batch after another: most of these are already done.
                await future
            except TimeoutError:
                for rest in stored:
                    rest.cancel()  # those not sent yet are withdrawn
                raise self._not_stored(event) from None
        return events

    def _encode(self, event: Event[Any]) -> bytes:
        validate_topic(event._topic)
        # Encoded first: a payload with no JSON form fails here, before anything is sent.
        return encode(event, max_bytes=self.max_event_bytes)

    async def _store(self, event: Event[Any]) -> None:
        """Broker backends: return once the broker has stored `event`."""
        if self._opening:
            # Subscriptions made earlier by this process must exist before their events do.
            await asyncio.gather(*self._opening, return_exceptions=True)
        try:
            await self._send(event)
        except TimeoutError:
            raise self._not_stored(event) from None

    def _send(self, event: Event[Any]) -> asyncio.Future[None]:
        """Hand `event` to the batch publisher; the future resolves once it is stored."""
        assert self._publisher is not None
        body = self._encode(event)
        return self._publisher.enqueue(Message(event.id, event._topic, event._key, body))

    def _not_stored(self, event: Event[Any]) -> PublishTimeoutError:
        return PublishTimeoutError(
            f"publish to {event._topic!r} was not confirmed stored by {self.safe_url} "
            f"within publish_timeout={self.publish_timeout}s (is the broker reachable?); it "
            "may or may not have been stored"
        )

    def _adopt(
        self,
        value: object,
        payload: Any,
        metadata: Mapping[str, Any] | None,
        key: str | None,
        parent: Event[Any] | None,
    ) -> Event[Any]:
        if not isinstance(value, Event):
            raise TypeError(
                "publish() takes a topic str and a payload, or an Event; "
                f"got {type(value).__name__}: {value!r}"
            )
        event: Event[Any] = value
        if payload is not None or metadata is not None or key is not None:
            raise TypeError(
                "publish(event) takes no payload, metadata or key: they are the event's own; "
                "use event.replace(...) to change them"
            )
        if parent is not None and event.id == parent.id:
            # event.replace(...) of the event being handled: a new event, not its own cause.
            fresh: Event[Any] = Event(
                event._topic,
                event._payload,
                event._metadata,
                key=event._key,
                source=event._source,
                reply_to=event._reply_to,
            )
            event = fresh
        fill_cause = parent is not None and event._causation_id is None
        fill_source = event._source is None and parent is not None
        if event._epoch is None and not fill_cause and not fill_source:
            return event
        # Published before, or needs its chain filled in: publish a copy, same id.
        adopted = event._copy(event._payload)
        adopted._epoch = None
        if fill_cause:
            assert parent is not None
            adopted._causation_id = parent.id
            if event._correlation_id is None:
                adopted._correlation_id = parent.correlation_id
        if fill_source:
            subscription = current_subscription.get()
            adopted._source = subscription.source if subscription is not None else None
            if subscription is not None:
                subscription.published_topics.add(adopted._topic)
        return adopted

    async def _dispatch(self, event: Event[Any], parent: Event[Any] | None) -> int:
        """Queue `event` for every matching subscription; the number of deliveries."""
        if self._backend is not None:
            await self._store(event)
            return 1
        queued = self._enqueue(event, parent)
        if type(queued) is _Stall:
            await self._enqueue_waiting(queued)
            return queued.count
        return queued  # type: ignore[return-value]

    def _enqueue(self, event: Event[Any], parent: Event[Any] | None) -> int | _Stall:
        """Queue without waiting: the number of deliveries, or where it must wait for room."""
        route = self._routes.get(event._topic)
        if route is None:
            route = self._route(event._topic)
        targets = route if type(route) is tuple else route.targets(event._key)  # type: ignore[union-attr]
        if event._target is not None:
            targets = self._targeted(targets, event._target)
        count = len(targets)
        if not count:
            return 0
        epoch = self._epoch
        if parent is not None and parent._epoch is not None and not parent._epoch.retired:
            epoch = parent._epoch  # a follow-up counts with its cause
        event._epoch = epoch
        epoch.pending += count
        for inbox in targets:
            if len(inbox) < inbox.capacity:
                inbox.append(event)
                if inbox.idle is not None:
                    inbox.wake_one()
                continue
            return _Stall(event, targets, targets.index(inbox), count, epoch)
        return count

    def _targeted(self, targets: Any, target: str) -> tuple[Inbox, ...]:
        """Of the inboxes an event goes to, the one of the subscription (or group) it is
        meant for: a dead letter sent back by a retry goes to no other subscriber."""
        chosen = [
            inbox
            for inbox in targets
            if inbox.subscription.name == target or inbox.subscription.group == target
        ]
        if not chosen:
            logger.warning(
                "eventwire: an event is meant for subscription %r, which this bus does not "
                "have among those matching its topic; nobody handles it",
                target,
            )
        return tuple(chosen[:1])

    async def _enqueue_waiting(self, stall: _Stall) -> None:
        """Go on queueing an event that met a full inbox, as each overflow policy says."""
        event, targets, epoch = stall.event, stall.targets, stall.epoch
        refused: InboxFullError | None = None
        loop = asyncio.get_running_loop()
        for index in range(stall.index, len(targets)):
            inbox = targets[index]
            subscription = inbox.subscription
            waiter: asyncio.Future[None] | None = None
            try:
                if not subscription._active:
                    _release(epoch, 1)  # unsubscribed since the route was read
                elif len(inbox) < inbox.capacity and not subscription._putters:
                    inbox.append(event)
                    if inbox.idle is not None:
                        inbox.wake_one()
                elif (
                    subscription.overflow == "drop_oldest"
                    and not subscription._putters
                    and (inbox or subscription._keys)  # room may be held by parked events
                ):
                    subscription._drop_oldest_for(event)
                elif subscription.overflow == "error":
                    _release(epoch, 1)
                    refused = refused or subscription._full_error(
                        event,
                        "its overflow policy is 'error' (the event was still queued for every "
                        "other matching subscription)",
                    )
                else:
                    waiter = loop.create_future()
                    await subscription._put_waiting(event, self.publish_timeout, waiter)
            except _Unsubscribed:
                _release(epoch, 1)
            except BaseException:
                # Not queued here nor for the rest: they are owed nothing, unless this inbox
                # let the event in just as the publish was cancelled.
                admitted = (
                    waiter is not None
                    and waiter.done()
                    and not waiter.cancelled()
                    and waiter.exception() is None
                )
                _release(epoch, len(targets) - index - admitted)
                raise
        if refused is not None:
            raise refused

    def publish_threadsafe(
        self,
        topic_or_event: str | Event[Any],
        payload: Any = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
        timeout: float | None = None,
    ) -> Event[Any]:
        """`publish` for plain synchronous code and other threads while the bus runs.

        Blocks until the event is queued (or `timeout` seconds pass) and returns it. Inside a
        plain-function handler, causation ids are filled in as with `publish`.
        """
        loop = self._loop
        if self._state == _CLOSED:
            raise BusClosedError("publish_threadsafe(): the bus is closed")
        if loop is None or self._state not in (_RUNNING, _CLOSING) or loop.is_closed():
            raise BusNotRunningError(
                "publish_threadsafe() needs a running bus: start it with `async with bus:` "
                "in its event loop first"
            )
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError(
                "publish_threadsafe() was called from the bus's own event loop, where it "
                "would block that loop; use `await bus.publish(...)` there"
            )
        parent = current_event.get()
        subscription = current_subscription.get() if parent is not None else None

        async def publish_in_loop() -> Event[Any]:
            # Runs as its own task: restore the publishing thread's handler context in it.
            token = current_event.set(parent)
            token_sub = current_subscription.set(subscription)
            try:
                return await self.publish(topic_or_event, payload, metadata=metadata, key=key)
            finally:
                current_subscription.reset(token_sub)
                current_event.reset(token)

        future = asyncio.run_coroutine_threadsafe(publish_in_loop(), loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if not future.cancel() and not future.cancelled():
                return future.result()  # it went through as the time ran out
            topic = topic_or_event if isinstance(topic_or_event, str) else topic_or_event.topic
            raise PublishTimeoutError(
                f"publish_threadsafe to {topic!r} was not queued within {timeout}s (a full "
                "inbox with overflow='block'); it was withdrawn from the inboxes it was still "
                "waiting for"
            ) from None

    # -- waiting ------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every event published so far, and every event their handlers published
        in turn, has been handled or dead-lettered. Raises `TimeoutError` after `timeout`."""
        if current_event.get() is not None:
            raise RuntimeError(
                "drain() was called from inside a handler and would wait for that handler "
                "itself; call it from the code that publishes"
            )
        if self._backend is not None:
            await self._drain_durable(timeout)
            return
        owed = [epoch for epoch in self._epochs if epoch.pending]
        for epoch in self._epochs:
            if not epoch.pending:
                epoch.retired = True
        self._epoch = _Epoch()
        self._epochs = [*owed, self._epoch]
        if not owed:
            return
        try:
            async with asyncio.timeout(timeout):
                for epoch in owed:
                    await epoch.wait()
        except TimeoutError:
            busy = {
                name: stats
                for name, stats in self.stats().items()
                if stats.queued or stats.in_flight
            }
            detail = ", ".join(
                f"{name} ({s.queued} queued, {s.in_flight} in flight)" for name, s in busy.items()
            )
            raise TimeoutError(
                f"drain() timed out after {timeout}s with "
                f"{sum(e.pending for e in owed)} deliveries still owed: {detail or 'none queued'}"
            ) from None

    async def _drain_durable(self, timeout: float | None) -> None:
        """Broker backends: wait until no durable subscription of the namespace, in any
        process, has events waiting or being handled (replies to requests excepted)."""
        backend = self._backend_or_fail()
        owed: list[str] = []
        pause = 0.002
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._opening:
                        await asyncio.gather(*self._opening, return_exceptions=True)
                    if self._publisher is not None:
                        await self._publisher.close()  # what is being sent counts
                    local = sum(epoch.pending for epoch in self._epochs)
                    if not local:
                        owed = [
                            f"{info.name} ({info.outstanding})"
                            for info in await backend.consumers()
                            if info.outstanding and not _is_tooling(info)
                        ]
                        if not owed and not sum(epoch.pending for epoch in self._epochs):
                            return
                    else:
                        owed = [
                            f"{name} ({stats.queued} queued, {stats.in_flight} in flight here)"
                            for name, stats in self.stats().items()
                            if stats.queued or stats.in_flight
                        ]
                    # Other processes' progress has no event to wait on: poll, backing off.
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.05)
        except TimeoutError:
            raise TimeoutError(
                f"drain() timed out after {timeout}s with events still owed on "
                f"{backend.url.redacted}: {', '.join(owed) or 'none seen'}"
            ) from None

    async def request(
        self,
        topic: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
        timeout: float | None,
    ) -> Any:
        """Publish and return the first reply: the first non-None value a handler returns.

        Raises `TimeoutError` if no reply comes within `timeout` seconds, `HandlerError`
        (naming the handler, with its exception as `__cause__`) if the handlers failed,
        and `NoReplyError` if nothing matches the topic or every handler returned None.
        """
        return await self._request_as(topic, payload, metadata, key, timeout, source=None)

    async def _request_as(
        self,
        topic: str,
        payload: Any,
        metadata: Mapping[str, Any] | None,
        key: str | None,
        timeout: float | None,
        *,
        source: str | None,
    ) -> Any:
        """`request` with `source` given (an agent's name) or, when None, taken from the
        handler running this code."""
        parent = current_event.get()
        if self._state != _RUNNING:
            self._check_accepting(parent)
        if source is None and parent is not None:
            subscription = current_subscription.get()
            source = subscription.source if subscription is not None else None
        event = new_event(topic, payload, metadata, key, parent, source, reply_to=self._reply_topic)
        return await self._request(event, parent, timeout)

    async def _request(
        self, event: Event[Any], parent: Event[Any] | None, timeout: float | None
    ) -> Any:
        loop = asyncio.get_running_loop()
        pending = _PendingRequest(loop.create_future(), event.topic)
        if self._backend is not None:
            return await self._request_durable(event, pending, timeout)
        self._requests[event.id] = pending
        try:
            route = self._route(event.topic)
            count = await self._dispatch(event, parent)
            if not count:
                raise NoReplyError(
                    f"no subscription matches {event.topic!r}, so nothing can answer this "
                    "request; subscribe a handler to it first"
                )
            if isinstance(route, _GroupedRoute):
                pending.delivered = [i.subscription.name for i in route.inboxes]
                pending.delivered += [g.members[0].group or "" for g in route.groups]
            else:
                pending.delivered = [i.subscription.name for i in route]
            pending.expected = count
            return await self._await_reply(event, pending, timeout)
        finally:
            self._requests.pop(event.id, None)

    async def _await_reply(
        self, event: Event[Any], pending: _PendingRequest, timeout: float | None
    ) -> Any:
        pending.check_complete()
        try:
            async with asyncio.timeout(timeout) as scope:
                return await asyncio.shield(pending.future)
        except TimeoutError:
            if not scope.expired():
                raise
            raise TimeoutError(
                f"no reply to request on {event.topic!r} within {timeout}s; it reached "
                f"{', '.join(pending.delivered) or 'no known subscription'} and "
                f"{pending.finished} of them finished"
            ) from None

    async def _request_durable(
        self, event: Event[Any], pending: _PendingRequest, timeout: float | None
    ) -> Any:
        """Broker backends: the request goes through the broker to whichever process runs
        each matching subscription; replies come back on this bus's own reply topic."""
        backend = self._backend_or_fail()
        if self._reply_subscription is None:
            self._reply_subscription = self._subscribe(
                self._reply_topic,
                self._on_reply,
                name=self._reply_topic,
                group=None,
                concurrency=1,
                retry=None,
                timeout=None,
                max_pending=DEFAULT_MAX_PENDING,
                overflow="block",
            )
        if self._opening:
            await asyncio.gather(*self._opening, return_exceptions=True)
        reached = sorted(
            {
                info.name
                for info in await backend.consumers()
                if not _is_tooling(info) and pattern_matches(info.pattern, event.topic)
            }
        )
        if not reached:
            raise NoReplyError(
                f"no subscription matches {event.topic!r} on {backend.url.redacted}, so nothing "
                "can answer this request; subscribe a handler to it first"
            )
        pending.delivered = reached
        pending.expected = len(reached)
        self._requests[event.id] = pending
        try:
            await self._store(event)
            return await self._await_reply(event, pending, timeout)
        finally:
            self._requests.pop(event.id, None)

    async def _on_reply(self, event: Event[Any]) -> None:
        reply = event.payload
        if not isinstance(reply, dict):
            return
        pending = self._requests.get(str(reply.get("request")))
        if pending is None:
            return  # its requester gave up (timeout) or it is a late second answer
        error = reply.get("error")
        pending.outcome(
            str(reply.get("subscription")),
            reply.get("result"),
            RemoteHandlerError(str(error), str(reply.get("error_type"))) if error else None,
        )

    async def _send_reply(
        self,
        subscription: Subscription,
        event: Event[Any],
        result: Any,
        error: BaseException | None,
    ) -> None:
        assert event.reply_to is not None
        reply: dict[str, Any] = {
            "request": event.id,
            "subscription": subscription.group or subscription.name,
            "result": None,
            "error": None,
            "error_type": None,
        }
        if error is not None:
            reply["error"] = str(error)
            reply["error_type"] = type(error).__name__
        else:
            reply["result"] = result
        try:
            try:
                await self.publish(event.reply_to, reply)
            except (TypeError, ValueError) as unencodable:
                reply.update(
                    result=None,
                    error=f"the reply could not be sent: {unencodable}",
                    error_type=type(unencodable).__name__,
                )
                await self.publish(event.reply_to, reply)
        except Exception:
            logger.exception("eventwire: could not send the reply to request %s", event.id)

    def _reply(
        self,
        subscription: Subscription,
        event: Event[Any],
        result: Any,
        error: BaseException | None,
    ) -> None:
        if self._backend is not None:
            if event._reply_to is not None and event._reply_to.startswith(_REPLY_PREFIX):
                self._track(
                    asyncio.get_running_loop().create_task(
                        self._send_reply(subscription, event, result, error)
                    )
                )
            return
        pending = self._requests.get(event.id)
        if pending is not None:
            pending.outcome(subscription.name, result, error)

    # -- failures -----------------------------------------------------------------------

    async def _dead_letter(
        self, subscription: Subscription, event: Event[Any], error: BaseException, attempts: int
    ) -> bool:
        """Publish the dead letter and a `_bus.error` notice; False if a broker backend could
        not store them (the event then goes back to the broker, to be tried again)."""
        description = f"{type(error).__name__}: {error}"
        logger.error(
            "eventwire: %s gave up on %s %s after %d attempt(s): %s",
            subscription.name,
            event.topic,
            event.id,
            attempts,
            description,
            exc_info=None if attempts == 0 else (type(error), error, error.__traceback__),
        )
        details: dict[str, Any] = {
            "error": description,
            "error_type": type(error).__name__,
            "subscription": subscription.name,
            "attempts": attempts,
        }
        if subscription.group is not None:
            details["group"] = subscription.group
        topic = event.topic
        return await self._publish_dead_letter(
            subscription,
            event.id,
            topic,
            None if topic.startswith("_dlq.") else (f"_dlq.{topic}", event),
            details,
        )

    async def _dead_letter_foreign(
        self, subscription: Subscription, delivery: Delivery, error: EnvelopeError
    ) -> bool:
        """A message on the broker that is not a valid envelope: to the DLQ with the reason."""
        dlq_topic, payload = foreign_dead_letter(delivery, error)
        subscription.failed += 1
        subscription.dead_lettered += 1
        logger.error(
            "eventwire: %s received a message on %r that is not an eventwire envelope (%s); "
            "sent to %s",
            subscription.name,
            delivery.topic,
            error,
            dlq_topic,
        )
        details = {
            "error": f"EnvelopeError: {error}",
            "error_type": "EnvelopeError",
            "subscription": subscription.name,
            "attempts": 0,
        }
        return await self._publish_dead_letter(
            subscription, None, delivery.topic, (dlq_topic, payload), details
        )

    async def _publish_dead_letter(
        self,
        subscription: Subscription,
        event_id: str | None,
        topic: str,
        letter: tuple[str, Any] | None,
        details: dict[str, Any],
    ) -> bool:
        try:
            if letter is not None:
                await self.publish(letter[0], letter[1], metadata=details)
            if not topic.startswith("_bus."):
                await self.publish(
                    "_bus.error",
                    {**details, "topic": topic, "event_id": event_id},
                    metadata={"subscription": subscription.name},
                )
        except Exception:
            logger.exception(
                "eventwire: could not publish the dead letter of %s for %s",
                event_id or f"a malformed message on {topic!r}",
                subscription.name,
            )
            return self._backend is None
        return True


def _is_tooling(info: ConsumerInfo) -> bool:
    """A consumer of the bus's own machinery or tools (replies, stats, the dead-letter store,
    history readers), which no application handler stands behind: drain() and request()
    ignore it."""
    return info.name.startswith(TOOLING_PREFIX) or info.pattern.startswith(_PROCESS_PATTERNS)


def _default_name(handler: Callable[..., Any]) -> str:
    target = getattr(handler, "__func__", handler)
    module = getattr(target, "__module__", None) or "handler"
    qualname = getattr(target, "__qualname__", None) or type(handler).__qualname__
    return f"{module}.{qualname}"


def _check_publishes(publishes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(publishes, str) or not isinstance(publishes, Sequence | set | frozenset):
        raise TypeError(
            "publishes= takes a list of topics, e.g. publishes=['research.complete'], "
            f"got {publishes!r}"
        )
    for topic in publishes:
        if not isinstance(topic, str):
            raise TypeError(f"publishes= holds {topic!r}, which is not a topic str")
        try:
            validate_pattern(topic)
        except InvalidTopicError as error:
            raise InvalidTopicError(f"publishes= {error}") from None
    return tuple(dict.fromkeys(publishes))


def _check_handler(handler: Any) -> None:
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {type(handler).__name__}: {handler!r}")
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(object())
    except TypeError:
        raise TypeError(
            f"handler {getattr(handler, '__qualname__', handler)!r} must accept the event as "
            f"its one positional argument; its signature is {signature}"
        ) from None
