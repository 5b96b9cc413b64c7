"""``eventwire runs``: the durable runs a backend's journal holds (`eventwire.runs`), with
their state and the steps they recorded."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from eventwire.cli._app import UrlOption, app, bus_url, console, fail, listing, safe_bus_url

if TYPE_CHECKING:
    from eventwire.runs import RunInfo

STATES = ("running", "finished", "failed", "unknown")


@app.command(
    "runs",
    epilog=(
        "Examples:\n\n"
        "  eventwire runs --url sqlite:///bus.db\n\n"
        "  eventwire runs --state failed --json --url redis://127.0.0.1:6379/0"
    ),
)
def list_runs_command(
    url: UrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    state: Annotated[
        str | None,
        typer.Option("--state", help=f"Only runs in this state: {', '.join(STATES)}."),
    ] = None,
) -> None:
    """The runs of ``durable=True`` handlers: each one's subscription and event, its state
    (running: in progress, or its process died and it resumes when the event comes again;
    finished; failed: its last try raised), how many times it was tried, and the steps it
    recorded (their results are kept: they are not called again)."""
    if state is not None and state not in STATES:
        fail(f"--state {state!r} is not a state: use one of {', '.join(STATES)}")
    runs = [run for run in _read_runs(url) if state is None or run.state == state]
    table = listing(
        runs,
        _as_dict,
        as_json=as_json,
        nothing=f"no durable runs on {safe_bus_url(url)}",
        title=f"Durable runs on {safe_bus_url(url)}",
        columns=("subscription", "event", "state", "tries", "steps", "last error"),
        right=("tries",),
    )
    if table is None:
        return
    for run in runs:
        steps = ", ".join(step.partition(":")[2] for step in run.steps) or "-"
        if run.failed:
            steps += " (failed: " + ", ".join(s.partition(":")[2] for s in run.failed) + ")"
        table.add_row(
            run.subscription, run.event_id, run.state, str(run.tries), steps, run.error or "-"
        )
    console().print(table)


def _read_runs(url: str | None) -> list[RunInfo]:
    from eventwire.backends import open_backend
    from eventwire.backends.base import BackendCapabilityError
    from eventwire.backends.memory import MemoryBackend
    from eventwire.runs import list_runs

    backend = open_backend(bus_url(url))
    if isinstance(backend, MemoryBackend):
        fail(
            "the in-process bus (memory://) keeps its runs in its own process: give the URL "
            "of a durable backend with --url or EVENTWIRE_URL"
        )

    async def read() -> list[RunInfo]:
        await backend.connect()
        try:
            return await list_runs(backend.journal())
        except BackendCapabilityError as exc:
            fail(str(exc))
        finally:
            await backend.close()

    return asyncio.run(read())


def _as_dict(run: RunInfo) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(run) | {"subscription": run.subscription, "event_id": run.event_id}
