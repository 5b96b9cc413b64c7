"""`eventwire subscriptions list|delete` through its real entry point, against real brokers:
durable subscriptions with their backlog, the processes running them, and deleting one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus
from tests.conformance.conftest import backend_url, destroy
from tests.test_cli_dlq import EVENTWIRE, cli, run

BROKERS = ("sqlite", "redis", "nats", "amqp")


@pytest.fixture(params=BROKERS)
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    found = backend_url(str(request.param), tmp_path)
    yield found
    await destroy(found)


async def listed(url: str) -> dict[str, dict[str, Any]]:
    result = await run("subscriptions", "list", "--json", "--url", url)
    assert result.returncode == 0, result.stderr
    return {entry["name"]: entry for entry in json.loads(result.stdout)}


async def test_list_shows_backlog_and_who_runs_it_and_delete_removes_it(url: str) -> None:
    async def bill(event: Event[Any]) -> None:
        return None

    worker = EventBus(url, close_grace=2.0)
    worker.subscribe("orders.*", bill, name="billing")
    async with worker:
        running = await listed(url)
        assert running["billing"]["processes"] == 1
        assert running["billing"]["pattern"] == "orders.*"
        refused = await run("subscriptions", "delete", "billing", "--yes", "--url", url)
        assert refused.returncode == 2
        assert "run by 1 process" in refused.stderr
    async with EventBus(url) as publisher:
        for number in range(3):
            await publisher.publish("orders.new", number)
        await publisher.drain(timeout=10)  # returns: nobody runs `billing` now
    stopped = await listed(url)
    assert stopped["billing"]["processes"] == 0
    assert stopped["billing"]["backlog"] == 3
    if "amqp" not in url:  # RabbitMQ tells who consumes a queue, not since when
        assert stopped["billing"]["last_active"] is not None
    table = await run("subscriptions", "list", "--url", url)
    assert "billing" in table.stdout
    assert "orders.*" in table.stdout
    deleted = await run("subscriptions", "delete", "billing", "--yes", "--url", url)
    assert deleted.returncode == 0, deleted.stderr
    assert "backlog of 3 event(s)" in deleted.stdout
    assert "billing" not in await listed(url)


async def test_a_name_reused_with_another_pattern_is_one_clear_line(
    url: str, tmp_path: Path
) -> None:
    first = EventBus(url)
    first.subscribe("orders.*", lambda e: None, name="billing")
    async with first:
        pass
    app = tmp_path / "reuse_app.py"
    app.write_text(
        "from eventwire import EventBus\n"
        "bus = EventBus()\n"
        "bus.subscribe('invoices.*', lambda e: None, name='billing')\n"
    )
    started = cli("run", "reuse_app:bus", "--url", url, "--grace", "1", cwd=tmp_path)
    assert started.returncode == 2
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1, started.stderr
    assert "already exists" in lines[0]
    assert "eventwire subscriptions delete billing" in lines[0]


def test_memory_keeps_no_subscriptions() -> None:
    result = cli("subscriptions", "list", "--url", "memory://")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: the in-process bus (memory://) keeps no durable subscriptions: give the URL "
        "of a broker with --url or EVENTWIRE_URL"
    ]


async def test_drain_stops_waiting_for_a_process_that_was_killed(url: str, tmp_path: Path) -> None:
    # A worker process runs `slow`, then is killed (no goodbye): once it is no longer heard
    # from, drain() does not wait for its subscription, whose backlog stays on the broker.
    (tmp_path / "killed_app.py").write_text(
        "import asyncio\n"
        "from eventwire import EventBus\n"
        "bus = EventBus()\n"
        "async def slow(event):\n"
        "    await asyncio.sleep(3600)\n"
        "bus.subscribe('jobs.*', slow, name='slow')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "EVENTWIRE_URL"}
    worker = await asyncio.create_subprocess_exec(
        EVENTWIRE,
        "run",
        "killed_app:bus",
        "--url",
        url,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(30):
            # Polls the broker (through the CLI): there is no event to wait on.
            while (await listed(url)).get("slow", {}).get("processes") != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        worker.send_signal(signal.SIGKILL)
        await asyncio.wait_for(worker.wait(), 10)
        async with EventBus(url) as publisher:
            await publisher.publish("jobs.run", 1)
            await publisher.drain(timeout=30)  # before, it waited for `slow` until the timeout
        after = await listed(url)
        assert after["slow"]["processes"] == 0
        assert after["slow"]["backlog"] >= 1
    finally:
        if worker.returncode is None:
            worker.kill()
            await asyncio.wait_for(worker.wait(), 10)
