from __future__ import annotations

import gc
import uuid
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from eventwire import Event


def test_defaults_are_filled_in() -> None:
    before = datetime.now(UTC)
    event = Event(topic="user.query", payload="hi")
    after = datetime.now(UTC)
    assert event.metadata == {}
    assert (
        before - timedelta(milliseconds=1) <= event.timestamp <= after + timedelta(milliseconds=1)
    )
    assert event.timestamp.tzinfo is not None
    assert event.correlation_id == event.id
    assert event.causation_id is None
    assert event.key is None
    assert event.source is None
    parsed = uuid.UUID(event.id)
    assert parsed.version == 7


def test_ids_are_unique_and_sort_by_creation() -> None:
    events = [Event("t", n) for n in range(2_000)]
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids


def test_id_time_part_matches_timestamp() -> None:
    event = Event("t")
    millis = int(uuid.UUID(event.id).hex[:12], 16)
    assert abs(millis - event.timestamp.timestamp() * 1000) < 2


def test_event_is_immutable() -> None:
    event = Event("user.query", {"q": 1}, {"user_id": "u-1"})
    with pytest.raises(AttributeError):
        event.topic = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        event.new_field = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        event.metadata["user_id"] = "u-2"  # type: ignore[index]


def test_metadata_is_copied_at_creation() -> None:
    metadata = {"user_id": "u-1"}
    event = Event("t", None, metadata)
    metadata["user_id"] = "changed"
    assert event.metadata["user_id"] == "u-1"


def test_explicit_fields_are_kept() -> None:
    stamp = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    event = Event(
        "t",
        1,
        id="my-id",
        timestamp=stamp,
        correlation_id="c",
        causation_id="p",
        key="k",
        source="agent",
    )
    assert (event.id, event.timestamp, event.correlation_id, event.causation_id) == (
        "my-id",
        stamp,
        "c",
        "p",
    )
    assert (event.key, event.source) == ("k", "agent")


def test_naive_timestamp_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Event("t", timestamp=datetime(2026, 1, 1))


def test_bad_constructor_arguments_are_named() -> None:
    with pytest.raises(TypeError, match="topic must be a str"):
        Event(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metadata must be a mapping"):
        Event("t", None, [("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="id must be a non-empty str"):
        Event("t", id="")


def test_replace_keeps_identity_unless_told() -> None:
    event = Event("t", 1, {"a": 1}, key="k")
    changed = event.replace(payload=2)
    assert changed.payload == 2
    assert event.payload == 1
    assert changed.id == event.id
    assert changed.timestamp == event.timestamp
    assert changed.key == "k"
    assert changed.metadata == {"a": 1}
    with pytest.raises(TypeError, match="unknown field"):
        event.replace(colour="red")


def test_equality_and_hash() -> None:
    event = Event("t", 1)
    assert event == event.replace()
    assert event != event.replace(payload=2)
    assert hash(event) == hash(event.replace(payload=2))
    assert event != Event("t", 1)


def test_generic_alias_for_annotations() -> None:
    alias = Event[int]
    event = alias("t", 1)
    assert isinstance(event, Event)
    assert "topic='t'" in repr(event)


def test_plain_value_events_skip_the_garbage_collector() -> None:
    from eventwire.event import new_event

    assert not gc.is_tracked(Event("t", 42, {"user": "u-1"}))
    assert not gc.is_tracked(new_event("t", "text", None, None, None, None))
    # anything that could lead back to the event is visible to the collector
    assert gc.is_tracked(Event("t", {"a": [1]}))
    assert gc.is_tracked(Event("t", 1, {"nested": {"a": 1}}))
    assert gc.is_tracked(new_event("t", [1], None, None, None, None))


class Holder:
    event: Any = None


def test_reference_cycles_through_an_event_are_collected() -> None:
    holder = Holder()
    event = Event("t", holder)
    holder.event = event  # event -> payload -> event
    probe = weakref.ref(holder)
    del holder, event
    gc.collect()
    assert probe() is None
