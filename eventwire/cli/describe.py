"""Commands that describe an app without running it: ``topology`` and ``asyncapi``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from eventwire.cli._app import app, console, error_console, fail, safe_bus_url

if TYPE_CHECKING:
    from eventwire.backends.journal import Journal
    from eventwire.bus import EventBus
    from eventwire.event import Event
    from eventwire.runs import RunInfo, StepInfo

TargetsArgument = Annotated[
    list[str],
    typer.Argument(
        help="The bus: 'module:attribute', e.g. 'myapp.agents:bus'; give several for an app "
        "whose processes each run a bus. Modules are imported (not run) from the current "
        "directory or the installed packages.",
        show_default=False,
    ),
]
OutputOption = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Write to this file instead of standard output."),
]
HistoryUrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Also learn who publishes what from the events this broker still holds, e.g. "
        "sqlite:///bus.db: sqlite, redis, nats, or amqp when the app runs with ?history= in "
        "its URL (amqp://guest:guest@127.0.0.1:5672/?history=7d).",
        show_default=False,
    ),
]
SinceOption = Annotated[
    str,
    typer.Option(help="With --url: read history from this long ago (30m, 1h, 2d) or an ISO time."),
]
TimeoutOption = Annotated[
    float, typer.Option(help="With --url: give up reading history after this many seconds.")
]


def _load(targets: list[str]) -> list[EventBus]:
    from eventwire.runner import load_bus

    return [load_bus(target) for target in targets]


def _history(url: str | None, since: str, timeout: float) -> list[Event[Any]]:
    """Events from the broker at `url` (none without one), with progress on stderr."""
    if url is None:
        return []
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from eventwire.topology import parse_since, read_history

    start = parse_since(since)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        console=error_console(),
        transient=True,
    )
    with progress:
        task = progress.add_task("reading history", total=None)

        def seen(count: int) -> None:
            progress.update(task, description=f"reading history: {count} events")

        try:
            return asyncio.run(read_history(url, since=start, timeout=timeout, progress=seen))
        except TimeoutError as error:
            error_console().print(f"warning: {error}", markup=False, style="yellow")
            events: list[Event[Any]] = getattr(error, "events", [])
            return events


def _write(text: str, output: Path | None, what: str) -> None:
    if output is None:
        console().file.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror or error}")
    error_console().print(f"wrote {what} to {output}", markup=False)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire topology myapp.agents:bus\n\n"
        "  eventwire topology myapp.agents:bus --format mermaid -o topology.mmd\n\n"
        "  eventwire topology agents:audit_bus agents:research_bus agents:email_bus "
        "--format svg -o topology.svg --url sqlite:///bus.db --since 2h"
    )
)
def topology(
    targets: Annotated[
        list[str] | None,
        typer.Argument(
            help="The bus: 'module:attribute', e.g. 'myapp.agents:bus'; give several for an "
            "app whose processes each run a bus. Modules are imported (not run) from the "
            "current directory or the installed packages. Not with --run.",
            show_default=False,
        ),
    ] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format", "-f", help="text, mermaid, dot (Graphviz), svg or json.", show_default=True
        ),
    ] = "text",
    output: OutputOption = None,
    url: HistoryUrlOption = None,
    since: SinceOption = "1h",
    timeout: TimeoutOption = 10.0,
    all_topics: Annotated[
        bool,
        typer.Option(
            "--all", help="Show the bus's own topics (_bus.*, every _dlq.<topic>) one by one."
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="svg: auto (Graphviz `dot` when installed, else built in), builtin or graphviz."
        ),
    ] = "auto",
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="Draw one durable run instead (its id, as `eventwire runs` shows it): its "
            "steps in order, a gather's side by side, its waits; text, mermaid or dot. "
            "Needs --url.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Draw an app's architecture: agents, subscriptions, topics and who publishes what.

    Reads what the code declares (subscriptions, their patterns and groups, publishes=[...])
    without running it. With --url it also reads recent events from the broker: each event's
    source (the agent or subscription that published it) adds a dashed "learnt" edge. Dead
    letters are drawn as one _dlq.> topic unless --all is given.
    """
    from eventwire.topology import FORMATS, Topology, render

    if run is not None:
        if targets:
            fail("--run draws one run from the journal at --url: give no bus with it")
        _write(_draw_run(run, url, format), output, f"run {run}")
        return
    if not targets:
        fail("give the bus to draw ('module:attribute'), or --run RUN with --url")
    if format not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if engine not in ("auto", "builtin", "graphviz"):
        fail(f"--engine must be auto, builtin or graphviz, got {engine!r}")
    buses = _load(targets)
    model = Topology.from_bus(*buses)
    model.learn(_history(url, since, timeout))
    text = render(model.view(internal=all_topics), format, engine=engine)
    _write(text, output, f"the {format} topology")


def _draw_run(run: str, url: str | None, format: str) -> str:
    from eventwire.run_graph import RUN_FORMATS, render_run

    if format not in RUN_FORMATS:
        fail(f"--run draws as {', '.join(RUN_FORMATS)}, not {format!r}")
    if url is None:
        fail("--run reads the run from a backend's journal: give its --url")
    from eventwire.cli.runs import on_journal
    from eventwire.runs import run_info, run_steps

    async def read(journal: Journal) -> tuple[RunInfo | None, list[StepInfo]]:
        return await run_info(journal, run), await run_steps(journal, run)

    info, steps = on_journal(url, read)
    if info is None:
        fail(f"no run {run!r} on {safe_bus_url(url)}: see `eventwire runs`")
    return render_run(info, steps, format)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire asyncapi myapp.agents:bus -o asyncapi.json\n\n"
        "  eventwire asyncapi myapp.agents:bus --title 'Support agents' --version 2.1.0 "
        "--format yaml -o asyncapi.yaml"
    )
)
def asyncapi(
    targets: TargetsArgument,
    output: OutputOption = None,
    title: Annotated[
        str | None, typer.Option(help="The document's title (default: the targets).")
    ] = None,
    version: Annotated[str, typer.Option(help="The API's version in info.version.")] = "1.0.0",
    format: Annotated[
        str, typer.Option("--format", "-f", help="json, or yaml (needs PyYAML).")
    ] = "json",
    url: HistoryUrlOption = None,
    since: SinceOption = "1h",
    timeout: TimeoutOption = 10.0,
) -> None:
    """Write an AsyncAPI 3.0.0 document of an app: its topics as channels, a receive
    operation per subscription and a send operation per published topic, with JSON Schema
    payloads from typed handlers (Event[Model]).
    """
    from eventwire.asyncapi import build_document, dump

    if format not in ("json", "yaml"):
        fail(f"--format must be json or yaml, got {format!r}")
    buses = _load(targets)
    events = _history(url, since, timeout)
    document = build_document(
        buses, title=title or f"eventwire app {' '.join(targets)}", version=version, events=events
    )
    try:
        text = dump(document, format)
    except ImportError:
        fail("--format yaml needs PyYAML: pip install pyyaml (or use --format json)")
    _write(text, output, "the AsyncAPI document")
