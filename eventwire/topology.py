"""The architecture of an app: its agents, subscriptions and topics, and who publishes what.

`Topology.from_bus(bus)` reads what a bus declares (subscriptions with their patterns and
groups, ``publishes=[...]``) and what it learnt while it ran (`Subscription.published_topics`);
`Topology.learn(events)` adds what events seen on a broker say (each event's `source` published
its topic); `read_history(url, since=...)` fetches those events from a broker that keeps
history (`eventwire.history`). Renderers turn the model into text, Mermaid, Graphviz DOT or SVG.

Edges are of two kinds: a topic *feeds* a subscription (``subscribes``; a wildcard pattern links
every known topic it matches and carries the pattern as its label) and a subscription or agent
*publishes* a topic. A publish edge is `declared` (``publishes=``) and/or `learnt` (seen at run
time, in this process or in broker history); renderers draw learnt-only edges dashed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal
from xml.sax.saxutils import escape, quoteattr

from eventwire.history import parse_since as parse_since
from eventwire.topics import pattern_matches

if TYPE_CHECKING:
    from eventwire.bus import EventBus
    from eventwire.event import Event

NodeKind = Literal["agent", "subscription", "topic"]
EdgeKind = Literal["subscribes", "publishes"]
Format = Literal["text", "mermaid", "dot", "svg", "json"]
FORMATS: tuple[str, ...] = ("text", "mermaid", "dot", "svg", "json")

# Dead letters of every topic are drawn as this one node unless internal topics are shown.
DEAD_LETTERS = "_dlq.>"
# Patterns of the bus's per-process subscriptions (request replies, stats requests).
_PROCESS_PATTERNS = ("_bus.reply.", "_bus.stats.")


@dataclass(frozen=True, slots=True)
class Node:
    """An agent, a subscription or a topic.

    `id` is ``agent:<name>``, ``subscription:<name>`` or ``topic:<topic>``. A topic node with
    `wildcard` stands for a pattern (a subscription's, or a declared publish) that matches no
    known topic. `known` is False for an agent seen only as the source of events in broker
    history (it runs on another bus, in another process).
    """

    id: str
    kind: NodeKind
    name: str
    pattern: str | None = None
    """Subscriptions: the topic pattern."""
    group: str | None = None
    """Subscriptions: the competing-consumer group."""
    agent: str | None = None
    """Subscriptions: the agent they belong to (None for a plain subscription)."""
    payload_type: str | None = None
    """Subscriptions: the payload type of a typed handler (``Event[Model]``)."""
    wildcard: bool = False
    known: bool = True

    @property
    def internal(self) -> bool:
        """A topic of the bus's own (first token starts with ``_``)."""
        return self.kind == "topic" and self.name.startswith("_")


@dataclass(slots=True)
class Edge:
    """``topic -> subscription`` (subscribes) or ``subscription/agent -> topic`` (publishes)."""

    source: str
    target: str
    kind: EdgeKind
    pattern: str | None = None
    """Subscribes edges: the subscription's pattern, when it is not the topic itself."""
    declared: bool = False
    """Publishes edges: declared with ``publishes=[...]``."""
    learnt: bool = False
    """Publishes edges: seen at run time (in this process, or in broker history)."""
    seen: int = 0
    """Publishes edges: how many events in the history read showed it."""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source, self.target, self.kind)


def _agent_id(name: str) -> str:
    return f"agent:{name}"


def _subscription_id(name: str) -> str:
    return f"subscription:{name}"


def _topic_id(topic: str) -> str:
    return f"topic:{topic}"


def _is_wildcard(pattern: str) -> bool:
    return any(token in ("*", ">") for token in pattern.split("."))


def _type_name(payload_type: Any) -> str:
    name = getattr(payload_type, "__name__", None)
    return name if isinstance(name, str) and "[" not in repr(payload_type) else repr(payload_type)


class Topology:
    """Agents, subscriptions and topics of one or more buses, with the edges between them."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self._publishes: dict[tuple[str, str, str], Edge] = {}
        self._subscribes: dict[tuple[str, str, str], Edge] = {}
        self.events_seen = 0
        """Events `learn` was given."""

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_bus(cls, *buses: EventBus) -> Topology:
        """The topology of `buses` (several: the processes of one app, drawn together)."""
        topology = cls()
        for bus in buses:
            topology.add_bus(bus)
        return topology

    def add_bus(self, bus: EventBus) -> None:
        """Add a bus's agents and subscriptions, their declared and learnt publishes."""
        from eventwire.payloads import payload_type_of

        owners: dict[str, str] = {}
        for agent in bus.agents.values():
            self._add_node(Node(_agent_id(agent.name), "agent", agent.name))
            for subscription in agent.subscriptions:
                owners[subscription.name] = agent.name
            # An agent may declare what it publishes outside its handlers (an entry point
            # that handles nothing, like the tutorial's main agent).
            for topic in _declared(getattr(agent, "publishes", ())):
                self._publish(_agent_id(agent.name), topic, declared=True)
        for subscription in bus.subscriptions.values():
            if subscription.pattern.startswith(_PROCESS_PATTERNS):
                continue  # the bus's own per-process inboxes, not part of the app
            try:
                payload_type = payload_type_of(subscription.handler)
            except TypeError:
                payload_type = None
            node = Node(
                _subscription_id(subscription.name),
                "subscription",
                subscription.name,
                pattern=subscription.pattern,
                group=subscription.group,
                agent=owners.get(subscription.name),
                payload_type=None if payload_type is None else _type_name(payload_type),
            )
            self._add_node(node)
            for topic in subscription.publishes:
                self._publish(node.id, topic, declared=True)
            for topic in sorted(subscription.published_topics):
                self._publish(node.id, topic, learnt=True)
        self._link()

    def learn(self, events: Iterable[Event[Any]]) -> int:
        """Add a ``source -> topic`` publishes edge for each event whose `source` is set.

        A source naming a plain subscription is that subscription; one naming an agent is the
        agent's subscription that handled the event's cause (found by `causation_id` among
        `events`), else the agent itself; an unknown source becomes an agent node marked not
        `known` (it runs elsewhere). Events without a source (published from outside any
        handler or agent) add their topic only. Returns how many events were read.
        """
        batch = list(events)
        topics_by_id = {event.id: event.topic for event in batch}
        for event in batch:
            self.events_seen += 1
            topic = event.topic
            source = event.source
            if source is None:
                self._topic(topic)
                continue
            for origin in self._sources(source, topics_by_id.get(event.causation_id or "")):
                edge = self._publish(origin, topic, learnt=True)
                edge.seen += 1
        self._link()
        return len(batch)

    def _sources(self, source: str, cause_topic: str | None) -> list[str]:
        subscription = self.nodes.get(_subscription_id(source))
        if subscription is not None and subscription.agent is None:
            return [subscription.id]
        agent = self.nodes.get(_agent_id(source))
        if agent is None:
            agent = self._add_node(Node(_agent_id(source), "agent", source, known=False))
        if cause_topic is not None:
            handlers = [
                node.id
                for node in self.nodes.values()
                if node.kind == "subscription"
                and node.agent == source
                and node.pattern is not None
                and pattern_matches(node.pattern, cause_topic)
            ]
            if handlers:
                return handlers
        return [agent.id]

    def _add_node(self, node: Node) -> Node:
        existing = self.nodes.get(node.id)
        if existing is not None:
            if not existing.known and node.known:
                self.nodes[node.id] = node
                return node
            return existing
        self.nodes[node.id] = node
        return node

    def _topic(self, topic: str) -> Node:
        return self._add_node(Node(_topic_id(topic), "topic", topic, wildcard=_is_wildcard(topic)))

    def _publish(
        self, source: str, topic: str, *, declared: bool = False, learnt: bool = False
    ) -> Edge:
        target = self._topic(topic).id
        edge = self._publishes.get((source, target, "publishes"))
        if edge is None:
            edge = self._publishes[(source, target, "publishes")] = Edge(
                source, target, "publishes"
            )
        edge.declared |= declared
        edge.learnt |= learnt
        return edge

    def _link(self) -> None:
        """(Re)compute every subscribes edge from the topics known now."""
        self._subscribes.clear()
        subscriptions = [n for n in self.nodes.values() if n.kind == "subscription"]
        for node in subscriptions:
            pattern = node.pattern
            assert pattern is not None
            if not _is_wildcard(pattern):
                self._subscribe(self._topic(pattern).id, node.id, None)
                continue
            matched = [
                topic.id
                for topic in list(self.nodes.values())
                if topic.kind == "topic"
                and (
                    topic.name == pattern
                    or (not topic.wildcard and pattern_matches(pattern, topic.name))
                )
            ]
            if not matched:
                matched = [self._topic(pattern).id]
            for topic_id in matched:
                self._subscribe(
                    topic_id, node.id, None if topic_id == _topic_id(pattern) else pattern
                )

    def _subscribe(self, topic_id: str, subscription_id: str, pattern: str | None) -> None:
        edge = Edge(topic_id, subscription_id, "subscribes", pattern=pattern)
        self._subscribes[edge.key] = edge

    # -- reading ----------------------------------------------------------------------------

    @property
    def edges(self) -> list[Edge]:
        """Every edge: subscribes first, then publishes, each in the order they were found."""
        return [*self._subscribes.values(), *self._publishes.values()]

    def of_kind(self, kind: NodeKind) -> list[Node]:
        """The nodes of one kind, in the order they were added."""
        return [node for node in self.nodes.values() if node.kind == kind]

    def members(self, agent: str) -> list[Node]:
        """The subscriptions of the agent named `agent`."""
        return [n for n in self.of_kind("subscription") if n.agent == agent]

    def incoming(self, node_id: str) -> list[Edge]:
        return [edge for edge in self.edges if edge.target == node_id]

    def outgoing(self, node_id: str) -> list[Edge]:
        return [edge for edge in self.edges if edge.source == node_id]

    def view(self, *, internal: bool = False) -> Topology:
        """What is drawn: without `internal`, the bus's ``_bus.*`` topics are left out (unless
        a subscription names one exactly) and every ``_dlq.*`` topic becomes one ``_dlq.>``
        node (the dead-letter flow)."""
        if internal:
            return self
        explicit = {n.pattern for n in self.of_kind("subscription")}

        def mapped(node_id: str) -> str | None:
            node = self.nodes[node_id]
            if not node.internal:
                return node_id
            if node.name.startswith("_dlq.") or node.name == "_dlq":
                return _topic_id(DEAD_LETTERS)
            return node_id if node.name in explicit else None

        shown = Topology()
        shown.events_seen = self.events_seen
        for node in self.nodes.values():
            new_id = mapped(node.id)
            if new_id is None:
                continue
            if new_id != node.id:
                shown._add_node(Node(new_id, "topic", DEAD_LETTERS, wildcard=True))
            else:
                shown._add_node(node)
        for edge in self._publishes.values():
            source, target = mapped(edge.source), mapped(edge.target)
            if source is None or target is None:
                continue
            merged = shown._publishes.setdefault(
                (source, target, "publishes"), Edge(source, target, "publishes")
            )
            merged.declared |= edge.declared
            merged.learnt |= edge.learnt
            merged.seen += edge.seen
        for edge in self._subscribes.values():
            source = mapped(edge.source)
            if source is None:
                continue
            label = None if source == _topic_id(edge.pattern or "") else edge.pattern
            if source != edge.source and label == DEAD_LETTERS:
                label = None
            shown._subscribes.setdefault(
                (source, edge.target, "subscribes"),
                Edge(source, edge.target, "subscribes", pattern=label),
            )
        return shown

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: ``{"nodes": [...], "edges": [...]}``."""
        nodes = [
            {
                "id": n.id,
                "kind": n.kind,
                "name": n.name,
                **{
                    key: value
                    for key, value in (
                        ("pattern", n.pattern),
                        ("group", n.group),
                        ("agent", n.agent),
                        ("payload_type", n.payload_type),
                    )
                    if value is not None
                },
                **({"wildcard": True} if n.wildcard else {}),
                **({"known": False} if not n.known else {}),
            }
            for n in self.nodes.values()
        ]
        edges = []
        for e in self.edges:
            entry: dict[str, Any] = {"source": e.source, "target": e.target, "kind": e.kind}
            if e.pattern is not None:
                entry["pattern"] = e.pattern
            if e.kind == "publishes":
                entry.update(declared=e.declared, learnt=e.learnt, seen=e.seen)
            edges.append(entry)
        return {"nodes": nodes, "edges": edges}


def _declared(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(str(topic) for topic in value)
    except TypeError:
        return ()


# -- history --------------------------------------------------------------------------------


async def read_history(
    url: str,
    *,
    since: datetime,
    timeout: float = 10.0,
    limit: int = 100_000,
    progress: Callable[[int], None] | None = None,
) -> list[Event[Any]]:
    """The events a broker still holds from `since` on (application topics and dead letters):
    `eventwire.history.read_history`, with hints for ``eventwire topology`` in its errors."""
    from eventwire.history import HistoryTimeoutError, HistoryUnavailableError
    from eventwire.history import read_history as read

    try:
        return await read(
            url, since=since, timeout=timeout, limit=limit, progress=progress, purpose="topology"
        )
    except HistoryUnavailableError as error:
        raise HistoryUnavailableError(
            f"{error} (or leave --url out to draw what the app declares)"
        ) from None
    except HistoryTimeoutError as error:
        raise HistoryTimeoutError(
            f"{error}; narrow --since or raise --timeout", error.events
        ) from None


# -- names for the diagram languages ---------------------------------------------------------


def _safe_ids(topology: Topology, prefix: Callable[[Node], str]) -> dict[str, str]:
    """Identifiers made of letters, digits and ``_`` for every node, distinct, readable."""
    ids: dict[str, str] = {}
    used: set[str] = set()
    for node in topology.nodes.values():
        base = prefix(node) + re.sub(r"\W+", "_", node.name).strip("_")
        candidate, number = base, 2
        while candidate in used:
            candidate, number = f"{base}_{number}", number + 1
        used.add(candidate)
        ids[node.id] = candidate
    return ids


def _kind_prefix(node: Node) -> str:
    return {"agent": "a_", "subscription": "s_", "topic": "t_"}[node.kind]


def _short_name(node: Node) -> str:
    """A subscription's name inside its agent's box: without the ``<agent>.`` prefix."""
    if node.agent is not None and node.name.startswith(node.agent + "."):
        return node.name[len(node.agent) + 1 :]
    return node.name


def _subscription_details(node: Node) -> list[str]:
    details = []
    if node.group:
        details.append(f"group {node.group}")
    if node.payload_type:
        details.append(f"Event[{node.payload_type}]")
    return details


def _edge_note(edge: Edge) -> str:
    if edge.kind == "subscribes":
        return f"via {edge.pattern}" if edge.pattern else ""
    marks = []
    if edge.declared:
        marks.append("declared")
    if edge.learnt:
        marks.append(f"seen {edge.seen}x" if edge.seen else "learnt")
    return ", ".join(marks)


def _owned(topology: Topology) -> tuple[list[Node], list[Node], list[Node]]:
    """Agents, plain subscriptions, topics."""
    return (
        topology.of_kind("agent"),
        [n for n in topology.of_kind("subscription") if n.agent is None],
        topology.of_kind("topic"),
    )


# -- text -------------------------------------------------------------------------------------


def render_text(topology: Topology, *, title: str | None = None) -> str:
    """A readable listing: agents with their subscriptions, plain subscriptions, topics."""
    agents, plain, topics = _owned(topology)
    subscriptions = topology.of_kind("subscription")
    lines = [
        title
        or (f"{len(agents)} agent(s), {len(subscriptions)} subscription(s), {len(topics)} topic(s)")
    ]
    if topology.events_seen:
        lines[0] += f"; {topology.events_seen} event(s) read from history"

    def publishes(node_id: str, indent: str) -> list[str]:
        out = []
        edges = topology.outgoing(node_id)
        for index, edge in enumerate(edges):
            branch = "└── " if index == len(edges) - 1 else "├── "
            topic = topology.nodes[edge.target].name
            out.append(f"{indent}{branch}publishes {topic}  ({_edge_note(edge)})")
        return out

    def subscription_lines(node: Node, indent: str, last: bool, short: bool) -> list[str]:
        branch = "└── " if last else "├── "
        receives = ", ".join(
            topology.nodes[e.source].name + (f" (via {e.pattern})" if e.pattern else "")
            for e in topology.incoming(node.id)
        )
        extra = "".join(f"  [{d}]" for d in _subscription_details(node))
        name = _short_name(node) if short else node.name
        head = f"{indent}{branch}{name} <- {receives or node.pattern}{extra}"
        return [head, *publishes(node.id, indent + ("    " if last else "│   "))]

    if agents:
        lines += ["", "agents"]
        for agent in agents:
            suffix = "" if agent.known else "  (seen in history only)"
            lines.append(f"  {agent.name}{suffix}")
            members = topology.members(agent.name)
            own = topology.outgoing(agent.id)
            for index, member in enumerate(members):
                last = index == len(members) - 1 and not own
                lines += subscription_lines(member, "  ", last, short=True)
            lines += publishes(agent.id, "  ")
    if plain:
        lines += ["", "subscriptions"]
        for index, node in enumerate(plain):
            lines += subscription_lines(node, "  ", index == len(plain) - 1, short=False)
    if topics:
        lines += ["", "topics"]
        width = max(len(t.name) for t in topics)
        for topic in topics:
            senders = [topology.nodes[e.source].name for e in topology.incoming(topic.id)]
            readers = [topology.nodes[e.target].name for e in topology.outgoing(topic.id)]
            lines.append(
                f"  {topic.name.ljust(width)}  published by {', '.join(senders) or '(unknown)'}"
                f"; received by {', '.join(readers) or '(nobody)'}"
            )
    lines += [
        "",
        "declared: publishes=[...]; learnt: seen at run time; seen Nx: N events in history",
    ]
    return "\n".join(lines) + "\n"


# -- mermaid ------------------------------------------------------------------------------------


def _mermaid_label(text: str) -> str:
    return '"' + text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;") + '"'


def render_mermaid(topology: Topology) -> str:
    """A Mermaid flowchart (left to right), as GitHub renders in a ```mermaid block.

    Agents with subscriptions are subgraphs holding them; topics are stadium shapes;
    learnt-only publishes are dotted arrows."""
    ids = _safe_ids(topology, _kind_prefix)
    agents, plain, topics = _owned(topology)
    lines = ["flowchart LR"]

    def subscription(node: Node, short: bool, indent: str) -> str:
        name = _short_name(node) if short else node.name
        label = "<br/>".join(
            [_mermaid_text(name), *map(_mermaid_text, _subscription_details(node))]
        )
        return f'{indent}{ids[node.id]}["{label}"]:::subscription'

    for agent in agents:
        members = topology.members(agent.name)
        style = "agent" if agent.known else "remote"
        if members:
            lines.append(f"  subgraph {ids[agent.id]}[{_mermaid_label('agent ' + agent.name)}]")
            lines += [subscription(member, True, "    ") for member in members]
            lines.append("  end")
            lines.append(f"  class {ids[agent.id]} {style}")
        else:
            lines.append(f"  {ids[agent.id]}[[{_mermaid_label(agent.name)}]]:::{style}")
    lines += [subscription(node, False, "  ") for node in plain]
    for topic in topics:
        lines.append(f"  {ids[topic.id]}([{_mermaid_label(topic.name)}]):::topic")
    for edge in topology.edges:
        source, target = ids[edge.source], ids[edge.target]
        label = edge.pattern if edge.kind == "subscribes" else None
        arrow = "-.->" if edge.kind == "publishes" and not edge.declared else "-->"
        text = f"|{_mermaid_label(label)}|" if label else ""
        lines.append(f"  {source} {arrow}{text} {target}")
    lines += [
        "  classDef topic fill:#e8f1ff,stroke:#3b6fd8,color:#10285a",
        "  classDef subscription fill:#fff8e6,stroke:#c98a00,color:#3d2a00",
        "  classDef agent fill:#f4f4f4,stroke:#666,color:#222",
        "  classDef remote fill:#f4f4f4,stroke:#999,stroke-dasharray:4 3,color:#444",
    ]
    return "\n".join(lines) + "\n"


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


# -- dot -----------------------------------------------------------------------------------------


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(topology: Topology) -> str:
    """The graph in the Graphviz DOT language (``dot -Tsvg`` draws it)."""
    agents, plain, topics = _owned(topology)
    lines = [
        "digraph eventwire {",
        "  rankdir=LR; compound=true; nodesep=0.3; ranksep=0.7;",
        '  node [fontname="Helvetica,Arial,sans-serif", fontsize=11];',
        '  edge [fontname="Helvetica,Arial,sans-serif", fontsize=9, color="#555555"];',
    ]

    def subscription(node: Node, short: bool) -> str:
        name = _short_name(node) if short else node.name
        label = "\\n".join(
            s.replace("\\", "\\\\").replace('"', '\\"')
            for s in [name, *_subscription_details(node)]
        )
        return (
            f'{_dot_string(node.id)} [label="{label}", shape=box, style="rounded,filled", '
            'fillcolor="#fff8e6", color="#c98a00"];'
        )

    for index, agent in enumerate(agents):
        members = topology.members(agent.name)
        if members:
            lines.append(f"  subgraph cluster_{index} {{")
            lines.append(f"    label={_dot_string('agent ' + agent.name)};")
            dashed = "" if agent.known else ",dashed"
            lines.append(f'    style="rounded{dashed}"; color="#666666";')
            lines += ["    " + subscription(member, True) for member in members]
            lines.append("  }")
        else:
            style = "filled" if agent.known else "filled,dashed"
            lines.append(
                f"  {_dot_string(agent.id)} [label={_dot_string(agent.name)}, shape=box3d, "
                f'style="{style}", fillcolor="#f4f4f4"];'
            )
    lines += ["  " + subscription(node, False) for node in plain]
    for topic in topics:
        lines.append(
            f"  {_dot_string(topic.id)} [label={_dot_string(topic.name)}, shape=box, "
            'style="rounded,filled", fillcolor="#e8f1ff", color="#3b6fd8", penwidth=1.5];'
        )
    clusters = {
        agent.id: (f"cluster_{index}", topology.members(agent.name))
        for index, agent in enumerate(agents)
    }
    for edge in topology.edges:
        attributes: list[str] = []
        source = edge.source
        cluster = clusters.get(source)
        if cluster is not None and cluster[1]:
            # An edge from an agent drawn as a box of subscriptions leaves the box.
            source = cluster[1][0].id
            attributes.append(f"ltail={cluster[0]}")
        if edge.kind == "subscribes" and edge.pattern:
            attributes.append(f"label={_dot_string(edge.pattern)}")
        if edge.kind == "publishes" and not edge.declared:
            attributes.append("style=dashed")
        suffix = f" [{', '.join(attributes)}]" if attributes else ""
        lines.append(f"  {_dot_string(source)} -> {_dot_string(edge.target)}{suffix};")
    lines.append("}")
    return "\n".join(line for line in lines if line) + "\n"


# -- svg -----------------------------------------------------------------------------------------

_FONT = "Helvetica, Arial, sans-serif"
_CHAR = 7.4  # average glyph width at 13px, generous so labels fit
_ROW = 22.0
_PAD = 12.0
_GAP_X = 90.0
_GAP_Y = 22.0


@dataclass(slots=True)
class _Box:
    """One box of the built-in layout: a topic, a plain subscription, or an agent with its
    subscriptions as rows (ports where edges attach)."""

    key: str
    kind: NodeKind
    title: str
    rows: list[Node] = field(default_factory=list)
    node: Node | None = None
    dummy: bool = False
    layer: int = 0
    order: float = 0.0
    x: float = 0.0
    y: float = 0.0
    width: float = 0.0
    height: float = 0.0

    def port(self, node_id: str) -> float:
        """The y of the row for `node_id` (its centre line for anything else)."""
        for index, row in enumerate(self.rows):
            if row.id == node_id:
                return self.y + _ROW * 1.3 + _ROW * index + _ROW / 2
        return self.y + self.height / 2


def _svg_lines(node: Node) -> list[str]:
    return [node.name, *_subscription_details(node)] if node.kind == "subscription" else [node.name]


# An edge as the layout draws it: the edge, its boxes from source to target through any
# waypoints, and whether it runs backwards (closes a cycle).
_Chain = tuple[Edge, list[_Box], bool]
# An edge between boxes: source box key, target box key, the edge.
_Link = tuple[str, str, Edge]


def _layout(topology: Topology) -> tuple[list[_Box], list[_Chain]]:
    """Layered layout: boxes in columns by longest path, ordered by barycentres, with
    waypoints (dummy boxes) on edges that cross columns. Returns boxes and, per edge, its
    chain of boxes and whether it runs backwards (a cycle)."""
    boxes, where = _boxes(topology)
    links = [(where[e.source], where[e.target], e) for e in topology.edges]
    _assign_layers(boxes, links)
    all_boxes, chains = _chains(boxes, links)
    columns = _ordered_columns(all_boxes, chains)
    _place(columns)
    return all_boxes, chains


def _boxes(topology: Topology) -> tuple[dict[str, _Box], dict[str, str]]:
    """A sized box per agent (its subscriptions as rows), plain subscription and topic, by
    key; and for each node id, the key of the box it is drawn in."""
    boxes: dict[str, _Box] = {}
    where: dict[str, str] = {}
    agents, plain, topics = _owned(topology)
    for agent in agents:
        members = topology.members(agent.name)
        boxes[agent.id] = _Box(agent.id, "agent", agent.name, rows=members, node=agent)
        where[agent.id] = agent.id
        for member in members:
            where[member.id] = agent.id
    for node in [*plain, *topics]:
        boxes[node.id] = _Box(node.id, node.kind, node.name, node=node)
        where[node.id] = node.id
    for box in boxes.values():
        _size(box)
    return boxes, where


def _size(box: _Box) -> None:
    """Set the box's width and height to fit its text."""
    if box.kind == "agent":
        texts = [f"agent {box.title}"] + [
            " · ".join([_short_name(r), *_subscription_details(r)]) for r in box.rows
        ]
        box.height = _ROW * 1.3 + _ROW * len(box.rows) + (_PAD / 2 if box.rows else 0)
    else:
        assert box.node is not None
        texts = _svg_lines(box.node)
        box.height = _ROW * len(texts) + _PAD / 2
    box.width = max(len(t) for t in texts) * _CHAR + 2 * _PAD


def _back_links(keys: Iterable[str], links: list[_Link]) -> set[tuple[str, str]]:
    """The links a depth-first search finds going back into its current path: laying them
    out as if reversed breaks every cycle."""
    successors: dict[str, list[str]] = {key: [] for key in keys}
    for source, target, _ in links:
        if source != target:
            successors[source].append(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    back: set[tuple[str, str]] = set()
    for root in successors:
        if root in state:
            continue
        stack = [(root, iter(successors[root]))]
        state[root] = 1
        while stack:
            current, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[current] = 2
                stack.pop()
            elif state.get(child) == 1:
                back.add((current, child))
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(successors[child])))
    return back


def _assign_layers(boxes: dict[str, _Box], links: list[_Link]) -> None:
    """Put each box in the column of its longest path from a box nothing points to."""
    back = _back_links(boxes, links)
    forward = [(s, t) if (s, t) not in back else (t, s) for s, t, _ in links if s != t]
    predecessors: dict[str, list[str]] = {key: [] for key in boxes}
    for source, target in forward:
        predecessors[target].append(source)
    layer: dict[str, int] = {}

    def depth(key: str) -> int:
        if key not in layer:
            layer[key] = 0  # guards against any cycle left
            layer[key] = max((depth(p) + 1 for p in predecessors[key]), default=0)
        return layer[key]

    for key, box in boxes.items():
        box.layer = depth(key)


def _chains(boxes: dict[str, _Box], links: list[_Link]) -> tuple[list[_Box], list[_Chain]]:
    """Every box, waypoints included, and each link's chain of boxes: a waypoint in each
    column the link crosses."""
    chains: list[_Chain] = []
    all_boxes = list(boxes.values())
    for source, target, edge in links:
        start, end = boxes[source], boxes[target]
        reverse = end.layer <= start.layer
        chain = [start]
        low, high = sorted((start.layer, end.layer))
        for level in range(low + 1, high):
            dummy = _Box(f"~{len(all_boxes)}", "topic", "", dummy=True, layer=level, height=2)
            all_boxes.append(dummy)
            chain.append(dummy)
        if reverse:
            chain[1:] = reversed(chain[1:])
        chain.append(end)
        chains.append((edge, chain, reverse))
    return all_boxes, chains


def _ordered_columns(all_boxes: list[_Box], chains: list[_Chain]) -> dict[int, list[_Box]]:
    """The boxes by column, each column ordered by sweeping left and right in turn, moving
    each box to the mean position of its neighbours in the column swept from."""
    columns: dict[int, list[_Box]] = {}
    for position, box in enumerate(all_boxes):
        box.order = position
        columns.setdefault(box.layer, []).append(box)
    neighbours: dict[int, list[int]] = {id(b): [] for b in all_boxes}
    for _, chain, _ in chains:
        for a, b in pairwise(chain):
            neighbours[id(a)].append(id(b))
            neighbours[id(b)].append(id(a))
    by_id = {id(b): b for b in all_boxes}
    for sweep in range(8):
        levels = sorted(columns) if sweep % 2 == 0 else sorted(columns, reverse=True)
        for level in levels:
            column = columns[level]
            for box in column:
                others = [
                    by_id[n].order
                    for n in neighbours[id(box)]
                    if by_id[n].layer == level + (-1 if sweep % 2 == 0 else 1)
                ]
                if others:
                    box.order = sum(others) / len(others)
            column.sort(key=lambda b: b.order)
            for index, box in enumerate(column):
                box.order = index
    return columns


def _place(columns: dict[int, list[_Box]]) -> None:
    """Set each box's x and y: columns left to right, each centred vertically."""
    x = _PAD
    heights = {
        level: sum(b.height for b in column) + _GAP_Y * (len(column) - 1)
        for level, column in columns.items()
    }
    tallest = max(heights.values(), default=0.0)
    for level in sorted(columns):
        column = columns[level]
        width = max((b.width for b in column), default=0.0)
        y = _PAD + 24 + (tallest - heights[level]) / 2
        for box in column:
            box.x = x + (width - box.width) / 2 if not box.dummy else x + width / 2
            box.y = y
            y += box.height + _GAP_Y
        x += width + _GAP_X


def render_svg(topology: Topology, *, engine: str = "auto") -> str:
    """An SVG drawing. `engine`: ``"graphviz"`` (the ``dot`` program), ``"builtin"`` (a
    layered layout in pure Python), or ``"auto"`` (graphviz when ``dot`` is installed)."""
    if engine not in ("auto", "builtin", "graphviz"):
        raise ValueError(f"engine must be 'auto', 'builtin' or 'graphviz', got {engine!r}")
    dot = shutil.which("dot") if engine != "builtin" else None
    if engine == "graphviz" and dot is None:
        raise ValueError("engine='graphviz' needs the Graphviz `dot` program on PATH")
    if dot is not None:
        done = subprocess.run(
            [dot, "-Tsvg"],
            input=render_dot(topology),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout
        if engine == "graphviz":
            raise ValueError(f"dot failed: {done.stderr.strip()}")
    return _render_builtin_svg(topology)


def _attr(text: str) -> str:
    return quoteattr(text)


def _render_builtin_svg(topology: Topology) -> str:
    boxes, chains = _layout(topology)
    ids = _safe_ids(topology, _kind_prefix)
    real = [b for b in boxes if not b.dummy]
    width = max((b.x + b.width for b in real), default=0.0) + _PAD
    height = max((b.y + b.height for b in real), default=0.0) + _PAD
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{_FONT}" font-size="13">',
        "<title>eventwire topology</title>",
        "<defs>",
        '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" '
        'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#555"/></marker>',
        "</defs>",
        "<style>"
        ".edge path{fill:none;stroke:#555;stroke-width:1.3}"
        ".edge.learnt path{stroke-dasharray:6 4;stroke:#888}"
        ".edge text{font-size:11px;fill:#444;paint-order:stroke;stroke:#fff;stroke-width:3px}"
        ".topic rect{fill:#e8f1ff;stroke:#3b6fd8;stroke-width:1.5}"
        ".subscription rect{fill:#fff8e6;stroke:#c98a00}"
        ".agent>rect{fill:#f4f4f4;stroke:#666}"
        ".agent.remote>rect{stroke-dasharray:4 3}"
        ".detail{fill:#6b5200;font-size:11px}"
        "</style>",
        '<text x="12" y="22" font-size="12" fill="#666">'
        + escape("eventwire topology — solid: declared or subscribed; dashed: learnt at run time")
        + "</text>",
    ]
    for edge, chain, reverse in chains:
        points: list[tuple[float, float]] = []
        first, last = chain[0], chain[-1]
        start_x = first.x if reverse else first.x + first.width
        points.append((start_x, first.port(edge.source)))
        points += [(b.x, b.y + 1) for b in chain[1:-1]]
        end_x = last.x + last.width if reverse else last.x
        points.append((end_x, last.port(edge.target)))
        path = f"M{points[0][0]:.1f},{points[0][1]:.1f}"
        for (x0, y0), (x1, y1) in pairwise(points):
            bend = max(abs(x1 - x0) / 2, 40.0) * (-1 if reverse else 1)
            path += f" C{x0 + bend:.1f},{y0:.1f} {x1 - bend:.1f},{y1:.1f} {x1:.1f},{y1:.1f}"
        learnt = edge.kind == "publishes" and not edge.declared
        classes = f"edge {edge.kind}" + (" learnt" if learnt else "")
        source = topology.nodes[edge.source].name
        target = topology.nodes[edge.target].name
        out.append(
            f"<g class={_attr(classes)} data-source={_attr(source)} data-target={_attr(target)}>"
            f"<title>{escape(f'{source} → {target}')}</title>"
            f'<path d="{path}" marker-end="url(#arrow)"/>'
        )
        note = edge.pattern if edge.kind == "subscribes" else None
        if note:
            # Near the topic end, where edges to one subscription have not converged yet.
            (x0, y0), (x1, y1) = points[-2], points[-1]
            out.append(
                f'<text x="{x0 + 0.3 * (x1 - x0):.1f}" y="{y0 + 0.2 * (y1 - y0) - 4:.1f}" '
                f'text-anchor="middle">{escape(note)}</text>'
            )
        out.append("</g>")
    for box in real:
        node = box.node
        assert node is not None
        if box.kind == "agent":
            remote = "" if node.known else " remote"
            out.append(
                f'<g class="agent{remote}" id={_attr(ids[node.id])} data-name={_attr(node.name)}>'
                f"<title>{escape('agent ' + node.name)}</title>"
                f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" '
                f'height="{box.height:.1f}" rx="8"/>'
                f'<text x="{box.x + _PAD:.1f}" y="{box.y + _ROW * 0.9:.1f}" '
                f'font-weight="bold">{escape("agent " + node.name)}</text>'
            )
            for index, row in enumerate(box.rows):
                top = box.y + _ROW * 1.3 + _ROW * index
                label = _short_name(row)
                details = " · ".join(_subscription_details(row))
                out.append(
                    f'<g class="subscription" id={_attr(ids[row.id])} '
                    f"data-name={_attr(row.name)}>"
                    f"<title>{escape(f'{row.name} <- {row.pattern}')}</title>"
                    f'<rect x="{box.x + 4:.1f}" y="{top:.1f}" width="{box.width - 8:.1f}" '
                    f'height="{_ROW - 2:.1f}" rx="4"/>'
                    f'<text x="{box.x + _PAD:.1f}" y="{top + _ROW * 0.7:.1f}" xml:space="preserve">'
                    f"{escape(label)}"
                    + (f'<tspan class="detail">  · {escape(details)}</tspan>' if details else "")
                    + "</text></g>"
                )
            out.append("</g>")
            continue
        lines = _svg_lines(node)
        out.append(
            f"<g class={_attr(node.kind + (' wildcard' if node.wildcard else ''))} "
            f"id={_attr(ids[node.id])} data-name={_attr(node.name)}>"
            f"<title>{escape(node.name)}</title>"
            f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" '
            f'height="{box.height:.1f}" rx="{box.height / 2 if node.kind == "topic" else 6:.1f}"/>'
        )
        for index, line in enumerate(lines):
            css = ' class="detail"' if index else ""
            out.append(
                f'<text x="{box.x + box.width / 2:.1f}" '
                f'y="{box.y + _ROW * (index + 0.75) + _PAD / 4:.1f}" text-anchor="middle"{css}>'
                f"{escape(line)}</text>"
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render(topology: Topology, fmt: str, *, engine: str = "auto") -> str:
    """`topology` in `fmt`: text, mermaid, dot, svg or json."""
    if fmt == "text":
        return render_text(topology)
    if fmt == "mermaid":
        return render_mermaid(topology)
    if fmt == "dot":
        return render_dot(topology)
    if fmt == "svg":
        return render_svg(topology, engine=engine)
    if fmt == "json":
        import json

        return json.dumps(topology.to_dict(), indent=2) + "\n"
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
