"""``eventwire demo --durable``: the research and email agents as one durable run, killed
mid-way and resumed in a new process, on SQLite, offline."""

from __future__ import annotations

import io

from rich.console import Console

from eventwire.durable_demo import run_durable_demo
from tests.test_cli_dlq import cli


async def test_the_durable_demo_resumes_the_killed_run_and_sends_one_email() -> None:
    out = Console(file=io.StringIO(), width=120)
    figures = await run_durable_demo(out)
    # The plan and the searches were recorded before the kill: made once. The draft was in
    # flight: made again by the second worker. The email: once.
    assert figures == {
        "plan calls": 1,
        "search calls": 3,
        "draft calls": 2,
        "emails sent": 1,
        "state": "finished",
        "tries": 3,
    }


def test_eventwire_demo_durable_runs_from_the_command_line() -> None:
    result = cli("demo", "--durable")
    assert result.returncode == 0, result.stderr
    assert "killing worker 1" in result.stdout
    assert "effect email: sent to ana@example.com" in result.stdout
