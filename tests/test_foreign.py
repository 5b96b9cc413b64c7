"""``decoder=``: how a subscription reads other producers' messages (eventwire.foreign), without
a broker: the built-in decoders, a list tried in turn, a function of one's own, stable ids,
the trace context from headers, and a bad option refused at subscribe time."""

from __future__ import annotations

from typing import Any

import pytest

from eventwire import Event, EventBus
from eventwire.envelope import EnvelopeError
from eventwire.foreign import ForeignMessage, decoder_of

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_plain_json_keeps_headers_correlation_and_trace_and_a_stable_id() -> None:
    message = ForeignMessage(
        "orders.created",
        b'{"total": 3}',
        {"content-type": "application/json", "correlation_id": "c-9", "traceparent": PARENT},
    )
    read = decoder_of("json")
    assert read is not None
    event = read(message)
    assert (event.topic, event.payload, event.correlation_id) == (
        "orders.created",
        {"total": 3},
        "c-9",
    )
    assert dict(event.trace_context) == {"traceparent": PARENT}
    assert event.metadata["headers"] == {
        "content-type": "application/json",
        "correlation_id": "c-9",
    }
    # No broker id: the id is a hash of what it holds, the same on every redelivery.
    assert event.id == read(message).id
    assert event.id != read(ForeignMessage("orders.created", b'{"total": 4}')).id
    assert read(ForeignMessage("t.x", b"1", message_id="broker-7")).id == "broker-7"


def test_a_list_is_tried_in_turn_and_every_refusal_is_named() -> None:
    read = decoder_of(["cloudevents", "json", "text"])
    assert read is not None
    assert read(ForeignMessage("t.x", b"[1, 2]")).payload == [1, 2]
    assert read(ForeignMessage("t.x", b"plain words")).payload == "plain words"
    strict = decoder_of(["cloudevents", "json"])
    assert strict is not None
    with pytest.raises(
        EnvelopeError, match=r"cloudevents: not a CloudEvent.*json: the body is not JSON"
    ):
        strict(ForeignMessage("t.x", b"plain words"))


def test_a_function_of_ones_own_reads_what_it_likes() -> None:
    def legacy(message: ForeignMessage) -> Event[Any]:
        kind, _, rest = message.body.decode().partition(":")
        return Event(f"legacy.{kind}", rest, id=message.event_id())

    read = decoder_of([legacy])
    assert read is not None
    assert read(ForeignMessage("x.y", b"order:42")).topic == "legacy.order"


@pytest.mark.parametrize(
    ("option", "error", "fault"),
    [
        ("xml", ValueError, "unknown decoder 'xml'"),
        ([], TypeError, "decoder= takes"),
        (["json", 3], TypeError, r"got 3 in the list"),
        (42, TypeError, "decoder= takes"),
    ],
)
def test_a_bad_decoder_is_refused_at_subscribe_time(option: Any, error: type, fault: str) -> None:
    bus = EventBus()

    async def handle(event: Event[Any]) -> None:
        return None

    with pytest.raises(error, match=fault):
        bus.subscribe("t.x", handle, decoder=option)
