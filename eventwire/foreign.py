"""Messages other systems wrote on the broker: how a subscription reads them (``decoder=``).

By default a subscription takes eventwire envelopes only and dead-letters anything else. With
``decoder=`` it also takes what another producer wrote on its topics, as an `Event`:

- ``"cloudevents"``: a CloudEvent in structured mode (a JSON document, content type
  ``application/cloudevents+json`` or a body with ``specversion``) or binary mode (attributes in
  ``ce-``, ``ce_``, ``cloudEvents:`` or ``cloudEvents_`` headers), every attribute kept
  (`eventwire.cloudevent`);
- ``"json"``: a plain JSON body, which becomes the payload (a typed handler validates it as
  usual);
- ``"text"``: a UTF-8 body, which becomes a `str` payload;
- a callable taking a `ForeignMessage` and returning an `Event` (raising to refuse it);
- a list of these, tried in turn: ``decoder=["cloudevents", "json"]``.

Envelopes are always read first, so eventwire's own events keep coming on the same topic. The
topic is the broker's: the NATS subject or AMQP routing key (without the namespace's prefix),
or a Redis entry's ``topic`` field. A foreign event's id is the broker's own id for the message
where it has one (``Nats-Msg-Id``, else the NATS stream sequence; the AMQP ``message_id``; the
Redis entry id), else a hash of its topic, headers and body; redeliveries keep it, so
``idempotent=True`` works. A W3C ``traceparent`` header continues the producer's trace. A
message no decoder takes is dead-lettered with every reason.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from eventwire.cloudevent import (
    STRUCTURED_CONTENT_TYPE,
    binary_attributes,
    from_binary,
    from_cloudevent,
)
from eventwire.envelope import EnvelopeError
from eventwire.event import Event

__all__ = ["DECODERS", "Decoder", "DecoderOption", "ForeignMessage", "decoder_of"]

TRACE_HEADERS = ("traceparent", "tracestate")


@dataclass(frozen=True, slots=True)
class ForeignMessage:
    """A message as the broker delivered it: its topic, body, headers (NATS headers, AMQP
    headers and properties such as ``content-type``, a Redis entry's other fields) and the
    broker's id for it, if any."""

    topic: str
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None

    def header(self, name: str) -> Any:
        """The header `name` (compared without case), or None."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None

    def event_id(self) -> str:
        """The id its event gets: the broker's, else a hash of what it holds."""
        if self.message_id:
            return self.message_id
        digest = hashlib.sha256(self.topic.encode())
        for key in sorted(self.headers):
            digest.update(f"\0{key}\0{self.headers[key]}".encode())
        digest.update(b"\0\0" + self.body)
        return f"foreign-{digest.hexdigest()[:32]}"

    def trace_context(self) -> dict[str, str]:
        """The W3C trace context in its headers (empty if none)."""
        found = {name: self.header(name) for name in TRACE_HEADERS}
        return {name: header_text(value) for name, value in found.items() if value}


Decoder: TypeAlias = Callable[[ForeignMessage], Event[Any]]
DecoderOption: TypeAlias = str | Decoder | Sequence[str | Decoder]


def cloudevents(message: ForeignMessage) -> Event[Any]:
    """A CloudEvent in structured or binary mode."""
    content_type = header_text(message.header("content-type") or "").split(";")[0].strip().lower()
    # A trace context in plain headers (an instrumented producer's) when the CloudEvent
    # carries none of its own (the distributed-tracing extension).
    trace = message.trace_context()
    if content_type != STRUCTURED_CONTENT_TYPE and binary_attributes(message.headers):
        headers = dict(message.headers)
        attributes = binary_attributes(headers)
        for name, value in trace.items():
            if name not in attributes:
                headers[f"ce-{name}"] = value
        return from_binary(headers, message.body, topic=message.topic)
    try:
        document = json.loads(message.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(
            f"not a CloudEvent: no ce- headers, and the body is not JSON ({exc})"
        ) from exc
    if not isinstance(document, dict) or "specversion" not in document:
        raise EnvelopeError("not a CloudEvent: no ce- headers, and no specversion in the body")
    return from_cloudevent(trace | document, topic=message.topic)


def json_body(message: ForeignMessage) -> Event[Any]:
    """A plain JSON body: the payload."""
    try:
        payload = json.loads(message.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError(f"the body is not JSON: {exc}") from exc
    return _plain(message, payload)


def text_body(message: ForeignMessage) -> Event[Any]:
    """A UTF-8 body: a str payload."""
    try:
        payload = message.body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"the body is not UTF-8 text: {exc}") from exc
    return _plain(message, payload)


DECODERS: Mapping[str, Decoder] = {
    "cloudevents": cloudevents,
    "json": json_body,
    "text": text_body,
}


def decoder_of(option: DecoderOption | None) -> Decoder | None:
    """The decoder a ``decoder=`` option names (None: envelopes only); a clear error for a
    name or value it cannot be."""
    if option is None:
        return None
    chosen = [option] if isinstance(option, str) or callable(option) else option
    if not isinstance(chosen, Sequence) or not chosen:
        raise TypeError(f"decoder= takes {_FORMS}, got {option!r}")
    decoders = [_one(item) for item in chosen]
    if len(decoders) == 1:
        return decoders[0]

    def first_that_reads(message: ForeignMessage) -> Event[Any]:
        reasons = []
        for decoder in decoders:
            try:
                return decoder(message)
            except Exception as error:  # each decoder's own refusal: try the next
                reasons.append(f"{_name(decoder)}: {error}")
        raise EnvelopeError("no decoder read it (" + "; ".join(reasons) + ")")

    return first_that_reads


_FORMS = (
    '"cloudevents", "json", "text", a function taking a ForeignMessage and returning an '
    "Event, or a list of these (tried in turn)"
)


def _one(item: Any) -> Decoder:
    if isinstance(item, str):
        found = DECODERS.get(item)
        if found is None:
            raise ValueError(f"unknown decoder {item!r}: decoder= takes {_FORMS}")
        return found
    if inspect.iscoroutinefunction(item):
        raise TypeError(
            f"decoder {item.__qualname__} is async: a decoder is a plain function (it only "
            "turns bytes into an Event; do the async work in the handler)"
        )
    if callable(item):
        return item  # type: ignore[no-any-return]
    raise TypeError(f"decoder= takes {_FORMS}, got {item!r} in the list")


def _name(decoder: Decoder) -> str:
    for name, known in DECODERS.items():
        if known is decoder:
            return name
    return getattr(decoder, "__qualname__", repr(decoder))


def _plain(message: ForeignMessage, payload: Any) -> Event[Any]:
    headers = {
        key: header_text(value)
        for key, value in message.headers.items()
        if key.lower() not in TRACE_HEADERS
    }
    correlation = message.header("correlation_id") or message.header("correlation-id")
    return Event(
        message.topic,
        payload,
        {"headers": headers} if headers else None,
        id=message.event_id(),
        correlation_id=header_text(correlation) if correlation else None,
        trace_context=message.trace_context() or None,
    )


def header_text(value: Any) -> str:
    """A header's value as text (bytes decoded as UTF-8, a bad byte replaced)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)
