"""`eventwire topology`: the model of a sample app (declared, learnt in-process, learnt from a
broker's history), each rendering, and the command through its real entry point."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from eventwire import EventBus
from eventwire.backends.broker import BrokerBackend
from eventwire.topology import (
    Topology,
    parse_since,
    read_history,
    render_dot,
    render_mermaid,
    render_svg,
    render_text,
)
from tests.conformance.conftest import destroy
from tests.services import require_service, unique_namespace, with_namespace

APP = Path(__file__).parent / "data" / "topology_app.py"
EVENTWIRE = Path(sys.executable).parent / "eventwire"
SVG = "{http://www.w3.org/2000/svg}"


def load_app() -> ModuleType:
    """A fresh copy of the sample app module (its own classes, its own bus)."""
    name = f"topology_app_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, APP)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def app() -> Iterator[ModuleType]:
    module = load_app()
    yield module
    sys.modules.pop(module.__name__, None)


@pytest.fixture(autouse=True)
def quiet_dead_letters() -> Iterator[None]:
    # The sample's analytics subscriber fails on purpose; its logged traceback is noise here.
    logger = logging.getLogger("eventwire")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


async def run_chain(bus: EventBus, queries: int = 2) -> None:
    """Ask `queries` questions through the main agent and wait for all they set off."""
    async with bus:
        for index in range(queries):
            await bus._agents["main"].ask(f"question {index}")  # type: ignore[attr-defined]
        await bus.drain(timeout=10)


def edge(topology: Topology, source: str, target: str) -> Any:
    found = [e for e in topology.edges if e.source == source and e.target == target]
    assert len(found) == 1, f"no single edge {source} -> {target} in {topology.edges}"
    return found[0]


def test_model_of_what_the_app_declares(app: ModuleType) -> None:
    topology = Topology.from_bus(app.build())
    assert [n.name for n in topology.of_kind("agent")] == ["main", "research", "email"]
    send = topology.nodes["subscription:email.send"]
    assert (send.pattern, send.group, send.agent, send.payload_type) == (
        "research.*",
        "mailers",
        "email",
        "Research",
    )
    assert topology.nodes["subscription:research.research"].payload_type == "UserQuery"
    assert topology.nodes["subscription:audit"].agent is None
    # subscribes: exact topics, and the wildcard through the topic it matches, labelled
    assert edge(topology, "topic:user.query", "subscription:research.research").pattern is None
    via = edge(topology, "topic:research.complete", "subscription:email.send")
    assert via.pattern == "research.*"
    # publishes, declared on @on(...) and on the agent class; nothing learnt before a run
    declared = edge(topology, "subscription:research.research", "topic:research.complete")
    assert (declared.declared, declared.learnt) == (True, False)
    assert edge(topology, "agent:main", "topic:user.query").declared
    assert "topic:research.metrics" not in topology.nodes


async def test_edges_learnt_by_running_the_chain_in_process(app: ModuleType) -> None:
    bus = app.build()
    await run_chain(bus)
    topology = Topology.from_bus(bus)
    confirmed = edge(topology, "subscription:research.research", "topic:research.complete")
    assert (confirmed.declared, confirmed.learnt) == (True, True)
    learnt = edge(topology, "subscription:research.research", "topic:research.metrics")
    assert (learnt.declared, learnt.learnt) == (False, True)
    # the wildcard subscriber now hears the learnt topic too
    assert edge(topology, "topic:research.metrics", "subscription:email.send").pattern == (
        "research.*"
    )
    everything = topology.view(internal=True)
    assert {"topic:_dlq.user.query", "topic:_bus.error"} <= set(everything.nodes)
    shown = topology.view()
    assert not [n for n in shown.nodes.values() if n.name.startswith("_bus")]
    assert edge(shown, "subscription:analytics", "topic:_dlq.>").learnt


async def test_each_format_names_the_nodes_and_edges(app: ModuleType) -> None:
    bus = app.build()
    await run_chain(bus, queries=1)
    shown = Topology.from_bus(bus).view()

    text = render_text(shown)
    assert "  research\n  └── research <- user.query  [Event[UserQuery]]" in text
    assert "publishes research.complete  (declared, learnt)" in text
    assert "publishes research.metrics  (learnt)" in text
    assert "send <- research.complete (via research.*)" in text

    mermaid = render_mermaid(shown)
    assert mermaid.startswith("flowchart LR\n")
    assert '  subgraph a_research["agent research"]' in mermaid
    assert "  t_user_query --> s_research_research" in mermaid
    assert '  t_research_complete -->|"research.*"| s_email_send' in mermaid
    assert "  s_research_research --> t_research_complete" in mermaid
    assert "  s_research_research -.-> t_research_metrics" in mermaid  # learnt: dotted
    assert "  a_main --> t_user_query" in mermaid

    dot = render_dot(shown)
    assert dot.startswith("digraph eventwire {")
    assert '"topic:user.query" -> "subscription:audit";' in dot
    assert '"subscription:research.research" -> "topic:research.metrics" [style=dashed];' in dot
    assert '"topic:research.complete" -> "subscription:email.send" [label="research.*"];' in dot


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_graphviz_draws_the_dot_output(app: ModuleType) -> None:
    dot = render_dot(Topology.from_bus(app.build()).view())
    checked = subprocess.run(
        ["dot", "-Tsvg"], input=dot, text=True, capture_output=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert "research.complete" in checked.stdout


def test_builtin_svg_is_xml_with_a_node_per_agent_subscription_and_topic(
    app: ModuleType,
) -> None:
    shown = Topology.from_bus(app.build()).view()
    root = ET.fromstring(render_svg(shown, engine="builtin"))
    assert root.tag == f"{SVG}svg"
    groups = list(root.iter(f"{SVG}g"))

    def named(kind: str) -> set[str]:
        return {
            g.attrib["data-name"]
            for g in groups
            if kind in g.attrib.get("class", "").split() and "data-name" in g.attrib
        }

    assert named("agent") == {"main", "research", "email"}
    assert named("subscription") == {
        "research.research",
        "email.send",
        "audit",
        "analytics",
    }
    assert named("topic") == {"user.query", "research.complete"}
    edges = [g for g in groups if "edge" in g.attrib.get("class", "").split()]
    assert len(edges) == len(shown.edges)
    drawn = {(g.attrib["data-source"], g.attrib["data-target"]) for g in edges}
    assert ("research.complete", "email.send") in drawn
    assert ("main", "user.query") in drawn
    for g in edges:
        path = g.find(f"{SVG}path")
        assert path is not None
        assert path.attrib["d"].startswith("M")
    # every box lies inside the drawing
    width, height = float(root.attrib["width"]), float(root.attrib["height"])
    for rect in root.iter(f"{SVG}rect"):
        assert 0 <= float(rect.attrib["x"]) <= width - float(rect.attrib["width"])
        assert 0 <= float(rect.attrib["y"]) <= height - float(rect.attrib["height"])


def test_a_cycle_and_a_wildcard_nobody_publishes_still_draw() -> None:
    bus = EventBus()
    bus.subscribe("job.retry", lambda e: None, name="worker", publishes=["job.retry"])
    bus.subscribe("alerts.>", lambda e: None, name="pager")
    shown = Topology.from_bus(bus)
    assert edge(shown, "topic:job.retry", "subscription:worker")
    assert shown.nodes["topic:alerts.>"].wildcard
    root = ET.fromstring(render_svg(shown, engine="builtin"))
    names = {g.attrib.get("data-name") for g in root.iter(f"{SVG}g")}
    assert {"worker", "pager", "job.retry", "alerts.>"} <= names


def test_since_takes_durations_and_iso_times() -> None:
    now = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    assert parse_since("90m", now=now) == now - timedelta(minutes=90)
    assert parse_since("2d", now=now) == now - timedelta(days=2)
    assert parse_since("2026-01-31T09:00:00", now=now) == datetime(2026, 1, 31, 9, tzinfo=UTC)
    with pytest.raises(ValueError, match=r"e\.g\. 30m"):
        parse_since("yesterday", now=now)


async def test_history_needs_a_backend_that_keeps_it() -> None:
    with pytest.raises(ValueError, match="keeps no history"):
        await read_history("memory://", since=datetime.now(UTC))


def history_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/bus.db"
    if kind == "amqp-history":
        return with_namespace(require_service("rabbitmq"), unique_namespace()) + "&history=1d"
    return with_namespace(require_service(kind), unique_namespace())


@pytest.mark.parametrize("kind", ["sqlite", "redis", "nats", "amqp-history"])
async def test_edges_learnt_from_a_brokers_history(
    kind: str, tmp_path: Path, app: ModuleType
) -> None:
    url = history_url(kind, tmp_path)
    started = datetime.now(UTC) - timedelta(seconds=5)
    await run_chain(app.build(url), queries=3)

    events = await read_history(url, since=started, timeout=20)
    # a fresh copy of the app, as `eventwire topology` imports it: it never ran
    topology = Topology.from_bus(load_app().build(url))
    assert topology.learn(events) == len(events)
    confirmed = edge(topology, "subscription:research.research", "topic:research.complete")
    assert (confirmed.declared, confirmed.learnt, confirmed.seen) == (True, True, 3)
    learnt = edge(topology, "subscription:research.research", "topic:research.metrics")
    assert (learnt.declared, learnt.seen) == (False, 3)
    assert edge(topology, "agent:main", "topic:user.query").seen == 3
    assert edge(topology.view(), "subscription:analytics", "topic:_dlq.>").seen == 3

    scanner = EventBus(url)
    assert isinstance(scanner.backend, BrokerBackend)
    await scanner.backend.connect()
    try:
        left = [c.name for c in await scanner.backend.consumers()]
        await scanner.backend.destroy()
    finally:
        await scanner.backend.close()
    assert "research.research" in left
    assert not [name for name in left if name.startswith("_eventwire.topology")]


def test_history_from_a_bus_nobody_knows_marks_its_sources_unknown() -> None:
    from eventwire import Event

    topology = Topology()
    root = Event("order.placed", {}, source=None)
    child = Event("order.billed", {}, source="billing", causation_id=root.id)
    topology.learn([root, child])
    billing = topology.nodes["agent:billing"]
    assert not billing.known
    assert edge(topology, "agent:billing", "topic:order.billed").seen == 1
    assert "topic:order.placed" in topology.nodes
    assert not topology.incoming("topic:order.placed")


# -- the command -----------------------------------------------------------------------------


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "PYTHONPATH": str(cwd)}
    env.pop("EVENTWIRE_URL", None)
    return subprocess.run(
        [str(EVENTWIRE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    shutil.copy(APP, tmp_path / "shop.py")
    return tmp_path


def test_command_prints_text_and_mermaid_and_writes_svg(app_dir: Path) -> None:
    text = cli(app_dir, "topology", "shop:bus")
    assert text.returncode == 0, text.stderr
    assert "research <- user.query" in text.stdout
    assert "publishes research.complete  (declared)" in text.stdout

    mermaid = cli(app_dir, "topology", "shop:bus", "--format", "mermaid")
    assert mermaid.returncode == 0, mermaid.stderr
    assert "t_user_query --> s_audit" in mermaid.stdout

    written = cli(app_dir, "topology", "shop:bus", "-f", "svg", "-o", "arch.svg")
    assert written.returncode == 0, written.stderr
    root = ET.parse(app_dir / "arch.svg").getroot()
    shown = " ".join(
        (element.text or "") for element in root.iter() if element.tag.endswith(("text", "title"))
    )
    for name in ("main", "research", "email", "audit", "analytics", "user.query"):
        assert name in shown


async def test_command_learns_from_sqlite_history(app_dir: Path) -> None:
    url = f"sqlite:///{app_dir}/bus.db"
    await run_chain(load_app().build(url), queries=2)
    done = cli(app_dir, "topology", "shop:bus", "--url", url, "--since", "10m")
    assert done.returncode == 0, done.stderr
    assert "publishes research.metrics  (seen 2x)" in done.stdout
    assert "publishes research.complete  (declared, seen 2x)" in done.stdout
    assert "event(s) read from history" in done.stdout


def test_command_errors_are_clear_and_exit_2(app_dir: Path) -> None:
    missing = cli(app_dir, "topology", "nosuchmodule:bus")
    assert missing.returncode == 2
    assert "cannot import module 'nosuchmodule'" in missing.stderr
    not_a_bus = cli(app_dir, "topology", "shop:UserQuery")
    assert not_a_bus.returncode == 2
    assert "not an EventBus" in not_a_bus.stderr
    bad_format = cli(app_dir, "topology", "shop:bus", "--format", "png")
    assert bad_format.returncode == 2
    assert "--format must be one of" in bad_format.stderr
    plain_rabbit = with_namespace(require_service("rabbitmq"), unique_namespace())
    try:
        no_history = cli(app_dir, "topology", "shop:bus", "--url", plain_rabbit)
    finally:
        asyncio.run(destroy(plain_rabbit))
    assert no_history.returncode == 2
    assert "keeps no history" in no_history.stderr
    assert "?history=7d" in no_history.stderr
    refused = cli(app_dir, "topology", "shop:bus", "--url", "amqp://guest:s3cret@127.0.0.1/")
    assert refused.returncode == 2
    assert "s3cret" not in refused.stdout + refused.stderr
    unreachable = cli(
        app_dir, "topology", "shop:bus", "--url", "redis://:s3cret@127.0.0.1:1/0", "--timeout", "3"
    )
    assert unreachable.returncode == 2
    assert "127.0.0.1:1" in unreachable.stderr
    assert "s3cret" not in unreachable.stdout + unreachable.stderr


def test_help_shows_examples() -> None:
    shown = subprocess.run(
        [str(EVENTWIRE), "topology", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        check=False,
    )
    assert shown.returncode == 0
    assert "eventwire topology myapp.agents:bus --format mermaid" in shown.stdout
