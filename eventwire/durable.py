"""How a ``durable=True`` subscription runs its handler: each delivery is a run
(`eventwire.runs.Run`) that journals its steps, parks on its waits and is resumed later.

A run that waits parks: its handler returns (the event is acknowledged), its status says
waiting, and nothing of it stays in memory. It is resumed by a request on its subscription's
resume topic (`eventwire.timers.resume_topic`), published by whoever resolved one of its
waits: an arriving event (heard by a companion subscription on each pattern declared with
``waits=``) or a timer. The request goes to one process of the subscription, which loads
the run's event from the journal and runs the handler again from the top: recorded steps
replay, resolved waits return their outcome, and the run goes on or parks again.

One delivery runs a parked run at a time: the first to write ``claim:<parks>`` for the
run's current park takes it. A wait resolved while its run was still running (or parking) is
seen by the run's own check after it parked, since the outcome was written before the
request read the status; a request that finds the run running or claimed lets it be.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from eventwire.backends.journal import Journal
from eventwire.context import current_event
from eventwire.envelope import decode
from eventwire.event import Event
from eventwire.options import SubscriptionOptions
from eventwire.retry import Retry
from eventwire.runs import EVENT_KEY, Parking, Run, RunParked, run_id
from eventwire.timers import Timers, resume_topic
from eventwire.waits import RESOLVED

logger = logging.getLogger("eventwire")

Companion = tuple[str, Callable[[Event[Any]], Awaitable[Any]], SubscriptionOptions]
"""A subscription a durable one needs beside it: pattern, handler, options."""

_ENDED = ("finished", "cancelled")
_ARRIVAL_RETRY = Retry(attempts=8, backoff=0.2)


@dataclass(frozen=True, slots=True)
class RunCounts:
    """What a durable subscription's runs did in this process."""

    executions: int
    """Times a run's handler began (first tries, retries, resumes)."""
    steps_called: int
    """Steps, effects and model calls whose functions ran."""
    steps_replayed: int
    """Steps, effects, model calls and waits taken from the journal instead."""
    parked: int
    """Times a run parked on a wait or sleep."""
    resumed: int
    """Times a parked run was resumed by a resolved wait or a timer."""


class DurableRunner:
    """The runs of one durable subscription."""

    def __init__(
        self,
        subscription: str,
        handler: Callable[[Event[Any], Run], Awaitable[Any]],
        options: SubscriptionOptions,
        *,
        journal: Journal,
        timers: Timers,
        convert: Callable[[Event[Any]], Event[Any]],
    ) -> None:
        self.subscription = subscription
        self._handler = handler
        self._options = options
        self._journal = journal
        self._timers = timers
        self._convert = convert
        self._parking = Parking(
            timers.waits(), subscription, frozenset(options.waits), timers.publish
        )
        self.runs = 0
        """Executions of runs in this process (first ones, replays and resumes)."""
        self.parked = 0
        """Executions that parked on a wait."""
        self.resumed = 0
        """Executions started by a resolved wait."""
        self.calls = 0
        """Steps and effects whose functions were called."""
        self.replays = 0
        """Steps, effects and waits taken from the journal."""

    def companions(self) -> list[Companion]:
        """The resume subscription, and one per declared wait pattern."""
        options = self._options
        resume = SubscriptionOptions(
            name=f"{self.subscription}:resume",
            concurrency=options.concurrency,
            retry=options.retry,
            max_restarts=options.max_restarts,
        )
        found: list[Companion] = [(resume_topic(self.subscription), self.resume, resume)]
        for pattern in options.waits:
            self._parking.waits.keep_arrivals(self.subscription, pattern)
            # An event on a waited pattern must not be dropped for a passing journal error.
            arrivals = SubscriptionOptions(
                name=f"{self.subscription}:waits:{pattern}",
                retry=_ARRIVAL_RETRY,
                max_restarts=options.max_restarts,
            )
            found.append((pattern, self._arrivals(pattern), arrivals))
        return found

    async def handle(self, event: Event[Any]) -> Any:
        """A delivery of the subscription's event: run it (or replay it)."""
        return await self._execute(event, f"event:{event.id}", resumed=False)

    async def resume(self, request: Event[Any]) -> Any:
        """A request to resume a parked run (its payload: ``{"run": <id>}``)."""
        payload = request.payload
        run = payload.get("run") if isinstance(payload, dict) else None
        if not isinstance(run, str):
            logger.warning("eventwire: %s: a resume request without a run: %r", self, payload)
            return None
        records = await self._journal.read(run)
        kept = records.get(EVENT_KEY)
        if kept is None:
            logger.warning("eventwire: %s: run %r has no event to resume with", self, run)
            return None
        event = self._convert(decode(kept))
        token = current_event.set(event)  # what the run publishes is caused by its event
        try:
            return await self._execute(event, f"resume:{request.id}", resumed=True)
        finally:
            current_event.reset(token)

    def _arrivals(self, pattern: str) -> Callable[[Event[Any]], Awaitable[None]]:
        waits = self._parking.waits
        timers = self._timers

        async def arrived(event: Event[Any]) -> None:
            await waits.arrived(self.subscription, pattern, event, timers.request_resumes)

        return arrived

    async def _execute(self, event: Event[Any], driver: str, *, resumed: bool) -> Any:
        while True:
            run = Run(run_id(self.subscription, event), event, self._journal, self._parking)
            await run.load()
            state = run.state
            if state in _ENDED:
                return None  # delivered again after it ended: nothing is done twice
            if run.cancelled:
                await run.mark("cancelled")
                return None
            if state == "waiting":
                if not await run.claim(driver):
                    return None  # another delivery resumes it
            elif resumed and run.driver != driver:
                return None  # running under another delivery, which sees what resolved
            await run.mark("running", driver=driver)
            self.runs += 1
            self.resumed += resumed
            try:
                result = await self._handler(event, run)
            except RunParked:
                self._count(run)
                self.parked += 1
                await run.keep_event()
                await run.mark("waiting")
                if await self._resolved_meanwhile(run):
                    resumed = True
                    continue
                return None
            except Exception as exc:
                self._count(run)
                await run.mark("failed", exc)
                raise
            self._count(run)
            await run.mark("finished")
            return result

    def counts(self) -> RunCounts:
        return RunCounts(self.runs, self.calls, self.replays, self.parked, self.resumed)

    def _count(self, run: Run) -> None:
        self.calls += run.calls
        self.replays += run.replays

    async def _resolved_meanwhile(self, run: Run) -> bool:
        """Whether a wait the run just parked on was resolved while it ran."""
        records = await self._journal.read(run.id)
        return any(RESOLVED + wait in records for wait in run.parked)

    def __repr__(self) -> str:
        return f"<DurableRunner {self.subscription!r}>"
