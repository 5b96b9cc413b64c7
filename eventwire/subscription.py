"""A subscription: one handler, its own bounded inbox and its own workers.

Each subscription is isolated: its inbox, workers, retries and failures never delay another
subscription. Workers drain whatever their inbox holds in a tight loop, and only park on a
future when it is empty. Where the events come from is the backend's business: the
in-process backend appends to the inbox as events are published, a broker backend fills it
from its durable consumer and, through the subscription's `lease`, hears of every event
finished (to acknowledge it) or given up without a stored dead letter (to deliver it again).
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
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from eventwire.backends.journal import Journal
from eventwire.context import current_event
from eventwire.deadletter import DeadLetters
from eventwire.durable import DurableRunner, RunCounts
from eventwire.errors import InboxFullError, PayloadValidationError, PoisonEventError
from eventwire.event import Event
from eventwire.foreign import decoder_of
from eventwire.inbox import Inbox, Overflow
from eventwire.metrics import LatencyHistogram, Percentiles
from eventwire.observe import Observer, Outcome, handling_record, notify, notify_finished
from eventwire.options import Start, SubscriptionOptions
from eventwire.payloads import PayloadConverter
from eventwire.requests import Requests
from eventwire.timers import Timers

logger = logging.getLogger("eventwire")

Handler = Callable[[Event[Any]], Any]

# The subscription whose worker this task is (set once per worker, not per event).
current_subscription: ContextVar[Subscription | None] = ContextVar(
    "eventwire_subscription", default=None
)

# A worker hands control back to the event loop after this many events in a row, so that one
# busy subscription whose handlers never suspend cannot starve the others.
_YIELD_EVERY = 256

# While handlers take less than this, only a sample of events is timed (see `_RunTimer`).
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
    runs: RunCounts | None = None
    """A durable subscription's run counters (steps called and replayed, parks, resumes)."""

    @property
    def mean_handling_seconds(self) -> float:
        """Mean wall time spent per finished event (handled or dead-lettered), retries and
        backoff included; 0.0 before any."""
        finished = self.handled + self.dead_lettered
        return self.handling_seconds / finished if finished else 0.0


class Lease(Protocol):
    """What a broker backend hears of the events it fed into a subscription."""

    def settled(self, event: Event[Any], finished: bool) -> None:
        """`event` was handled or dead-lettered (`finished`), or its dead letter could not
        be stored (it must be delivered again later)."""
        ...

    async def record_handled(self, event: Event[Any]) -> None:
        """Idempotent subscriptions: `event` was handled; remember it at once."""
        ...

    def holds(self, event: Event[Any]) -> bool | None:
        """Whether this process still holds `event` (asked before handling it): False when
        its lease may have run out meanwhile (the process was stopped), and the broker may
        have given it to another process; it must not be handled here then. None: held, but
        it came back from an earlier delivery, whose handling may have killed its process
        (see `restarts`)."""
        ...

    async def settled_now(self, event: Event[Any], finished: bool) -> None:
        """`settled`, for an event whose `restarts` were counted: its acknowledgement is
        sent before this returns."""
        ...

    async def restarts(self, event: Event[Any]) -> int:
        """Record in the broker that handling of `event`, which came back, starts again now;
        the number of such restarts recorded for it, this one included (forgotten once it is
        acknowledged). 0 if they cannot be recorded now (the broker is unreachable)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionServices:
    """What a subscription uses of its bus, handed to it when it is built."""

    observers: list[Observer]
    """The bus's observers (the live list: observers added later are seen)."""
    dead_letters: DeadLetters
    requests: Requests
    unsubscribe: Callable[[Subscription, bool, bool], Awaitable[None]]
    """Takes the subscription off the bus: (subscription, drain, forget)."""
    journal: Callable[[], Journal]
    """The backend's run journal, for ``durable=True`` handlers (`eventwire.runs`)."""
    timers: Timers
    """The bus's durable waits and timers (`eventwire.timers`)."""


class _HandlerTimeout(TimeoutError):
    pass


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


class Subscription:
    """A handler subscribed to a topic pattern. Created by `EventBus.subscribe`."""

    # Slots keep the fields publish touches close together: with thousands of subscriptions
    # the cost of a publish is mostly memory traffic.
    __slots__ = (
        "_active",
        "_converter",
        "_executor",
        "_handling_seconds",
        "_histogram",
        "_in_flight",
        "_invoke",
        "_services",
        "_stopping",
        "_unfolded",
        "_unfolded_seconds",
        "_worker_cancel_told",
        "_workers",
        "concurrency",
        "dead_lettered",
        "decoder",
        "dropped",
        "failed",
        "group",
        "handled",
        "handler",
        "idempotent",
        "inbox",
        "lease",
        "max_pending",
        "name",
        "opening",
        "options",
        "overflow",
        "partitions",
        "pattern",
        "published_topics",
        "publishes",
        "retried",
        "retry",
        "runner",
        "source",
        "start",
        "timeout",
    )

    def __init__(
        self,
        pattern: str,
        handler: Handler,
        options: SubscriptionOptions,
        *,
        name: str,
        source: str,
        converter: PayloadConverter | None,
        services: SubscriptionServices,
    ) -> None:
        self.pattern = pattern
        self.handler = handler
        self.options = options
        self.name = name
        self.group = options.group
        self.concurrency = options.concurrency
        self.retry = options.retry
        self.timeout = options.timeout
        self.max_pending = options.max_pending
        self.overflow: Overflow = options.overflow
        # Where a new durable subscription begins, and whether redeliveries of events it
        # already handled are skipped (broker backends; see EventBus.subscribe).
        self.start: Start = options.start
        self.idempotent = options.idempotent
        # Keyed events spread over this many partitions, each handled by one process at a
        # time: per-key order across processes on brokers (None: not partitioned).
        self.partitions = options.partitions
        # Reads what other producers wrote on its topics (`eventwire.foreign`); None:
        # envelopes only.
        self.decoder = decoder_of(options.decoder)
        # What `Event.source` says for events this subscription's handler publishes.
        self.source = source
        self._converter = converter
        self._services = services
        # Topics the handler publishes: declared (`publishes=`), and seen at run time.
        self.publishes = options.publishes
        self.published_topics: set[str] = set()
        # A durable subscription's runs (`eventwire.durable`); None for a plain one.
        self.runner = self._durable(handler) if options.durable else None
        self._invoke = self._make_invoker(handler if self.runner is None else self.runner.handle)
        # Set by a broker backend: hears of every event finished (see `Lease`).
        self.lease: Lease | None = None
        # Set by a broker backend while it creates the durable consumer in the background.
        self.opening: asyncio.Task[None] | None = None

        self.inbox = Inbox(self, options.max_pending, options.overflow)
        self._workers: list[asyncio.Task[None]] = []
        self._worker_cancel_told = False
        self._in_flight: list[Event[Any] | None] = [None] * options.concurrency
        self._active = True
        self._stopping = False
        self._executor: ThreadPoolExecutor | None = None

        self.handled = 0
        self.failed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.dropped = 0
        self._handling_seconds = 0.0
        self._histogram = LatencyHistogram()
        # Fast events of short runs, folded into the histogram in batches (see `_RunTimer`).
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
    def workers(self) -> tuple[asyncio.Task[None], ...]:
        """The worker tasks, while started."""
        return tuple(self._workers)

    @property
    def stats(self) -> SubscriptionStats:
        """Counters: handled, failed attempts, retries, dead letters, drops, depth."""
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
            queued=self.inbox.queued,
            handling_seconds=self._handling_seconds,
            handling=self.histogram.percentiles(),
            runs=None if self.runner is None else self.runner.counts(),
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
        if self.opening is not None:
            await asyncio.shield(self.opening)

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
        self._active = False
        self.inbox.refuse_waiting()
        await self._services.unsubscribe(self, drain, forget)

    def in_own_handler(self) -> bool:
        """True when called from one of this subscription's handlers."""
        return current_subscription.get() is self

    async def finish(self) -> None:
        """Unsubscribed: let the workers handle what is queued, then stop; returns when they
        have (at once when called from this subscription's own handler)."""
        self._stopping = True
        self.inbox.wake_all()
        if self._workers and not self.in_own_handler():
            await asyncio.gather(*self._workers, return_exceptions=True)

    async def stopped(self) -> None:
        """Return when every worker has ended."""
        await asyncio.gather(*self._workers, return_exceptions=True)

    def release(self, event: Event[Any]) -> None:
        """`event` is no longer owed by this process (given back to its broker)."""
        epoch = event.drain_epoch
        if epoch is not None:
            epoch.release()

    def _durable(self, handler: Callable[..., Any]) -> DurableRunner:
        """The runner of `handler(event, run)`, which journals each event's run."""
        if not _is_async_callable(handler):
            raise TypeError(
                f"durable=True needs an async handler (async def ...(event, run)): "
                f"{self.name!r} is a plain function"
            )
        return DurableRunner(
            self.name,
            handler,
            self.options,
            journal=self._services.journal(),  # a backend without one refuses here, at once
            timers=self._services.timers,
            convert=self._convert_resumed,
        )

    def _convert_resumed(self, event: Event[Any]) -> Event[Any]:
        """A parked run's event, read back from the journal, as the handler takes it."""
        if self._converter is None:
            return event
        return event.with_payload(self._converter(event.payload))

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

    def begin(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the workers (the bus does, when it starts or when subscribed while running)."""
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
        for task in self._workers:
            task.add_done_callback(self._worker_ended)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """A worker ends only when its subscription stops: one that ended otherwise would
        leave its events unhandled without a word, so it is reported."""
        if self._stopping:
            return
        left = sum(not worker.done() for worker in self._workers)
        state = (
            f"{left} of its {self.concurrency} workers go on, with {len(self.inbox)} queued "
            "event(s)"
        )
        if task.cancelled():
            # Once per subscription: a loop stopped with the bus open cancels every worker.
            if self._worker_cancel_told:
                return
            self._worker_cancel_told = True
            logger.warning(
                "eventwire: a worker of %s was cancelled while the subscription ran (was the "
                "event loop stopped before the bus was closed?); %s",
                self.name,
                state,
            )
            return
        error = task.exception()
        if not isinstance(error, Exception):
            return  # KeyboardInterrupt, SystemExit: the process is on its way out
        logger.error(
            "eventwire: a worker of %s stopped on an error, a bug in eventwire; %s",
            self.name,
            state,
            exc_info=error,
        )

    async def _work(self, index: int) -> None:  # noqa: C901, PLR0912, PLR0915
        # One loop on purpose: it runs once per event, and a call per event costs the in-process
        # bus measurable throughput. What is not per event lives in methods: taking a key
        # (`_hold_key`), timing (`_RunTimer`), failures (`_failed`).
        current_subscription.set(self)
        inbox = self.inbox
        in_flight = self._in_flight
        # With concurrency > 1, the worker that takes a key first handles every later event
        # of that key, from `chain`, before it takes anything else: per-key order holds.
        keys = inbox.parked if self.concurrency > 1 else None
        invoke = self._invoke
        converter = self._converter
        lease = self.lease
        observers = self._services.observers
        requests = self._services.requests
        set_current = current_event.set
        create_future = asyncio.get_running_loop().create_future
        timer = _RunTimer(self)
        chain: deque[Event[Any]] | None = None
        held_key: str | None = None
        streak = 0
        check_at = timer.begin()
        while True:
            if chain:
                event = chain.popleft()
                inbox.capacity += 1
                if inbox.putters:
                    inbox.admit_waiting()
            else:
                if held_key is not None:
                    assert keys is not None
                    del keys[held_key]
                    chain = held_key = None
                    if inbox.putters:
                        inbox.admit_waiting()
                if not inbox:
                    in_flight[index] = None
                    timer.end(streak)
                    # Nothing queued: park until an event comes (inline: with many quiet
                    # subscriptions, a worker parks every few events).
                    if self._stopping:
                        self._fold()
                        return
                    waiter = create_future()
                    inbox.park(waiter)
                    await waiter
                    streak = 0
                    check_at = timer.begin()
                    continue
                event = inbox.popleft()
                if inbox.putters:
                    inbox.admit_waiting()
                if keys is not None and event.key is not None:
                    chain = self._hold_key(event, keys)
                    if chain is None:
                        continue  # parked behind the worker that holds its key
                    held_key = event.key

            restarted = False
            if lease is not None:
                held = lease.holds(event)
                if not held:
                    if held is False:
                        # Its lease ran out while it waited (the process was stopped): another
                        # process may be handling it now. The broker delivers it again.
                        self.release(event)
                        continue
                    if await self._poisonous(event, lease):
                        continue
                    restarted = self.options.max_restarts is not None
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
                if lease is not None and self.idempotent:
                    await lease.record_handled(event)
                if event.reply_to is not None:
                    requests.reply(self, event, result, None)
            finished = True
            if failure is not None:
                # Retried outside the `except` block, so that a retry does not run with the
                # first error as its exception context.
                finished = await self._failed(event, failure)
                failure = None
            if lease is not None:
                if restarted:
                    await lease.settled_now(event, finished)
                else:
                    lease.settled(event, finished)
            epoch = event.drain_epoch  # set when queued
            epoch.pending -= 1  # type: ignore[union-attr]
            if not epoch.pending and epoch.waiters:  # type: ignore[union-attr]
                epoch.settle()  # type: ignore[union-attr]

            streak += 1
            if streak >= check_at:
                check_at = timer.checkpoint(streak)
                if not check_at:
                    # A long run: let the other tasks of the loop have a turn.
                    in_flight[index] = None
                    streak = 0
                    await asyncio.sleep(0)
                    check_at = timer.begin()

    def _hold_key(
        self, event: Event[Any], keys: dict[str, deque[Event[Any]]]
    ) -> deque[Event[Any]] | None:
        """Take `event`'s key for this worker: the chain where later events of the key will
        wait for it; None when another worker holds the key (`event` then waits behind it,
        in order, holding room in the inbox)."""
        key = event.key
        assert key is not None
        busy = keys.get(key)
        if busy is not None:
            busy.append(event)
            self.inbox.capacity -= 1
            return None
        chain: deque[Event[Any]] = deque()
        keys[key] = chain
        return chain

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
        observers = tuple(self._services.observers)
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
        payload = self._converter(event.payload)
        if payload is event.payload:
            return event
        typed = event.with_payload(payload)
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
                event.topic,
                attempt,
                retry.attempts,
                type(error).__name__,
                error,
            )
            await asyncio.sleep(retry.delay(attempt))
            attempt += 1
            try:
                if self._services.observers:
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
            if self.lease is not None and self.idempotent:
                await self.lease.record_handled(event)
            if event.reply_to is not None:
                self._services.requests.reply(self, event, result, None)
            return True
        return await self._dead_letter(event, error, attempt)

    async def _dead_letter(self, event: Event[Any], error: BaseException, attempts: int) -> bool:
        """Give up on `event`: its dead letter, and the failure as the reply to a request;
        False if the dead letter could not be stored."""
        self.dead_lettered += 1
        stored = await self._services.dead_letters.dead_letter(self, event, error, attempts)
        if event.reply_to is not None:
            self._services.requests.reply(self, event, None, error)
        return stored

    async def _poisonous(self, event: Event[Any], lease: Lease) -> bool:
        """Whether `event`, which came back unfinished, was dead-lettered (and settled) as a
        poison event rather than handled once more (see `max_restarts`)."""
        limit = self.options.max_restarts
        if limit is None:
            return False
        starts = await lease.restarts(event)
        if starts <= limit:
            return False
        self.failed += 1
        error = PoisonEventError(self.name, event, starts, limit)
        # Acknowledged at once: its letter is stored, and a crash before a batched ack
        # would store it again when the event comes back.
        await lease.settled_now(event, await self._dead_letter(event, error, starts))
        epoch = event.drain_epoch  # set when queued
        assert epoch is not None
        epoch.pending -= 1
        if not epoch.pending and epoch.waiters:
            epoch.settle()
        return True

    # -- dropping and stopping -----------------------------------------------------------

    def drop(self, event: Event[Any]) -> int:
        """Discard `event` unhandled (a full inbox, or unsubscribed with ``drain=False``),
        counted; returns how many were dropped so far."""
        self.dropped += 1
        observers = self._services.observers
        if observers:
            notify(observers, "dropped", self, event)
        if event.reply_to is not None:
            self._services.requests.reply(
                self,
                event,
                None,
                InboxFullError(
                    f"subscription {self.name!r} dropped the request without handling it",
                    subscription=self.name,
                    event=event,
                ),
            )
        self.release(event)
        return self.dropped

    def stop_now(self) -> list[tuple[Event[Any], str]]:
        """Cancel the workers; return what they had not handled, with where it was."""
        left: list[tuple[Event[Any], str]] = [
            (event, "in_flight") for event in self._in_flight if event is not None
        ]
        left.extend((event, "queued") for event in self.inbox.close())
        self._stopping = True
        for task in self._workers:
            task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        return left


class _RunTimer:
    """Times one worker's runs of events for the subscription's histogram.

    Time is read at the edges of a run of events (the worker only suspends inside handlers,
    so the run's wall time is their handling time), and around single events only where that
    is cheap. A clock read costs a tenth of a fast handler, so while handlers are fast (under
    20 µs) one event in 16 of a run is timed, to notice when they turn slow, and all are
    recorded at the mean of a batch of 64 or more (which reading `histogram` or `stats` adds
    to its copy); while handlers are slower, every event is timed and recorded on its own.
    Per event, the worker pays nothing but the ``streak >= check_at`` test that yielding
    needs anyway.
    """

    __slots__ = (
        "fast_sample",
        "run_started",
        "slow",
        "slow_sample",
        "started",
        "subscription",
        "timed_count",
        "timed_seconds",
        "timing",
    )

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.slow = True
        self.timing = True
        self.run_started = self.started = 0.0
        self.timed_count = 0
        self.timed_seconds = 0.0
        # The latest timed event under and over the fast threshold: what untimed events of a
        # run most likely took.
        self.fast_sample = 0.0
        self.slow_sample = 0.0

    def begin(self) -> int:
        """A run starts; returns after how many events to call `checkpoint`."""
        self.run_started = self.started = time.perf_counter()
        self.timing = self.slow
        self.timed_count = 0
        self.timed_seconds = 0.0
        return 1 if self.slow else _SAMPLE_EVERY - 1

    def checkpoint(self, streak: int) -> int:
        """`streak` events of the run are done; returns when to check next, or 0 when the
        run is long enough that the worker should yield (it was recorded)."""
        now = time.perf_counter()
        subscription = self.subscription
        if self.timing:  # the event just done was timed
            elapsed = now - self.started
            self.slow = elapsed > _FAST_HANDLER
            if self.slow:
                subscription._histogram.record(elapsed)
                self.timed_count += 1
                self.timed_seconds += elapsed
                self.slow_sample = elapsed
            else:
                # Counted with the run's untimed events: one record per sample would cost
                # more than the sampling saves.
                self.fast_sample = elapsed
        if streak >= _YIELD_EVERY:
            run_seconds = now - self.run_started
            subscription._handling_seconds += run_seconds
            untimed = streak - self.timed_count
            if untimed:
                subscription._record_untimed(
                    untimed, run_seconds - self.timed_seconds, self.fast_sample, self.slow_sample
                )
            return 0
        if self.timing and not self.slow:
            self.timing = False
            return streak + _SAMPLE_EVERY - 1
        # Time the next event, from now.
        self.timing = True
        self.started = now
        return streak + 1

    def end(self, streak: int) -> None:
        """The inbox is empty after `streak` events: record the run."""
        subscription = self.subscription
        run_seconds = time.perf_counter() - self.run_started
        subscription._handling_seconds += run_seconds
        if streak <= self.timed_count:
            return
        untimed = streak - self.timed_count
        run_seconds -= self.timed_seconds
        if run_seconds > _FAST_HANDLER * untimed:
            subscription._record_untimed(untimed, run_seconds, self.fast_sample, self.slow_sample)
            self.slow = True
        else:
            # Folded in by the batch: a record per run would cost more than the run's
            # handlers when runs are short.
            subscription._unfolded += untimed
            subscription._unfolded_seconds += run_seconds
            if subscription._unfolded >= _FOLD_EVERY:
                subscription._fold()
