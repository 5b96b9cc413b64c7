"""A subscription: one handler, its own bounded inbox and its own workers.

Each subscription is isolated: its inbox, workers, retries and failures never delay another
subscription. Workers drain whatever their inbox holds in a tight loop, and only park on a
future when it is empty.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from eventwire.backends.base import Start
from eventwire.context import current_event, current_subscription
from eventwire.errors import (
    BusClosedError,
    InboxFullError,
    PayloadValidationError,
    PublishTimeoutError,
)
from eventwire.event import Event
from eventwire.metrics import LatencyHistogram, Percentiles
from eventwire.observe import Outcome, handling_record, notify, notify_finished
from eventwire.payloads import PayloadConverter
from eventwire.retry import NO_RETRY, Retry

if TYPE_CHECKING:
    from eventwire.bus import EventBus
    from eventwire.durable import Feeder

logger = logging.getLogger("eventwire")

Overflow = Literal["block", "drop_oldest", "error"]
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_oldest", "error")
Handler = Callable[[Event[Any]], Any]

DEFAULT_MAX_PENDING = 10_000

# A worker hands control back to the event loop after this many events in a row, so that one
# busy subscription whose handlers never suspend cannot starve the others.
_YIELD_EVERY = 256

# While handlers take less than this, only a sample of events is timed (see `_work`).
_FAST_HANDLER = 2e-5
# Of fast events back to back, one in this many is timed, to notice handlers turning slow.
_SAMPLE_EVERY = 16
# Fast events of short runs are recorded at their mean once this many have gathered.
_FOLD_EVERY = 64


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """A snapshot of one subscription's counters."""

    name: str
    pattern: str
    group: str | None
    handled: int
    failed: int
    retried: int
    dead_lettered: int
    dropped: int
    in_flight: int
    queued: int
    handling_seconds: float
    handling: Percentiles
    """Percentiles of the time each finished event took (retries and backoff included)."""

    @property
    def mean_handling_seconds(self) -> float:
        """Mean wall time spent per finished event (handled or dead-lettered), retries and
        backoff included; 0.0 before any."""
        finished = self.handled + self.dead_lettered
        return self.handling_seconds / finished if finished else 0.0


class _HandlerTimeout(TimeoutError):
    pass


class _Unsubscribed(Exception):
    """Tells a blocked publisher that the subscription it waited for is gone."""


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _is_async_callable(handler: Callable[..., Any]) -> bool:
    target: Any = handler
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(target, "__call__", None)  # noqa: B004
    return call is not None and inspect.iscoroutinefunction(call)


class Inbox(deque[Event[Any]]):
    """A subscription's queue of events. It also carries what a publish checks (room left,
    parked workers), so that queueing an event touches one object."""

    __slots__ = ("capacity", "idle", "subscription")

    def __init__(self, subscription: Subscription, capacity: int) -> None:
        super().__init__()
        self.subscription = subscription
        # Room for queued events; lowered while events wait behind a busy key.
        self.capacity = capacity
        # Parked workers' wake-up futures; None (not an empty list) when no worker is parked.
        self.idle: list[asyncio.Future[None]] | None = None

    def wake_one(self) -> None:
        idle = self.idle
        while idle:
            waiter = idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                break
        if not idle:
            self.idle = None


class Subscription:
    """A handler subscribed to a topic pattern. Created by `EventBus.subscribe`."""

    # Slots keep the fields publish touches close together: with thousands of subscriptions
    # the cost of a publish is mostly memory traffic.
    __slots__ = (
        "_active",
        "_converter",
        "_executor",
        "_feeder",
        "_forget",
        "_handling_seconds",
        "_histogram",
        "_in_flight",
        "_inbox",
        "_invoke",
        "_keys",
        "_opening",
        "_putters",
        "_self_blocked",
        "_stopping",
        "_unfolded",
        "_unfolded_seconds",
        "_workers",
        "bus",
        "concurrency",
        "dead_lettered",
        "dropped",
        "failed",
        "group",
        "handled",
        "handler",
        "idempotent",
        "max_pending",
        "name",
        "overflow",
        "pattern",
        "published_topics",
        "publishes",
        "retried",
        "retry",
        "source",
        "start",
        "timeout",
    )

    def __init__(
        self,
        bus: EventBus,
        pattern: str,
        handler: Handler,
        *,
        name: str,
        group: str | None,
        concurrency: int,
        retry: Retry | None,
        timeout: float | None,
        max_pending: int,
        overflow: Overflow,
        source: str,
        converter: PayloadConverter | None,
        start: Start = "latest",
        idempotent: bool = False,
        publishes: tuple[str, ...] = (),
    ) -> None:
        self.bus = bus
        self.pattern = pattern
        self.handler = handler
        self.name = name
        self.group = group
        self.concurrency = concurrency
        self.retry = retry or NO_RETRY
        self.timeout = timeout
        self.max_pending = max_pending
        self.overflow: Overflow = overflow
        # What `Event.source` says for events this subscription's handler publishes.
        self.source = source
        self._converter = converter
        # Topics the handler publishes: declared (`publishes=`), and seen at run time.
        self.publishes = publishes
        self.published_topics: set[str] = set()
        self._invoke = self._make_invoker(handler)
        # Where a new durable subscription begins, and whether redeliveries of events it
        # already handled are skipped (broker backends; see EventBus.subscribe).
        self.start: Start = start
        self.idempotent = idempotent
        # Set on broker backends: fills the inbox from the broker, acknowledges what is done.
        self._feeder: Feeder | None = None
        self._forget = False
        # Broker backends: creating the durable consumer, when subscribed on a running bus.
        self._opening: asyncio.Task[None] | None = None

        self._inbox = Inbox(self, max_pending)
        # Publishers waiting for room, oldest first. Invariant: while any wait, the inbox is
        # full, so the publish fast path need not look at this deque.
        self._putters: deque[tuple[asyncio.Future[None], Event[Any]]] = deque()
        self._workers: list[asyncio.Task[None]] = []
        self._in_flight: list[Event[Any] | None] = [None] * concurrency
        self._keys: dict[str, deque[Event[Any]]] = {}
        self._active = True
        self._stopping = False
        self._executor: ThreadPoolExecutor | None = None
        # Workers of this subscription blocked publishing into its own full inbox.
        self._self_blocked = 0

        self.handled = 0
        self.failed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.dropped = 0
        self._handling_seconds = 0.0
        self._histogram = LatencyHistogram()
        # Fast events of short runs, folded into the histogram in batches (see `_work`).
        self._unfolded = 0
        self._unfolded_seconds = 0.0

    def __repr__(self) -> str:
        group = f", group={self.group!r}" if self.group else ""
        return f"<Subscription {self.name!r} on {self.pattern!r}{group}>"

    @property
    def active(self) -> bool:
        """False once unsubscribed."""
        return self._active

    @property
    def stats(self) -> SubscriptionStats:
        """Counters: handled, failed attempts, retries, dead letters, drops, depth."""
        queued = len(self._inbox) + (self.max_pending - self._inbox.capacity) + len(self._putters)
        return SubscriptionStats(
            name=self.name,
            pattern=self.pattern,
            group=self.group,
            handled=self.handled,
            failed=self.failed,
            retried=self.retried,
            dead_lettered=self.dead_lettered,
            dropped=self.dropped,
            in_flight=sum(1 for e in self._in_flight if e is not None),
            queued=queued,
            handling_seconds=self._handling_seconds,
            handling=self.histogram.percentiles(),
        )

    @property
    def histogram(self) -> LatencyHistogram:
        """Every finished event's handling time, as of now: a copy, safe to read from any
        thread (for exporters such as Prometheus)."""
        # Fast events still waiting to be folded in are added to the copy, never to the
        # histogram itself: the reader may be on another thread than the workers.
        snapshot = self._histogram.copy()
        waiting, seconds = self._unfolded, self._unfolded_seconds
        if waiting:
            snapshot.record(seconds / waiting, waiting)
        return snapshot

    async def ready(self) -> None:
        """Return once the subscription receives events. On a broker backend, subscribing
        while the bus runs creates its durable consumer in the background (later publishes of
        this bus wait for it by themselves); await this before another process publishes
        events it must see. Raises what creating it raised (e.g. a pattern conflict)."""
        if self._opening is not None:
            await asyncio.shield(self._opening)

    async def unsubscribe(self, *, drain: bool = True, forget: bool = False) -> None:
        """Stop receiving new events. With `drain` (the default) events already queued are
        still handled and this waits for them (unless called from this subscription's own
        handler); with ``drain=False`` they are discarded and counted as dropped.

        On a broker backend the durable subscription stays on the broker, keeping the events
        published for it until it runs again (here or in another process), and those held
        here but not handled go back to it. ``forget=True`` removes it from the broker, with
        its backlog, for every process.
        """
        if not self._active:
            return
        self._forget = forget
        self._active = False
        self.bus._remove_subscription(self)
        # Publishers blocked on this inbox: their event is no longer owed to it.
        for waiter, _ in self._putters:
            if not waiter.done():
                waiter.set_exception(_Unsubscribed())
        self._putters.clear()
        feeder = self._feeder
        if feeder is not None:
            await feeder.stop_fetching()
        if not drain and feeder is not None:
            # Not lost: the feeder gives them back to the broker when it closes.
            for event in self._take_queued():
                self._settle_locally(event)
        elif not drain:
            while self._inbox:
                self._discard(self._inbox.popleft())
            for chain in self._keys.values():
                while chain:
                    self._discard(chain.popleft())
                    self._inbox.capacity += 1
        self._stopping = True
        self._wake_all()
        if current_subscription.get() is self or not self._workers:
            if feeder is not None:
                self.bus._track(asyncio.get_running_loop().create_task(self._close_feeder()))
            return
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._close_feeder()

    async def _close_feeder(self) -> None:
        if self._feeder is not None:
            if current_subscription.get() is self:
                await asyncio.gather(*self._workers, return_exceptions=True)
            await self._feeder.close(forget=self._forget)

    def _take_queued(self) -> list[Event[Any]]:
        """Remove and return every queued (not in-flight) event."""
        taken = list(self._inbox)
        self._inbox.clear()
        for chain in self._keys.values():
            taken.extend(chain)
            self._inbox.capacity += len(chain)
            chain.clear()
        return taken

    def _settle_locally(self, event: Event[Any]) -> None:
        epoch = event._epoch
        if epoch is not None:
            epoch.pending -= 1
            if not epoch.pending and epoch.waiters:
                epoch.settle()

    # -- handler invocation -------------------------------------------------------------

    def _make_invoker(self, handler: Handler) -> Callable[[Event[Any]], Awaitable[Any]]:
        timeout = self.timeout
        name = self.name
        if _is_async_callable(handler):
            if timeout is None:
                return handler

            async def invoke_with_timeout(event: Event[Any]) -> Any:
                try:
                    async with asyncio.timeout(timeout) as scope:
                        return await handler(event)
                except TimeoutError:
                    if scope.expired():
                        raise _HandlerTimeout(
                            f"handler {name!r} did not finish within timeout={timeout}s"
                        ) from None
                    raise

            return invoke_with_timeout

        async def invoke_in_thread(event: Event[Any]) -> Any:
            # Plain functions run in the bus's thread pool, in a copy of this context so that
            # publish_threadsafe() inside them still knows which event caused what.
            context = contextvars.copy_context()
            future = asyncio.get_running_loop().run_in_executor(
                self._thread_pool(), context.run, handler, event
            )
            if timeout is None:
                result = await future
            else:
                try:
                    async with asyncio.timeout(timeout) as scope:
                        result = await future
                except TimeoutError:
                    if scope.expired():
                        raise _HandlerTimeout(
                            f"handler {name!r} did not finish within timeout={timeout}s "
                            "(its thread keeps running: plain functions cannot be interrupted)"
                        ) from None
                    raise
            if inspect.isawaitable(result):
                result = await result
            return result

        return invoke_in_thread

    def _thread_pool(self) -> ThreadPoolExecutor:
        # Its own threads, as many as its concurrency: a stuck plain-function handler cannot
        # starve another subscription, and a call abandoned by `timeout=` keeps its thread, so
        # the next call waits for it instead of overlapping it.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix=f"eventwire-{self.name}"
            )
        return self._executor

    # -- workers ------------------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._workers or not self._active:
            return
        self._stopping = False
        context = contextvars.Context()
        self._workers = [
            loop.create_task(
                self._work(index), name=f"eventwire:{self.name}#{index}", context=context.copy()
            )
            for index in range(self.concurrency)
        ]

    def _wake_all(self) -> None:
        idle, self._inbox.idle = self._inbox.idle or [], None
        for waiter in idle:
            if not waiter.done():
                waiter.set_result(None)

    def _admit_waiting(self) -> None:
        """Room was made: move the longest-waiting blocked publisher's event in."""
        while self._putters and len(self._inbox) < self._inbox.capacity:
            waiter, event = self._putters.popleft()
            if waiter.done():  # its publisher gave up (timeout or cancellation)
                continue
            self._inbox.append(event)
            waiter.set_result(None)
            if self._inbox.idle:
                self._inbox.wake_one()

    async def _work(self, index: int) -> None:
        current_subscription.set(self)
        inbox = self._inbox
        in_flight = self._in_flight
        keys = self._keys if self.concurrency > 1 else None
        invoke = self._invoke
        converter = self._converter
        feeder = self._feeder
        set_current = current_event.set
        clock = time.perf_counter
        record_time = self._histogram.record
        observers = self.bus._observers
        loop = asyncio.get_running_loop()
        # With concurrency > 1, the worker that takes a key first handles every later event
        # of that key, from `chain`, before it takes anything else: per-key order holds.
        chain: deque[Event[Any]] | None = None
        held_key: str | None = None
        streak = 0
        # Time is read at the edges of a run of events (the worker only suspends inside
        # handlers, so the run's wall time is their handling time), and around single events
        # only where that is cheap. A clock read costs a tenth of a fast handler, so while
        # handlers are fast (under 20 µs) one event in 16 of a run is timed, to notice when
        # they turn slow, and all are recorded at the mean of a batch of 64 or more (which
        # reading `histogram` or `stats` adds to its copy); while handlers are slower, every
        # event is timed and recorded on its own. Per event, the fast path adds nothing but the
        # `streak >= check_at` test that yielding needs anyway.
        run_started = started = clock()
        slow = timing = True
        check_at = 1
        timed_count = 0
        timed_seconds = 0.0
        # The latest timed event under and over the fast threshold: what untimed events of a
        # run most likely took.
        fast_sample = 0.0
        slow_sample = 0.0
        while True:
            if chain:
                event = chain.popleft()
                self._inbox.capacity += 1
                if self._putters:
                    self._admit_waiting()
            else:
                if held_key is not None:
                    assert keys is not None
                    del keys[held_key]
                    chain = held_key = None
                    if self._putters:
                        self._admit_waiting()
                if not inbox:
                    in_flight[index] = None
                    run_seconds = clock() - run_started
                    self._handling_seconds += run_seconds
                    if streak > timed_count:
                        untimed = streak - timed_count
                        run_seconds -= timed_seconds
                        if run_seconds > _FAST_HANDLER * untimed:
                            self._record_untimed(untimed, run_seconds, fast_sample, slow_sample)
                            slow = True
                        else:
                            # Folded in by the batch: a record per run would cost more than
                            # the run's handlers when runs are short.
                            self._unfolded += untimed
                            self._unfolded_seconds += run_seconds
                            if self._unfolded >= _FOLD_EVERY:
                                self._fold()
                    if self._stopping:
                        self._fold()
                        return
                    streak = timed_count = 0
                    timed_seconds = 0.0
                    waiter: asyncio.Future[None] = loop.create_future()
                    if inbox.idle is None:
                        inbox.idle = [waiter]
                    else:
                        inbox.idle.append(waiter)
                    await waiter
                    run_started = started = clock()
                    timing = slow
                    check_at = 1 if slow else _SAMPLE_EVERY - 1
                    continue
                event = inbox.popleft()
                if self._putters:
                    self._admit_waiting()
                if keys is not None and event._key is not None:
                    busy = keys.get(event._key)
                    if busy is not None:
                        # Another worker holds this key: wait behind it, in order.
                        busy.append(event)
                        self._inbox.capacity -= 1
                        continue
                    held_key = event._key
                    keys[held_key] = chain = deque()

            # Left set after handling: a worker only suspends inside a handler or when idle
            # (where this is cleared), so whoever looks at it sees the event in hand.
            in_flight[index] = event
            set_current(event)
            try:
                if observers:
                    result = await self._observed(event, 1)
                elif converter is None:
                    result = await invoke(event)
                else:
                    result = await invoke(self._convert(event))
            except Exception as error:
                failure: BaseException | None = error
            except asyncio.CancelledError as error:
                if _being_cancelled():
                    raise
                failure = error  # something the handler awaited was cancelled: a failure
            else:
                failure = None
                self.handled += 1
                if feeder is not None and self.idempotent:
                    await feeder.record_handled(event)
                if event._reply_to is not None:
                    self.bus._reply(self, event, result, None)
            finished = True
            if failure is not None:
                # Retried outside the `except` block, so that a retry does not run with the
                # first error as its exception context.
                finished = await self._failed(event, failure)
                failure = None
            if feeder is not None:
                feeder.settled(event, finished)
            epoch = event._epoch  # set when queued
            epoch.pending -= 1  # type: ignore[union-attr]
            if not epoch.pending and epoch.waiters:  # type: ignore[union-attr]
                epoch.settle()  # type: ignore[union-attr]

            streak += 1
            if streak >= check_at:
                now = clock()
                if timing:  # the event just done was timed
                    elapsed = now - started
                    slow = elapsed > _FAST_HANDLER
                    if slow:
                        record_time(elapsed)
                        timed_count += 1
                        timed_seconds += elapsed
                        slow_sample = elapsed
                    else:
                        # Counted with the run's untimed events: one record per sample would
                        # cost more than the sampling saves.
                        fast_sample = elapsed
                if streak >= _YIELD_EVERY:
                    in_flight[index] = None
                    run_seconds = now - run_started
                    self._handling_seconds += run_seconds
                    untimed = streak - timed_count
                    if untimed:
                        self._record_untimed(
                            untimed, run_seconds - timed_seconds, fast_sample, slow_sample
                        )
                    streak = timed_count = 0
                    timed_seconds = 0.0
                    await asyncio.sleep(0)
                    run_started = started = clock()
                    timing = slow
                    check_at = 1 if slow else _SAMPLE_EVERY - 1
                elif timing and not slow:
                    timing = False
                    check_at = streak + _SAMPLE_EVERY - 1
                else:
                    # Time the next event, from now.
                    timing = True
                    started = now
                    check_at = streak + 1

    def _fold(self) -> None:
        """Record the fast events of short runs not recorded yet, at their mean."""
        if self._unfolded:
            self._histogram.record(self._unfolded_seconds / self._unfolded, self._unfolded)
            self._unfolded = 0
            self._unfolded_seconds = 0.0

    def _record_untimed(
        self, untimed: int, seconds: float, fast_sample: float, slow_sample: float
    ) -> None:
        """Record `untimed` events of a run that took `seconds` together. Time beyond what
        fast events take (`fast_sample`) went to slow ones: as many as it takes events like
        the last slow one timed (`slow_sample`), or one if none was, so the tail and the
        maximum stay close to right."""
        excess = seconds - fast_sample * untimed
        if excess <= _FAST_HANDLER or untimed == 1:
            self._histogram.record(seconds / untimed, untimed)
            return
        slow = round(excess / slow_sample) if slow_sample else 1
        slow = min(max(slow, 1), untimed)
        if untimed > slow:
            self._histogram.record(fast_sample, untimed - slow)
        self._histogram.record(excess / slow + fast_sample, slow)

    async def _observed(self, event: Event[Any], attempt: int) -> Any:
        """One handling attempt, reported to the bus's observers."""
        observers = tuple(self.bus._observers)
        tokens = notify(observers, "attempt_started", self, event, attempt)
        started = time.perf_counter()
        try:
            if self._converter is None:
                result = await self._invoke(event)
            else:
                result = await self._invoke(self._convert(event))
        except BaseException as error:
            seconds = time.perf_counter() - started
            outcome: Outcome
            if isinstance(error, asyncio.CancelledError) and _being_cancelled():
                outcome, tried = "cancelled", attempt
            elif isinstance(error, PayloadValidationError):
                outcome, tried = "dead_lettered", 0
            elif self.retry.should_retry(error, attempt):
                outcome, tried = "retrying", attempt
            else:
                outcome, tried = "dead_lettered", attempt
            record = handling_record(self, event, tried, outcome, seconds, error)
            notify_finished(observers, "attempt_finished", tokens, self, event, record, error)
            raise
        record = handling_record(
            self, event, attempt, "handled", time.perf_counter() - started, None
        )
        notify_finished(observers, "attempt_finished", tokens, self, event, record, None)
        return result

    def _convert(self, event: Event[Any]) -> Event[Any]:
        assert self._converter is not None
        payload = self._converter(event._payload)
        if payload is event._payload:
            return event
        typed = event._copy(payload)
        current_event.set(typed)
        return typed

    async def _failed(self, event: Event[Any], error: BaseException) -> bool:
        """Retry, then dead-letter; False if the dead letter could not be stored."""
        attempt = 1
        retry = self.retry
        while True:
            self.failed += 1
            if isinstance(error, PayloadValidationError):
                attempt = 0  # the handler never ran: retrying cannot help
                break
            if not retry.should_retry(error, attempt):
                break
            self.retried += 1
            logger.info(
                "eventwire: %s failed on %s (attempt %d/%d): %s: %s; retrying",
                self.name,
                event._topic,
                attempt,
                retry.attempts,
                type(error).__name__,
                error,
            )
            await asyncio.sleep(retry.delay(attempt))
            attempt += 1
            try:
                if self.bus._observers:
                    result = await self._observed(event, attempt)
                elif self._converter is None:
                    result = await self._invoke(event)
                else:
                    result = await self._invoke(self._convert(event))
            except Exception as again:
                error = again
                continue
            except asyncio.CancelledError as again:
                if _being_cancelled():
                    raise
                error = again
                continue
            self.handled += 1
            if self._feeder is not None and self.idempotent:
                await self._feeder.record_handled(event)
            if event._reply_to is not None:
                self.bus._reply(self, event, result, None)
            return True
        self.dead_lettered += 1
        stored = await self.bus._dead_letter(self, event, error, attempt)
        if event._reply_to is not None:
            self.bus._reply(self, event, None, error)
        return stored

    # -- overflow and shutdown ----------------------------------------------------------

    def _discard(self, event: Event[Any]) -> None:
        self.dropped += 1
        if self.bus._observers:
            notify(self.bus._observers, "dropped", self, event)
        if event._reply_to is not None:
            self.bus._reply(
                self,
                event,
                None,
                InboxFullError(
                    f"subscription {self.name!r} dropped the request without handling it",
                    subscription=self.name,
                    event=event,
                ),
            )
        epoch = event._epoch
        if epoch is not None:
            epoch.pending -= 1
            if not epoch.pending and epoch.waiters:
                epoch.settle()

    def _drop_oldest_for(self, event: Event[Any]) -> None:
        if self._inbox:
            oldest = self._inbox.popleft()
        else:
            # All the room is taken by events waiting behind busy keys: drop the oldest.
            chain = min((c for c in self._keys.values() if c), key=lambda c: c[0]._seq)
            oldest = chain.popleft()
            self._inbox.capacity += 1
        self._discard(oldest)
        if self.dropped == 1 or self.dropped % 1000 == 0:
            logger.warning(
                "eventwire: inbox of %s is full (max_pending=%d): dropped its oldest event "
                "(%d dropped so far; raise max_pending or use overflow='block')",
                self.name,
                self.max_pending,
                self.dropped,
            )
        self._inbox.append(event)
        if self._inbox.idle:
            self._inbox.wake_one()

    def _full_error(self, event: Event[Any], why: str) -> InboxFullError:
        return InboxFullError(
            f"inbox of subscription {self.name!r} is full ({self.max_pending} events waiting): "
            f"{why}",
            subscription=self.name,
            event=event,
        )

    async def _put_waiting(
        self, event: Event[Any], timeout: float | None, waiter: asyncio.Future[None]
    ) -> None:
        """Wait for room (overflow='block'), first come first served. `waiter` is resolved
        once the event is let into the inbox."""
        own = current_subscription.get() is self
        if own and self._self_blocked + 1 >= self.concurrency:
            raise self._full_error(
                event,
                "its own handler is publishing to it, and with every worker waiting for room "
                "it would deadlock; raise max_pending, or use overflow='drop_oldest' or 'error'",
            )
        self._putters.append((waiter, event))
        self._self_blocked += own
        try:
            if timeout is None:
                await waiter
            else:
                async with asyncio.timeout(timeout):
                    await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                return  # admitted just as the timeout fired: the event is queued
            raise PublishTimeoutError(
                f"publish to {event._topic!r} waited {timeout}s for room in the full inbox of "
                f"subscription {self.name!r} (max_pending={self.max_pending}); that subscriber "
                "is slow or stuck. Raise publish_timeout or max_pending, or choose "
                "overflow='drop_oldest' or 'error' for it"
            ) from None
        finally:
            self._self_blocked -= own
            if not waiter.done():
                waiter.cancel()

    def _stop_now(self) -> list[tuple[Event[Any], str]]:
        """Cancel the workers; return what they had not handled, with where it was."""
        left: list[tuple[Event[Any], str]] = []
        for event in self._in_flight:
            if event is not None:
                left.append((event, "in_flight"))
        for parked in self._keys.values():
            left.extend((event, "queued") for event in parked)
        left.extend((event, "queued") for event in self._inbox)
        for waiter, event in self._putters:
            if not waiter.done():
                left.append((event, "queued"))
        self._inbox.clear()
        self._keys.clear()
        self._inbox.idle = None  # the parked workers are cancelled below, their futures with them
        self._stopping = True
        for task in self._workers:
            task.cancel()
        for waiter, event in self._putters:
            if not waiter.done():
                waiter.set_exception(
                    BusClosedError(
                        f"the bus closed while publish to {event._topic!r} waited for room "
                        f"in the inbox of {self.name!r}"
                    )
                )
        self._putters.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        return left
