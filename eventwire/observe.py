"""Observers: see every publish and every handling attempt of a bus, as it happens.

Tracing (`eventwire.tracing`), lineage records (`eventwire.lineage`), recorders
(`EventBus.record`) and metrics exporters are observers. Register one with
``bus.observe(observer)``; a bus with no observer pays one attribute check per event.

Observer methods run on the bus's event loop, inside the publishing or handling task (so
context variables such as the current span are shared with the handler). They must not block.
An observer that raises is logged and skipped; it never changes what the bus delivers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import msgspec
from msgspec.structs import force_setattr

from eventwire.event import EMPTY_TRACE

if TYPE_CHECKING:
    from eventwire.event import Event

logger = logging.getLogger("eventwire")

Outcome = Literal["handled", "retrying", "dead_lettered", "cancelled", "skipped"]
"""What became of one handling attempt:

- ``handled``: the handler returned.
- ``retrying``: it failed and will be tried again.
- ``dead_lettered``: it failed for the last time (or the payload failed validation); the
  event goes to the DLQ.
- ``cancelled``: the bus stopped while it ran (the event is reported by `close()`, or goes
  back to the broker).
- ``skipped``: never run: an ``idempotent=True`` duplicate, or a retried dead letter meant
  for another subscription.
"""


class SubscriptionInfo(Protocol):
    """What observers are told of the subscription handling an event (a `Subscription`)."""

    @property
    def name(self) -> str: ...

    @property
    def pattern(self) -> str: ...

    @property
    def group(self) -> str | None: ...


ObserverT = TypeVar("ObserverT", bound="Observer")


class Observable(Protocol):
    """What observers can be registered with (an `EventBus`)."""

    def observe(self, observer: ObserverT) -> ObserverT: ...

    def unobserve(self, observer: Any) -> None: ...

    @property
    def observers(self) -> tuple[Observer, ...]: ...


OUTCOMES: tuple[Outcome, ...] = ("handled", "retrying", "dead_lettered", "cancelled", "skipped")


class HandlingRecord(msgspec.Struct, frozen=True, gc=False):
    """One handling attempt of one event by one subscription."""

    subscription: str
    event_id: str
    topic: str
    correlation_id: str
    attempt: int
    """1 for the first try; 0 when the handler never ran (validation failed, skipped)."""
    outcome: Outcome
    seconds: float
    """Wall time of this attempt (the handler's run; backoff before a retry not included)."""
    error: str | None = None
    """``"ExceptionType: message"`` for a failed attempt."""
    error_type: str | None = None
    finished_at: float = 0.0
    """Unix time (seconds) when the attempt ended."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the record."""
        return {
            "subscription": self.subscription,
            "event_id": self.event_id,
            "topic": self.topic,
            "correlation_id": self.correlation_id,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "seconds": self.seconds,
            "error": self.error,
            "error_type": self.error_type,
            "finished_at": self.finished_at,
        }


def handling_record(
    subscription: SubscriptionInfo,
    event: Event[Any],
    attempt: int,
    outcome: Outcome,
    seconds: float,
    error: BaseException | None,
) -> HandlingRecord:
    """The record of an attempt that just ended."""
    return HandlingRecord(
        subscription=subscription.name,
        event_id=event.id,
        topic=event.topic,
        correlation_id=event.correlation_id,
        attempt=attempt,
        outcome=outcome,
        seconds=seconds,
        error=None if error is None else f"{type(error).__name__}: {error}",
        error_type=None if error is None else type(error).__name__,
        finished_at=time.time(),
    )


@dataclass(frozen=True, slots=True)
class Transport:
    """Where a bus's events travel, as telemetry names it: the messaging system
    (``messaging.system``: the broker, or ``eventwire`` in-process) and the broker's address
    and port (``server.address``, ``server.port``), when it has one."""

    system: str = "eventwire"
    address: str | None = None
    port: int | None = None


class Observer:
    """Base class of observers: override the methods you need; the rest do nothing.

    A ``*_started`` method returns a token (anything, e.g. a span) that the matching
    ``*_finished`` call receives back.
    """

    def attached(self, transport: Transport) -> None:
        """The observer was added to a bus whose events travel on `transport`."""

    def publish_started(self, event: Event[Any]) -> Any:
        """`event` is about to be queued (in-process) or sent to the broker. It is not shared
        yet: tracing attaches its trace context here (`set_trace_context`)."""
        return None

    def publish_finished(self, token: Any, event: Event[Any], error: BaseException | None) -> None:
        """The publish returned (`error` is None) or raised `error`."""

    def attempt_started(
        self, subscription: SubscriptionInfo, event: Event[Any], attempt: int
    ) -> Any:
        """A handler is about to run `event` (`attempt` counts from 1)."""
        return None

    def attempt_finished(
        self,
        token: Any,
        subscription: SubscriptionInfo,
        event: Event[Any],
        record: HandlingRecord,
        error: BaseException | None,
    ) -> None:
        """The attempt ended, as `record` says; `error` is what the handler raised."""

    def skipped(
        self, subscription: SubscriptionInfo, event: Event[Any], record: HandlingRecord
    ) -> None:
        """`event` reached `subscription` but its handler was not run (see `Outcome`)."""

    def dropped(self, subscription: SubscriptionInfo, event: Event[Any]) -> None:
        """`event` was dropped from a full inbox (``overflow="drop_oldest"``)."""


def set_trace_context(event: Event[Any], carrier: dict[str, str]) -> None:
    """Attach a W3C trace context (``traceparent``, ``tracestate``) to an event being
    published; only valid inside `Observer.publish_started`, before the event is shared."""
    force_setattr(event, "trace_context", MappingProxyType(carrier) if carrier else EMPTY_TRACE)


def notify(observers: Sequence[Observer], method: str, *args: Any) -> list[Any]:
    """Call `method` on every observer; a failing observer is logged, never raised."""
    results: list[Any] = []
    for observer in observers:
        try:
            results.append(getattr(observer, method)(*args))
        except Exception:
            logger.warning("eventwire: observer %r failed in %s", observer, method, exc_info=True)
            results.append(None)
    return results


def notify_finished(
    observers: Sequence[Observer], method: str, tokens: Sequence[Any], *args: Any
) -> None:
    """Call a ``*_finished`` method on every observer with its own token, in reverse order
    (the last started finishes first, so context managers nest)."""
    for index in range(len(observers) - 1, -1, -1):
        observer = observers[index]
        try:
            getattr(observer, method)(tokens[index], *args)
        except Exception:
            logger.warning("eventwire: observer %r failed in %s", observer, method, exc_info=True)
