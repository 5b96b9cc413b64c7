"""The wire form of events: round trips, typed payloads, and bad input that names the fault."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from eventwire import Event, EventBus
from eventwire.envelope import (
    EnvelopeError,
    PayloadTooLargeError,
    UnencodablePayloadError,
    check_encodable,
    decode,
    encode,
)


class UserQuery(BaseModel):
    text: str
    user_id: str


@dataclass
class Scores:
    values: list[float]


def assert_same_event(a: Event[Any], b: Event[Any]) -> None:
    assert a.to_dict() == b.to_dict()


def test_round_trip_keeps_every_field() -> None:
    original = Event(
        "user.query",
        {"q": "revenue?", "n": [1, 2.5, None, True]},
        {"user_id": "u-1", "session_id": "s-9"},
        correlation_id="corr",
        causation_id="cause",
        key="k1",
        source="main",
        reply_to="_bus.reply.x",
    )
    copy = decode(encode(original))
    assert_same_event(copy, original)
    assert copy.timestamp == original.timestamp


def test_defaults_survive_the_trip() -> None:
    original = Event("t", None)
    copy = decode(encode(original))
    assert copy.correlation_id == original.id
    assert copy.metadata == {}
    assert copy.causation_id is None


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values, st.dictionaries(st.text(min_size=1), json_values, max_size=4))
def test_any_json_value_round_trips(payload: Any, metadata: dict[str, Any]) -> None:
    original = Event("t.x", payload, metadata)
    assert_same_event(decode(encode(original)), original)


def test_models_and_dataclasses_travel_as_json_and_come_back_typed() -> None:
    model_event = decode(encode(Event("q", UserQuery(text="hi", user_id="u"))))
    assert model_event.payload == {"text": "hi", "user_id": "u"}
    dataclass_event = decode(encode(Event("s", Scores([1.0, 2.5]))))
    assert dataclass_event.payload == {"values": [1.0, 2.5]}


async def test_typed_handler_gets_its_type_back_after_the_trip() -> None:
    got: list[UserQuery] = []

    async def handler(event: Event[UserQuery]) -> None:
        got.append(event.payload)

    async with EventBus() as bus:
        bus.subscribe("q", handler)
        wire = encode(Event("q", UserQuery(text="hi", user_id="u")))
        await bus.publish(decode(wire))
        await bus.drain(timeout=2)
    assert got == [UserQuery(text="hi", user_id="u")]


def test_dead_letter_nests_the_original_event() -> None:
    original = Event("orders.created", {"id": 7}, {"user_id": "u"})
    letter = Event("_dlq.orders.created", original, {"error": "ValueError: x", "attempts": 3})
    copy = decode(encode(letter))
    assert isinstance(copy.payload, Event)
    assert_same_event(copy.payload, original)
    assert copy.metadata["attempts"] == 3


def test_unencodable_payload_is_refused_before_sending() -> None:
    with pytest.raises(UnencodablePayloadError, match=r"builtins\.object"):
        encode(Event("t", object()))
    with pytest.raises(UnencodablePayloadError, match="JSON"):
        encode(Event("t", None, {"handle": open}))


@pytest.mark.parametrize(
    "payload", [float("inf"), {"a": [1.0, float("nan")]}, Scores([float("-inf")])]
)
def test_non_finite_floats_are_refused_not_turned_into_null(payload: Any) -> None:
    with pytest.raises(UnencodablePayloadError, match="infinite or NaN"):
        encode(Event("t", payload))
    assert decode(encode(Event("t", {"a": None, "b": 1.5}))).payload == {"a": None, "b": 1.5}


# Values of every kind a publisher might try: sendable, unfaithful (sets, bytes), without a
# JSON form, non-finite, text that UTF-8 cannot hold, and long enough to pass a small limit.
any_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=300)
    | st.sampled_from(["\ud800", b"\xff", bytearray(b"a"), object(), datetime(2026, 1, 1)])
    | st.frozensets(st.integers(), max_size=3),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=3) | st.integers() | st.binary(max_size=2), children)
        | st.builds(Scores, st.lists(children, max_size=2))
    ),
    max_leaves=12,
)


def _outcome(check: Any) -> tuple[type[Exception], str] | None:
    try:
        check()
    except (UnencodablePayloadError, PayloadTooLargeError) as exc:
        return type(exc), str(exc)
    return None


@given(any_values, st.dictionaries(st.text(max_size=3), any_values, max_size=2))
def test_the_in_process_check_refuses_exactly_what_encoding_refuses(
    payload: Any, metadata: dict[str, Any]
) -> None:
    event = Event("t.x", payload, metadata)
    expected = _outcome(lambda: encode(event, max_bytes=2_000))
    assert _outcome(lambda: check_encodable(event, max_bytes=2_000)) == expected


def test_size_limit() -> None:
    event = Event("t", "x" * 2_000)
    assert decode(encode(event, max_bytes=None)).payload == "x" * 2_000
    with pytest.raises(PayloadTooLargeError, match="over the limit of 1,000"):
        encode(event, max_bytes=1_000)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not a valid eventwire envelope"),
        (b"not json at all", "not a valid eventwire envelope"),
        (b'{"v": 1, "id": "a", "topic": "t", "time": "2026-01-01T00:00:00Z", "pay', "truncated"),
        (b'{"v": 1, "topic": "t", "time": "2026-01-01T00:00:00Z"}', "missing required field `id`"),
        (b'{"v": 2, "id": "a", "topic": "t", "time": "2026-01-01T00:00:00Z"}', "version 2"),
        (b'{"v": 1, "id": "a", "topic": 5, "time": "2026-01-01T00:00:00Z"}', "Expected `str`"),
        (b'["an", "array"]', "Expected `object`"),
    ],
)
def test_foreign_or_broken_messages_name_the_fault(data: bytes, fragment: str) -> None:
    with pytest.raises(EnvelopeError, match=fragment):
        decode(data)


def test_foreign_json_nested_too_deep_is_an_envelope_error() -> None:
    # 4 KB of brackets, as another producer might write: the documented error, not a
    # RecursionError escaping into the consumer's fetch loop.
    good = json.loads(encode(Event("t.x", 1)))
    body = json.dumps({**good, "payload": None}).replace("null", "[" * 2000 + "]" * 2000)
    with pytest.raises(EnvelopeError, match="nests too deep"):
        decode(body.encode())


def test_a_dead_letter_of_an_event_as_deep_as_allowed_is_encodable() -> None:
    from eventwire.envelope import MAX_DEPTH

    deep: list[Any] = []
    inner = deep
    for _ in range(MAX_DEPTH - 1):
        inner.append([])
        inner = inner[0]
    event = Event("t.x", deep)
    letter = Event("_dlq.t.x", event, {"error": "boom"})
    assert decode(encode(letter)).payload.payload == deep
