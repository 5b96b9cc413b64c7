"""Agents: classes whose ``@on`` methods handle events and which publish as themselves."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from eventwire.backends.base import Start
from eventwire.context import current_event, current_subscription
from eventwire.errors import BusNotRunningError
from eventwire.event import Event, new_event
from eventwire.retry import Retry
from eventwire.subscription import DEFAULT_MAX_PENDING, Overflow, Subscription
from eventwire.topics import validate_pattern

if TYPE_CHECKING:
    from eventwire.bus import EventBus

F = TypeVar("F", bound=Callable[..., Any])

_ON_ATTRIBUTE = "__eventwire_on__"


def on(
    pattern: str,
    *,
    name: str | None = None,
    group: str | None = None,
    concurrency: int = 1,
    retry: Retry | None = None,
    timeout: float | None = None,
    max_pending: int = DEFAULT_MAX_PENDING,
    overflow: Overflow = "block",
    start: Start = "latest",
    idempotent: bool = False,
    publishes: Sequence[str] = (),
) -> Callable[[F], F]:
    """Mark an `Agent` method as the handler of `pattern`; same options as `subscribe`.

    The subscription is named ``<agent name>.<method name>`` unless `name` is given.
    """
    validate_pattern(pattern)
    options: dict[str, Any] = {
        "name": name,
        "group": group,
        "concurrency": concurrency,
        "retry": retry,
        "timeout": timeout,
        "overflow": overflow,
        "max_pending": max_pending,
        "start": start,
        "idempotent": idempotent,
        "publishes": publishes,
    }

    def mark(method: F) -> F:
        marks: list[tuple[str, dict[str, Any]]] = getattr(method, _ON_ATTRIBUTE, [])
        setattr(method, _ON_ATTRIBUTE, [*marks, (pattern, options)])
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

    def _attach(self, bus: EventBus) -> None:
        if self._bus is not None:
            raise ValueError(f"agent {self.name!r} is already registered on {self._bus!r}")
        handlers: list[tuple[str, str, dict[str, Any]]] = []
        for cls in reversed(type(self).__mro__):
            for attribute, value in vars(cls).items():
                for pattern, options in getattr(value, _ON_ATTRIBUTE, ()):
                    handlers.append((attribute, pattern, options))
        created: list[Subscription] = []
        try:
            seen: set[str] = set()
            for attribute, pattern, options in handlers:
                base = options["name"] or f"{self.name}.{attribute}"
                name, number = base, 2
                while name in seen:
                    name, number = f"{base}#{number}", number + 1
                seen.add(name)
                created.append(
                    bus._subscribe(
                        pattern,
                        getattr(self, attribute),
                        source=self.name,
                        **{**options, "name": name},
                    )
                )
        except BaseException:
            for subscription in created:
                bus._remove_subscription(subscription)
            raise
        self._bus = bus
        self.subscriptions = created

    async def publish(
        self,
        topic_or_event: str | Event[Any],
        payload: Any = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> Event[Any]:
        """Publish through the agent's bus, with `source` set to this agent's name."""
        bus = self.bus
        if isinstance(topic_or_event, Event):
            if topic_or_event.source is None:
                topic_or_event = topic_or_event.replace(source=self.name)
            event = await bus.publish(topic_or_event, payload, metadata=metadata, key=key)
        else:
            parent = current_event.get()
            if not bus.running:
                bus._check_accepting(parent)
            event = new_event(topic_or_event, payload, metadata, key, parent, self.name)
            if bus._observers:
                await bus._publish_observed(event, parent)
            else:
                await bus._dispatch(event, parent)
        subscription = current_subscription.get()
        if subscription is not None and subscription.source == self.name:
            # Learnt for `eventwire topology`, as bus.publish does for plain handlers.
            subscription.published_topics.add(event.topic)
        return event

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
        return await self.bus._request_as(topic, payload, metadata, key, timeout, source=self.name)
