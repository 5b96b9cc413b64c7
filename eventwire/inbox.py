"""A subscription's inbox: its bounded queue of events, and what a publish does when it is
full (the overflow policy), in one object.

The fast path is a plain `deque` append, which the in-process backend inlines: room left
(``len(inbox) < inbox.capacity``), append, wake a parked worker if there is one. `put` is the
rest: waiting for room (``"block"``), dropping the oldest queued event (``"drop_oldest"``) or
refusing (``"error"``). Events parked behind a busy key (`parked`) hold room in the inbox
too, so that a subscription's memory stays bounded by `max_pending` whatever its keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Literal, Protocol

from eventwire.errors import BusClosedError, InboxFullError, PublishTimeoutError
from eventwire.event import Event

logger = logging.getLogger("eventwire")

Overflow = Literal["block", "drop_oldest", "error"]
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_oldest", "error")


class InboxOwner(Protocol):
    """The subscription an inbox belongs to, as the inbox sees it."""

    @property
    def name(self) -> str: ...

    @property
    def group(self) -> str | None: ...

    @property
    def active(self) -> bool: ...

    @property
    def concurrency(self) -> int: ...

    def drop(self, event: Event[Any]) -> int:
        """Discard `event` (counted); the number dropped so far."""
        ...


class Unsubscribed(Exception):
    """Tells a blocked publisher that the subscription it waited for is gone."""


class Inbox(deque[Event[Any]]):
    """A subscription's queue of events. It also carries what a publish checks (room left,
    parked workers), so that queueing an event touches one object."""

    __slots__ = (
        "capacity",
        "idle",
        "max_pending",
        "overflow",
        "parked",
        "putters",
        "self_blocked",
        "subscription",
    )

    def __init__(self, subscription: InboxOwner, max_pending: int, overflow: Overflow) -> None:
        super().__init__()
        self.subscription = subscription
        self.max_pending = max_pending
        self.overflow: Overflow = overflow
        # Room for queued events; lowered while events wait behind a busy key (`parked`).
        self.capacity = max_pending
        # Parked workers' wake-up futures; None (not an empty list) when no worker is parked.
        self.idle: list[asyncio.Future[None]] | None = None
        # key -> events waiting for the worker that holds the key (concurrency > 1).
        self.parked: dict[str, deque[Event[Any]]] = {}
        # Publishers waiting for room, oldest first. Invariant: while any wait, the inbox is
        # full, so the publish fast path need not look at this deque.
        self.putters: deque[tuple[asyncio.Future[None], Event[Any]]] = deque()
        # Workers of this subscription blocked publishing into their own full inbox.
        self.self_blocked = 0

    @property
    def queued(self) -> int:
        """Events waiting: queued, parked behind a busy key, or held by a blocked publisher."""
        return len(self) + (self.max_pending - self.capacity) + len(self.putters)

    # -- workers ------------------------------------------------------------------------

    def wake_one(self) -> None:
        idle = self.idle
        while idle:
            waiter = idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                break
        if not idle:
            self.idle = None

    def wake_all(self) -> None:
        idle, self.idle = self.idle or [], None
        for waiter in idle:
            if not waiter.done():
                waiter.set_result(None)

    def park(self, waiter: asyncio.Future[None]) -> None:
        """A worker found nothing to do: `waiter` is resolved when an event comes."""
        if self.idle is None:
            self.idle = [waiter]
        else:
            self.idle.append(waiter)

    def admit_waiting(self) -> None:
        """Room was made: move the longest-waiting blocked publishers' events in."""
        putters = self.putters
        while putters and len(self) < self.capacity:
            waiter, event = putters.popleft()
            if waiter.done():  # its publisher gave up (timeout or cancellation)
                continue
            self.append(event)
            waiter.set_result(None)
            if self.idle:
                self.wake_one()

    # -- publishing into a full inbox ---------------------------------------------------

    async def put(
        self,
        event: Event[Any],
        timeout: float | None,
        waiter: asyncio.Future[None],
        *,
        own: bool = False,
    ) -> InboxFullError | None:
        """Queue `event` as the overflow policy says, the inbox being full (or publishers
        waiting). `waiter` is resolved once the event is let in after a wait, so a caller
        cancelled just then can tell; `own` says the publisher is a handler of this inbox's
        subscription (waiting could deadlock). Returns the refusal under policy ``"error"`` (the
        event is not queued here), else None once queued. Raises `InboxFullError` for a wait
        that would deadlock, `PublishTimeoutError`, or `Unsubscribed`."""
        if not self.subscription.active:
            raise Unsubscribed
        if len(self) < self.capacity and not self.putters:
            self.append(event)
            if self.idle is not None:
                self.wake_one()
        elif (
            self.overflow == "drop_oldest"
            and not self.putters
            and (self or self.parked)  # room may be held by parked events
        ):
            self._drop_oldest_for(event)
        elif self.overflow == "error":
            return self.full_error(
                event,
                "its overflow policy is 'error' (the event was still queued for every other "
                "matching subscription)",
            )
        else:
            await self._wait_for_room(event, timeout, waiter, own)
        return None

    def _drop_oldest_for(self, event: Event[Any]) -> None:
        if self:
            oldest = self.popleft()
        else:
            # All the room is taken by events waiting behind busy keys: drop the oldest.
            chain = min((c for c in self.parked.values() if c), key=lambda c: c[0].sequence)
            oldest = chain.popleft()
            self.capacity += 1
        dropped = self.subscription.drop(oldest)
        if dropped == 1 or dropped % 1000 == 0:
            logger.warning(
                "eventwire: inbox of %s is full (max_pending=%d): dropped its oldest event "
                "(%d dropped so far; raise max_pending or use overflow='block')",
                self.subscription.name,
                self.max_pending,
                dropped,
            )
        self.append(event)
        if self.idle:
            self.wake_one()

    def full_error(self, event: Event[Any], why: str) -> InboxFullError:
        name = self.subscription.name
        return InboxFullError(
            f"inbox of subscription {name!r} is full ({self.max_pending} events waiting): {why}",
            subscription=name,
            event=event,
        )

    async def _wait_for_room(
        self, event: Event[Any], timeout: float | None, waiter: asyncio.Future[None], own: bool
    ) -> None:
        subscription = self.subscription
        if own and self.self_blocked + 1 >= subscription.concurrency:
            raise self.full_error(
                event,
                "its own handler is publishing to it, and with every worker waiting for room "
                "it would deadlock; raise max_pending, or use overflow='drop_oldest' or 'error'",
            )
        self.putters.append((waiter, event))
        self.self_blocked += own
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
                f"publish to {event.topic!r} waited {timeout}s for room in the full inbox of "
                f"subscription {subscription.name!r} (max_pending={self.max_pending}); that "
                "subscriber is slow or stuck. Raise publish_timeout or max_pending, or choose "
                "overflow='drop_oldest' or 'error' for it"
            ) from None
        finally:
            self.self_blocked -= own
            if not waiter.done():
                waiter.cancel()

    # -- stopping -----------------------------------------------------------------------

    def refuse_waiting(self) -> None:
        """The subscription is gone: publishers waiting for room owe it nothing."""
        for waiter, _ in self.putters:
            if not waiter.done():
                waiter.set_exception(Unsubscribed())
        self.putters.clear()

    def take_all(self) -> list[Event[Any]]:
        """Remove and return every queued event (parked ones included), oldest first."""
        taken = list(self)
        self.clear()
        for chain in self.parked.values():
            taken.extend(chain)
            self.capacity += len(chain)
            chain.clear()
        return taken

    def close(self) -> list[Event[Any]]:
        """The bus closed: empty the inbox, fail waiting publishers; return every event that
        was queued, parked or waiting for room."""
        left = [*(e for chain in self.parked.values() for e in chain), *self]
        left.extend(event for waiter, event in self.putters if not waiter.done())
        self.clear()
        self.parked.clear()
        self.idle = None  # the parked workers are cancelled, their futures with them
        for waiter, event in self.putters:
            if not waiter.done():
                waiter.set_exception(
                    BusClosedError(
                        f"the bus closed while publish to {event.topic!r} waited for room "
                        f"in the inbox of {self.subscription.name!r}"
                    )
                )
        self.putters.clear()
        return left
