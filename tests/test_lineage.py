"""Lineage: a chain rebuilt from events and handling records, printed and exported; handling
records stored on the broker with `lineage=True`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from eventwire import Event, EventBus, Retry
from eventwire.lineage import (
    HANDLED_TOPIC,
    LineageNode,
    build_lineage,
    handling_records,
    lineage_to_dict,
    render_lineage,
)
from tests.conftest import wait_until


def wire_chain(bus: EventBus) -> None:
    """user.query -> research.complete -> email.sent; email fails once; `archive` always
    fails, so research.complete is also dead-lettered."""
    failures = {"email": 0}

    async def research(event: Event[Any]) -> None:
        await bus.publish("research.complete", f"notes on {event.payload}")

    async def email(event: Event[Any]) -> None:
        if failures["email"] == 0:
            failures["email"] += 1
            raise ConnectionError("smtp down")
        await bus.publish("email.sent", "ok")

    async def archive(event: Event[Any]) -> None:
        raise ValueError("archive full")

    bus.subscribe("user.query", research, name="research")
    bus.subscribe("research.complete", email, name="email", retry=Retry(attempts=2, backoff=0))
    bus.subscribe("research.complete", archive, name="archive")


def render(nodes: list[LineageNode]) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render_lineage(nodes))
    return console.export_text()


async def test_a_recorded_chain_becomes_a_tree_with_every_handling(bus: EventBus) -> None:
    wire_chain(bus)
    async with bus.record(">") as seen:
        root = await bus.publish("user.query", "revenue")
        await bus.drain(timeout=5)
    [tree] = seen.lineage(root)
    assert tree.event.id == root.id
    assert [r.outcome for r in tree.handlings] == ["handled"]
    [research] = tree.children
    assert research.event.topic == "research.complete"
    outcomes = {name: (r.outcome, r.attempt) for name, r in research.outcomes().items()}
    assert outcomes == {"email": ("handled", 2), "archive": ("dead_lettered", 1)}
    children = sorted(child.event.topic for child in research.children)
    assert children == ["_dlq.research.complete", "email.sent"]
    assert all(node.event.correlation_id == root.id for node in tree.walk())

    text = render(seen.lineage(root))
    assert f"chain {root.id}" in text
    assert "user.query" in text
    assert "✓ email  handled  2 attempts" in text
    assert "(ConnectionError: smtp down)" in text
    assert "✗ archive  dead_lettered  1 attempt" in text
    assert "(ValueError: archive full)" in text

    exported = lineage_to_dict(seen.lineage(root))
    json.dumps(exported)  # JSON-ready
    [email_handlings] = [
        [h for h in exported[0]["children"][0]["handlings"] if h["subscription"] == "email"]
    ]
    assert [h["outcome"] for h in email_handlings] == ["retrying", "handled"]


def test_build_lineage_keeps_other_chains_and_bookkeeping_out() -> None:
    root = Event("user.query", 1)
    child = Event("research.complete", 2, correlation_id=root.id, causation_id=root.id)
    record = Event(HANDLED_TOPIC, {}, correlation_id=root.id, causation_id=root.id)
    stranger = Event("user.query", 3)
    orphan = Event("email.sent", 4, correlation_id=root.id, causation_id="missing-cause")
    nodes = build_lineage([orphan, stranger, record, child, root], [], root.id)
    assert [node.event.id for node in nodes] == [root.id, orphan.id]
    assert [c.event.id for c in nodes[0].children] == [child.id]
    assert build_lineage([stranger], [], root.id) == []
    assert "no events" in render([])


def test_malformed_handling_records_are_skipped() -> None:
    good = {
        "subscription": "email",
        "event_id": "e1",
        "topic": "t",
        "correlation_id": "c",
        "attempt": 1,
        "outcome": "handled",
        "seconds": 0.5,
    }
    events = [
        Event(HANDLED_TOPIC, good),
        Event(HANDLED_TOPIC, {**good, "outcome": "exploded"}),
        Event(HANDLED_TOPIC, "not a dict"),
        Event("other.topic", good),
    ]
    [record] = handling_records(events)
    assert (record.subscription, record.outcome, record.seconds) == ("email", "handled", 0.5)


async def test_lineage_true_publishes_records_in_process() -> None:
    records: list[dict[str, Any]] = []
    async with EventBus(lineage=True) as bus:
        wire_chain(bus)

        async def collect(event: Event[Any]) -> None:
            records.append(event.payload)

        bus.subscribe(HANDLED_TOPIC, collect, name="collector")
        root = await bus.publish("user.query", "q")
        await bus.drain(timeout=5)
    # research, email x2, archive, email.sent has no subscriber: 4 records, none of itself.
    assert sorted((r["subscription"], r["outcome"]) for r in records) == [
        ("archive", "dead_lettered"),
        ("email", "handled"),
        ("email", "retrying"),
        ("research", "handled"),
    ]
    assert {r["correlation_id"] for r in records} == {root.id}


async def test_lineage_true_stores_records_on_the_broker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    async with EventBus(url, lineage=True) as bus:
        wire_chain(bus)
        root = await bus.publish("user.query", "q")
        await bus.drain(timeout=10)

    # Another process, later, reads them back from the broker's history.
    stored: list[Event[Any]] = []
    reader = EventBus(url)

    async def collect(event: Event[Any]) -> None:
        stored.append(event)

    reader.subscribe(HANDLED_TOPIC, collect, name="reader", start="earliest")
    async with reader:
        await wait_until(lambda: len(stored) >= 4, timeout=10)
    records = handling_records(stored)
    assert sorted((r.subscription, r.outcome, r.attempt) for r in records) == [
        ("archive", "dead_lettered", 1),
        ("email", "handled", 2),
        ("email", "retrying", 1),
        ("research", "handled", 1),
    ]
    assert all(event.causation_id is not None for event in stored)
    assert {r.correlation_id for r in records} == {root.id}
