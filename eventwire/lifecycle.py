"""Around a bus's life: the background tasks it keeps alive, and how `close()` ends it (let
queued work finish within the grace period, stop every part, report what was abandoned)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from eventwire.backends.base import Backend
from eventwire.drain import DrainTracker
from eventwire.errors import BusClosedError
from eventwire.event import Event
from eventwire.registry import SubscriptionRegistry
from eventwire.requests import Requests

logger = logging.getLogger("eventwire")


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


class BackgroundTasks:
    """The tasks a bus started and awaits nowhere (replies, agents' `on_start`...)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task alive until done, and log it if it fails."""
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("eventwire: %s failed", task.get_name(), exc_info=task.exception())


class Shutdown:
    """How `close()` ends a running bus: it lets this process's queued and in-flight work
    finish within the grace period, then stops every subscription, the backend and the
    requests still waiting, and reports (and logs) every event it had to abandon."""

    def __init__(
        self,
        backend: Backend,
        registry: SubscriptionRegistry,
        tracker: DrainTracker,
        requests: Requests,
        *,
        closed: Callable[[CloseReport], object],
        where: str | None,
    ) -> None:
        self._backend = backend
        self._registry = registry
        self._tracker = tracker
        self._requests = requests
        # Told the report once everything is stopped (also when close() is cancelled).
        self._closed = closed
        # Where abandoned events go back to for redelivery, for the log (None: nowhere).
        self._where = where

    async def run(self, grace: float) -> CloseReport:
        """Wait up to `grace` seconds for the work owed here, then stop everything."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(grace):
                await self._backend.stop_fetching()  # a broker's: finish what this process holds
                await self._tracker.wait_all()
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
                "" if self._where is None else f"; returned to {self._where} for redelivery",
                ", ".join(f"{u.subscription}<-{u.event.topic} ({u.state})" for u in unhandled[:10])
                + (" ..." if len(unhandled) > 10 else ""),
            )
        return report

    async def _stop_all(self) -> CloseReport:
        unhandled: list[UnhandledEvent] = []
        workers: list[asyncio.Task[None]] = []
        for subscription in self._registry.all_for_closing():
            for event, state in subscription.stop_now():
                unhandled.append(UnhandledEvent(subscription.name, event, state))  # type: ignore[arg-type]
            workers.extend(subscription.workers)
        if workers:
            # Bounded: a handler that swallows its cancellation must not hang close().
            _, stubborn = await asyncio.wait(workers, timeout=1.0)
            for task in stubborn:
                logger.error("eventwire: %s ignored cancellation at close", task.get_name())
        for task in list(self._registry.opening):
            task.cancel()
        try:
            await self._backend.stop()
        finally:
            self._requests.close()
            self._tracker.abandon(
                BusClosedError(f"the bus closed with {len(unhandled)} event(s) unhandled")
                if unhandled
                else None  # a drain() still waiting learns the work was abandoned
            )
        report = CloseReport(tuple(unhandled))
        self._closed(report)
        return report
