from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pytest
from pydantic import BaseModel

from eventwire import Event, EventBus
from eventwire.envelope import UnencodablePayloadError


class UserQuery(BaseModel):
    text: str
    user_id: str


@dataclass
class Research:
    query: str
    score: float


async def test_pydantic_payload_is_validated_and_converted(bus: EventBus) -> None:
    got: list[UserQuery] = []

    async def handler(event: Event[UserQuery]) -> None:
        got.append(event.payload)

    bus.subscribe("user.query", handler)
    published = await bus.publish("user.query", {"text": "hi", "user_id": "u-1"})
    await bus.publish("user.query", UserQuery(text="as model", user_id="u-2"))
    await bus.drain(timeout=2)
    assert got == [UserQuery(text="hi", user_id="u-1"), UserQuery(text="as model", user_id="u-2")]
    assert published.payload == {"text": "hi", "user_id": "u-1"}  # the published event is unchanged


async def test_dataclass_payload_is_converted(bus: EventBus) -> None:
    got: list[Research] = []

    def handler(event: Event[Research]) -> None:  # plain function, same conversion
        got.append(event.payload)

    bus.subscribe("research.complete", handler)
    await bus.publish("research.complete", {"query": "q", "score": "0.5"})
    await bus.drain(timeout=2)
    assert got == [Research(query="q", score=0.5)]


async def test_invalid_payload_goes_to_dlq_and_never_reaches_handler(bus: EventBus) -> None:
    called: list[Any] = []
    dead: list[Event[Any]] = []

    async def handler(event: Event[UserQuery]) -> None:
        called.append(event.payload)

    bus.subscribe("_dlq.user.query", dead.append, name="dlq")
    bus.subscribe("user.query", handler, name="typed")
    bad = await bus.publish("user.query", {"text": "missing user id"})
    await bus.drain(timeout=2)
    assert called == []
    assert dead[0].payload.id == bad.id
    assert dead[0].metadata["error_type"] == "PayloadValidationError"
    assert "user_id" in dead[0].metadata["error"]
    assert "Field required" in dead[0].metadata["error"]
    assert dead[0].metadata["attempts"] == 0
    assert bus.stats()["typed"].dead_lettered == 1


async def test_typed_event_keeps_ids_and_metadata(bus: EventBus) -> None:
    got: list[Event[UserQuery]] = []

    async def handler(event: Event[UserQuery]) -> None:
        got.append(event)

    bus.subscribe("user.query", handler)
    published = await bus.publish(
        "user.query", {"text": "t", "user_id": "u"}, metadata={"session_id": "s"}
    )
    await bus.drain(timeout=2)
    assert got[0].id == published.id
    assert got[0].metadata["session_id"] == "s"


async def test_untyped_and_any_handlers_get_raw_payloads(bus: EventBus) -> None:
    raw: list[Any] = []

    async def untyped(event: Event) -> None:  # type: ignore[type-arg]
        raw.append(event.payload)

    async def any_typed(event: Event[Any]) -> None:
        raw.append(event.payload)

    bus.subscribe("t", untyped)
    bus.subscribe("t", any_typed)
    await bus.publish("t", {"x": 1})
    await bus.drain(timeout=2)
    assert raw == [{"x": 1}, {"x": 1}]


async def test_builtin_payload_types_are_validated(bus: EventBus) -> None:
    got: list[int] = []
    dead: list[Event[Any]] = []

    async def handler(event: Event[int]) -> None:
        got.append(event.payload)

    bus.subscribe("_dlq.n", dead.append, name="dlq")
    bus.subscribe("n", handler)
    await bus.publish("n", "12")
    await bus.publish("n", "twelve")
    await bus.drain(timeout=2)
    assert got == [12]
    assert len(dead) == 1


class Opaque:
    """A class pydantic has no schema for."""


async def test_types_pydantic_cannot_validate_are_checked_by_class(bus: EventBus) -> None:
    letters: list[Event[Any]] = []
    opaque: list[Opaque | None] = []
    dead: list[Event[Any]] = []

    async def watch(letter: Event[Event[Any]]) -> None:
        letters.append(letter.payload)

    async def takes_opaque(event: Event[Opaque | None]) -> None:
        opaque.append(event.payload)

    async def broken(event: Event[Any]) -> None:
        raise RuntimeError("x")

    bus.subscribe("_dlq.broken", watch, name="watch")
    bus.subscribe("_dlq.opaque", dead.append, name="dlq-opaque")
    bus.subscribe("broken", broken, name="broken")
    bus.subscribe("opaque", takes_opaque, name="opaque")
    original = await bus.publish("broken", 1)
    # An Opaque has no JSON form, so no backend can carry it: refused at publish, in process
    # as on a broker; what can be sent is still checked against the handler's type.
    with pytest.raises(UnencodablePayloadError):
        await bus.publish("opaque", Opaque())
    await bus.publish("opaque", None)
    await bus.publish("opaque", "not opaque")
    await bus.drain(timeout=2)
    assert [letter.id for letter in letters] == [original.id]
    assert opaque == [None]
    assert "is a str, not the tests.test_typed_payloads.Opaque | None" in dead[0].metadata["error"]


def test_unusable_payload_annotation_is_a_clear_error() -> None:
    async def handler(event: Event[Optional[list[Opaque]]]) -> None:  # noqa: UP045
        ...

    with pytest.raises(TypeError, match="cannot validate"):
        EventBus().subscribe("t", handler)


async def test_a_callable_object_handler_with_string_annotations_is_accepted() -> None:
    seen: list[int] = []

    class Counter:
        def __call__(self, event: Event[int]) -> None:
            seen.append(event.payload)

    async with EventBus() as bus:
        bus.subscribe("n", Counter(), name="counter")
        await bus.publish("n", "41")
        await bus.drain(timeout=2)
    assert seen == [41]
