"""Payloads are accepted or refused the same way on every backend, before anything is sent:
what a broker cannot carry faithfully, the in-process bus refuses too, with the same error.
What a handler receives is the table of docs/wire-format.md: an untyped handler gets the
published object itself in process and its JSON form from a broker; a typed one
(``Event[T]``) gets a `T`, equal on every backend."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID

import msgspec
import pytest
from pydantic import BaseModel, ConfigDict

from eventwire import Event, EventBus
from eventwire.envelope import MAX_DEPTH, PayloadTooLargeError, UnencodablePayloadError


class Color(enum.Enum):
    RED = "red"


class Point(BaseModel):
    x: int
    when: datetime
    tags: set[str] = set()  # a model says what its fields are: a set comes back a set


class LabelledPoint(Point):
    label: str


class StrictPoint(BaseModel):
    model_config = ConfigDict(strict=True)
    x: int
    when: datetime


@dataclass
class Reading:
    sensor: str
    value: float
    at: datetime


class Sample(msgspec.Struct):
    name: str
    at: datetime


class Pair(NamedTuple):
    left: int
    right: str


@dataclass
class Tagged:
    tags: set[str]


class Blob(msgspec.Struct):
    data: bytes


WHEN = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
WHEN_TEXT = "2026-01-02T03:04:05.678901Z"
ID = UUID("01a213a8-4a13-7415-a897-90d9000001ce")


def nested(depth: int) -> list[Any]:
    """Lists `depth` levels deep: [[[...]]]."""
    outer: list[Any] = []
    inner = outer
    for _ in range(depth - 1):
        inner.append([])
        inner = inner[0]
    return outer


def containing_itself() -> dict[str, Any]:
    loop: dict[str, Any] = {"name": "loop"}
    loop["self"] = [loop]
    return loop


def holding_itself_twice() -> list[Any]:
    # Looked into naively, level n holds 2**n references: the check must not blow up.
    twice: list[Any] = []
    twice.extend([twice, twice])
    return twice


class Refused(NamedTuple):
    value: Any
    metadata: dict[str, Any] | None
    error: type[Exception]
    says: str  # a regular expression the error's message matches, on every backend


REFUSED: dict[str, Refused] = {
    "an object": Refused(object(), None, UnencodablePayloadError, r"builtins\.object"),
    "a lambda": Refused(lambda: None, None, UnencodablePayloadError, "as JSON"),
    "NaN": Refused(math.nan, None, UnencodablePayloadError, "infinite or NaN"),
    "infinity in a list": Refused([1.0, -math.inf], None, UnencodablePayloadError, "NaN"),
    "an object in a dict": Refused({"a": object()}, None, UnencodablePayloadError, "object"),
    "an object in metadata": Refused("fine", {"who": object()}, UnencodablePayloadError, "JSON"),
    "a string over the size limit": Refused(
        "x" * (2 * 1024 * 1024), None, PayloadTooLargeError, "over the limit"
    ),
    "a set": Refused({3, 1}, None, UnencodablePayloadError, r"set value at payload: .*list"),
    "a frozenset": Refused(frozenset({"a"}), None, UnencodablePayloadError, "no sets"),
    "a set in a dict": Refused(
        {"tags": {"a"}}, None, UnencodablePayloadError, r"at payload\['tags'\]"
    ),
    "a set in a dataclass": Refused(
        Tagged({"a"}), None, UnencodablePayloadError, r"at payload\.tags"
    ),
    "bytes": Refused(b"\x00\xff", None, UnencodablePayloadError, r"bytes value .*base64"),
    "a bytearray": Refused(bytearray(b"a"), None, UnencodablePayloadError, "no bytes"),
    "a memoryview": Refused(memoryview(b"a"), None, UnencodablePayloadError, "no bytes"),
    "bytes in a struct": Refused(Blob(b"a"), None, UnencodablePayloadError, r"payload\.data"),
    "a bytes key": Refused({b"k": 1}, None, UnencodablePayloadError, "a key of payload"),
    "bytes in metadata": Refused(
        "fine", {"blob": b"a"}, UnencodablePayloadError, r"at metadata\['blob'\]"
    ),
    "a lone surrogate": Refused("\ud800", None, UnencodablePayloadError, "surrogates"),
    "a dict containing itself": Refused(
        containing_itself(), None, UnencodablePayloadError, "contains itself"
    ),
    "a list holding itself twice": Refused(
        {"a": holding_itself_twice()}, None, UnencodablePayloadError, "contains itself"
    ),
    "lists too deep": Refused(nested(MAX_DEPTH + 1), None, UnencodablePayloadError, "deep"),
    "1,000 levels deep in metadata": Refused(
        "fine", {"deep": nested(1000)}, UnencodablePayloadError, f"{MAX_DEPTH} levels"
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_an_unsendable_payload_is_refused_alike_and_nothing_is_sent(
    bus: EventBus, case: str
) -> None:
    value, metadata, error, says = REFUSED[case]
    seen: list[Any] = []

    async def handle(event: Event[Any]) -> None:
        seen.append(event.payload)

    bus.subscribe("data.in", handle, name="reader")
    with pytest.raises(error, match=says):
        await bus.publish("data.in", value, metadata=metadata)
    with pytest.raises(error, match=says):
        await bus.publish_many([("data.in", "first"), Event("data.in", value, metadata)])
    await bus.publish("data.in", "after")
    await bus.drain(timeout=15)
    assert seen == ["after"], "nothing of a refused publish (or its batch) was delivered"


async def test_a_payload_just_under_the_limit_is_delivered(bus: EventBus) -> None:
    seen: list[int] = []

    async def handle(event: Event[Any]) -> None:
        seen.append(len(event.payload))

    bus.subscribe("data.big", handle, name="reader")
    text = "y" * (1024 * 1024 - 2048)
    await bus.publish("data.big", text)
    await bus.drain(timeout=15)
    assert seen == [len(text)]


# Published value -> what an untyped handler gets from a broker: its JSON form.
JSON_FORMS: dict[str, tuple[Any, Any]] = {
    "dict": ({"a": [1, 2.5, None, True, "x"]}, {"a": [1, 2.5, None, True, "x"]}),
    "tuple": ((1, "a"), [1, "a"]),
    "named-tuple": (Pair(1, "a"), [1, "a"]),
    "int-keys": ({1: "a"}, {"1": "a"}),
    "datetime": (WHEN, WHEN_TEXT),
    "offset-datetime": (
        datetime(2026, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=2))),
        "2026-01-02T03:04:00+02:00",
    ),
    "naive-datetime": (datetime(2026, 1, 2, 3, 4), "2026-01-02T03:04:00"),
    "date": (date(2026, 1, 2), "2026-01-02"),
    "time": (time(3, 4, 5), "03:04:05"),
    "timedelta": (timedelta(days=1, seconds=5), "P1DT5S"),
    "uuid": (ID, str(ID)),
    "decimal": (Decimal("1.10"), "1.10"),
    "enum": (Color.RED, "red"),
    "model": (Point(x=1, when=WHEN), {"x": 1, "when": WHEN_TEXT, "tags": []}),
    "dataclass": (Reading("t1", 2.5, WHEN), {"sensor": "t1", "value": 2.5, "at": WHEN_TEXT}),
    "struct": (Sample("s", WHEN), {"name": "s", "at": WHEN_TEXT}),
    "as-deep-as-allowed": (nested(MAX_DEPTH), nested(MAX_DEPTH)),
}


async def test_an_untyped_handler_gets_the_object_in_process_and_its_json_form_from_a_broker(
    bus: EventBus, backend_name: str
) -> None:
    seen: dict[str, Any] = {}
    for case in JSON_FORMS:

        async def handle(event: Event[Any], case: str = case) -> None:
            seen[case] = event.payload

        bus.subscribe(f"form.{case}", handle, name=f"form-{case}")
    for case, (value, _) in JSON_FORMS.items():
        await bus.publish(f"form.{case}", value)
    await bus.drain(timeout=15)
    for case, (value, form) in JSON_FORMS.items():
        if backend_name == "memory":
            assert seen[case] is value, case  # by reference: no copy, no conversion
        else:
            assert (seen[case], type(seen[case])) == (form, type(form)), case


# (annotation, published value, what the handler gets on every backend)
TYPED: dict[str, tuple[Any, Any, Any]] = {
    "model": (Point, Point(x=1, when=WHEN, tags={"a"}), Point(x=1, when=WHEN, tags={"a"})),
    "model-from-dict": (Point, {"x": "1", "when": WHEN_TEXT}, Point(x=1, when=WHEN)),
    "model-from-subclass": (
        Point,
        LabelledPoint(x=1, when=WHEN, label="l"),
        Point(x=1, when=WHEN),  # the annotated class, as a broker can only give
    ),
    "strict-model": (StrictPoint, StrictPoint(x=1, when=WHEN), StrictPoint(x=1, when=WHEN)),
    "strict-model-from-dict": (StrictPoint, {"x": 1, "when": WHEN}, StrictPoint(x=1, when=WHEN)),
    "dataclass": (Reading, Reading("t1", 2.5, WHEN), Reading("t1", 2.5, WHEN)),
    "dataclass-from-dict": (
        Reading,
        {"sensor": "t1", "value": "2.5", "at": WHEN},
        Reading("t1", 2.5, WHEN),
    ),
    "struct": (Sample, Sample("s", WHEN), Sample("s", WHEN)),
    "struct-from-dict": (Sample, {"name": "s", "at": WHEN_TEXT}, Sample("s", WHEN)),
    "datetime": (datetime, WHEN, WHEN),
    "datetime-from-text": (datetime, WHEN_TEXT, WHEN),
    "naive-datetime": (datetime, datetime(2026, 1, 2), datetime(2026, 1, 2)),
    "date": (date, date(2026, 1, 2), date(2026, 1, 2)),
    "timedelta": (timedelta, timedelta(days=1, microseconds=5), timedelta(days=1, microseconds=5)),
    "uuid": (UUID, ID, ID),
    "uuid-from-text": (UUID, str(ID), ID),
    "decimal": (Decimal, Decimal("1.10"), Decimal("1.10")),
    "enum": (Color, Color.RED, Color.RED),
    "list-of-int": (list[int], [1, 2], [1, 2]),
    "list-from-tuple": (list[int], (1, 2), [1, 2]),
    "tuple": (tuple[int, str], (1, "a"), (1, "a")),
    "named-tuple": (Pair, Pair(1, "a"), Pair(1, "a")),
    "set-from-list": (set[str], ["b", "a"], {"a", "b"}),
    "dict-of-datetime": (dict[str, datetime], {"a": WHEN}, {"a": WHEN}),
    "dict-with-int-keys": (dict[int, str], {1: "a"}, {1: "a"}),
    "list-of-models": (list[Point], [{"x": 1, "when": WHEN}], [Point(x=1, when=WHEN)]),
    "optional": (int | None, None, None),
}


def _shape(value: Any) -> Any:
    """The value's type, and its items' types, all the way down."""
    if isinstance(value, dict):
        return (type(value), [(_shape(k), _shape(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value), [_shape(item) for item in value])
    if isinstance(value, set | frozenset):
        return (type(value), sorted(repr(_shape(item)) for item in value))
    return type(value)


def _typed(annotation: Any, seen: dict[str, Any], case: str) -> Callable[..., Any]:
    async def handle(event: Event[Any]) -> None:
        seen[case] = event.payload

    handle.__annotations__ = {"event": Event[annotation], "return": None}
    return handle


async def test_a_typed_handler_gets_the_same_type_and_value_on_every_backend(
    bus: EventBus,
) -> None:
    seen: dict[str, Any] = {}
    dead: list[Event[Any]] = []
    bus.subscribe("_dlq.typed.>", dead.append, name="dead")
    for case, (annotation, _, _) in TYPED.items():
        bus.subscribe(f"typed.{case}", _typed(annotation, seen, case), name=f"typed-{case}")
    for case, (_, value, _) in TYPED.items():
        await bus.publish(f"typed.{case}", value)
    await bus.drain(timeout=15)
    problems = {letter.metadata["subscription"]: letter.metadata["error"] for letter in dead}
    problems.update(
        (f"typed-{case}", f"got {seen[case]!r}")
        for case, (_, _, expected) in TYPED.items()
        if case in seen and (_shape(seen[case]), seen[case]) != (_shape(expected), expected)
    )
    assert problems == {}
    assert len(seen) == len(TYPED)
