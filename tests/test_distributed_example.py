"""examples/distributed/ as its README runs it: four `eventwire run` processes and `ask.py`,
sharing nothing but a broker (SQLite here, and Redis when it is reachable)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import backend_url, destroy

ROOT = Path(__file__).resolve().parent.parent
EVENTWIRE = Path(sys.executable).parent / "eventwire"
PROCESSES = ("audit_bus", "research_bus", "research_bus", "email_bus")
QUERIES = ("What is our refund policy?", "Who owns billing?", "Where is the SLA?")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def read_until(process: subprocess.Popen[str], marker: str, timeout: float = 30) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} never came; the process said: {lines}")


@pytest.mark.parametrize("backend_name", ["sqlite", "redis"])
def test_the_pipeline_runs_across_processes(
    backend_name: str, tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    url = backend_url(backend_name, tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    try:
        for target in PROCESSES:
            process = subprocess.Popen(
                [str(EVENTWIRE), "run", f"examples.distributed.agents:{target}", "--url", url],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            started.append(process)
            assert "running" in read_until(process, "SIGTERM or Ctrl-C stops")[-1]
        ask = subprocess.run(
            [sys.executable, "examples/distributed/ask.py", "--url", url, *QUERIES],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert ask.returncode == 0, ask.stdout + ask.stderr
        assert f"all {len(QUERIES)} queries handled" in ask.stdout
        asked = dict(re.findall(r"asked '(.+)' as (\S+)", ask.stdout))
        for process in started:
            process.terminate()
        output = {id(p): p.communicate(timeout=30)[0] for p in started}
    finally:
        asyncio.run(destroy(url))
    audit, research_a, research_b, email = (output[id(p)] for p in started)
    for query, event_id in asked.items():
        assert f"asked {query!r} (id {event_id})" in audit
        # One durable subscription in two processes: each query researched exactly once.
        assert (research_a + research_b).count(f"RESEARCH {query!r}") == 1
        assert f"{query!r}: 3 relevant reports (correlation {event_id})" in email
    for process in started:
        assert process.returncode == 0, "each process stopped cleanly on SIGTERM"
