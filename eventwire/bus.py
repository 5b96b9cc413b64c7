"""The event bus: publish events on topics, subscribe handlers to patterns.

`EventBus` is the facade an application uses. It owns the bus's state (new, running,
closing, closed), its agents and the hot path of `publish`; the rest belongs to the parts it
builds and hands to each other: the backend (where events travel: in process, or through a
broker), the subscriptions by name (`eventwire.registry`), the rest of publishing
(`eventwire.publishing`), request/reply (`eventwire.requests`), drain (`eventwire.drain`),
closing and background tasks (`eventwire.lifecycle`), the dead-letter publisher
(`eventwire.deadletter`) and the observers (`eventwire.observe`). Whatever the backend, the
bus runs the same code: the backend is the only part that differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from time import time_ns
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, Unpack, overload, runtime_checkable

import msgspec

from eventwire.backends import open_backend, resolve_url
from eventwire.backends.base import DLQ_CONSUMER, TOOLING_PREFIX, Backend, BusServices, Capabilities
from eventwire.context import current_event
from eventwire.deadletter import DLQ_PATTERN, DeadLetters
from eventwire.drain import Drainer, DrainTracker
from eventwire.envelope import DEFAULT_MAX_BYTES, encode
from eventwire.errors import BusClosedError, BusNotRunningError
from eventwire.event import (
    ATOMIC_TYPES,
    EMPTY_METADATA,
    Event,
    build,
    build_event,
    event_class,
    freeze_metadata,
    new_event,
    sequence,
)
from eventwire.lifecycle import BackgroundTasks, CloseReport, Shutdown, UnhandledEvent
from eventwire.observe import Observer
from eventwire.options import SubscriptionKeywords, SubscriptionOptions
from eventwire.publishing import Publisher, adopt, publish_from_thread, publisher_source
from eventwire.registry import SubscriptionRegistry
from eventwire.requests import REPLY_PREFIX, Requester, Requests
from eventwire.subscription import Handler, Subscription, SubscriptionStats
from eventwire.timers import Timers
from eventwire.topics import validate_pattern, validate_topic
from eventwire.waits import EventTimer

if TYPE_CHECKING:
    from eventwire.record import Recorder

__all__ = [
    "DLQ_CONSUMER",
    "DLQ_PATTERN",
    "REPLY_PREFIX",
    "TOOLING_PREFIX",
    "URL_ENVIRONMENT_VARIABLE",
    "CloseReport",
    "EventBus",
    "UnhandledEvent",
]

logger = logging.getLogger("eventwire")

H = TypeVar("H", bound=Callable[..., Any])
A = TypeVar("A", bound="Registrable")
Obs = TypeVar("Obs", bound=Observer)

_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"

# Read by EventBus() when no URL is given, so that one app runs unchanged on any backend.
URL_ENVIRONMENT_VARIABLE = "EVENTWIRE_URL"


@dataclass(frozen=True, slots=True)
class PlannedSubscription:
    """A subscription an agent asks its bus for (`Registrable.planned_subscriptions`)."""

    pattern: str
    handler: Handler
    options: SubscriptionOptions


@runtime_checkable
class Registrable(Protocol):
    """What `EventBus.register` takes: an `eventwire.Agent`."""

    name: str
    subscriptions: list[Subscription]

    def planned_subscriptions(self) -> list[PlannedSubscription]: ...

    def bind(self, bus: EventBus, subscriptions: list[Subscription]) -> None: ...

    async def on_start(self) -> None: ...

    async def on_stop(self) -> None: ...


class EventBus:
    """Publish events on topics; subscribe handlers to topic patterns.

    ``EventBus()`` is the in-process bus (``memory://``), unless the ``EVENTWIRE_URL``
    environment variable names another; ``EventBus("nats://...")`` runs the same code on a
    broker, and ``EventBus(backend=...)`` on a backend instance of your own. Use it as
    ``async with bus:``: that starts the workers, and on exit waits for queued work (up to
    `close_grace` seconds) and closes. `publish_timeout` bounds how long `publish` waits for
    room in a full inbox or for a broker's confirmation (None waits for ever).
    `redeliver_after` is how long a broker keeps an event leased to a process that stopped
    answering. `max_event_bytes` bounds an encoded event on a broker. `tracing=True` makes an
    OpenTelemetry span of every publish and handling attempt (`eventwire.tracing`; needs
    ``eventwire[otel]``); `lineage=True` stores a record of every handling attempt on the
    broker, for ``eventwire trace`` (`eventwire.lineage`).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        backend: Backend | None = None,
        publish_timeout: float | None = 30.0,
        close_grace: float = 10.0,
        redeliver_after: float = 30.0,
        max_event_bytes: int | None = DEFAULT_MAX_BYTES,
        tracing: bool = False,
        lineage: bool = False,
    ) -> None:
        if backend is None:
            if url is None:
                url = os.environ.get(URL_ENVIRONMENT_VARIABLE) or "memory://"
            self.url = resolve_url(url)
            backend = open_backend(self.url)
        elif url is not None:
            raise ValueError("EventBus() takes a url or a backend=, not both")
        elif not isinstance(backend, Backend):
            raise TypeError(
                f"backend= takes an eventwire Backend instance, got {type(backend).__name__}"
            )
        else:
            self.url = backend.url.redacted
        if not redeliver_after > 0:
            raise ValueError(f"redeliver_after must be > 0 seconds, got {redeliver_after!r}")
        if publish_timeout is not None and publish_timeout <= 0:
            raise ValueError(f"publish_timeout must be > 0 seconds or None, got {publish_timeout}")
        if close_grace < 0:
            raise ValueError(f"close_grace must be >= 0 seconds, got {close_grace}")
        self.redeliver_after = redeliver_after
        self.max_event_bytes = max_event_bytes
        self.publish_timeout = publish_timeout
        self.close_grace = close_grace

        self._state = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = asyncio.Event()
        self._close_report: CloseReport | None = None
        self._background = BackgroundTasks()
        # See `observe`. A list mutated in place: workers and backends keep a reference to it.
        self._observers: list[Observer] = []
        self._tracker = DrainTracker()
        self._requests = Requests(self.publish, self._background.track)
        self._dead_letters = DeadLetters(self.publish)
        self._backend = backend
        backend.bind(
            BusServices(
                tracker=self._tracker,
                dead_letters=self._dead_letters,
                observers=self._observers,
                publish_timeout=publish_timeout,
                redeliver_after=redeliver_after,
                max_event_bytes=max_event_bytes,
                track=self._background.track,
            )
        )
        # The backend's publish, bound once: the hot path of the library.
        self._send = backend.send
        self._timers = Timers(backend.journal, self.publish, self._background.track)
        self._registry = SubscriptionRegistry(
            backend,
            observers=self._observers,
            dead_letters=self._dead_letters,
            requests=self._requests,
            running_loop=self._running_loop,
            closing=self._closing_state,
            track=self._background.track,
            opening_changed=self._reconsider_indirect,
            timers=self._timers,
        )
        self._publisher = Publisher(
            backend, observers=self._observers, wait_opened=self._registry.wait_opened
        )
        self._requester = Requester(
            self._requests,
            subscribe=self.add_subscription,
            wait_opened=self._registry.wait_opened,
            receivers=backend.receivers,
            publish=self._publisher.indirect,
            where=self.safe_url if backend.capabilities.durable else None,
        )
        self._shutdown = Shutdown(
            backend,
            self._registry,
            self._tracker,
            self._requests,
            closed=self._closed_now,
            where=self.safe_url if backend.capabilities.durable else None,
        )
        self._drainer = Drainer(
            self._tracker,
            backend,
            wait_opened=self._registry.wait_opened,
            subscriptions=self._registry.by_name,
            where=self.safe_url,
        )
        self._subscriptions = self._registry.by_name  # the registry's own dict, read often
        self._agents: dict[str, Registrable] = {}
        # True when a publish does more than hand the event to the backend (observers, or
        # subscriptions opening): one test on the hot path instead of two.
        self._indirect = False
        if tracing:
            from eventwire.tracing import Tracing

            self.observe(Tracing())
        self.lineage = False
        if lineage:
            self.record_lineage()

    def __repr__(self) -> str:
        return f"<EventBus {self.safe_url} {self._state}, {len(self._subscriptions)} subscriptions>"

    @property
    def safe_url(self) -> str:
        """The bus URL with any password replaced by ``***``: safe to print and log."""
        return self._backend.url.redacted

    @property
    def capabilities(self) -> Capabilities:
        """What this bus's backend guarantees beyond the common contract (README table)."""
        return self._backend.capabilities

    @property
    def backend(self) -> Backend:
        """Where this bus's events travel (`eventwire.backends.memory.MemoryBackend` for the
        in-process bus)."""
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
        await self._backend.start()
        self._state = _RUNNING
        for subscription in list(self._subscriptions.values()):
            subscription.begin(self._loop)
        self._timers.start(self._loop)
        for agent in list(self._agents.values()):
            await agent.on_start()

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
            return self._closed_now(CloseReport())
        grace = self.close_grace if grace is None else grace
        # Agents say goodbye while they may still publish.
        for agent in list(self._agents.values()):
            try:
                await agent.on_stop()
            except Exception:
                logger.exception("eventwire: %s.on_stop() failed", agent.name)
        self._state = _CLOSING
        await self._timers.stop()
        return await self._shutdown.run(grace)

    def _closed_now(self, report: CloseReport) -> CloseReport:
        self._state = _CLOSED
        self._close_report = report
        self._closed.set()
        return report

    # -- subscribing --------------------------------------------------------------------

    @overload
    def subscribe(
        self, pattern: str, handler: None = None, **options: Unpack[SubscriptionKeywords]
    ) -> Callable[[H], H]: ...

    @overload
    def subscribe(
        self, pattern: str, handler: Handler, **options: Unpack[SubscriptionKeywords]
    ) -> Subscription: ...

    def subscribe(
        self,
        pattern: str,
        handler: Handler | None = None,
        **options: Unpack[SubscriptionKeywords],
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
        An event whose handling starts again after it came back unfinished (its process died,
        or lost the lease) more than `max_restarts` times (default 5; None: no limit) is a
        poison event: it is dead-lettered with `PoisonEventError` instead. Only these restarts
        count, recorded in the broker as they begin, so events that came back with it unstarted
        are not punished.
        There, `max_pending` bounds how many events this process holds at once; the rest of
        the backlog waits in the broker, and `overflow` does not apply.
        `partitions=N` keeps same-key events in order, one at a time, across all the processes
        running the subscription (a pool): keyed events are spread over N partitions, each
        consumed by one live process at a time, and moved when processes come and go
        (docs/backends.md, "Per-key order across processes"). Events without a key spread
        freely. SQLite keeps per-key order across processes without it; in one process
        (``memory://``) it changes nothing.
        `decoder` lets it take what other systems wrote on its topics besides eventwire's
        envelopes: ``"cloudevents"`` (structured or binary mode), ``"json"`` or ``"text"``
        bodies, a function of a `eventwire.foreign.ForeignMessage` returning an `Event`, or a
        list of these tried in turn (docs/interop.md). Without it, such messages are
        dead-lettered.

        `publishes` declares the topics the handler publishes (e.g.
        ``publishes=["research.complete"]``), for ``eventwire topology`` and ``asyncapi``;
        topics it is seen publishing at run time are added in `Subscription.published_topics`.

        `durable=True` makes each handling a run (`eventwire.runs.Run`): the handler is
        ``async def handler(event, run)``, and the results of its ``run.step(...)`` and
        ``run.effect(...)`` calls are kept in the backend's journal, so that when the event
        comes again (a crash, a retry) finished steps return their results without being
        called again (docs/durable.md). Needs a backend with a journal (RabbitMQ: one named
        by ``?journal=`` in its URL). `waits` declares the patterns its runs wait on
        (``run.wait_for``), so that their events are kept from the start.
        """
        validate_pattern(pattern)
        built = SubscriptionOptions.of(**options)
        if handler is None:

            def decorator(function: H) -> H:
                subscription = self.add_subscription(pattern, function, built)
                with contextlib.suppress(AttributeError, TypeError):
                    function.__eventwire_subscription__ = subscription  # type: ignore[attr-defined]
                return function

            return decorator
        return self.add_subscription(pattern, handler, built)

    def add_subscription(
        self,
        pattern: str,
        handler: Handler,
        options: SubscriptionOptions,
        *,
        source: str | None = None,
    ) -> Subscription:
        """`subscribe` with its options already built; `source` is what events its handler
        publishes say in `Event.source` (default: the subscription's name)."""
        planned = self._registry.plan([(pattern, handler, options, source)])
        for subscription in planned:  # with a durable one's companions (its waits)
            self._registry.install(subscription)
        return planned[0]

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop if self._state == _RUNNING else None

    def _closing_state(self) -> str | None:
        return self._state if self._state in (_CLOSING, _CLOSED) else None

    def _reconsider_indirect(self) -> None:
        self._indirect = bool(self._observers) or bool(self._registry.opening)

    @property
    def subscriptions(self) -> Mapping[str, Subscription]:
        """Active subscriptions by name (a live, read-only view)."""
        return MappingProxyType(self._subscriptions)

    def register(self, agent: A) -> A:
        """Subscribe every ``@on`` method of `agent`, as ``<agent name>.<method name>``."""
        if not isinstance(agent, Registrable):
            raise TypeError(f"register() takes an Agent, got {type(agent).__name__}")
        if agent.name in self._agents:
            raise ValueError(
                f"an agent named {agent.name!r} is already registered on this bus; "
                "give each agent a distinct name="
            )
        planned = self._registry.plan(
            [(p.pattern, p.handler, p.options, agent.name) for p in agent.planned_subscriptions()]
        )
        agent.bind(self, planned)
        for subscription in planned:
            self._registry.install(subscription)
        self._agents[agent.name] = agent
        if self._state == _RUNNING:
            assert self._loop is not None
            self._background.track(
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
            observer.attached(self._backend.transport)
            self._observers.append(observer)
            self._indirect = True
        return observer

    def unobserve(self, observer: Observer) -> None:
        """Stop calling `observer`. No error if it was not observing."""
        with contextlib.suppress(ValueError):
            self._observers.remove(observer)
        self._reconsider_indirect()

    @property
    def observers(self) -> tuple[Observer, ...]:
        """The observers registered with `observe`, in order."""
        return tuple(self._observers)

    def record_lineage(self) -> None:
        """Store a record of every handling attempt from now on, for ``eventwire trace``
        (what ``lineage=True`` does; `eventwire.lineage`). Idempotent."""
        if self.lineage:
            return
        from eventwire.lineage import LineageRecorder

        self.observe(LineageRecorder(self._publish_soon))
        self.lineage = True

    @property
    def owed(self) -> int:
        """Deliveries this process has taken and not finished (queued or being handled), as
        `drain()` counts them."""
        return self._tracker.pending

    @property
    def agents(self) -> Mapping[str, Registrable]:
        """Registered agents by name (a live, read-only view)."""
        return MappingProxyType(self._agents)

    def record(self, pattern: str = ">") -> Recorder:
        """A recorder of the events on topics matching `pattern` and of their handling, for
        tests: ``async with bus.record("research.>") as seen: ... await seen.wait_for(...)``.
        See `eventwire.record.Recorder` and docs/testing.md."""
        from eventwire.record import Recorder

        return Recorder(self, pattern)

    # -- publishing ---------------------------------------------------------------------

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
        source: str | None = None,
    ) -> Event[Any]:
        """Publish an `Event`, or build one from ``(topic, payload, metadata=, key=)``.

        Returns the published event once it is queued for every matching subscription
        (waiting for room where an inbox is full and its overflow policy is ``"block"``), or
        on a broker once the broker has stored it. Handlers never run inside this call.
        `source` names the publisher in `Event.source` (an agent does this for you; inside a
        handler it defaults to the handler's subscription).
        """
        parent = current_event.get()
        if self._state is not _RUNNING:
            self._check_accepting(parent)
        event: Event[Any]
        if type(topic_or_event) is str:
            if parent is None and source is None:
                # new_event() inlined: the root publish is the hottest path of the library.
                if type(payload) in ATOMIC_TYPES and not metadata:
                    event = build_event(
                        topic_or_event,
                        payload,
                        EMPTY_METADATA,
                        key,
                        None,
                        time_ns(),
                        next(sequence),
                    )
                else:
                    event = build(
                        event_class(payload, metadata),
                        topic_or_event,
                        payload,
                        freeze_metadata(metadata) if metadata else EMPTY_METADATA,
                        key,
                        None,
                        time_ns(),
                        next(sequence),
                    )
            else:
                source = publisher_source(topic_or_event, source)
                event = new_event(topic_or_event, payload, metadata, key, parent, source)
        else:
            event = adopt(topic_or_event, payload, metadata, key, parent, source)
        if self._indirect:
            await self._publisher.indirect(event, parent)
            return event
        sent = self._send(event, parent)
        if type(sent) is not int:
            await sent  # type: ignore[misc]
        return event

    async def schedule(
        self,
        topic_or_event: str | Event[Any],
        payload: Any = None,
        *,
        at: datetime | timedelta | float,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> Event[Any]:
        """Publish an event later, durably: `at` is a timezone-aware datetime, or a delay
        (a timedelta or seconds). The event is kept in the backend's journal and published
        by whichever bus on it runs a durable subscription or scheduled something, also
        after a restart (a time that passed while none ran fires at the next start). It is
        published at least once, with the id returned here; ``idempotent=True``
        subscribers handle it once. Needs a backend with a journal."""
        now = time.time()
        if isinstance(at, datetime):
            if at.tzinfo is None:
                raise ValueError("schedule(at=) takes a timezone-aware datetime, e.g. with tz=UTC")
            due = at.timestamp()
        elif isinstance(at, timedelta):
            due = now + at.total_seconds()
        elif isinstance(at, int | float) and not isinstance(at, bool):
            due = now + at
        else:
            raise TypeError(f"schedule(at=) takes a datetime, a timedelta or seconds, got {at!r}")
        parent = current_event.get()
        if self._state is not _RUNNING:
            self._check_accepting(parent)
        if type(topic_or_event) is str:
            validate_topic(topic_or_event)
            source = publisher_source(topic_or_event, None)
            event = new_event(topic_or_event, payload, metadata, key, parent, source)
        else:
            event = adopt(topic_or_event, payload, metadata, key, parent, None)
        envelope = encode(event, max_bytes=self.max_event_bytes)
        if due <= now:
            return await self.publish(event)
        self._timers.want()
        await self._timers.waits().add_timer(EventTimer(due, msgspec.Raw(envelope), event.id))
        return event

    def _publish_soon(self, event: Event[Any]) -> asyncio.Future[Any] | None:
        """Publish `event` without waiting (an observer's own records): it is queued at once,
        so that a drain() or close() that follows waits for it. Returns what to wait on."""
        if self._state not in (_RUNNING, _CLOSING):
            raise BusNotRunningError("the bus is not running")
        sent = self._send(event, None)
        if type(sent) is int:
            return None
        return asyncio.ensure_future(sent)  # type: ignore[arg-type]

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
        return await self._publisher.many(items, parent)

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
        return publish_from_thread(
            loop,
            functools.partial(self.publish, topic_or_event, payload, metadata=metadata, key=key),
            topic_or_event,
            timeout,
        )

    # -- waiting ------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every event published so far, and every event their handlers published
        in turn, has been handled or dead-lettered; on a broker, in every process. Raises
        `TimeoutError` after `timeout`, naming what is still owed."""
        if current_event.get() is not None:
            raise RuntimeError(
                "drain() was called from inside a handler and would wait for that handler "
                "itself; call it from the code that publishes"
            )
        await self._drainer.drain(timeout)

    async def request(
        self,
        topic: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
        timeout: float | None,
        source: str | None = None,
    ) -> Any:
        """Publish and return the first reply: the first non-None value a handler returns.

        Raises `TimeoutError` if no reply comes within `timeout` seconds, `HandlerError`
        (naming the handler, with its exception as `__cause__`) if the handlers failed,
        and `NoReplyError` if nothing matches the topic or every handler returned None.
        """
        parent = current_event.get()
        if self._state is not _RUNNING:
            self._check_accepting(parent)
        if parent is not None or source is not None:
            source = publisher_source(topic, source)
        validate_topic(topic)
        event = new_event(
            topic, payload, metadata, key, parent, source, reply_to=self._requests.reply_topic
        )
        return await self._requester.ask(event, parent, timeout)
