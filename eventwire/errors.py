"""Exceptions raised by eventwire. Every one names what went wrong and how to fix it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eventwire.event import Event


class EventwireError(Exception):
    """Base class of every eventwire error."""


class InvalidTopicError(EventwireError, ValueError):
    """A topic or pattern breaks the naming rules."""


class BusNotRunningError(EventwireError, RuntimeError):
    """The bus was used before `start()` / `async with bus:` or after `close()`."""


class BusClosedError(BusNotRunningError):
    """The bus is closed or closing and accepts no new events from outside its handlers."""


class InboxFullError(EventwireError):
    """A subscription's inbox is full and its overflow policy is ``"error"``
    (or waiting for room would deadlock)."""

    def __init__(self, message: str, *, subscription: str, event: Event[Any]) -> None:
        super().__init__(message)
        self.subscription = subscription
        self.event = event


class PublishTimeoutError(EventwireError, TimeoutError):
    """`publish` waited longer than `publish_timeout` for room in a full inbox."""


class HandlerError(EventwireError):
    """Raised to a requester when the handler of its request failed.

    `subscription` names the handler, `__cause__` is the handler's exception.
    """

    def __init__(self, message: str, *, subscription: str, error: str) -> None:
        super().__init__(message)
        self.subscription = subscription
        self.error = error


class RemoteHandlerError(EventwireError):
    """A handler in another process failed; `error_type` names its exception's class."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class NoReplyError(EventwireError, LookupError):
    """A request reached no subscription, or every handler finished without a reply."""


class PayloadValidationError(EventwireError, ValueError):
    """An event's payload did not validate against a typed handler's payload type."""


class PoisonEventError(EventwireError):
    """The reason in the dead letter of a poison event: its handling started again and again
    without ever finishing (each time its process died, or lost the event's lease), more
    than the subscription's ``max_restarts``. It is dead-lettered instead of being handled
    once more, so that it stops taking processes down with the events they hold."""

    def __init__(self, subscription: str, event: Event[Any], starts: int, limit: int) -> None:
        super().__init__(
            f"{subscription} started handling {event.topic} event {event.id} {starts} time(s) "
            f"after it came back unfinished (its process died or lost the lease each time), "
            f"more than max_restarts={limit}: dead-lettered as a poison event. Fix what "
            f"kills the handler and retry it with `eventwire dlq retry`, or raise max_restarts"
        )
        self.subscription = subscription
        self.event_id = event.id
        self.starts = starts
        self.limit = limit
