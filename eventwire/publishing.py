"""Publishing beyond the hot path: who publishes, adopting a ready-made `Event`, publishes
that observers see or that wait for subscriptions still opening, batches, and publishes from
other threads.

`EventBus.publish` builds a root event and hands it to the backend itself (the hottest path
of the library); everything else a publish may need is here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from eventwire.context import current_event
from eventwire.errors import PublishTimeoutError
from eventwire.event import Event, new_event
from eventwire.observe import Observer, notify, notify_finished
from eventwire.subscription import current_subscription
from eventwire.topics import validate_topic

if TYPE_CHECKING:
    from eventwire.backends.base import Backend


def publisher_source(topic: str, source: str | None) -> str | None:
    """Who publishes, for `Event.source`: `source` if given, else the subscription whose
    handler runs this code; that subscription learns the topic (`published_topics`)."""
    subscription = current_subscription.get()
    if subscription is not None and (source is None or source == subscription.source):
        subscription.published_topics.add(topic)
        return subscription.source
    return source


def adopt(
    value: object,
    payload: Any,
    metadata: Mapping[str, Any] | None,
    key: str | None,
    parent: Event[Any] | None,
    source: str | None,
) -> Event[Any]:
    """The `Event` given to ``publish(event)``, caused by `parent` (the handled event, if
    any) and naming its publisher."""
    if not isinstance(value, Event):
        raise TypeError(
            "publish() takes a topic str and a payload, or an Event; "
            f"got {type(value).__name__}: {value!r}"
        )
    if payload is not None or metadata is not None or key is not None:
        raise TypeError(
            "publish(event) takes no payload, metadata or key: they are the event's own; "
            "use event.replace(...) to change them"
        )
    if parent is not None or source is not None:
        learned = publisher_source(value.topic, source)
        source = learned if value.source is None else None
    return value.caused_by(parent, source)


class Publisher:
    """The publishes that do more than hand an event to the backend."""

    def __init__(
        self,
        backend: Backend,
        *,
        observers: list[Observer],
        wait_opened: Callable[[], Awaitable[None]],
    ) -> None:
        self._backend = backend
        self._send = backend.send
        self._observers = observers  # the bus's live list
        # Subscriptions made earlier by this process must exist before their events do.
        self._wait_opened = wait_opened

    async def indirect(self, event: Event[Any], parent: Event[Any] | None) -> None:
        """Publish `event` once the subscriptions being opened exist, seen by the observers."""
        await self._wait_opened()
        if not self._observers:
            sent = self._send(event, parent)
            if type(sent) is not int:
                await sent  # type: ignore[misc]
            return
        observers = tuple(self._observers)
        tokens = notify(observers, "publish_started", event)
        try:
            sent = self._send(event, parent)
            if type(sent) is not int:
                await sent  # type: ignore[misc]
        except BaseException as error:
            notify_finished(observers, "publish_finished", tokens, event, error)
            raise
        notify_finished(observers, "publish_finished", tokens, event, None)

    async def many(
        self, items: Iterable[Event[Any] | tuple[str, Any]], parent: Event[Any] | None
    ) -> list[Event[Any]]:
        """`EventBus.publish_many`, once the bus accepts events."""
        subscription = current_subscription.get() if parent is not None else None
        source = subscription.source if subscription is not None else None
        events: list[Event[Any]] = []
        for item in items:
            if isinstance(item, tuple):
                topic, payload = item
                validate_topic(topic)
                events.append(new_event(topic, payload, None, None, parent, source))
                if subscription is not None:
                    subscription.published_topics.add(topic)
            else:
                events.append(adopt(item, None, None, None, parent, None))
        for event in events:
            validate_topic(event.topic)
        if self._observers:
            # One publish after another, each seen by the observers (its own span).
            for event in events:
                await self.indirect(event, parent)
            return events
        await self._wait_opened()
        await self._backend.send_many(events, parent)
        return events


def publish_from_thread(
    loop: asyncio.AbstractEventLoop,
    publish: Callable[[], Awaitable[Event[Any]]],
    what: str | Event[Any],
    timeout: float | None,
) -> Event[Any]:
    """Run `publish` in `loop` from another thread and wait for it up to `timeout` seconds
    (`EventBus.publish_threadsafe`); `what` is the topic or event being published."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError(
            "publish_threadsafe() was called from the bus's own event loop, where it "
            "would block that loop; use `await bus.publish(...)` there"
        )
    parent = current_event.get()
    subscription = current_subscription.get() if parent is not None else None

    async def publish_in_loop() -> Event[Any]:
        # Runs as its own task: restore the publishing thread's handler context in it.
        token = current_event.set(parent)
        token_sub = current_subscription.set(subscription)
        try:
            return await publish()
        finally:
            current_subscription.reset(token_sub)
            current_event.reset(token)

    future = asyncio.run_coroutine_threadsafe(publish_in_loop(), loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        if not future.cancel() and not future.cancelled():
            return future.result()  # it went through as the time ran out
        topic = what if isinstance(what, str) else what.topic
        raise PublishTimeoutError(
            f"publish_threadsafe to {topic!r} was not queued within {timeout}s (a full "
            "inbox with overflow='block'); it was withdrawn from the inboxes it was still "
            "waiting for"
        ) from None
