"""Lineage: the tree of events one event caused, with what every subscription did with each.

Events carry `correlation_id` (the chain's root) and `causation_id` (the event whose handler
published them), so a chain can be rebuilt from any set of events: a recorder's
(`bus.record()`), or a durable backend's history (``eventwire trace``). How each event was
handled comes from `HandlingRecord`s: a recorder keeps them in memory; on a broker,
``EventBus(url, lineage=True)`` (or ``eventwire run --lineage``) stores each one as an event
on `HANDLED_TOPIC`, where ``eventwire trace`` finds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from rich.markup import escape
from rich.text import Text
from rich.tree import Tree

from eventwire.backends.journal import Journal
from eventwire.event import Event, new_event
from eventwire.metrics import format_seconds
from eventwire.observe import HandlingRecord, Observer, SubscriptionInfo
from eventwire.runs import RunInfo, run_id, run_info

# Publishes an event without waiting; returns what to wait on, if anything (the bus's).
PublishSoon = Callable[[Event[Any]], "asyncio.Future[Any] | None"]

logger = logging.getLogger("eventwire")

HANDLED_TOPIC = "_bus.handled"
"""Where `LineageRecorder` stores handling records (a reserved topic: ``>`` does not match
it; read it with ``_bus.handled`` or ``_bus.>``)."""

_MARKS = {
    "handled": ("✓", "green"),
    "retrying": ("↻", "yellow"),
    "dead_lettered": ("✗", "red"),
    "cancelled": ("⊘", "magenta"),
    "skipped": ("·", "dim"),
}


@dataclass
class LineageNode:
    """One event of a chain, how each subscription handled it, and the events it caused."""

    event: Event[Any]
    handlings: list[HandlingRecord] = field(default_factory=list)
    children: list[LineageNode] = field(default_factory=list)
    runs: dict[str, RunInfo] = field(default_factory=dict)
    """Durable runs of this event, by subscription: what each journaled (see `add_runs`)."""

    def walk(self) -> Iterable[LineageNode]:
        """This node and every node under it, depth first, in time order."""
        yield self
        for child in self.children:
            yield from child.walk()

    def outcomes(self) -> dict[str, HandlingRecord]:
        """The last attempt of each subscription that handled this event, by subscription."""
        last: dict[str, HandlingRecord] = {}
        for record in self.handlings:
            last[record.subscription] = record
        return last


def _is_bookkeeping(event: Event[Any]) -> bool:
    # Handling records, replies, stats and error notices are the bus's own traffic; dead
    # letters (`_dlq.`) belong to the chain.
    return event.topic.startswith("_bus.")


def build_lineage(
    events: Iterable[Event[Any]], handlings: Iterable[HandlingRecord], correlation_id: str
) -> list[LineageNode]:
    """The chain `correlation_id` as trees: roots are its events whose cause is not among
    `events` (normally the one event that started it), children follow `causation_id`, in
    time order. Each node gets the `handlings` of its event, ordered by when they ended."""
    chain: dict[str, Event[Any]] = {}
    for event in events:
        if event.correlation_id == correlation_id and not _is_bookkeeping(event):
            chain.setdefault(event.id, event)
    records: dict[str, list[HandlingRecord]] = {}
    for record in handlings:
        if record.event_id in chain:
            records.setdefault(record.event_id, []).append(record)
    nodes = {
        event_id: LineageNode(
            event, sorted(records.get(event_id, []), key=lambda r: (r.finished_at, r.attempt))
        )
        for event_id, event in chain.items()
    }
    roots: list[LineageNode] = []
    for node in sorted(nodes.values(), key=lambda n: (n.event.timestamp, n.event.id)):
        cause = node.event.causation_id
        parent = nodes.get(cause) if cause is not None else None
        if parent is not None and parent is not node:
            parent.children.append(node)
        else:
            roots.append(node)
    return roots


def handling_records(events: Iterable[Event[Any]]) -> list[HandlingRecord]:
    """The `HandlingRecord`s stored by `LineageRecorder` among `events` (history read from a
    broker); events on other topics, and malformed records, are passed over."""
    found: list[HandlingRecord] = []
    for event in events:
        if event.topic != HANDLED_TOPIC or not isinstance(event.payload, dict):
            continue
        try:
            found.append(msgspec.convert(event.payload, HandlingRecord))
        except msgspec.ValidationError:
            logger.warning("eventwire: a malformed handling record %s was skipped", event.id)
    return found


def _short(event_id: str | None) -> str:
    return "-" if event_id is None else event_id[-12:]


def payload_preview(payload: Any, width: int = 60) -> str:
    """A payload on one line, as JSON, cut at `width` characters."""
    if isinstance(payload, Event):
        text = f"<event {payload.topic} {_short(payload.id)}>"
    else:
        try:
            text = msgspec.json.encode(payload).decode()
        except (TypeError, ValueError):
            text = repr(payload)
    return text if len(text) <= width else text[: width - 1] + "…"


def _handling_line(records: list[HandlingRecord]) -> Text:
    last = records[-1]
    mark, style = _MARKS.get(last.outcome, ("?", "white"))
    attempts = max(record.attempt for record in records)
    took = sum(record.seconds for record in records)
    line = Text.assemble(
        (f"{mark} ", style),
        (last.subscription, "bold"),
        f"  {last.outcome}",
        f"  {attempts} attempt{'s' if attempts != 1 else ''}" if attempts else "  not run",
        f"  {format_seconds(took)}",
    )
    errors = [record.error for record in records if record.error]
    if errors:
        line.append(f"  ({errors[-1]})", style="red")
    return line


def _run_line(run: RunInfo) -> Text:
    line = Text.assemble(("run ", "dim"), run.state, (f"  {run.tries} tries", "dim"))
    if run.steps:
        line.append("  " + ", ".join(run.steps))
    if run.waiting:
        line.append("  waiting for " + ", ".join(run.waiting), style="yellow")
    if run.failed:
        line.append("  failed: " + ", ".join(run.failed), style="red")
    return line


async def add_runs(nodes: list[LineageNode], journal: Journal) -> None:
    """Attach to each node the durable runs its handlings made (read from `journal`)."""
    for root in nodes:
        for node in root.walk():
            for subscription in {record.subscription for record in node.handlings}:
                run = await run_info(journal, run_id(subscription, node.event))
                if run is not None:
                    node.runs[subscription] = run


def _event_label(node: LineageNode, start: datetime, marked: str | None) -> Text:
    event = node.event
    offset = (event.timestamp - start).total_seconds()
    label = Text.assemble(
        (f"+{offset:.3f}s ", "dim"),
        (event.topic, "bold cyan" if not event.topic.startswith("_dlq.") else "bold red"),
        f"  {_short(event.id)}",
        (f"  from {event.source}" if event.source else "", "dim"),
        ("  " + escape(payload_preview(event.payload)), "dim"),
    )
    if marked is not None and event.id == marked:
        label.append("  ◀", style="bold yellow")
    return label


def render_lineage(nodes: list[LineageNode], *, marked: str | None = None) -> Tree:
    """A rich tree of the chain: each event with its time offset from the first, topic, id,
    source and payload; under it each subscription's outcome, attempts, time and last error;
    then the events it caused. `marked` (an event id) gets an arrow."""
    if not nodes:
        return Tree(Text("no events", style="dim"))
    start = min(node.event.timestamp for node in nodes)
    correlation = nodes[0].event.correlation_id
    total = sum(1 for root in nodes for _ in root.walk())
    tree = Tree(Text.assemble(("chain ", "bold"), correlation, (f"  ({total} events)", "dim")))

    def add(branch: Tree, node: LineageNode) -> None:
        child = branch.add(_event_label(node, start, marked))
        by_subscription: dict[str, list[HandlingRecord]] = {}
        for record in node.handlings:
            by_subscription.setdefault(record.subscription, []).append(record)
        for subscription, records in by_subscription.items():
            handling = child.add(_handling_line(records))
            run = node.runs.get(subscription)
            if run is not None:
                handling.add(_run_line(run))
        for grandchild in node.children:
            add(child, grandchild)

    for root in nodes:
        add(tree, root)
    return tree


def event_to_json(event: Event[Any]) -> dict[str, Any]:
    """An event as a JSON-ready dict (a nested event, such as a dead letter's, included)."""
    payload = event.payload
    return {
        "id": event.id,
        "topic": event.topic,
        "time": event.timestamp.isoformat().replace("+00:00", "Z"),
        "source": event.source,
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "key": event.key,
        "metadata": _json_value(dict(event.metadata)),
        "payload": event_to_json(payload) if isinstance(payload, Event) else _json_value(payload),
    }


def _json_value(value: Any) -> Any:
    try:
        return msgspec.to_builtins(value, enc_hook=_plain)
    except TypeError:
        return repr(value)


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"{type(value).__name__} has no JSON form")


def lineage_to_dict(nodes: list[LineageNode]) -> list[dict[str, Any]]:
    """The chain as JSON-ready dicts (``eventwire trace --json``): each event's fields, its
    `handlings` and its `children`."""

    def convert(node: LineageNode) -> dict[str, Any]:
        return {
            **event_to_json(node.event),
            "handlings": [record.to_dict() for record in node.handlings],
            "runs": {name: asdict(run) for name, run in node.runs.items()},
            "children": [convert(child) for child in node.children],
        }

    return [convert(node) for node in nodes]


class LineageRecorder(Observer):
    """Stores every handling attempt on the bus's broker as an event on `HANDLED_TOPIC`, for
    ``eventwire trace``. Installed by ``EventBus(url, lineage=True)``.

    Records go out with the bus's batched publishes (one more small event per attempt);
    `drain()` and `close()` wait for them like for any publish. Attempts on the bus's own
    ``_bus.`` topics are not recorded. On the in-process bus the records are published to
    in-process subscribers of `HANDLED_TOPIC` (the bus keeps no history: use `bus.record()`).
    """

    def __init__(self, publish_soon: PublishSoon) -> None:
        self._publish_soon = publish_soon
        self._waiting: set[asyncio.Future[Any]] = set()
        self.failed = 0

    def __repr__(self) -> str:
        return f"LineageRecorder(failed={self.failed})"

    def attempt_finished(
        self,
        token: Any,
        subscription: SubscriptionInfo,
        event: Event[Any],
        record: HandlingRecord,
        error: BaseException | None,
    ) -> None:
        self._store(subscription, event, record)

    def skipped(
        self, subscription: SubscriptionInfo, event: Event[Any], record: HandlingRecord
    ) -> None:
        self._store(subscription, event, record)

    def _store(
        self, subscription: SubscriptionInfo, event: Event[Any], record: HandlingRecord
    ) -> None:
        if _is_bookkeeping(event):
            return
        entry = new_event(HANDLED_TOPIC, record.to_dict(), None, None, event, subscription.name)
        try:
            # Queued at once: a drain() or close() that follows waits for it.
            waiting = self._publish_soon(entry)
        except Exception as failure:  # the bus is closing: say so, never break handling
            self.failed += 1
            logger.warning("eventwire: a handling record could not be stored: %s", failure)
            return
        if waiting is not None:
            self._waiting.add(waiting)
            waiting.add_done_callback(self._sent)

    def _sent(self, future: asyncio.Future[Any]) -> None:
        self._waiting.discard(future)
        if future.cancelled() or future.exception() is None:
            return
        self.failed += 1
        logger.warning("eventwire: a handling record could not be stored: %s", future.exception())
