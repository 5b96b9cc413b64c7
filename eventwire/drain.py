"""What `drain()` waits for: deliveries owed in this process, counted by epoch.

Every event queued in this process counts once per subscription it is queued for, in the
epoch that was current when it was published (a follow-up counts in its cause's epoch). A
worker that finishes an event releases it. `drain()` retires the current epoch and waits for
the owed ones to reach zero, so that events published while it waits do not keep it waiting
for ever. `Drainer` is `drain()` itself: those epochs first, then what the backend still owes
in other processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol


class Epoch:
    """Deliveries owed for events published between two `drain()` calls, and their causes."""

    __slots__ = ("pending", "retired", "waiters")

    def __init__(self) -> None:
        self.pending = 0
        # Set once drain() has seen it settle: later publishes must not count against it.
        self.retired = False
        self.waiters: list[asyncio.Future[None]] = []

    def release(self, deliveries: int = 1) -> None:
        """`deliveries` were handled, dead-lettered, dropped or given back."""
        self.pending -= deliveries
        if not self.pending and self.waiters:
            self.settle()

    def settle(self, error: BaseException | None = None) -> None:
        """Wake every waiter: with `error` when the work was abandoned (the bus closed)."""
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


class DrainTracker:
    """The epochs of one bus: the current one, and older ones still owed work."""

    __slots__ = ("current", "epochs")

    def __init__(self) -> None:
        self.current = Epoch()
        self.epochs: list[Epoch] = [self.current]

    def epoch_for(self, cause: Epoch | None) -> Epoch:
        """Where a new delivery counts: with its cause's epoch while that is not retired."""
        if cause is not None and not cause.retired:
            return cause
        return self.current

    @property
    def pending(self) -> int:
        """Deliveries owed in this process, in every epoch."""
        return sum(epoch.pending for epoch in self.epochs)

    def rotate(self) -> list[Epoch]:
        """Start a new epoch; return the older ones still owed work (what drain waits for)."""
        owed = [epoch for epoch in self.epochs if epoch.pending]
        for epoch in self.epochs:
            if not epoch.pending:
                epoch.retired = True
        self.current = Epoch()
        self.epochs = [*owed, self.current]
        return owed

    async def wait_all(self) -> None:
        """Wait until every epoch that exists now is settled."""
        for epoch in list(self.epochs):
            await epoch.wait()

    def abandon(self, error: BaseException | None) -> None:
        """The bus closed: nothing is owed any more; waiters learn of `error` if any."""
        for epoch in self.epochs:
            epoch.pending = 0
            epoch.settle(error)


class DrainBackend(Protocol):
    """What `Drainer` asks of the backend (a `Backend` is one)."""

    async def flush(self) -> None: ...

    async def outstanding(self) -> list[str]: ...


class QueueCounts(Protocol):
    """What `Drainer` reads of a subscription's stats, to say what is still owed."""

    @property
    def queued(self) -> int: ...

    @property
    def in_flight(self) -> int: ...


class Counted(Protocol):
    """A subscription, as `Drainer` sees it."""

    @property
    def stats(self) -> QueueCounts: ...


class Drainer:
    """`drain()`: waits for the epochs owed in this process, then for what the backend still
    owes elsewhere (other processes' subscriptions), and says what is left on a timeout."""

    def __init__(
        self,
        tracker: DrainTracker,
        backend: DrainBackend,
        *,
        wait_opened: Callable[[], Awaitable[None]],
        subscriptions: Mapping[str, Counted],
        where: str,
    ) -> None:
        self._tracker = tracker
        self._backend = backend
        # Subscriptions still being opened must exist before drain() can trust the backend.
        self._wait_opened = wait_opened
        self._subscriptions = subscriptions
        self._where = where

    async def drain(self, timeout: float | None) -> None:
        """Wait until everything published so far is handled or dead-lettered, in every
        process; `TimeoutError` after `timeout`, naming what is still owed."""
        owed = self._tracker.rotate()
        elsewhere: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                for epoch in owed:
                    await epoch.wait()
                pause = 0.002
                while True:
                    await self._wait_opened()
                    await self._backend.flush()  # what is being sent counts
                    elsewhere = await self._backend.outstanding()
                    if not elsewhere:
                        return
                    # Other processes' progress has no event to wait on: poll, backing off.
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.05)
        except TimeoutError:
            counts = {name: sub.stats for name, sub in self._subscriptions.items()}
            here = [
                f"{name} ({s.queued} queued, {s.in_flight} in flight here)"
                for name, s in counts.items()
                if s.queued or s.in_flight
            ]
            owed_here = sum(epoch.pending for epoch in owed)
            raise TimeoutError(
                f"drain() timed out after {timeout}s with "
                + (f"{owed_here} deliveries still owed: " if owed_here else "events still owed: ")
                + (", ".join([*here, *(f"{e} on {self._where}" for e in elsewhere)]))
                + ("" if here or elsewhere else "none queued")
            ) from None
