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
