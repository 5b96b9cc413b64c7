"""The event: an immutable message on a topic, with the ids that let a chain be followed."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

if TYPE_CHECKING:
    from eventwire.bus import _Epoch

P = TypeVar("P")

_EMPTY_METADATA: Mapping[str, Any] = MappingProxyType({})
_EMPTY_TRACE: Mapping[str, str] = MappingProxyType({})
_sequence = itertools.count()
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
# Builds an event from its fields in declaration order, skipping the public signature.
_build = _StructMeta.__call__


class _EventMeta(_StructMeta):  # type: ignore[misc]
    """Gives `Event` its public constructor; the struct itself takes private fields."""

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
        frozen = _freeze(metadata)
        if cls is Event:
            cls = _event_class(payload, frozen)
        return _build(
            cls,
            topic,
            payload,
            frozen,
            key,
            source,
            ns,
            next(_sequence),
            id,
            correlation_id,
            causation_id,
            reply_to,
        )


class Event(msgspec.Struct, Generic[P], gc=False, metaclass=_EventMeta):
    """An immutable event: a `topic`, a `payload` and read-only `metadata`.

    `id` (a time-sortable UUIDv7 string) and `timestamp` (UTC) are filled in at creation;
    `correlation_id` defaults to the event's own id. When a handler publishes, the bus sets
    the new event's `correlation_id` and `causation_id` from the event being handled, so a
    chain across agents can be followed end to end. `Event[Model]` in a handler's annotation
    asks the bus to validate and convert the payload to `Model`.
    """

    # Public fields are read-only properties over private fields: an event is shared by every
    # subscriber it fans out to, so none of them may change what the others see. The struct is
    # not tracked by the garbage collector (gc=False), so queued events cost no collector time;
    # events whose payload or metadata could lead back to them (anything but plain values) are
    # built as `_TrackedEvent`, which the collector does see, so reference cycles are freed.
    _topic: str
    _payload: P
    _metadata: Mapping[str, Any]
    _key: str | None
    _source: str | None
    _ns: int
    _seq: int
    _id: str | None = None
    _correlation_id: str | None = None
    _causation_id: str | None = None
    _reply_to: str | None = None
    _epoch: _Epoch | None = None
    # W3C trace context (``traceparent``/``tracestate``), set by tracing when published.
    _trace: Mapping[str, str] | None = None
    # The one subscription that handles this event (a dead letter sent back by a retry).
    _target: str | None = None

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
        ) -> None: ...

    @property
    def topic(self) -> str:
        """The topic the event is published on, e.g. ``user.query``."""
        return self._topic

    @property
    def payload(self) -> P:
        """The event's content: any value, or a validated model for a typed handler."""
        return self._payload

    @property
    def metadata(self) -> Mapping[str, Any]:
        """Read-only key/value annotations (user id, session id, ...)."""
        return self._metadata

    @property
    def id(self) -> str:
        """Unique, time-sortable id (UUIDv7 text)."""
        event_id = self._id
        if event_id is None:
            # Formatting is deferred to first use: most in-process events never need the text.
            event_id = self._id = _format_id(self._ns, self._seq)
        return event_id

    @property
    def timestamp(self) -> datetime:
        """When the event was created, timezone-aware UTC."""
        return datetime.fromtimestamp(self._ns // 1000 / 1_000_000, UTC)

    @property
    def correlation_id(self) -> str:
        """Shared by every event of one chain; the id of the chain's first event."""
        return self._correlation_id or self.id

    @property
    def causation_id(self) -> str | None:
        """The id of the event whose handler published this one; None for a root event."""
        return self._causation_id

    @property
    def key(self) -> str | None:
        """Ordering key: events with the same key are handled one at a time, in order."""
        return self._key

    @property
    def source(self) -> str | None:
        """Name of the subscription or agent that published it; None from outside a handler."""
        return self._source

    @property
    def reply_to(self) -> str | None:
        """Set on events published by `EventBus.request`: where a handler's return value goes."""
        return self._reply_to

    @property
    def trace_context(self) -> Mapping[str, str]:
        """The W3C trace context (``traceparent``, ``tracestate``) the event carries when
        published with tracing on (see `eventwire.tracing`); empty otherwise."""
        return self._trace or _EMPTY_TRACE

    @property
    def target(self) -> str | None:
        """The name of the only subscription that handles this event, or None (every
        matching subscription). Set on a dead letter sent back by ``eventwire dlq retry``."""
        return self._target

    def replace(self, **changes: Any) -> Event[Any]:
        """A copy with the given fields changed (same id unless `id` is given)."""
        fields: dict[str, Any] = {
            "topic": self._topic,
            "payload": self._payload,
            "metadata": self._metadata,
            "id": self.id,
            "timestamp": None,
            "correlation_id": self._correlation_id,
            "causation_id": self._causation_id,
            "key": self._key,
            "source": self._source,
            "reply_to": self._reply_to,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"Event.replace() got unknown field(s): {', '.join(sorted(unknown))}")
        keep_time = "timestamp" not in changes
        fields.update(changes)
        event: Event[Any] = Event(**fields)
        if keep_time:
            event._ns = self._ns
        return event

    def _copy(self, payload: Any) -> Event[Any]:
        """Same event, other payload object (typed conversion); keeps drain accounting."""
        cls = _event_class(payload, self._metadata)
        if cls is type(self) or cls is Event:
            return msgspec.structs.replace(self, _payload=payload)
        fields = list(msgspec.structs.astuple(self))
        fields[1] = payload
        return _build(cls, *fields)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        """The event's fields as a plain dict (payload and metadata as they are)."""
        return {
            "id": self.id,
            "topic": self._topic,
            "payload": self._payload,
            "metadata": dict(self._metadata),
            "timestamp": self.timestamp,
            "correlation_id": self.correlation_id,
            "causation_id": self._causation_id,
            "key": self._key,
            "source": self._source,
            "reply_to": self._reply_to,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self._ns == other._ns and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.id)

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [
            ("topic", self._topic),
            ("payload", self._payload),
            ("metadata", dict(self._metadata)),
            ("id", self.id),
            ("causation_id", self._causation_id),
            ("key", self._key),
            ("source", self._source),
        ]

    def __repr__(self) -> str:
        parts = [f"topic={self._topic!r}", f"payload={self._payload!r}"]
        if self._metadata:
            parts.append(f"metadata={dict(self._metadata)!r}")
        parts.append(f"id={self.id!r}")
        if self._causation_id is not None:
            parts.append(f"causation_id={self._causation_id!r}")
        if self._key is not None:
            parts.append(f"key={self._key!r}")
        if self._source is not None:
            parts.append(f"source={self._source!r}")
        return f"Event({', '.join(parts)})"


class _TrackedEvent(Event[P], gc=True):  # type: ignore[metaclass]
    """An event whose payload or metadata may hold references back to it (a cycle), so the
    garbage collector must see it. Events with plain-value payloads skip that cost."""


# Values that cannot refer back to an event, so an event holding only these cannot be part of a
# reference cycle and may stay out of the garbage collector's sight.
_ATOMIC = frozenset({str, int, float, bool, type(None), bytes})


def _event_class(payload: Any, metadata: Mapping[str, Any] | None) -> type[Event[Any]]:
    if type(payload) in _ATOMIC and (
        not metadata or all(type(value) in _ATOMIC for value in metadata.values())
    ):
        return Event
    return _TrackedEvent


_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)


def _freeze(metadata: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not metadata:
        return _EMPTY_METADATA
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
    return _build(  # type: ignore[no-any-return]
        _event_class(payload, metadata),
        topic,
        payload,
        _freeze(metadata) if metadata else _EMPTY_METADATA,
        key,
        source,
        time.time_ns(),
        next(_sequence),
        None,
        None if parent is None else parent.correlation_id,
        None if parent is None else parent.id,
        reply_to,
    )
