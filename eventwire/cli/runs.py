"""``eventwire runs``: the durable runs a backend's journal holds (`eventwire.runs`), with
their state and the steps they recorded; ``eventwire send`` / ``approve`` resolve a waiting
run's wait, ``eventwire cancel`` cancels a run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from eventwire.cli._app import UrlOption, app, bus_url, console, fail, listing, safe_bus_url

if TYPE_CHECKING:
    from eventwire.backends.journal import Journal
    from eventwire.runs import RunInfo

T = TypeVar("T")

STATES = ("running", "waiting", "finished", "failed", "cancelled", "unknown")


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
    waiting: parked on the waits listed; finished; failed: its last try raised; cancelled),
    how many times it was tried, and the steps it recorded (their results are kept: they
    are not called again)."""
    if state is not None and state not in STATES:
        fail(f"--state {state!r} is not a state: use one of {', '.join(STATES)}")
    runs = [run for run in _read_runs(url) if state is None or run.state == state]
    table = listing(
        runs,
        _as_dict,
        as_json=as_json,
        nothing=f"no durable runs on {safe_bus_url(url)}",
        title=f"Durable runs on {safe_bus_url(url)}",
        columns=("subscription", "event", "state", "tries", "steps", "waiting for", "last error"),
        right=("tries",),
    )
    if table is None:
        return
    for run in runs:
        steps = ", ".join(step.partition(":")[2] for step in run.steps) or "-"
        if run.failed:
            steps += " (failed: " + ", ".join(s.partition(":")[2] for s in run.failed) + ")"
        waiting = ", ".join(run.waiting) or "-"
        table.add_row(
            run.subscription,
            run.event_id,
            run.state,
            str(run.tries),
            steps,
            waiting,
            run.error or "-",
        )
    console().print(table)


RunArgument = Annotated[
    str,
    typer.Argument(
        help="The run's id, as `eventwire runs` shows it: <subscription>/<event id>.",
        show_default=False,
    ),
]
WaitOption = Annotated[
    str | None,
    typer.Option(
        "--wait", help="Which wait (e.g. wait:approval.given), when the run waits on several."
    ),
]


@app.command(
    "send",
    epilog=(
        "Example:\n\n"
        "  eventwire send 'research/0190...' '{\"note\": \"go ahead\"}' --url sqlite:///bus.db"
    ),
)
def send_command(
    run: RunArgument,
    payload: Annotated[
        str, typer.Argument(help="Fields to send, as a JSON object.", show_default=False)
    ] = "{}",
    wait: WaitOption = None,
    url: UrlOption = None,
) -> None:
    """Resolve a waiting run's wait: publish the event it waits for, on its topic, with
    the fields it matches on and those given. Prints the event's id."""
    import json

    try:
        fields = json.loads(payload)
    except json.JSONDecodeError as exc:
        fail(f"the payload must be a JSON object: {exc}")
    if not isinstance(fields, dict):
        fail(f"the payload must be a JSON object, e.g. '{{\"approved\": true}}', got {payload}")
    console().print(_send(url, run, wait, fields))


@app.command(
    "approve",
    epilog="Example:\n\n  eventwire approve 'research/0190...' --by ana --url sqlite:///bus.db",
)
def approve_command(
    run: RunArgument,
    deny: Annotated[bool, typer.Option("--deny", help="Send approved=false instead.")] = False,
    by: Annotated[str | None, typer.Option("--by", help="Who decides (sent as `by`).")] = None,
    wait: WaitOption = None,
    url: UrlOption = None,
) -> None:
    """Approve (or --deny) what a waiting run asks: `send` with ``{"approved": true}`` (and
    ``"by"``), on the topic of the run's wait."""
    fields: dict[str, object] = {"approved": not deny}
    if by is not None:
        fields["by"] = by
    console().print(_send(url, run, wait, fields))


@app.command("cancel", epilog="Example:\n\n  eventwire cancel 'research/0190...' --url ...")
def cancel_command(
    run: RunArgument,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept with the run).")] = "cancelled",
    url: UrlOption = None,
) -> None:
    """Cancel a run: a waiting run is not resumed, a running one stops at its next park."""
    from eventwire.runs import cancel_run

    if not on_journal(url, lambda journal: cancel_run(journal, run, reason)):
        fail(f"no unfinished run {run!r} on {safe_bus_url(url)}: see `eventwire runs`")
    console().print(f"cancelled {run}")


def _send(url: str | None, run: str, wait: str | None, fields: dict[str, object]) -> str:
    from eventwire.bus import EventBus
    from eventwire.errors import InvalidTopicError
    from eventwire.runs import pending_waits
    from eventwire.topics import validate_topic

    waits = on_journal(url, lambda journal: pending_waits(journal, run))
    if not waits:
        fail(f"run {run!r} on {safe_bus_url(url)} waits for nothing: see `eventwire runs`")
    if wait is None:
        if len(waits) > 1:
            fail(f"run {run!r} waits on {', '.join(sorted(waits))}: choose one with --wait")
        [wait] = waits
    spec = waits.get(wait)
    if spec is None or spec.pattern is None:
        fail(f"run {run!r} has no event wait {wait!r}; it waits on {', '.join(sorted(waits))}")
    try:
        validate_topic(spec.pattern)
    except InvalidTopicError:
        fail(
            f"{wait} waits for the pattern {spec.pattern!r}, not one topic: publish the event "
            "with `eventwire publish <topic> ...` instead"
        )
    topic, payload = spec.pattern, _nested(spec.match) | fields

    async def publish() -> str:
        async with EventBus(bus_url(url)) as bus:
            return (await bus.publish(topic, payload)).id

    return asyncio.run(publish())


def _nested(match: dict[str, object]) -> dict[str, object]:
    """Match values by dotted path, as a payload that has them."""
    payload: dict[str, object] = {}
    for path, value in match.items():
        *parents, last = path.split(".")
        level = payload
        for part in parents:
            level = level.setdefault(part, {})  # type: ignore[assignment]
        level[last] = value
    return payload


def _read_runs(url: str | None) -> list[RunInfo]:
    from eventwire.runs import list_runs

    return on_journal(url, list_runs)


def on_journal(url: str | None, work: Callable[[Journal], Awaitable[T]]) -> T:
    """`work` on the journal of the backend at `url` (connected for it, closed after)."""
    from eventwire.backends import open_backend
    from eventwire.backends.base import BackendCapabilityError
    from eventwire.backends.memory import MemoryBackend

    backend = open_backend(bus_url(url))
    if isinstance(backend, MemoryBackend):
        fail(
            "the in-process bus (memory://) keeps its runs in its own process: give the URL "
            "of a durable backend with --url or EVENTWIRE_URL"
        )

    async def run() -> T:
        await backend.connect()
        try:
            return await work(backend.journal())
        except BackendCapabilityError as exc:
            fail(str(exc))
        finally:
            await backend.close()

    return asyncio.run(run())


def _as_dict(run: RunInfo) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(run) | {"subscription": run.subscription, "event_id": run.event_id}
