"""What `drain()` waits for: deliveries owed in this process, counted by epoch.

Every event queued in this process counts once per subscription it is queued for, in the
epoch that was current when it was published (a follow-up counts in its cause's epoch). A
worker that finishes an event releases it. `drain()` retires the current epoch and waits for
the owed ones to reach zero, so that events published while it waits do not keep it waiting
for ever.
"""

from __future__ import annotations

import asyncio


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
