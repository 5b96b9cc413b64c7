"""`bus.stats()` counts what the issue asks for: handled, failed, retried, dead-lettered,
dropped, in flight, inbox depth, and handling-time percentiles."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus, Retry
from tests.clone import fresh_shell, like_a_clone
from tests.conftest import wait_until
from tests.services import free_port


async def test_handled_counts_every_finished_event(bus: EventBus) -> None:
    bus.subscribe("m.handled", lambda event: None, name="counter")
    for number in range(7):
        await bus.publish("m.handled", number)
    await bus.drain(timeout=5)
    stats = bus.stats()["counter"]
    assert (stats.handled, stats.failed, stats.retried, stats.dead_lettered) == (7, 0, 0, 0)
    assert (stats.name, stats.pattern, stats.group) == ("counter", "m.handled", None)
    assert (stats.in_flight, stats.queued, stats.dropped) == (0, 0, 0)


async def test_failures_retries_and_dead_letters_are_counted_apart(bus: EventBus) -> None:
    calls: list[Any] = []

    def flaky(event: Event[str]) -> None:
        calls.append(event.payload)
        # "once" fails on its first try only; "never" fails on every try.
        if event.payload == "never" or calls.count(event.payload) == 1:
            raise RuntimeError(f"fails on {event.payload}")

    bus.subscribe("m.flaky", flaky, name="flaky", retry=Retry(attempts=3, backoff=0.0))
    await bus.publish("m.flaky", "once")
    await bus.publish("m.flaky", "never")
    await bus.drain(timeout=5)
    stats = bus.stats()["flaky"]
    # "once": 1 failure, 1 retry, handled. "never": 3 failures, 2 retries, dead-lettered.
    assert stats.handled == 1
    assert stats.failed == 4
    assert stats.retried == 3
    assert stats.dead_lettered == 1
    assert stats.handling.count == 2  # one handling time per finished event, not per try


async def test_in_flight_queued_and_dropped_follow_a_blocked_handler(bus: EventBus) -> None:
    release = asyncio.Event()
    started: list[int] = []

    async def blocked(event: Event[int]) -> None:
        started.append(event.payload)
        await release.wait()

    bus.subscribe(
        "m.blocked",
        blocked,
        name="blocked",
        concurrency=2,
        max_pending=3,
        overflow="drop_oldest",
    )
    for number in range(2):
        await bus.publish("m.blocked", number)
    await wait_until(lambda: len(started) == 2, timeout=5)
    for number in range(2, 7):
        await bus.publish("m.blocked", number)
    stats = bus.stats()["blocked"]
    # 2 handlers hold one event each; the inbox holds 3; the 2 oldest waiting were dropped.
    assert (stats.in_flight, stats.queued, stats.dropped) == (2, 3, 2)
    release.set()
    await bus.drain(timeout=5)
    stats = bus.stats()["blocked"]
    assert (stats.in_flight, stats.queued, stats.dropped, stats.handled) == (0, 0, 2, 5)


async def test_percentiles_reflect_handler_durations(bus: EventBus) -> None:
    async def timed(event: Event[float]) -> None:
        if event.payload:
            await asyncio.sleep(event.payload)

    bus.subscribe("m.timed", timed, name="timed")
    for _ in range(10):
        await bus.publish("m.timed", 0.0)
    for _ in range(10):
        await bus.publish("m.timed", 0.02)
    await bus.drain(timeout=10)
    stats = bus.stats()["timed"]
    handling = stats.handling
    assert handling.count == 20
    # Nearest rank: the 10th of 20 durations is an instant one, the 20th a 20 ms sleep.
    assert handling.p50 < 0.015
    assert handling.p99 >= 0.02
    assert handling.max >= 0.02
    assert handling.p50 <= handling.p90 <= handling.p99 <= handling.max
    assert stats.handling_seconds >= 10 * 0.02
    assert stats.mean_handling_seconds >= 0.01


async def test_the_same_counters_on_a_durable_backend(tmp_path: Path) -> None:
    async with EventBus(f"sqlite:///{tmp_path}/bus.db", close_grace=2.0) as bus:

        def fail_odd(event: Event[int]) -> None:
            if event.payload % 2:
                raise ValueError("odd")

        bus.subscribe("m.durable", fail_odd, name="durable", retry=Retry(attempts=2, backoff=0))
        for number in range(4):
            await bus.publish("m.durable", number)
        await wait_until(lambda: bus.stats()["durable"].handling.count == 4, timeout=10)
        stats = bus.stats()["durable"]
        assert (stats.handled, stats.failed, stats.retried, stats.dead_lettered) == (2, 4, 2, 2)


DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def doc_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block of docs/metrics.md, in order."""
    return re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def test_doc_python_examples_print_what_the_doc_shows(tmp_path: Path) -> None:
    blocks = doc_blocks()
    checked = 0
    for (language, code), (next_language, shown) in itertools.pairwise(blocks):
        if language != "python" or code.startswith("# shop.py"):
            continue
        assert next_language == "text", f"no output shown after:\n{code}"
        script = tmp_path / f"example{checked}.py"
        script.write_text(code, encoding="utf-8")
        result = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == shown.splitlines()
        checked += 1
    assert checked == 2


def test_doc_shell_session_runs_as_shown(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the session uses curl")
    blocks = doc_blocks()
    shop = next(code for language, code in blocks if code.startswith("# shop.py"))
    session = next(code for language, code in blocks if language == "console")
    (tmp_path / "shop.py").write_text(shop, encoding="utf-8")
    commands = [line[2:] for line in session.splitlines() if line.startswith("$ ")]
    port = str(free_port())  # the doc's 9464 may be taken here
    script = "set -e\n" + "\n".join(commands).replace("9464", port) + "\nwait\n"
    env = {**fresh_shell(), "COLUMNS": "120", "NO_COLOR": "1"}
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=like_a_clone(tmp_path),  # the session calls .venv/bin/eventwire, as the doc shows
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    handled = (
        'eventwire_events_handled_total{group="",pattern="order.*",subscription="billing"} 1.0'
    )
    assert handled in result.stdout.splitlines()
    row = next(line for line in result.stdout.splitlines() if line.startswith("   billing"))
    assert row.split()[1:8] == ["1", "2", "1", "1", "0", "0", "0"]
    assert "Dead letters kept: 1 (see eventwire dlq)" in result.stdout
    document = json.loads((tmp_path / "stats.json").read_text(encoding="utf-8"))
    assert document["subscriptions"][0]["name"] == "billing"


async def test_the_stats_responder_closes_even_if_a_cancellation_is_swallowed(
    tmp_path: Path,
) -> None:
    """Broker client libraries can swallow a cancellation that races with their own timeout
    (seen with redis-py under load: `eventwire run` then never exited). Closing must not
    depend on the cancellation arriving."""
    from eventwire.stats_service import StatsResponder

    async with EventBus(f"sqlite:///{tmp_path}/bus.db") as bus:
        responder = StatsResponder(bus)
        await responder.start()
        consumer = responder._consumer
        assert consumer is not None
        real_fetch = consumer.fetch
        entered = asyncio.Event()
        swallowed: list[bool] = []

        async def fetch(limit: int, wait: float) -> list[Any]:
            entered.set()
            try:
                return await real_fetch(limit, wait)
            except asyncio.CancelledError:
                swallowed.append(True)  # what a library racing its own timeout does
                return []

        consumer.fetch = fetch  # type: ignore[method-assign]
        await asyncio.wait_for(entered.wait(), timeout=10)
        await asyncio.wait_for(responder.close(), timeout=10)
    assert swallowed == [True]
