"""`eventwire runs` through its real entry point, against every backend with a journal: the
durable runs, their state, tries and recorded steps."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus, Run
from tests.conformance.conftest import backend_url, destroy
from tests.test_cli_dlq import cli, run


@pytest.fixture(params=["sqlite", "redis", "nats"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    found = backend_url(str(request.param), tmp_path)
    yield found
    await destroy(found)


async def listed(url: str, *options: str) -> dict[str, dict[str, Any]]:
    result = await run("runs", "--json", "--url", url, *options)
    assert result.returncode == 0, result.stderr
    return {entry["event_id"]: entry for entry in json.loads(result.stdout)}


async def test_runs_lists_each_runs_state_tries_and_steps(url: str) -> None:
    ended = asyncio.Event()
    handled = 0

    async def agent(event: Event[str], run_: Run) -> None:
        nonlocal handled
        try:
            await run_.step("plan", lambda: "a plan")
            if event.payload == "fail":
                await run_.step("search", _broken_search)
            await run_.effect("email", lambda: "sent")
        finally:
            handled += 1
            if handled == 2:
                ended.set()

    async with EventBus(url) as bus:
        bus.subscribe("task", agent, durable=True, name="agent")
        good = await bus.publish("task", "ok")
        bad = await bus.publish("task", "fail")
        async with asyncio.timeout(10):
            await ended.wait()
        await bus.drain(timeout=10)
    runs = await listed(url)
    assert runs[good.id]["subscription"] == "agent"
    assert runs[good.id]["state"] == "finished"
    assert runs[good.id]["tries"] == 1
    assert runs[good.id]["steps"] == ["step:plan", "effect:email"]
    assert runs[bad.id]["state"] == "failed"
    assert runs[bad.id]["steps"] == ["step:plan"]
    assert runs[bad.id]["failed"] == ["step:search"]
    assert "search index is down" in runs[bad.id]["error"]
    assert set(await listed(url, "--state", "failed")) == {bad.id}
    table = await run("runs", "--url", url)
    assert table.returncode == 0, table.stderr
    assert "(failed: search)" in table.stdout


def _broken_search() -> str:
    raise ConnectionError("search index is down")


def test_runs_refuses_a_bad_state_the_memory_bus_and_a_backend_without_a_journal() -> None:
    bad_state = cli("runs", "--state", "asleep", "--url", "sqlite:///unused.db")
    assert bad_state.returncode == 2
    assert "--state 'asleep' is not a state" in bad_state.stderr
    memory = cli("runs", "--url", "memory://")
    assert memory.returncode == 2
    assert "keeps its runs in its own process" in memory.stderr


async def test_approve_resolves_a_waiting_run_and_cancel_stops_another(url: str) -> None:
    """A person approves one parked run from the command line and cancels another; the
    first goes on in the running bus, the second never runs again."""
    decisions: dict[str, Any] = {}
    resumed = asyncio.Event()

    async def agent(event: Event[str], run_: Run) -> None:
        await run_.step("draft", lambda: f"draft of {event.payload}")
        answer = await run_.wait_for("approval.given", match={"run": run_.id}, timeout=60)
        assert answer is not None
        decisions[event.payload] = answer.payload
        resumed.set()

    async with EventBus(url) as bus:
        sub = bus.subscribe("task", agent, durable=True, waits=["approval.given"], name="agent")
        await sub.ready()
        kept = await bus.publish("task", "keep")
        dropped = await bus.publish("task", "drop")

        async def parked() -> bool:
            runs = await listed(url)
            return all(runs.get(e.id, {}).get("state") == "waiting" for e in (kept, dropped))

        async with asyncio.timeout(20):
            while not await parked():  # noqa: ASYNC110 - journal state, no event to await
                await asyncio.sleep(0.05)
        runs = await listed(url)
        assert runs[kept.id]["waiting"] == ["wait:approval.given"]
        cancelled = await run(
            "cancel", f"agent/{dropped.id}", "--reason", "duplicate", "--url", url
        )
        assert cancelled.returncode == 0, cancelled.stderr
        approved = await run("approve", f"agent/{kept.id}", "--by", "ana", "--url", url)
        assert approved.returncode == 0, approved.stderr
        async with asyncio.timeout(20):
            await resumed.wait()
        # Approving the cancelled run is refused: it waits for nothing any more.
        refused = await run("approve", f"agent/{dropped.id}", "--url", url)
        await bus.drain(timeout=10)
    assert decisions == {"keep": {"run": f"agent/{kept.id}", "approved": True, "by": "ana"}}
    runs = await listed(url)
    assert runs[kept.id]["state"] == "finished"
    assert runs[dropped.id]["state"] == "cancelled"
    assert refused.returncode == 2
    assert "waits for nothing" in refused.stderr


def test_send_refuses_a_payload_that_is_not_a_json_object() -> None:
    bad = cli("send", "agent/1", "[1, 2]", "--url", "sqlite:///unused.db")
    assert bad.returncode == 2
    assert "must be a JSON object" in bad.stderr


async def test_topology_draws_a_run_with_its_gather_side_by_side_and_its_pending_wait(
    url: str,
) -> None:
    parked = asyncio.Event()

    async def agent(event: Event[str], run_: Run) -> None:
        await run_.step("plan", lambda: "a plan")
        await run_.gather(run_.step("search", lambda: 1), run_.step("search", lambda: 2))
        await run_.effect("notify", lambda: "told")
        parked.set()
        await run_.wait_for("review.done", match={"run": run_.id}, timeout=60)

    async with EventBus(url) as bus:
        sub = bus.subscribe("task", agent, durable=True, waits=["review.done"], name="agent")
        await sub.ready()
        task = await bus.publish("task", "t")
        async with asyncio.timeout(20):
            await parked.wait()
        await bus.drain(timeout=10)
    text = await run("topology", "--run", f"agent/{task.id}", "--url", url)
    mermaid = await run("topology", "--run", f"agent/{task.id}", "--url", url, "-f", "mermaid")
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[1:] == [
        "  event",
        "  └─ step plan",
        "  ├─ gather (concurrently):",
        "  │    • step search",
        "  │    • step search#2",
        "  └─ effect notify",
        "  └─ wait for review.done (waiting)",
        "  … parked on wait:review.done",
    ]
    assert mermaid.returncode == 0, mermaid.stderr
    edges = [line.strip() for line in mermaid.stdout.splitlines() if "-->" in line]
    # The plan fans out to both searches, which join into the effect.
    assert edges == [
        "event --> s0_0",
        "s0_0 --> s1_0",
        "s0_0 --> s1_1",
        "s1_0 --> s2_0",
        "s1_1 --> s2_0",
        "s2_0 --> s3_0",
    ]
    assert "class s3_0 pending" in mermaid.stdout
    missing = await run("topology", "--run", "agent/none", "--url", url)
    assert missing.returncode == 2
    assert "no run 'agent/none'" in missing.stderr
