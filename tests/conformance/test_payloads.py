"""Payloads are accepted or refused the same way on every backend, before anything is sent:
what a broker cannot carry, the in-process bus refuses too, with the same error."""

from __future__ import annotations

import math
from typing import Any

import pytest

from eventwire import Event, EventBus
from eventwire.envelope import PayloadTooLargeError, UnencodablePayloadError

REFUSED: dict[str, tuple[Any, dict[str, Any] | None, type[Exception]]] = {
    "an object": (object(), None, UnencodablePayloadError),
    "a lambda": (lambda: None, None, UnencodablePayloadError),
    "NaN": (math.nan, None, UnencodablePayloadError),
    "infinity in a list": ([1.0, -math.inf], None, UnencodablePayloadError),
    "an object in a dict": ({"a": object()}, None, UnencodablePayloadError),
    "an object in metadata": ("fine", {"who": object()}, UnencodablePayloadError),
    "a string over the size limit": ("x" * (2 * 1024 * 1024), None, PayloadTooLargeError),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_an_unsendable_payload_is_refused_alike_and_nothing_is_sent(
    bus: EventBus, case: str
) -> None:
    value, metadata, error = REFUSED[case]
    seen: list[Any] = []

    async def handle(event: Event[Any]) -> None:
        seen.append(event.payload)

    bus.subscribe("data.in", handle, name="reader")
    with pytest.raises(error):
        await bus.publish("data.in", value, metadata=metadata)
    with pytest.raises(error):
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
