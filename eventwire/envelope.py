"""How an event crosses a process boundary: a versioned JSON envelope, never a pickle.

One JSON document per event (msgspec does the encoding)::

    {"v": 1, "id": "...", "topic": "user.query", "time": "2026-11-25T17:01:17.282373Z",
     "payload": ..., "metadata": {...}, "correlation_id": "...", "causation_id": null,
     "key": null, "source": "research", "reply_to": null}

`payload` is any JSON value, or a value with one obvious JSON form (a datetime, a UUID, a
pydantic model, a dataclass...; the table in docs/wire-format.md), and a typed handler
(``Event[Model]``) gets its type back on the other side. Sets and bytes, which JSON would
carry as something else, are refused, as is anything with no JSON form. When the payload
is itself an event (a dead letter), it is nested as an envelope and ``"payload_kind": "event"``
says so. `eventwire.cloudevent` maps the same fields onto CloudEvents 1.0.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from typing import Any

import msgspec

from eventwire.errors import EventwireError
from eventwire.event import Event, text_length

ENVELOPE_VERSION = 1
DEFAULT_MAX_BYTES = 1024 * 1024
_NESTED_EVENT = "event"


class EnvelopeError(EventwireError, ValueError):
    """Bytes that are not a valid eventwire envelope (foreign, truncated, other version)."""


class UnencodablePayloadError(EventwireError, TypeError):
    """A payload or metadata value that has no JSON form."""


class PayloadTooLargeError(EventwireError, ValueError):
    """An encoded event over the size limit."""


class _Envelope(msgspec.Struct, forbid_unknown_fields=False, omit_defaults=True):
    v: int
    id: str
    topic: str
    time: datetime
    payload: Any = None
    metadata: dict[str, Any] = {}
    correlation_id: str | None = None
    causation_id: str | None = None
    key: str | None = None
    source: str | None = None
    reply_to: str | None = None
    payload_kind: str | None = None
    trace: dict[str, str] | None = None
    target: str | None = None


def _json_form(value: Any) -> Any:
    # Called by msgspec for types it does not know natively.
    dump = getattr(value, "model_dump", None)  # pydantic v2 models
    if callable(dump):
        return dump(mode="json")
    raise UnencodablePayloadError(
        f"cannot encode a {type(value).__module__}.{type(value).__qualname__} as JSON: "
        "payloads and metadata must be JSON values (dict, list, tuple, str, int, float, bool, "
        "None), dates and times, UUIDs, decimals, enums, pydantic models, dataclasses or "
        "msgspec structs (docs/wire-format.md)"
    )


_encoder = msgspec.json.Encoder(enc_hook=_json_form)


def encode_payload(payload: Any) -> bytes:
    """The JSON form of a payload, as an envelope carries it (no checks: see `encode`)."""
    return _encoder.encode(payload)


# msgspec would write these as a list (in no fixed order) or as base64 text, and a handler on
# a broker would get that instead: refused, on every backend, with what to send instead.
_SETS = (set, frozenset)
_BYTES = (bytes, bytearray, memoryview)
# Leaves of plain JSON data, whose type alone says they hold no set or bytes.
_PLAIN = frozenset({str, int, float, bool, type(None)})
_REFUSED = _SETS + _BYTES
# Below this length, looking at each value is cheaper than testing them all first.
_SHORT = 16
MAX_DEPTH = 256
"""Containers (dicts, lists, objects) nested deeper than this in a payload or its metadata
are refused, as is a container that contains itself, on every backend."""
_TOO_DEEP = object()


def _unfaithful(values: list[Any]) -> Any:
    """The first set or bytes object in `values` or anything in them that msgspec writes
    itself (containers, dataclasses, structs, attrs classes, a nested event); `_TOO_DEEP` if
    they nest deeper than `MAX_DEPTH` (or refer to themselves); else None. A pydantic model
    is not looked into: its own JSON form (`model_dump`) turns sets into lists and its
    validation turns them back."""
    plain = _PLAIN.issuperset
    level = values
    for _ in range(MAX_DEPTH):  # one level of nesting per pass
        pending: list[Any] = []
        # Containers looked into on this level: one referred to many times (a list holding
        # itself twice) is looked into once, or each level would double.
        seen: set[int] = set()
        for value in level:
            kind = type(value)
            if kind in _PLAIN or id(value) in seen:
                continue
            seen.add(id(value))
            # The values of a long container are first tested all at once, in C: a long list
            # of plain values costs no loop here.
            if kind is dict or isinstance(value, dict):
                if not plain(map(type, value)):
                    pending.extend(value)  # keys: bytes keys would become base64 text too
                if len(value) < _SHORT or not plain(map(type, value.values())):
                    pending.extend(value.values())
            elif kind is list or kind is tuple or isinstance(value, list | tuple):
                if len(value) < _SHORT or not plain(map(type, value)):
                    pending.extend(value)
            elif isinstance(value, _REFUSED):
                return value
            elif isinstance(value, Event):
                # On this same level: a dead letter is as deep as the event it carries.
                level.extend((value.payload, dict(value.metadata)))
            elif isinstance(value, msgspec.Struct):
                pending.extend(getattr(value, name) for name in value.__struct_fields__)
            elif dataclasses.is_dataclass(value):
                pending.extend(getattr(value, f.name) for f in dataclasses.fields(value))
            elif hasattr(kind, "__attrs_attrs__"):
                pending.extend(getattr(value, a.name) for a in kind.__attrs_attrs__)
        if not pending:
            return None
        level = pending
    return None if plain(map(type, level)) else _TOO_DEEP  # leaves may be one level below


def _where(root: Any, target: Any, path: str, depth: int = 0) -> str | None:
    """The path from `root` to `target` (found by identity), for an error message."""
    if root is target:
        return path
    if depth > MAX_DEPTH:  # `root` may refer to itself: the target is not down there
        return None
    children: list[tuple[str, Any]] = []
    if isinstance(root, Event):
        children = [(f"{path}.payload", root.payload), (f"{path}.metadata", dict(root.metadata))]
    elif isinstance(root, dict):
        for key, value in root.items():
            if key is target:
                return f"a key of {path}"
            children.append((f"{path}[{key!r}]", value))
    elif isinstance(root, list | tuple):
        children = [(f"{path}[{index}]", value) for index, value in enumerate(root)]
    elif isinstance(root, msgspec.Struct):
        children = [(f"{path}.{name}", getattr(root, name)) for name in root.__struct_fields__]
    elif dataclasses.is_dataclass(root):
        children = [(f"{path}.{f.name}", getattr(root, f.name)) for f in dataclasses.fields(root)]
    elif hasattr(type(root), "__attrs_attrs__"):
        children = [(f"{path}.{a.name}", getattr(root, a.name)) for a in root.__attrs_attrs__]
    for child_path, child in children:
        found = _where(child, target, child_path, depth + 1)
        if found is not None:
            return found
    return None


def refuse_unfaithful(event: Event[Any], *, payload: bool = True) -> None:
    """Raise `UnencodablePayloadError` if the event's payload (unless not `payload`) or
    metadata holds a value JSON would not bring back as it was (a set, bytes, too deep)."""
    values = [event.payload] if payload else []
    if event.metadata:
        values.append(dict(event.metadata))
    found = _unfaithful(values)
    if found is None:
        return
    if found is _TOO_DEEP:
        raise UnencodablePayloadError(_too_deep(event))
    where = (
        _where(event.payload, found, "payload")
        or _where(dict(event.metadata), found, "metadata")
        or "payload"
    )
    kind = type(found).__name__
    if isinstance(found, _SETS):
        advice = (
            "JSON has no sets: a broker would deliver it as a list, in no fixed order. Send a "
            "list (sorted(...) for a stable order); a handler annotated with a set type "
            "(Event[set[str]], or a model field) gets a set back"
        )
    else:
        advice = (
            "JSON has no bytes: a broker would deliver them as base64 text. Send text (a str), "
            "base64.b64encode(data).decode() for binary data, or a reference to where the "
            "data is kept"
        )
    raise UnencodablePayloadError(
        f"the event on {event.topic!r} holds a {kind} value at {where}: {advice}"
    )


_decoder = msgspec.json.Decoder(_Envelope)


def _fields(event: Event[Any]) -> _Envelope:
    payload = event.payload
    kind = None
    if isinstance(payload, Event):
        payload = _fields(payload)
        kind = _NESTED_EVENT
    return _Envelope(
        v=ENVELOPE_VERSION,
        id=event.id,
        topic=event.topic,
        time=event.timestamp,
        payload=payload,
        metadata=dict(event.metadata),
        correlation_id=event.correlation_id,
        causation_id=event.causation_id,
        key=event.key,
        source=event.source,
        reply_to=event.reply_to,
        payload_kind=kind,
        trace=dict(event.trace_context) if event.trace_context else None,
        target=event.target,
    )


def _too_deep(event: Event[Any]) -> str:
    return (
        f"the event on {event.topic!r} nests containers more than {MAX_DEPTH} levels deep, or "
        "holds a container that contains itself: JSON cannot carry a cycle, and a broker's "
        "consumers could not decode such depth. Send a flatter structure"
    )


def _encoded(event: Event[Any], value: Any) -> bytes:
    try:
        return _encoder.encode(value)
    except UnencodablePayloadError:
        raise
    except RecursionError:  # a pydantic model or another value deep inside refers to itself
        raise UnencodablePayloadError(_too_deep(event)) from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnencodablePayloadError(f"cannot encode the event on {event.topic!r}: {exc}") from exc


def _refuse_non_finite(event: Event[Any]) -> None:
    if _has_non_finite(event):
        raise UnencodablePayloadError(
            f"the event on {event.topic!r} holds an infinite or NaN float, which JSON cannot "
            "carry; send it as a string or None"
        )


def encode(event: Event[Any], *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> bytes:
    """The event as envelope bytes. Raises `UnencodablePayloadError` for a value with no
    faithful JSON form (no JSON form at all, a set, bytes, an infinite or NaN float) and
    `PayloadTooLargeError` past `max_bytes`, before anything is sent."""
    refuse_unfaithful(event)
    try:
        fields = _fields(event)
    except RecursionError:  # events nested in events, thousands deep
        raise UnencodablePayloadError(_too_deep(event)) from None
    data = _encoded(event, fields)
    # msgspec writes inf and nan as null; look for them only when a null was written.
    if b"null" in data:
        _refuse_non_finite(event)
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"the event on {event.topic!r} encodes to {len(data):,} bytes, over the limit of "
            f"{max_bytes:,}; send a reference (a URL or an id) instead of the data, or raise "
            "the limit"
        )
    return data


# Envelope bytes besides the payload, the metadata and the event's own text fields, at most:
# field names, quotes, the version and the time.
_ENVELOPE_OVERHEAD = 512
# Room for the text fields of an event with a plain payload, which are not looked at: the
# topic (at most 253 bytes) and three ids fit; keys, sources and ids thousands of characters
# long are not expected.
_TEXT_ALLOWANCE = 512
# The widest JSON escape of one character (\u00XX) is six bytes.
_WIDEST_ESCAPE = 6


def check_encodable(event: Event[Any], *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> None:
    """Raise what `encode` would raise for `event` (`UnencodablePayloadError`,
    `PayloadTooLargeError`), without building its envelope where that is sure to succeed:
    the in-process bus refuses what a broker refuses, at the cost of a type test for an int
    or a short str, and of a look through the payload and an encoding of it alone for the
    others."""
    payload = event.payload
    kind = type(payload)
    metadata = event.metadata
    if not metadata:
        if kind is int or payload is None or kind is bool:
            return
        # ASCII text always encodes (other text may hold a lone surrogate, which UTF-8 cannot).
        if (
            kind is str
            and payload.isascii()
            and (
                max_bytes is None
                or len(payload) * _WIDEST_ESCAPE + _ENVELOPE_OVERHEAD + _TEXT_ALLOWANCE <= max_bytes
            )
        ):
            return
    if isinstance(payload, Event):  # a dead letter: rare enough to build the envelope
        encode(event, max_bytes=max_bytes)
        return
    refuse_unfaithful(event)
    data = _encoded(event, payload)
    more = _encoded(event, dict(metadata)) if metadata else b""
    if b"null" in data or b"null" in more:
        _refuse_non_finite(event)
    if (
        max_bytes is not None
        and len(data) + len(more) + text_length(event) * _WIDEST_ESCAPE + _ENVELOPE_OVERHEAD
        > max_bytes
    ):
        encode(event, max_bytes=max_bytes)  # near the limit: the envelope's size decides


def _has_non_finite(event: Event[Any]) -> bool:
    pending: list[Any] = [event.payload, dict(event.metadata)]
    while pending:
        value = pending.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                return True
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list | tuple | set | frozenset):
            pending.extend(value)
        elif isinstance(value, Event):
            pending.extend((value.payload, dict(value.metadata)))
        elif hasattr(value, "model_dump"):
            pending.append(value.model_dump())
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            pending.append(dataclasses.asdict(value))
    return False


def _event_from(envelope: _Envelope) -> Event[Any]:
    if envelope.v != ENVELOPE_VERSION:
        raise EnvelopeError(
            f"envelope version {envelope.v} is not supported: this eventwire reads version "
            f"{ENVELOPE_VERSION}; upgrade the reading side"
        )
    payload = envelope.payload
    if envelope.payload_kind == _NESTED_EVENT:
        payload = _event_from(msgspec.convert(payload, _Envelope))
    elif envelope.payload_kind is not None:
        raise EnvelopeError(f"unknown payload_kind {envelope.payload_kind!r}")
    if envelope.time.tzinfo is None:
        raise EnvelopeError("envelope time has no timezone; expected RFC 3339 with Z or offset")
    event: Event[Any] = Event(
        envelope.topic,
        payload,
        envelope.metadata,
        id=envelope.id,
        timestamp=envelope.time,
        correlation_id=envelope.correlation_id,
        causation_id=envelope.causation_id,
        key=envelope.key,
        source=envelope.source,
        reply_to=envelope.reply_to,
        trace_context=envelope.trace,
        target=envelope.target,
    )
    return event


def decode(data: bytes | bytearray | memoryview | str) -> Event[Any]:
    """The event in envelope bytes. Raises `EnvelopeError` naming what is wrong."""
    try:
        envelope = _decoder.decode(data)
        return _event_from(envelope)
    except EnvelopeError:
        raise
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        raise EnvelopeError(f"not a valid eventwire envelope: {exc}") from exc
    except RecursionError:  # another producer's JSON, nested past what Python's stack holds
        raise EnvelopeError(
            "not a valid eventwire envelope: its JSON nests too deep to decode"
        ) from None
