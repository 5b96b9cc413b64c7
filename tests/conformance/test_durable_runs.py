"""Durable runs in real processes killed with SIGKILL at random points: every run
completes, no step is called again once the handler got its result, and each effect happens
once (or twice in the one documented window, counted)."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from eventwire import EventBus
from tests.conformance.test_crash import poll, processes, spawn, wait_ready

__all__ = ["processes"]  # the fixture, used by name

RUNS = 20
STEPS = ("plan", "search-a", "search-b", "draft", "review")


def ledger_lines(ledger: Path) -> list[list[str]]:
    return [line.split() for line in ledger.read_text().splitlines()] if ledger.exists() else []


def done(ledger: Path) -> set[str]:
    return {fields[1] for fields in ledger_lines(ledger) if fields[0] == "done"}


@pytest.mark.parametrize("backend_name", ["sqlite", "redis", "nats"])
async def test_runs_killed_at_random_points_complete_without_calling_finished_steps_again(
    bus_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    ledger = tmp_path / "ledger.txt"
    chooser = random.Random(12)
    kills = 0
    async with EventBus(bus_url) as bus:
        worker = spawn(processes, "tests.conformance.run_worker", bus_url, str(ledger))
        await wait_ready(worker)
        for task in range(RUNS):
            await bus.publish("agent.task", task)
        async with asyncio.timeout(120):
            while len(done(ledger)) < RUNS:
                # Let it work a random while, then kill it mid-run, and start another.
                await asyncio.sleep(chooser.uniform(0.05, 0.6))
                if len(done(ledger)) == RUNS:
                    break
                worker.send_signal(signal.SIGKILL)
                worker.wait(timeout=10)
                kills += 1
                worker = spawn(processes, "tests.conformance.run_worker", bus_url, str(ledger))
                await wait_ready(worker)
        await poll(lambda: len(done(ledger)) == RUNS, timeout=60)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=10)
    assert kills >= 3, "the workers were killed in the middle of the runs"
    # No step's function was called after the handler got its result (it was recorded).
    got: dict[tuple[str, str], bool] = defaultdict(bool)
    calls_after_got = []
    effects: dict[str, int] = defaultdict(int)
    for fields in ledger_lines(ledger):
        kind, *rest = fields
        if kind == "begin":
            task, step = rest
            if got[(task, step)]:
                calls_after_got.append((task, step))
            if step == "email":
                effects[task] += 1
        elif kind == "got":
            got[(rest[0], rest[1])] = True
    assert calls_after_got == []
    assert all(got[(str(task), step)] for task in range(RUNS) for step in (*STEPS, "email"))
    # Each email went out once, unless a kill fell between its sending and its record.
    assert set(effects) == {str(task) for task in range(RUNS)}
    assert all(count <= 2 for count in effects.values()), effects
