"""Durable runs in real processes killed with SIGKILL at random points: every run
completes, no step is called again once the handler got its result, every wait gets its
approval (sent at random times, before or after the run parks), and each effect happens once
(or twice in the one documented window, counted).

``EVENTWIRE_CRASH_RUNS`` sets how many runs (20 in the suite; bench/durable_crash.py runs
200), and ``EVENTWIRE_CRASH_REPORT`` a file where the figures are written as JSON."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from eventwire import Event, EventBus
from tests.conformance.test_crash import poll, processes, spawn, wait_ready

__all__ = ["processes"]  # the fixture, used by name

RUNS = int(os.environ.get("EVENTWIRE_CRASH_RUNS", "20"))
MOST_KILLS = 8 + RUNS // 5
STEPS = ("plan", "search-a", "search-b", "draft", "review")


def ledger_lines(ledger: Path) -> list[list[str]]:
    return [line.split() for line in ledger.read_text().splitlines()] if ledger.exists() else []


def moving(ledger: Path, runs: int) -> Callable[[int], Callable[[], bool]]:
    def moved(lines: int) -> Callable[[], bool]:
        """Whether the worker went on since the ledger had `lines` lines (or all ended)."""
        return lambda: len(ledger_lines(ledger)) > lines or len(done(ledger)) == runs

    return moved


async def stuck(bus: EventBus, ledger: Path, tasks: list[Event[int]]) -> str:
    """What the journal says of the runs that did not finish (for the failure message)."""
    journal = bus.backend.journal()
    lines = []
    for event in tasks:
        if str(event.payload) not in done(ledger):
            run = f"agent/{event.id}"
            records = await journal.read(run)
            lines.append(f"task {event.payload} ({run}): {sorted(records)}")
            for key in ("status", "resolved:wait:agent.approved"):
                if key in records:
                    lines.append(f"  {key} = {records[key][:300]!r}")
    return "runs that did not finish:\n" + "\n".join(lines)


def done(ledger: Path) -> set[str]:
    return {fields[1] for fields in ledger_lines(ledger) if fields[0] == "done"}


@pytest.mark.parametrize("backend_name", ["sqlite", "redis", "nats", "amqp-journal"])
async def test_runs_killed_at_random_points_complete_without_calling_finished_steps_again(
    bus_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    ledger = tmp_path / "ledger.txt"
    chooser = random.Random(12)
    kills = 0
    started = time.perf_counter()
    async with EventBus(bus_url) as bus:
        worker = spawn(processes, "tests.conformance.run_worker", bus_url, str(ledger))
        await wait_ready(worker)
        tasks = [await bus.publish("agent.task", task) for task in range(RUNS)]
        # Approvals at random times: some come before their run waits, some after.
        approvals = list(range(RUNS))
        chooser.shuffle(approvals)

        async def approve() -> None:
            for task in approvals:
                await asyncio.sleep(chooser.uniform(0, 0.05))
                await bus.publish("agent.approved", {"task": task})

        approver = asyncio.ensure_future(approve())
        moved = moving(ledger, RUNS)
        async with asyncio.timeout(120 + RUNS):
            while len(done(ledger)) < RUNS and kills < MOST_KILLS:
                # Let it make progress and work a random while more, then kill it mid-run,
                # and start another.
                await poll(moved(len(ledger_lines(ledger))), timeout=60)
                await asyncio.sleep(chooser.uniform(0, 0.3))
                if len(done(ledger)) == RUNS:
                    break
                worker.send_signal(signal.SIGKILL)
                worker.wait(timeout=10)
                kills += 1
                worker = spawn(processes, "tests.conformance.run_worker", bus_url, str(ledger))
                await wait_ready(worker)
        try:
            await poll(lambda: len(done(ledger)) == RUNS, timeout=60 + RUNS)
        except TimeoutError:
            raise AssertionError(await stuck(bus, ledger, tasks)) from None
        await approver
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=10)
    seconds = time.perf_counter() - started
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
    approved = {fields[1] for fields in ledger_lines(ledger) if fields[0] == "approved"}
    assert approved == {str(task) for task in range(RUNS)}
    # Each email went out once, unless a kill fell between its sending and its record.
    assert set(effects) == {str(task) for task in range(RUNS)}
    assert all(count <= 2 for count in effects.values()), effects
    report = os.environ.get("EVENTWIRE_CRASH_REPORT")
    if report:
        calls = sum(1 for fields in ledger_lines(ledger) if fields[0] == "begin")
        figures = {
            "runs": RUNS,
            "kills": kills,
            "seconds": round(seconds, 1),
            "steps in the runs": RUNS * (len(STEPS) + 1),
            "calls made": calls,
            "called again (in flight at a kill)": calls - RUNS * (len(STEPS) + 1),
            "emails twice (the window)": sum(1 for count in effects.values() if count == 2),
        }
        line = json.dumps({"backend": bus_url.partition(":")[0], **figures}) + "\n"
        with Path(report).open("a") as out:  # noqa: ASYNC230 - one line, at the end
            out.write(line)
