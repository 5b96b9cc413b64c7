"""The subscriptions of one bus by name: building and checking them, installing them on the
backend (and waiting while it creates what they need), and taking them off again."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from eventwire.backends.base import Backend, BackendCapabilityError
from eventwire.deadletter import DeadLetters
from eventwire.errors import BusClosedError
from eventwire.observe import Observer
from eventwire.options import Start, SubscriptionOptions
from eventwire.payloads import make_converter, payload_type_of
from eventwire.requests import Requests
from eventwire.subscription import Handler, Subscription, SubscriptionServices
from eventwire.timers import Timers
from eventwire.topics import validate_pattern

logger = logging.getLogger("eventwire")

Wanted = tuple[str, Handler, SubscriptionOptions, "str | None"]
"""A subscription to make: pattern, handler, options, source (None: its own name)."""


class SubscriptionRegistry:
    """The subscriptions of one bus, and those still being opened or drained."""

    def __init__(
        self,
        backend: Backend,
        *,
        observers: list[Observer],
        dead_letters: DeadLetters,
        requests: Requests,
        running_loop: Callable[[], asyncio.AbstractEventLoop | None],
        closing: Callable[[], str | None],
        track: Callable[[asyncio.Task[Any]], None],
        opening_changed: Callable[[], None],
        timers: Timers,
    ) -> None:
        self._backend = backend
        # The event loop while the bus runs (workers start at once), else None.
        self._running_loop = running_loop
        # "closing"/"closed" once no subscription may be added, else None.
        self._closing = closing
        self._track = track
        self._opening_changed = opening_changed
        self.services = SubscriptionServices(
            observers=observers,
            dead_letters=dead_letters,
            requests=requests,
            unsubscribe=self.unsubscribe,
            journal=backend.journal,
            timers=timers,
        )
        self._timers = timers
        self.by_name: dict[str, Subscription] = {}
        # Group name -> how many subscriptions on the bus are in it (the identity check reads
        # it, so that adding the 10,000th subscription does not look at the 9,999 others).
        self._group_sizes: dict[str, int] = {}
        # Unsubscribed subscriptions whose workers still finish queued events.
        self.draining: set[Subscription] = set()
        # Subscriptions whose backend is still creating something for them (a durable
        # consumer): the bus's publishes wait for them, so they see every later event.
        self.opening: set[asyncio.Task[None]] = set()
        # Durable subscriptions' companions, taken off with them.
        self._companions_of: dict[Subscription, list[Subscription]] = {}

    def plan(self, wanted: Sequence[Wanted]) -> list[Subscription]:
        """Build and check subscriptions, all before any is installed: a bad one raises with
        none of them on the bus."""
        closing = self._closing()
        if closing is not None:
            raise BusClosedError(f"cannot subscribe: the bus is {closing}")
        planned: list[Subscription] = []
        # Names and groups of this call's subscriptions, checked with those on the bus.
        taken = ChainMap[str, Subscription]({}, self.by_name)
        groups = ChainMap[str, int]({}, self._group_sizes)
        for pattern, handler, options, source in wanted:
            validate_pattern(pattern)
            _check_handler(handler, durable=options.durable)
            self._check_start(options.start)
            name = options.name
            if name is None:
                name = _unique_default_name(_default_name(handler), taken)
            elif name in taken:
                raise ValueError(
                    f"a subscription named {name!r} already exists on this bus; pass another "
                    "name=, or the same group= to make them competing consumers"
                )
            _check_identity(name, options.group, taken, groups)
            payload_type = payload_type_of(handler)
            subscription = Subscription(
                pattern,
                handler,
                options,
                name=name,
                source=source or name,
                converter=make_converter(payload_type, name) if payload_type is not None else None,
                services=self.services,
            )
            taken[name] = subscription
            if options.group is not None:
                groups[options.group] = groups.get(options.group, 0) + 1
            planned.append(subscription)
            if subscription.runner is not None:
                planned.extend(self._companions(subscription, taken))
        return planned

    def _companions(
        self, subscription: Subscription, taken: ChainMap[str, Subscription]
    ) -> list[Subscription]:
        """The subscriptions a durable one needs beside it (`DurableRunner.companions`)."""
        assert subscription.runner is not None
        made = []
        for pattern, handler, options in subscription.runner.companions():
            assert options.name is not None
            if options.name in taken:
                raise ValueError(
                    f"a subscription named {options.name!r} already exists on this bus, and "
                    f"durable subscription {subscription.name!r} needs that name for its "
                    "waits: rename one of them"
                )
            companion = Subscription(
                pattern,
                handler,
                options,
                name=options.name,
                source=subscription.source,
                converter=None,
                services=self.services,
            )
            taken[options.name] = companion
            made.append(companion)
        self._companions_of[subscription] = made
        return made

    def _check_start(self, start: Start) -> None:
        backend = self._backend
        if start == "latest" or backend.capabilities.replay:
            return
        raise BackendCapabilityError(
            f"start={start!r} replays history, which the {backend.scheme}:// backend "
            "cannot do (see the capability table in the README); use start='latest', or a "
            "backend that keeps history such as 'sqlite:///bus.db'"
        )

    def install(self, subscription: Subscription) -> None:
        """Put a planned subscription on the bus and its backend."""
        if subscription.runner is not None:
            self._timers.want()
        self._add(subscription)
        try:
            opening = self._backend.attach(subscription)
        except BaseException:
            self._remove(subscription)
            raise
        if opening is not None:
            task = asyncio.get_running_loop().create_task(
                self._finish_opening(subscription, opening),
                name=f"eventwire:{subscription.name}:open",
            )
            subscription.opening = task
            self.opening.add(task)
            task.add_done_callback(self._opened)
            self._opening_changed()
            self._track(task)
            return
        loop = self._running_loop()
        if loop is not None:
            subscription.begin(loop)

    async def _finish_opening(self, subscription: Subscription, opening: Any) -> None:
        try:
            await opening
        except Exception:
            logger.exception(
                "eventwire: could not open the durable subscription %s on %s",
                subscription.name,
                self._backend.url.redacted,
            )
            self._remove(subscription)
            await subscription.unsubscribe(drain=False)
            raise
        loop = self._running_loop()
        if loop is not None and subscription.active:
            subscription.begin(loop)

    def _add(self, subscription: Subscription) -> None:
        self.by_name[subscription.name] = subscription
        if subscription.group is not None:
            sizes = self._group_sizes
            sizes[subscription.group] = sizes.get(subscription.group, 0) + 1

    def _remove(self, subscription: Subscription) -> None:
        if self.by_name.get(subscription.name) is not subscription:
            return
        del self.by_name[subscription.name]
        group = subscription.group
        if group is not None:
            left = self._group_sizes[group] - 1
            if left:
                self._group_sizes[group] = left
            else:
                del self._group_sizes[group]

    def _opened(self, task: asyncio.Task[None]) -> None:
        self.opening.discard(task)
        self._opening_changed()

    async def wait_opened(self) -> None:
        """Return once every subscription being opened is (or failed)."""
        if self.opening:
            await asyncio.gather(*self.opening, return_exceptions=True)

    async def unsubscribe(self, subscription: Subscription, drain: bool, forget: bool) -> None:
        """Take `subscription` off the bus and its backend (see `Subscription.unsubscribe`)."""
        for companion in self._companions_of.pop(subscription, ()):
            await companion.unsubscribe(drain=drain, forget=forget)
        self._remove(subscription)
        await self._backend.detach(subscription)
        if not drain:
            self._backend.give_back(subscription, subscription.inbox.take_all())
        workers = subscription.workers
        if workers and not all(task.done() for task in workers):
            self.draining.add(subscription)
            gathered = asyncio.gather(*workers, return_exceptions=True)
            gathered.add_done_callback(lambda _: self.draining.discard(subscription))
        await subscription.finish()
        if subscription.in_own_handler():
            # Its own worker cannot wait for itself: let go once the workers are done.
            self._track(
                asyncio.get_running_loop().create_task(self._release_later(subscription, forget))
            )
            return
        await self._backend.release(subscription, forget=forget)

    async def _release_later(self, subscription: Subscription, forget: bool) -> None:
        await subscription.stopped()
        await self._backend.release(subscription, forget=forget)

    def all_for_closing(self) -> list[Subscription]:
        """Every subscription with workers to stop: active ones and those still draining."""
        every = [*self.by_name.values(), *self.draining]
        self.draining.clear()
        return every


def _default_name(handler: Callable[..., Any]) -> str:
    target = getattr(handler, "__func__", handler)
    module = getattr(target, "__module__", None) or "handler"
    qualname = getattr(target, "__qualname__", None) or type(handler).__qualname__
    return f"{module}.{qualname}"


def _unique_default_name(base: str, taken: Mapping[str, Any]) -> str:
    if base not in taken:
        return base
    number = 2
    while f"{base}#{number}" in taken:
        number += 1
    return f"{base}#{number}"


def _check_identity(
    name: str,
    group: str | None,
    names: Mapping[str, Subscription],
    groups: Mapping[str, int],
) -> None:
    """A subscription's identity on a broker is its group, else its name: refuse one that
    would share another's without being in its group (on every backend alike). `names`:
    the subscriptions by name; `groups`: the groups in use."""
    if group is None:
        if name not in groups:
            return
        member = next(s.name for s in names.values() if s.group == name)  # only on a clash
        clash = f"the name {name!r} is the group of subscription {member!r}"
    else:
        other = names.get(group)
        if other is None or other.group is not None:
            return
        clash = f"its group {group!r} is the name of subscription {other.name!r}"
    raise ValueError(
        f"subscription {name!r} cannot be added: {clash}, and on a broker both would "
        "share one durable consumer (each event would reach only one of them); give the "
        "subscription another name or group"
    )


def _check_handler(handler: Any, *, durable: bool) -> None:
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {type(handler).__name__}: {handler!r}")
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return
    arguments = (
        "the event and the run as its two positional arguments"
        if durable
        else "the event as its one positional argument"
    )
    try:
        signature.bind(*([object()] * (2 if durable else 1)))
    except TypeError:
        raise TypeError(
            f"handler {getattr(handler, '__qualname__', handler)!r} must accept {arguments}; "
            f"its signature is {signature}"
        ) from None
