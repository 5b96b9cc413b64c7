"""CloudEvents 1.0 both ways: every attribute survives, binary data included, in structured and
binary mode; the official CloudEvents SDK reads what eventwire writes and the reverse; what
CloudEvents cannot carry is refused naming it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import amqp, http, kafka, rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from eventwire import Event
from eventwire.cloudevent import (
    METADATA_KEY,
    from_binary,
    from_cloudevent,
    to_binary,
    to_cloudevent,
)
from eventwire.envelope import EnvelopeError, UnencodablePayloadError

TRACE = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "vendor=1",
}


def full_event(payload: Any = None) -> Event[Any]:
    return Event(
        "research.complete",
        {"summary": "ok"} if payload is None else payload,
        {"user_id": "u-1", METADATA_KEY: {"subject": "doc-7", "dataschema": "https://x/s.json"}},
        causation_id="c1",
        key="k",
        source="research",
        reply_to="_bus.reply.r1",
        timestamp=datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC),
        trace_context=TRACE,
    )


def test_every_field_and_kept_attribute_round_trips_through_a_structured_document() -> None:
    original = full_event()
    document = to_cloudevent(original)
    assert document["type"] == "research.complete"
    assert document["source"] == "research"
    assert document["time"] == "2026-11-25T12:00:00.123456Z"
    assert document["partitionkey"] == "k"
    assert document["subject"] == "doc-7"
    assert document["dataschema"] == "https://x/s.json"
    assert document["traceparent"] == TRACE["traceparent"]
    assert json.loads(document["eventwiremetadata"]) == {"user_id": "u-1"}
    back = from_cloudevent(json.loads(json.dumps(document)))
    assert back.to_dict() == original.to_dict()
    assert dict(back.trace_context) == TRACE


def test_a_foreign_document_keeps_every_attribute_and_goes_back_out_the_same() -> None:
    foreign = {
        "specversion": "1.0",
        "id": "A-1",
        "type": "com.example.order.created",
        "source": "/shop",
        "subject": "order-9",
        "dataschema": "https://example.com/order.json",
        "datacontenttype": "application/vnd.order+json",
        "time": "2026-12-01T10:00:00Z",
        "tenant": "acme",
        "priority": 3,
        "urgent": True,
        "data": {"total": 12},
    }
    event = from_cloudevent(foreign, topic="orders.created")  # the topic a subject gave
    assert (event.topic, event.id, event.source, event.payload) == (
        "orders.created",
        "A-1",
        "/shop",
        {"total": 12},
    )
    kept = event.metadata[METADATA_KEY]
    assert kept["type"] == "com.example.order.created"
    assert kept["tenant"] == "acme"
    document = to_cloudevent(event)
    for name, value in foreign.items():
        assert document[name] == value, name
    assert document["eventwiretopic"] == "orders.created"
    assert from_cloudevent(document).topic == "orders.created"


def test_binary_data_is_a_bytes_payload_and_goes_back_as_data_base64() -> None:
    event = from_cloudevent(
        {
            "specversion": "1.0",
            "id": "b",
            "type": "files.blob",
            "source": "/s",
            "data_base64": "AAH/",
        }
    )
    assert event.payload == b"\x00\x01\xff"
    document = to_cloudevent(event)
    assert document["data_base64"] == "AAH/"
    assert "data" not in document


def test_binary_mode_round_trips_with_each_binding_prefix() -> None:
    original = full_event()
    for prefix in ("ce-", "ce_", "cloudEvents:", "cloudEvents_"):
        headers, body = to_binary(original, prefix)
        assert headers["content-type"] == "application/json"
        assert all(name.startswith(prefix) for name in headers if name != "content-type")
        assert from_binary(headers, body).to_dict() == original.to_dict()
    headers, body = to_binary(full_event(b"\x00raw"))
    assert headers["content-type"] == "application/octet-stream"
    assert from_binary(headers, body).payload == b"\x00raw"


def sdk_event(data: Any) -> CloudEvent:
    attributes = {
        "specversion": "1.0",
        "id": "sdk-1",
        "type": "orders.created",
        "source": "/sdk",
        "subject": "o-1",
        "tenant": "acme",
        "datacontenttype": "application/json" if not isinstance(data, bytes) else None,
    }
    return CloudEvent({k: v for k, v in attributes.items() if v is not None}, data)


@pytest.mark.parametrize("data", [{"total": 3}, b"\x00\x01"])
def test_what_the_cloudevents_sdk_writes_is_read_in_every_binding(data: Any) -> None:
    event = sdk_event(data)
    fmt = JSONFormat()
    readings = []
    structured = http.to_structured(event, fmt)
    readings.append(from_cloudevent(json.loads(structured.body)))
    for binding in (http, rabbitmq):
        message = binding.to_binary(event, fmt)
        headers = dict(message.headers)
        if binding is rabbitmq and message.content_type:
            headers["content-type"] = message.content_type
        readings.append(from_binary(headers, message.body))
    message = kafka.to_binary(event, fmt)
    readings.append(from_binary({k: v for k, v in message.headers.items()}, message.value))
    message = amqp.to_binary(event, fmt)  # AMQP 1.0: time as milliseconds, cloudEvents_
    readings.append(
        from_binary(message.application_properties | message.properties, message.application_data)
    )
    for reading in readings:
        assert (reading.topic, reading.id, reading.source, reading.payload) == (
            "orders.created",
            "sdk-1",
            "/sdk",
            data,
        )
        assert reading.metadata[METADATA_KEY]["subject"] == "o-1"
        assert reading.metadata[METADATA_KEY]["tenant"] == "acme"
        sent = event.get_time()
        assert sent is not None
        # AMQP 1.0 carries milliseconds.
        assert abs((reading.timestamp - sent).total_seconds()) < 0.001


def test_what_eventwire_writes_is_read_by_the_cloudevents_sdk() -> None:
    original = full_event()
    fmt = JSONFormat()
    structured = http.from_structured(
        http.HTTPMessage(
            {"content-type": "application/cloudevents+json"},
            json.dumps(to_cloudevent(original)).encode(),
        ),
        fmt,
    )
    headers, body = to_binary(original)
    binary = http.from_binary(http.HTTPMessage(headers, body), fmt)
    for read in (structured, binary):
        assert read.get_id() == original.id
        assert read.get_type() == "research.complete"
        assert read.get_source() == "research"
        assert read.get_subject() == "doc-7"
        assert read.get_extension("partitionkey") == "k"
        assert read.get_extension("traceparent") == TRACE["traceparent"]
        assert read.get_data() in ({"summary": "ok"}, b'{"summary":"ok"}')


@pytest.mark.parametrize(
    ("kept", "fault"),
    [
        ({"id": "x"}, "may not set 'id'"),
        ({"MyExt": "x"}, "'MyExt' .* is not a valid name"),
        ({"tags": ["a"]}, "'tags' holds a list"),
        ({"ratio": 0.5}, "'ratio' holds a float"),
        ("subject=x", "must be a dict"),
    ],
)
def test_what_cloudevents_cannot_carry_is_refused_naming_it(kept: Any, fault: str) -> None:
    with pytest.raises(EnvelopeError, match=fault):
        to_cloudevent(Event("t.x", 1, {METADATA_KEY: kept}))


def test_bad_documents_name_the_fault() -> None:
    base = {"specversion": "1.0", "id": "x", "type": "t.x", "source": "/s"}
    with pytest.raises(EnvelopeError, match="lacks required attribute"):
        from_cloudevent({"specversion": "1.0", "id": "x"})
    with pytest.raises(EnvelopeError, match="specversion"):
        from_cloudevent(base | {"specversion": "0.3"})
    with pytest.raises(EnvelopeError, match="both data and data_base64"):
        from_cloudevent(base | {"data": 1, "data_base64": "AA=="})
    with pytest.raises(EnvelopeError, match="not base64"):
        from_cloudevent(base | {"data_base64": "!!"})
    with pytest.raises(EnvelopeError, match=r"not an eventwire topic.*pass topic="):
        from_cloudevent(base | {"type": "Order Created"})
    headers = {"ce-id": "x", "ce-type": "t.x", "ce-source": "/s", "content-type": "text/json"}
    with pytest.raises(EnvelopeError, match="not the JSON its content type says"):
        from_binary(headers | {"content-type": "application/json"}, b"{oops")
    with pytest.raises(UnencodablePayloadError, match="no sets"):
        to_cloudevent(Event("t", {"tags": {"a"}}))
