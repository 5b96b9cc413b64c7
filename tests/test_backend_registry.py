"""Backends are found by URL scheme in a registry that other packages extend (an entry-point
group, or `register_backend`), and a bus takes a backend instance as well as a URL."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest

import eventwire.backends as registry
from eventwire import Event, EventBus
from eventwire.backends import ENTRY_POINT_GROUP, backend_class, register_backend
from eventwire.backends.memory import MemoryBackend


class LoopbackBackend(MemoryBackend):
    """A third party's backend: in process, under a scheme of its own."""

    scheme = "loopback"


async def _round_trip(bus: EventBus) -> list[Any]:
    seen: list[Any] = []

    async def handle(event: Event[Any]) -> None:
        seen.append(event.payload)

    bus.subscribe("ping", handle, name="pong")
    async with bus:
        await bus.publish("ping", 1)
        await bus.drain(timeout=5)
    return seen


async def test_a_bus_runs_on_a_backend_instance() -> None:
    backend = MemoryBackend()
    bus = EventBus(backend=backend)
    assert bus.backend is backend
    assert await _round_trip(bus) == [1]


def test_a_backend_serves_one_bus() -> None:
    backend = MemoryBackend()
    EventBus(backend=backend)
    with pytest.raises(ValueError, match="already serves another EventBus"):
        EventBus(backend=backend)


def test_a_url_and_a_backend_are_not_both_taken() -> None:
    with pytest.raises(ValueError, match="not both"):
        EventBus("memory://", backend=MemoryBackend())
    with pytest.raises(TypeError, match="Backend instance"):
        EventBus(backend="memory://")  # type: ignore[arg-type]


async def test_a_registered_scheme_opens_its_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_registered", {})
    with pytest.raises(ValueError, match="unknown bus URL scheme 'loopback'"):
        EventBus("loopback://")
    register_backend("loopback", LoopbackBackend)
    bus = EventBus("loopback://")
    assert type(bus.backend) is LoopbackBackend
    assert await _round_trip(bus) == [1]


async def test_a_scheme_declared_by_an_installed_package_is_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    declared = [
        EntryPoint(
            name="thirdparty",
            value=f"{__name__}:LoopbackBackend",
            group=ENTRY_POINT_GROUP,
        )
    ]
    monkeypatch.setattr(
        registry,
        "entry_points",
        lambda group: declared if group == ENTRY_POINT_GROUP else [],
    )
    assert backend_class("thirdparty") is LoopbackBackend
    assert "thirdparty" in registry.known_schemes()
    assert await _round_trip(EventBus("thirdparty://")) == [1]


def test_a_declared_backend_that_is_not_a_backend_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    declared = [EntryPoint(name="bogus", value="collections:OrderedDict", group=ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: declared)
    with pytest.raises(TypeError, match="not an eventwire Backend subclass"):
        EventBus("bogus://")


def test_schemes_are_lowercase_identifiers() -> None:
    with pytest.raises(ValueError, match="lowercase identifier"):
        register_backend("My-Scheme", LoopbackBackend)


def test_every_built_in_scheme_has_its_backend() -> None:
    for scheme in registry.SCHEMES:
        assert backend_class(scheme).scheme == scheme
