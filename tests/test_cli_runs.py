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
