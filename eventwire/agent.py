"""Agents: classes whose ``@on`` methods handle events and which publish as themselves."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar, Unpack

from eventwire.bus import EventBus, PlannedSubscription
from eventwire.errors import BusNotRunningError
from eventwire.event import Event
from eventwire.options import SubscriptionKeywords, SubscriptionOptions
from eventwire.subscription import Subscription
from eventwire.topics import validate_pattern

F = TypeVar("F", bound=Callable[..., Any])

_ON_ATTRIBUTE = "__eventwire_on__"


def on(pattern: str, **options: Unpack[SubscriptionKeywords]) -> Callable[[F], F]:
    """Mark an `Agent` method as the handler of `pattern`; same options as `subscribe`.

    The subscription is named ``<agent name>.<method name>`` unless `name` is given.
    """
    validate_pattern(pattern)
    built = SubscriptionOptions.of(**options)

    def mark(method: F) -> F:
        marks: list[tuple[str, SubscriptionOptions]] = getattr(method, _ON_ATTRIBUTE, [])
        setattr(method, _ON_ATTRIBUTE, [*marks, (pattern, built)])
        return method

    return mark


class Agent:
    """Base class for agents. Subclass it, decorate handler methods with ``@on(pattern)``,
    then ``bus.register(MyAgent(name="..."))``.

    `self.publish` and `self.request` go through the agent's bus with `source` set to the
    agent's name; override `on_start` / `on_stop` for set-up and tear-down.
    """

    publishes: tuple[str, ...] = ()
    """Topics the agent publishes outside its handlers (from `on_start`, an entry point),
    for ``eventwire topology`` and ``eventwire asyncapi``; a handler declares its own with
    ``@on(..., publishes=[...])``."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self._bus: EventBus | None = None
        self.subscriptions: list[Subscription] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @property
    def bus(self) -> EventBus:
        """The bus this agent is registered on."""
        if self._bus is None:
            raise BusNotRunningError(
                f"agent {self.name!r} is not registered: call bus.register(agent) first"
            )
        return self._bus

    async def on_start(self) -> None:
        """Called when the bus starts (or at once, if it is already running)."""

    async def on_stop(self) -> None:
        """Called when the bus begins to close, before queued work is finished."""

    def planned_subscriptions(self) -> list[PlannedSubscription]:
        """The subscriptions of this agent's ``@on`` methods, named ``<agent>.<method>``
        unless ``@on`` names them (`EventBus.register` makes them)."""
        if self._bus is not None:
            raise ValueError(f"agent {self.name!r} is already registered on {self._bus!r}")
        planned: list[PlannedSubscription] = []
        seen: set[str] = set()
        for cls in reversed(type(self).__mro__):
            for attribute, value in vars(cls).items():
                for pattern, options in getattr(value, _ON_ATTRIBUTE, ()):
                    base = options.name or f"{self.name}.{attribute}"
                    name, number = base, 2
                    while name in seen:
                        name, number = f"{base}#{number}", number + 1
                    seen.add(name)
                    planned.append(
                        PlannedSubscription(
                            pattern, getattr(self, attribute), replace(options, name=name)
                        )
                    )
        return planned

    def bind(self, bus: EventBus, subscriptions: list[Subscription]) -> None:
        """Called by `EventBus.register` with the subscriptions it made for this agent."""
        self._bus = bus
        self.subscriptions = subscriptions

    async def publish(
        self,
        topic_or_event: str | Event[Any],
        payload: Any = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> Event[Any]:
        """Publish through the agent's bus, with `source` set to this agent's name."""
        return await self.bus.publish(
            topic_or_event, payload, metadata=metadata, key=key, source=self.name
        )

    async def request(
        self,
        topic: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
        timeout: float | None,
    ) -> Any:
        """`EventBus.request` through the agent's bus, with `source` set to this agent."""
        return await self.bus.request(
            topic, payload, metadata=metadata, key=key, timeout=timeout, source=self.name
        )
