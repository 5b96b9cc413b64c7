"""`eventwire trace` through its real entry point: a chain rebuilt from a broker's history."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus
from tests.conformance.conftest import backend_url, destroy
from tests.test_cli_dlq import cli
from tests.test_cli_tail import eventwire
from tests.test_history import started
from tests.test_lineage import wire_chain


async def run_chain(url: str, *, lineage: bool) -> Event[Any]:
    """The chain of `wire_chain` on the broker at `url`, run to its end; its first event."""
    async with EventBus(url, lineage=lineage) as bus:
        wire_chain(bus)
        root = await bus.publish("user.query", "revenue")
        await bus.drain(timeout=20)
    return root


async def trace(*args: str) -> Any:
    return await asyncio.to_thread(cli, "trace", *args)


@pytest.mark.parametrize("kind", ["sqlite", "redis", "nats", "amqp-history"])
async def test_the_tree_shows_every_event_and_handling_of_the_chain(
    kind: str, tmp_path: Path
) -> None:
    url = backend_url(kind, tmp_path)
    async with started(url, lineage=True) as bus:
        wire_chain(bus)
        root = await bus.publish("user.query", "revenue")
        await bus.drain(timeout=20)
        as_json = await trace(root.id, "--url", url, "--json")
        as_text = await trace(root.id, "--url", url)

    assert as_json.returncode == 0, as_json.stderr
    assert "not recorded" not in as_json.stderr
    [tree] = json.loads(as_json.stdout)
    assert (tree["id"], tree["topic"]) == (root.id, "user.query")
    assert [(h["subscription"], h["outcome"]) for h in tree["handlings"]] == [
        ("research", "handled")
    ]
    [research] = tree["children"]
    assert research["topic"] == "research.complete"
    by_subscription: dict[str, list[dict[str, Any]]] = {}
    for handling in research["handlings"]:
        by_subscription.setdefault(handling["subscription"], []).append(handling)
    email, archive = by_subscription["email"], by_subscription["archive"]
    assert [(h["attempt"], h["outcome"]) for h in email] == [(1, "retrying"), (2, "handled")]
    assert email[0]["error"] == "ConnectionError: smtp down"
    assert all(h["seconds"] > 0 for h in email + archive)
    assert [(h["attempt"], h["outcome"], h["error_type"]) for h in archive] == [
        (1, "dead_lettered", "ValueError")
    ]
    assert sorted(child["topic"] for child in research["children"]) == [
        "_dlq.research.complete",
        "email.sent",
    ]

    assert as_text.returncode == 0, as_text.stderr
    text = as_text.stdout
    for expected in (
        "user.query",
        "research.complete",
        "email.sent",
        "_dlq.research.complete",
        "email  handled  2 attempts",
        "archive  dead_lettered  1 attempt",
        "ValueError: archive full",
    ):
        assert expected in text, text


async def test_any_event_of_the_chain_shows_the_whole_chain_marked(tmp_path: Path) -> None:
    url = backend_url("sqlite", tmp_path)
    async with started(url) as bus:
        # A root stamped well before its follow-up: reading from the follow-up's time alone
        # would miss it.
        root = Event("user.query", "old", timestamp=datetime.now(UTC) - timedelta(seconds=30))
        await bus.publish(root)
        child = Event("research.complete", "new", correlation_id=root.id, causation_id=root.id)
        await bus.publish(child)
        await bus.publish("user.query", "another chain")
        shown = await trace(child.id, "--url", url)
        as_json = await trace(child.id, "--url", url, "--json")

    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    [marked] = [line for line in lines if "◀" in line]
    assert "research.complete" in marked
    assert any("user.query" in line and "old" in line for line in lines)
    assert "another chain" not in shown.stdout
    assert "handlings were not recorded" in shown.stderr
    assert "lineage=True" in shown.stderr
    [tree] = json.loads(as_json.stdout)
    assert tree["id"] == root.id
    assert [child["id"] for child in tree["children"]] == [child.id]


async def test_a_chain_run_without_lineage_shows_its_events_and_says_why_no_handlings(
    tmp_path: Path,
) -> None:
    url = backend_url("sqlite", tmp_path)
    root = await run_chain(url, lineage=False)
    shown = await trace(root.id, "--url", url)
    assert shown.returncode == 0, shown.stderr
    assert "email.sent" in shown.stdout
    assert "attempt" not in shown.stdout
    assert "eventwire run app:bus --lineage" in shown.stderr


async def test_an_unknown_id_is_exit_1(tmp_path: Path) -> None:
    url = backend_url("sqlite", tmp_path)
    await run_chain(url, lineage=True)
    missing = Event("never.published").id
    shown = await trace(missing, "--url", url)
    assert shown.returncode == 1
    assert f"no event or chain {missing}" in shown.stderr


def test_buses_without_history_and_bad_ids_are_exit_2(tmp_path: Path) -> None:
    some_id = Event("x.y").id
    memory = cli("trace", some_id)
    assert memory.returncode == 2
    assert "bus.record()" in memory.stderr
    assert "seen.lineage(" in memory.stderr
    plain_rabbit = backend_url("amqp", tmp_path)
    try:
        amqp = cli("trace", some_id, "--url", plain_rabbit)
    finally:
        asyncio.run(destroy(plain_rabbit))
    assert amqp.returncode == 2
    assert "amqp:// keeps no history" in amqp.stderr
    assert "?history=7d" in amqp.stderr
    not_an_id = cli("trace", "order-42", "--url", backend_url("sqlite", tmp_path))
    assert not_an_id.returncode == 2
    assert "give --since" in not_an_id.stderr


def test_help_shows_examples() -> None:
    shown = cli("trace", "--help")
    assert shown.returncode == 0
    assert "eventwire trace 0190f3c2-8d4e-7b1a-9c3f-3a5c0e2f41d7 --json" in shown.stdout


def docs_app() -> str:
    """The app of the walk through in docs/cli.md."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text("utf-8")
    match = re.search(r"```python\n(from eventwire .*?)```", text, re.DOTALL)
    assert match, "docs/cli.md has no app under 'A walk through'"
    return match.group(1)


async def test_the_walk_through_of_the_docs_runs_as_shown(tmp_path: Path) -> None:
    (tmp_path / "agents.py").write_text(docs_app(), encoding="utf-8")
    url = "sqlite:///agents.db"  # relative: the commands run in tmp_path
    app = eventwire("run", "agents:bus", "--url", url, "--lineage", cwd=tmp_path)
    # Four handling records end the chain: research, email twice, archive.
    records = eventwire("tail", "_bus.handled", "--url", url, "--count", "4", cwd=tmp_path)
    async with app as running, records as handled:
        await running.ready("running 3 subscription(s)", stream="stdout")
        await handled.ready()
        published = await asyncio.to_thread(
            cli, "publish", "user.query", '{"text": "refund policy"}', "--url", url, cwd=tmp_path
        )
        assert published.returncode == 0, published.stderr
        code, _ = await handled.finish()
        assert code == 0, handled.stderr
        shown = await asyncio.to_thread(
            cli, "trace", published.stdout.strip(), "--url", url, cwd=tmp_path
        )
        running.process.send_signal(signal.SIGTERM)
        code, _ = await running.finish()
    assert code == 0, running.stderr
    assert shown.returncode == 0, shown.stderr
    for expected in (
        "✓ research  handled  1 attempt",
        "✗ archive  dead_lettered  1 attempt",
        "(ValueError: archive is full)",
        "✓ email  handled  2 attempts",
        "(ConnectionError: smtp timeout)",
        "_dlq.research.complete",
        "email.sent",
    ):
        assert expected in shown.stdout, shown.stdout


@pytest.mark.parametrize("kind", ["sqlite", "redis", "nats"])
async def test_a_durable_handling_shows_its_runs_steps_and_waits(kind: str, tmp_path: Path) -> None:
    url = backend_url(kind, tmp_path)
    try:
        async with started(url, lineage=True) as bus:

            async def research(event: Event[str], run: Any) -> None:
                await run.step("plan", lambda: "a plan")
                await run.effect("notify", lambda: "told")
                await run.wait_for("review.done", match={"query": event.id}, timeout=60)

            sub = bus.subscribe(
                "user.query", research, durable=True, waits=["review.done"], name="research"
            )
            await sub.ready()
            root = await bus.publish("user.query", "revenue")
            await bus.drain(timeout=20)
            as_json = await trace(root.id, "--url", url, "--json")
            as_text = await trace(root.id, "--url", url)
    finally:
        await destroy(url)
    assert as_json.returncode == 0, as_json.stderr
    [tree] = json.loads(as_json.stdout)
    run = tree["runs"]["research"]
    assert run["state"] == "waiting"
    assert run["steps"] == ["step:plan", "effect:notify", "wait:review.done"]
    assert run["waiting"] == ["wait:review.done"]
    assert as_text.returncode == 0, as_text.stderr
    assert "run waiting" in as_text.stdout
    assert "step:plan, effect:notify, wait:review.done" in as_text.stdout
