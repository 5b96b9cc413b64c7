"""The event: an immutable message on a topic, with the ids that let a chain be followed."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
from msgspec.structs import force_setattr

if TYPE_CHECKING:
    from eventwire.drain import Epoch

P = TypeVar("P")

EMPTY_METADATA: Mapping[str, Any] = MappingProxyType({})
EMPTY_TRACE: Mapping[str, str] = MappingProxyType({})
sequence = itertools.count()
# 30 random bits per process keep ids from different processes apart; the sequence keeps ids
# from one process unique and ordered.
_NODE = secrets.randbits(30) << 32
_NS_PER_MS = 1_000_000


def _format_id(ns: int, seq: int) -> str:
    """A UUIDv7 string: 48-bit Unix milliseconds, 12 bits of sub-millisecond time, 62 bits
    of node and sequence. Ids sort by creation time."""
    ms, sub_ms = divmod(ns, _NS_PER_MS)
    value = (
        (ms << 80)
        | (0x7 << 76)
        | ((sub_ms * 4096 // _NS_PER_MS) << 64)
        | (0b10 << 62)
        | _NODE
        | (seq & 0xFFFF_FFFF)
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_StructMeta: type = type(msgspec.Struct)
# Builds an event from its fields in declaration order, skipping the public signature
# (the bus's fast path; its callers pass every field in order).
build = _StructMeta.__call__


class _EventMeta(_StructMeta):  # type: ignore[misc]
    """Gives `Event` its public constructor; the struct itself takes its fields in order."""

    def __call__(
        cls,
        topic: str,
        payload: Any = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,
        timestamp: datetime | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        key: str | None = None,
        source: str | None = None,
        reply_to: str | None = None,
        trace_context: Mapping[str, str] | None = None,
        target: str | None = None,
    ) -> Any:
        if not isinstance(topic, str):
            raise TypeError(f"Event topic must be a str, got {type(topic).__name__}: {topic!r}")
        if id is not None and (not isinstance(id, str) or not id):
            raise ValueError(f"Event id must be a non-empty str, got {id!r}")
        if timestamp is None:
            ns = time.time_ns()
        else:
            if timestamp.tzinfo is None or timestamp.utcoffset() is None:
                raise ValueError(
                    f"Event timestamp must be timezone-aware, got naive {timestamp!r}; "
                    "pass e.g. datetime.now(timezone.utc)"
                )
            delta = timestamp - _EPOCH_UTC
            ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
        frozen = freeze_metadata(metadata)
        if cls is Event:
            cls = event_class(payload, frozen)
        return build(
            cls,
            topic,
            payload,
            frozen,
            key,
            source,
            ns,
            next(sequence),
            id,
            correlation_id,
            causation_id,
            reply_to,
            None,
            MappingProxyType(dict(trace_context)) if trace_context else EMPTY_TRACE,
            target,
        )


class Event(msgspec.Struct, Generic[P], gc=False, frozen=True, metaclass=_EventMeta):
    """An immutable event: a `topic`, a `payload` and read-only `metadata`.

    `id` (a time-sortable UUIDv7 string) and `timestamp` (UTC) are filled in at creation;
    `correlation_id` defaults to the event's own id. When a handler publishes, the bus sets
    the new event's `correlation_id` and `causation_id` from the event being handled, so a
    chain across agents can be followed end to end. `Event[Model]` in a handler's annotation
    asks the bus to validate and convert the payload to `Model`.
    """

    # The struct is frozen: an event is shared by every subscriber it fans out to, so none of
    # them may change what the others see. It is not tracked by the garbage collector
    # (gc=False), so queued events cost no collector time; events whose payload or metadata
    # could lead back to them (anything but plain values) are built as `_TrackedEvent`, which
    # the collector does see, so reference cycles are freed.
    topic: str
    """The topic the event is published on, e.g. ``user.query``."""
    payload: P
    """The event's content: any value, or a validated model for a typed handler."""
    metadata: Mapping[str, Any]
    """Read-only key/value annotations (user id, session id, ...)."""
    key: str | None
    """Ordering key: events with the same key are handled one at a time, in order."""
    source: str | None
    """Name of the subscription or agent that published it; None from outside a handler."""
    created_ns: int
    """When the event was created, in nanoseconds since the Unix epoch (see `timestamp`)."""
    sequence: int
    """Creation order within this process: events created later have a higher number."""
    _id: str | None = None
    _correlation_id: str | None = None
    causation_id: str | None = None
    """The id of the event whose handler published this one; None for a root event."""
    reply_to: str | None = None
    """Set on events published by `EventBus.request`: where a handler's return value goes."""
    drain_epoch: Epoch | None = None
    """The bus's bookkeeping: the `drain()` epoch this event counts in while it is queued in
    this process (`eventwire.drain`); never sent anywhere."""
    trace_context: Mapping[str, str] = EMPTY_TRACE
    """The W3C trace context (``traceparent``, ``tracestate``) the event carries when
    published with tracing on (see `eventwire.tracing`); empty otherwise."""
    target: str | None = None
    """The name of the only subscription that handles this event, or None (every matching
    subscription). Set on a dead letter sent back by ``eventwire dlq retry``."""

    if TYPE_CHECKING:

        def __init__(
            self,
            topic: str,
            payload: P = ...,
            metadata: Mapping[str, Any] | None = None,
            *,
            id: str | None = None,
            timestamp: datetime | None = None,
            correlation_id: str | None = None,
            causation_id: str | None = None,
            key: str | None = None,
            source: str | None = None,
            reply_to: str | None = None,
            trace_context: Mapping[str, str] | None = None,
            target: str | None = None,
        ) -> None: ...

    @property
    def id(self) -> str:
        """Unique, time-sortable id (UUIDv7 text)."""
        event_id = self._id
        if event_id is None:
            # Formatting is deferred to first use: most in-process events never need the text.
            event_id = _format_id(self.created_ns, self.sequence)
            force_setattr(self, "_id", event_id)
        return event_id

    @property
    def timestamp(self) -> datetime:
        """When the event was created, timezone-aware UTC."""
        return datetime.fromtimestamp(self.created_ns // 1000 / 1_000_000, UTC)

    @property
    def correlation_id(self) -> str:
        """Shared by every event of one chain; the id of the chain's first event."""
        return self._correlation_id or self.id

    def replace(self, **changes: Any) -> Event[Any]:
        """A copy with the given fields changed (same id unless `id` is given)."""
        fields: dict[str, Any] = {
            "topic": self.topic,
            "payload": self.payload,
            "metadata": self.metadata,
            "id": self.id,
            "timestamp": None,
            "correlation_id": self._correlation_id,
            "causation_id": self.causation_id,
            "key": self.key,
            "source": self.source,
            "reply_to": self.reply_to,
            "trace_context": self.trace_context,
            "target": self.target,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"Event.replace() got unknown field(s): {', '.join(sorted(unknown))}")
        keep_time = "timestamp" not in changes
        fields.update(changes)
        event: Event[Any] = Event(**fields)
        if keep_time:
            force_setattr(event, "created_ns", self.created_ns)
        return event

    def with_payload(self, payload: Any) -> Event[Any]:
        """Same event (same id, same drain accounting), another payload object: what a typed
        handler receives after conversion."""
        cls = event_class(payload, self.metadata)
        if cls is type(self) or cls is Event:
            return msgspec.structs.replace(self, payload=payload)
        fields = list(msgspec.structs.astuple(self))
        fields[1] = payload
        return build(cls, *fields)  # type: ignore[no-any-return]

    def caused_by(self, parent: Event[Any] | None, source: str | None) -> Event[Any]:
        """The event to publish for this one: itself when it needs nothing, otherwise a
        copy (same id) with its chain filled in from `parent` (the event being handled) and
        its `source` (the publishing subscription or agent), and no drain accounting."""
        if parent is not None and self.id == parent.id:
            # event.replace(...) of the event being handled: a new event, not its own cause.
            return Event(
                self.topic,
                self.payload,
                self.metadata,
                key=self.key,
                source=self.source,
                reply_to=self.reply_to,
            ).caused_by(parent, source)
        fill_cause = parent is not None and self.causation_id is None
        fill_source = self.source is None and source is not None
        if self.drain_epoch is None and not fill_cause and not fill_source:
            return self
        changes: dict[str, Any] = {"drain_epoch": None}
        if fill_cause:
            assert parent is not None
            changes["causation_id"] = parent.id
            if self._correlation_id is None:
                changes["_correlation_id"] = parent.correlation_id
        if fill_source:
            changes["source"] = source
        return msgspec.structs.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The event's fields as a plain dict (payload and metadata as they are)."""
        return {
            "id": self.id,
            "topic": self.topic,
            "payload": self.payload,
            "metadata": dict(self.metadata),
            "timestamp": self.timestamp,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "key": self.key,
            "source": self.source,
            "reply_to": self.reply_to,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self.created_ns == other.created_ns and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.id)

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [
            ("topic", self.topic),
            ("payload", self.payload),
            ("metadata", dict(self.metadata)),
            ("id", self.id),
            ("causation_id", self.causation_id),
            ("key", self.key),
            ("source", self.source),
        ]

    def __repr__(self) -> str:
        parts = [f"topic={self.topic!r}", f"payload={self.payload!r}"]
        if self.metadata:
            parts.append(f"metadata={dict(self.metadata)!r}")
        parts.append(f"id={self.id!r}")
        if self.causation_id is not None:
            parts.append(f"causation_id={self.causation_id!r}")
        if self.key is not None:
            parts.append(f"key={self.key!r}")
        if self.source is not None:
            parts.append(f"source={self.source!r}")
        return f"Event({', '.join(parts)})"


class _TrackedEvent(Event[P], gc=True, frozen=True):  # type: ignore[metaclass]
    """An event whose payload or metadata may hold references back to it (a cycle), so the
    garbage collector must see it. Events with plain-value payloads skip that cost."""


# Values that cannot refer back to an event, so an event holding only these cannot be part of a
# reference cycle and may stay out of the garbage collector's sight.
ATOMIC_TYPES = frozenset({str, int, float, bool, type(None), bytes})


# `build` bound to `Event` once: a call without the class argument to slice off, which saves
# a third of the cost of building the plain events of the publish hot path.
build_event: Callable[..., Event[Any]] = _StructMeta.__call__.__get__(Event)


def event_class(payload: Any, metadata: Mapping[str, Any] | None) -> type[Event[Any]]:
    if type(payload) in ATOMIC_TYPES and (
        not metadata or all(type(value) in ATOMIC_TYPES for value in metadata.values())
    ):
        return Event
    return _TrackedEvent


_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)


def freeze_metadata(metadata: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not metadata:
        return EMPTY_METADATA
    if not isinstance(metadata, Mapping):
        raise TypeError(
            f"Event metadata must be a mapping (dict), got {type(metadata).__name__}: {metadata!r}"
        )
    return MappingProxyType(dict(metadata))


def new_event(
    topic: str,
    payload: Any,
    metadata: Mapping[str, Any] | None,
    key: str | None,
    parent: Event[Any] | None,
    source: str | None,
    reply_to: str | None = None,
) -> Event[Any]:
    """The bus's fast constructor: skips argument checks that publish already made."""
    return build(  # type: ignore[no-any-return]
        event_class(payload, metadata),
        topic,
        payload,
        freeze_metadata(metadata) if metadata else EMPTY_METADATA,
        key,
        source,
        time.time_ns(),
        next(sequence),
        None,
        None if parent is None else parent.correlation_id,
        None if parent is None else parent.id,
        reply_to,
    )


def text_length(event: Event[Any]) -> int:
    """Characters in an event's own text fields (topic, ids, key, source, reply_to, target,
    trace context), counting an id not formatted yet at its length: with the payload and
    the metadata, what its envelope holds."""
    length = (
        len(event.topic)
        + (36 if event._id is None else len(event._id))
        + len(event._correlation_id or "")
        + len(event.causation_id or "")
        + len(event.key or "")
        + len(event.source or "")
        + len(event.reply_to or "")
        + len(event.target or "")
    )
    for name, value in event.trace_context.items():
        length += len(name) + len(value) + 8  # quotes, colon, comma
    return length
