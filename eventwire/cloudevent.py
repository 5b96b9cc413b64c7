"""CloudEvents 1.0: an `Event` as a CloudEvent and back, in structured mode (one JSON document)
and binary mode (attributes in message headers, the data as the body).

Every attribute survives the trip. Those eventwire has fields for map onto them (the table in
docs/wire-format.md); the W3C trace context is the distributed-tracing extension
(``traceparent``, ``tracestate``); every other attribute (``subject``, ``dataschema``, a
``type`` other than the topic, a ``datacontenttype`` other than JSON, any extension) is kept
in the event's metadata under ``"cloudevents"``, from where `to_cloudevent` writes it back.
Binary data (``data_base64``, or a binary-mode body that is neither JSON nor text) becomes a
`bytes` payload, and a `bytes` payload becomes ``data_base64``. What CloudEvents cannot carry
(an extension named in capitals, an extension holding a list) is refused with an
`EnvelopeError` naming it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from eventwire.envelope import EnvelopeError, encode_payload, refuse_unfaithful
from eventwire.event import Event
from eventwire.topics import is_topic

__all__ = [
    "CLOUDEVENTS_ATTRIBUTES",
    "METADATA_KEY",
    "STRUCTURED_CONTENT_TYPE",
    "binary_attributes",
    "from_binary",
    "from_cloudevent",
    "to_binary",
    "to_cloudevent",
]

# eventwire field -> CloudEvents attribute.
CLOUDEVENTS_ATTRIBUTES: Mapping[str, str] = {
    "id": "id",
    "topic": "type",
    "source": "source",
    "time": "time",
    "payload": "data",
    "correlation_id": "correlationid",
    "causation_id": "causationid",
    "key": "partitionkey",
    "reply_to": "replyto",
    "metadata": "eventwiremetadata",
    "trace_context": "traceparent, tracestate",
}
METADATA_KEY = "cloudevents"
"""The metadata entry that keeps the attributes eventwire has no field for."""
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
# Header prefixes of binary mode: HTTP and NATS ``ce-``, Kafka ``ce_``, AMQP ``cloudEvents:``
# and the ``cloudEvents_`` form for AMQP clients that refuse a colon (compared lowercased).
BINARY_PREFIXES = ("ce-", "ce_", "cloudevents:", "cloudevents_")
_DEFAULT_SOURCE = "/eventwire"
_JSON = "application/json"
# Attributes eventwire maps onto its own fields: never kept under METADATA_KEY.
_MAPPED = frozenset(
    {
        "specversion",
        "id",
        "source",
        "time",
        "data",
        "data_base64",
        "correlationid",
        "causationid",
        "partitionkey",
        "replyto",
        "eventwiremetadata",
        "eventwiretopic",
        "traceparent",
        "tracestate",
    }
)
_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]{1,20}")
_REQUIRED = ("id", "source", "type")


def to_cloudevent(event: Event[Any]) -> dict[str, Any]:
    """The event as a CloudEvents 1.0 structured-mode document (a dict ready for JSON).

    ``source`` is ``/eventwire`` when the event has none (CloudEvents requires one). Metadata
    travels as the ``eventwiremetadata`` extension, a JSON string (extension values must be
    scalars), but for its ``"cloudevents"`` entry, whose attributes are written back as
    they came. Raises `eventwire.envelope.UnencodablePayloadError` or `EnvelopeError` naming
    what cannot go.
    """
    document = _attributes_of(event)
    if isinstance(event.payload, bytes | bytearray):
        document["data_base64"] = base64.b64encode(event.payload).decode("ascii")
    elif event.payload is not None or "datacontenttype" not in document:
        document.setdefault("datacontenttype", _JSON)
        document["data"] = json.loads(encode_payload(event.payload))
    return document


def to_binary(event: Event[Any], prefix: str = "ce-") -> tuple[dict[str, str], bytes]:
    """The event in binary mode: headers (each attribute under `prefix`, and
    ``content-type``) and the body (its data: JSON, or the bytes of a `bytes` payload)."""
    document = _attributes_of(event)
    content_type = document.pop("datacontenttype", None)
    if isinstance(event.payload, bytes | bytearray):
        body = bytes(event.payload)
        content_type = content_type or "application/octet-stream"
    else:
        body = encode_payload(event.payload)
        content_type = content_type or _JSON
    headers = {f"{prefix}{name}": _header_text(value) for name, value in document.items()}
    headers["content-type"] = content_type
    return headers, body


def from_cloudevent(document: Mapping[str, Any], *, topic: str | None = None) -> Event[Any]:
    """An event from a CloudEvents 1.0 structured-mode document; raises `EnvelopeError`.

    The topic is `topic` when given (what a broker's subject or routing key says), else the
    ``eventwiretopic`` extension eventwire writes, else ``type``.
    """
    if document.get("specversion") != "1.0":
        raise EnvelopeError(
            f"not a CloudEvents 1.0 document: specversion is {document.get('specversion')!r}"
        )
    if "data" in document and "data_base64" in document:
        raise EnvelopeError("CloudEvent has both data and data_base64: it may have only one")
    if "data_base64" in document:
        try:
            data: Any = base64.b64decode(document["data_base64"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise EnvelopeError(f"CloudEvent data_base64 is not base64: {exc}") from exc
    else:
        data = document.get("data")
    return _event(document, data, topic)


def from_binary(headers: Mapping[str, Any], body: bytes, *, topic: str | None = None) -> Event[Any]:
    """An event from a binary-mode CloudEvent: attributes from `headers` (any of the
    binding prefixes), data from `body` as its ``content-type`` says (JSON, text, or else
    bytes). Raises `EnvelopeError`."""
    attributes = binary_attributes(headers)
    content_type = _content_type(headers)
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    return _event(attributes, _data_of(body, content_type), topic)


def binary_attributes(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The CloudEvents attributes among message headers (empty if none)."""
    found: dict[str, Any] = {}
    for name, value in headers.items():
        lowered = name.lower()
        for prefix in BINARY_PREFIXES:
            if lowered.startswith(prefix):
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                if prefix == "ce-" and isinstance(text, str):
                    text = unquote(text)  # the HTTP binding percent-encodes
                found[lowered[len(prefix) :]] = text
                break
    return found


# -- the mapping -------------------------------------------------------------------------


def _attributes_of(event: Event[Any]) -> dict[str, Any]:
    """Every attribute of the event's CloudEvent but its data."""
    refuse_unfaithful(event, payload=not isinstance(event.payload, bytes | bytearray))
    metadata = dict(event.metadata)
    kept = metadata.pop(METADATA_KEY, None) or {}
    if not isinstance(kept, Mapping):
        raise EnvelopeError(
            f"metadata[{METADATA_KEY!r}] must be a dict of CloudEvents attributes, "
            f"got {type(kept).__name__}"
        )
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": event.id,
        "type": event.topic,
        "source": event.source or _DEFAULT_SOURCE,
        "time": event.timestamp.isoformat().replace("+00:00", "Z"),
        "correlationid": event.correlation_id,
    }
    for name, value in kept.items():
        _check_attribute(name, value)
        document[name] = value
    if document["type"] != event.topic:
        document["eventwiretopic"] = event.topic  # the kept type is not the topic
    optional = {
        "causationid": event.causation_id,
        "partitionkey": event.key,
        "replyto": event.reply_to,
        "eventwiremetadata": json.dumps(metadata) if metadata else None,
        "traceparent": event.trace_context.get("traceparent"),
        "tracestate": event.trace_context.get("tracestate"),
    }
    document.update({name: value for name, value in optional.items() if value is not None})
    return document


def _check_attribute(name: Any, value: Any) -> None:
    if not isinstance(name, str) or name in _MAPPED:
        raise EnvelopeError(
            f"metadata[{METADATA_KEY!r}] may not set {name!r}: eventwire writes that attribute "
            "from the event's own fields"
        )
    if not _ATTRIBUTE_NAME.fullmatch(name):
        raise EnvelopeError(
            f"CloudEvents attribute {name!r} in metadata[{METADATA_KEY!r}] is not a valid name: "
            "1 to 20 lowercase letters and digits"
        )
    if not isinstance(value, str | int):  # bool is an int
        raise EnvelopeError(
            f"CloudEvents attribute {name!r} holds a {type(value).__name__}: attribute values "
            "are strings, integers or booleans"
        )


def _event(attributes: Mapping[str, Any], data: Any, topic: str | None) -> Event[Any]:
    missing = [name for name in _REQUIRED if not attributes.get(name)]
    if missing:
        raise EnvelopeError(f"CloudEvent lacks required attribute(s): {', '.join(missing)}")
    kind = str(attributes["type"])
    chosen = topic or attributes.get("eventwiretopic") or kind
    if not is_topic(chosen):
        raise EnvelopeError(
            f"CloudEvent type {kind!r} is not an eventwire topic (dot-separated words): receive "
            "it through a subscription on a broker, whose subject or routing key gives the "
            "topic, or pass topic="
        )
    kept = {
        name: value
        for name, value in attributes.items()
        if name not in _MAPPED and not (name == "type" and value == chosen)
    }
    if kept.get("datacontenttype") == _JSON:
        del kept["datacontenttype"]
    try:
        timestamp = _time_of(attributes.get("time"))
        metadata = (
            json.loads(attributes["eventwiremetadata"]) if "eventwiremetadata" in attributes else {}
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EnvelopeError(f"CloudEvent has a malformed attribute: {exc}") from exc
    if not isinstance(metadata, dict):
        raise EnvelopeError("CloudEvent extension eventwiremetadata is not a JSON object")
    if timestamp is not None and timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    if kept:
        metadata[METADATA_KEY] = kept
    trace = {
        name: str(attributes[name]) for name in ("traceparent", "tracestate") if name in attributes
    }
    source = str(attributes["source"])
    return Event(
        chosen,
        data,
        metadata,
        id=str(attributes["id"]),
        timestamp=timestamp,
        correlation_id=_text_or_none(attributes.get("correlationid")),
        causation_id=_text_or_none(attributes.get("causationid")),
        key=_text_or_none(attributes.get("partitionkey")),
        source=None if source == _DEFAULT_SOURCE else source,
        reply_to=_text_or_none(attributes.get("replyto")),
        trace_context=trace or None,
    )


def _time_of(value: Any) -> datetime | None:
    """RFC 3339 text, or what an AMQP header holds: a timestamp, or milliseconds since 1970."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _content_type(headers: Mapping[str, Any]) -> str | None:
    for name, value in headers.items():
        if name.lower() in ("content-type", "content_type", "contenttype"):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            return text
    return None


def _data_of(body: bytes, content_type: str | None) -> Any:
    """A binary-mode body as its content type says: JSON parsed, text decoded, else bytes;
    with none, JSON if it parses, else bytes."""
    if content_type is None:
        try:
            return json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            return body
    media = content_type.split(";")[0].strip().lower()
    if media == _JSON or media.endswith("+json"):
        if not body:
            return None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EnvelopeError(
                f"CloudEvent data is not the JSON its content type says: {exc}"
            ) from exc
    if media.startswith("text/"):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeError(f"CloudEvent text data is not UTF-8: {exc}") from exc
    return body


def _header_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
