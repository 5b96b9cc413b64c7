"""The bus's clock for durable runs: a task that fires the timers filed in the backend's
journal (`eventwire.waits`): the deadlines of waits, the ends of sleeps, events scheduled
with `EventBus.schedule`, and the expiry of finished streams' chunks.

Every running bus with a durable subscription (or that scheduled an event) polls, so timers
that fell due while every process was down fire at the next start, within one `tick`.
Several processes may fire the same timer: a wait is resolved once (first write wins), and a
scheduled event is published at least once, with its id, so an ``idempotent=True``
subscriber handles it once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from eventwire.backends.journal import Journal
from eventwire.envelope import decode
from eventwire.event import Event
from eventwire.streams import chunks_id, seq_key
from eventwire.topics import safe_name
from eventwire.waits import EventTimer, ExpiryTimer, Resumption, Timer, Waits

logger = logging.getLogger("eventwire")

RESUME_PREFIX = "_run.resume."
"""Resume requests of a durable subscription's parked runs go to ``_run.resume.<name>``."""

TICK = 0.5
"""Seconds between two looks at the timers."""

_STOP_WAIT = 5.0
_LONGEST_PAUSE = 30.0  # between tries while the journal fails

Publish = Callable[..., Awaitable[Event[Any]]]


def resume_topic(subscription: str) -> str:
    """The topic on which parked runs of `subscription` are asked to resume."""
    return RESUME_PREFIX + safe_name(subscription, limit=120)


class Timers:
    """The bus's `Waits` (on its backend's journal, opened when first needed) and the task
    that fires due timers while the bus runs and something wants them."""

    def __init__(
        self,
        journal: Callable[[], Journal],
        publish: Publish,
        track: Callable[[asyncio.Task[Any]], None],
        *,
        tick: float = TICK,
    ) -> None:
        self._journal = journal
        self._publish = publish
        self._track = track
        self._tick = tick
        self._waits: Waits | None = None
        self._wanted = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.fired = 0
        """Timers this process fired."""

    @property
    def publish(self) -> Publish:
        """The bus's publish."""
        return self._publish

    def waits(self) -> Waits:
        """The index of waits and timers in the backend's journal (raises if it has none)."""
        if self._waits is None:
            self._waits = Waits(self._journal())
        return self._waits

    async def request_resumes(self, resumptions: list[Resumption]) -> None:
        """Ask for each of these runs to be resumed (by its subscription, in any process)."""
        for resumption in resumptions:
            await self._publish(resume_topic(resumption.subscription), {"run": resumption.run})

    def want(self) -> None:
        """Something on this bus needs timers fired (a durable subscription, a schedule)."""
        self._wanted = True
        self._launch()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """The bus runs: poll from now on, if wanted."""
        self._loop = loop
        self._launch()

    async def stop(self) -> None:
        """Stop polling (the bus is closing); a timer being fired is fired again later."""
        self._loop = None
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            task.cancel()
            # Bounded: a broker client may swallow a cancellation (the loop then sees
            # `_stopping` at its next turn).
            await asyncio.wait([task], timeout=_STOP_WAIT)

    def _launch(self) -> None:
        if self._wanted and self._loop is not None and self._task is None:
            self._task = self._loop.create_task(self._poll(), name="eventwire:timers")
            self._track(self._task)

    async def _poll(self) -> None:
        waits = self.waits()
        pause = self._tick
        while not self._stopping:
            try:
                for slot, entry, timer in await waits.due_timers(time.time()):
                    if self._stopping:
                        return
                    await self._fire(waits, timer)
                    await waits.fired(slot, [entry])
                    self.fired += 1
                await waits.prune(time.time())
            except Exception as exc:
                if self._stopping:
                    return
                logger.warning("eventwire: firing timers failed (will retry): %s", exc)
                pause = min(pause * 2, _LONGEST_PAUSE)
            else:
                pause = self._tick
            await asyncio.sleep(pause)

    async def _fire(self, waits: Waits, timer: Timer) -> None:
        if isinstance(timer, EventTimer):
            await self._publish(decode(bytes(timer.envelope)))
            return
        if isinstance(timer, ExpiryTimer):
            keys = [seq_key(seq) for seq in range(timer.chunks)]
            await waits.journal.forget(chunks_id(timer.stream), keys)
            return
        _, won = await waits.time_out(timer.run, timer.wait)
        if won:
            await self.request_resumes([Resumption(timer.subscription, timer.run)])
