"""The ``memory://`` backend: the in-process bus, and the default.

A publish appends the event itself (no bytes, no copy) to the inbox of every matching
subscription of this process, found through the `Router`; that is all it costs when there is
room. A full inbox does what its overflow policy says (`Inbox.put`). Nothing outlives the
process, and there is only one process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

from msgspec.structs import force_setattr

from eventwire.backends.base import Backend, BusServices, Capabilities, ConsumerInfo
from eventwire.backends.journal import Journal, MemoryJournal
from eventwire.backends.url import BusURL, parse_url
from eventwire.drain import DrainTracker, Epoch
from eventwire.envelope import check_encodable
from eventwire.errors import InboxFullError
from eventwire.event import Event
from eventwire.inbox import Inbox, Unsubscribed
from eventwire.routing import Router, targeted
from eventwire.subscription import Subscription, current_subscription


class MemoryBackend(Backend):
    """Delivers in this process; see the module docstring."""

    scheme = "memory"
    capabilities = Capabilities(
        durable=False,
        replay=False,
        key_order_across_processes=False,
        idempotent=True,  # trivially: nothing is ever delivered twice
        cross_process_drain=False,
    )

    def __init__(self, url: BusURL | None = None) -> None:
        super().__init__(url or parse_url("memory://"))
        self.router = Router()
        self._routes = self.router.routes
        self._attached: dict[Subscription, None] = {}
        # The bus's, from `bind`; until then nothing is routed here, so nothing is counted.
        self._tracker = DrainTracker()
        self._journal = MemoryJournal()

    def journal(self) -> Journal:
        return self._journal

    async def connect(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to disconnect from."""

    # -- events -------------------------------------------------------------------------

    def bind(self, services: BusServices) -> None:
        super().bind(services)
        # Read on every publish: one attribute instead of a property call each time.
        self._tracker = services.tracker

    def send(self, event: Event[Any], cause: Event[Any] | None) -> int | Awaitable[Any]:
        # What a broker would refuse is refused here too, before anything is queued.
        if type(event.payload) is not int or event.metadata:
            check_encodable(event, max_bytes=self.services.max_event_bytes)
        route = self._routes.get(event.topic)
        if route is None:
            route = self.router.route(event.topic)
        targets = route if type(route) is tuple else route.targets(event.key)  # type: ignore[union-attr]
        if event.target is not None:
            targets = targeted(targets, event.target)
        count = len(targets)
        if not count:
            return 0
        epoch = self._tracker.current
        if cause is not None:
            cause_epoch = cause.drain_epoch
            if cause_epoch is not None and not cause_epoch.retired:
                epoch = cause_epoch  # a follow-up counts with its cause
        force_setattr(event, "drain_epoch", epoch)
        epoch.pending += count
        if count == 1:  # one subscriber: no loop to set up
            inbox = targets[0]
            if len(inbox) < inbox.capacity:
                inbox.append(event)
                if inbox.idle is not None:
                    inbox.wake_one()
                return 1
            return self._put_rest(event, targets, epoch)
        # No enumerate(): the index is only needed on the slow path, found there.
        for inbox in targets:
            if len(inbox) < inbox.capacity:
                inbox.append(event)
                if inbox.idle is not None:
                    inbox.wake_one()
                continue
            return self._put_rest(event, targets[_position(targets, inbox) :], epoch)
        return count

    async def send_many(self, events: Sequence[Event[Any]], cause: Event[Any] | None) -> None:
        max_bytes = self.services.max_event_bytes
        for event in events:  # all checked first: a bad one is refused with none sent
            check_encodable(event, max_bytes=max_bytes)
        await super().send_many(events, cause)

    async def _put_rest(self, event: Event[Any], targets: Sequence[Inbox], epoch: Epoch) -> int:
        """Go on queueing an event that met a full inbox, as each overflow policy says."""
        refused: InboxFullError | None = None
        loop = asyncio.get_running_loop()
        publisher = current_subscription.get()
        timeout = self.services.publish_timeout
        for index, inbox in enumerate(targets):
            waiter: asyncio.Future[None] = loop.create_future()
            try:
                refusal = await inbox.put(
                    event, timeout, waiter, own=publisher is inbox.subscription
                )
            except Unsubscribed:
                epoch.release()  # unsubscribed since the route was read
                continue
            except BaseException:
                # Not queued here nor for the rest: they are owed nothing, unless this inbox
                # let the event in just as the publish was cancelled.
                admitted = waiter.done() and not waiter.cancelled() and waiter.exception() is None
                epoch.release(len(targets) - index - admitted)
                raise
            if refusal is not None:
                epoch.release()
                refused = refused or refusal
        if refused is not None:
            raise refused
        return len(targets)

    # -- subscriptions ------------------------------------------------------------------

    def attach(self, subscription: Subscription) -> None:
        self._attached[subscription] = None
        self.router.add(subscription)

    async def detach(self, subscription: Subscription) -> None:
        if self._attached.pop(subscription, 0) is None:
            self.router.remove(subscription)

    def give_back(self, subscription: Subscription, events: Sequence[Event[Any]]) -> None:
        for event in events:
            subscription.drop(event)  # nowhere to give it back to

    async def receivers(self, topic: str) -> list[str]:
        return self.router.receivers(topic)

    async def outstanding(self) -> list[str]:
        return []  # there are no other processes: what this one owes, the bus counts

    async def consumers(self) -> list[ConsumerInfo]:
        infos: dict[str, ConsumerInfo] = {}
        for subscription in self._attached:
            name = subscription.group or subscription.name
            stats = subscription.stats
            before = infos.get(name)
            outstanding = stats.queued + stats.in_flight + (before.outstanding if before else 0)
            infos[name] = ConsumerInfo(name, subscription.pattern, outstanding, processes=1)
        return list(infos.values())

    async def delete_consumer(self, name: str) -> None:
        """Nothing outlives its subscription in process."""

    async def destroy(self) -> None:
        """Nothing is stored."""


def _position(targets: Sequence[Inbox], inbox: Inbox) -> int:
    """Where `inbox` is among `targets`, by identity (an inbox is a deque: == compares the
    events queued)."""
    for index, target in enumerate(targets):
        if target is inbox:
            return index
    raise ValueError("inbox not among the targets")
