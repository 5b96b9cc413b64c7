"""A poison event (one whose handler kills its process) on every durable broker: with the
process respawned after each crash, it is dead-lettered after `max_restarts` restarts, and
every other event is handled, none of them dead-lettered for having come back with it."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from eventwire import EventBus
from eventwire.dlq import DeadLetterQueue
from tests.conformance.test_crash import poll, processes, spawn, wait_ready

__all__ = ["processes"]  # the fixture, used by name

pytestmark = pytest.mark.parametrize(
    "backend_name", ["sqlite", "redis", "nats", "amqp", "amqp-classic"]
)

EVENTS = 400
POISON = 40
MAX_RESTARTS = 3


def lines(output: Path, kind: str) -> Counter[int]:
    if not output.exists():
        return Counter()
    words = output.read_text().split()
    return Counter(int(n) for verb, n in zip(words[::2], words[1::2], strict=True) if verb == kind)


async def test_a_poison_event_is_dead_lettered_after_max_restarts_and_nothing_else_is(
    bus_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    output = tmp_path / "handled.txt"
    innocent = set(range(EVENTS)) - {POISON}
    worker = ("tests.conformance.poison_worker", bus_url, str(output), str(POISON))
    async with EventBus(bus_url) as bus:
        first = spawn(processes, *worker, str(MAX_RESTARTS))
        await wait_ready(first)
        for n in range(EVENTS):
            await bus.publish("poison.work", n)
        crashes = 0
        dlq = DeadLetterQueue(bus)
        async with asyncio.timeout(120):
            while True:
                with contextlib.suppress(TimeoutError):
                    await poll(lambda: processes[-1].poll() is not None, timeout=1.0)
                if processes[-1].poll() is not None:
                    crashes += 1
                    assert crashes <= MAX_RESTARTS + 1, (
                        f"the poison event killed {crashes} processes: it was not capped"
                    )
                    await wait_ready(spawn(processes, *worker, str(MAX_RESTARTS)))
                elif innocent <= set(lines(output, "done")) and (letters := await dlq.list()):
                    break
        assert processes[-1].poll() is None, "the last worker is still running"
    starts = lines(output, "start")
    assert starts[POISON] == MAX_RESTARTS + 1, "the first start and MAX_RESTARTS restarts"
    assert crashes == MAX_RESTARTS + 1
    assert [(letter.event and letter.event.payload, letter.error_type) for letter in letters] == [
        (POISON, "PoisonEventError")
    ]
    assert f"max_restarts={MAX_RESTARTS}" in letters[0].error
    assert POISON not in lines(output, "done")
