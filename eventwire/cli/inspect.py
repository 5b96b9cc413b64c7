"""``eventwire tail``, ``replay`` and ``trace``: what passes on a broker, what it kept, and
how one chain of events went (`eventwire.history`, `eventwire.lineage`)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from eventwire.cli._app import UrlOption, app, bus_url, console, error_console, fail

if TYPE_CHECKING:
    from eventwire.event import Event
    from eventwire.history import History, HistoryReader
    from eventwire.lineage import LineageNode

_IN_PROCESS = (
    "memory:// is the in-process bus: its events live only inside the process that publishes "
    "them, so no other process can see them"
)
_TAIL_MEMORY = (
    f"{_IN_PROCESS}. Run the app on a broker (sqlite, redis, nats, amqp) and give its URL with "
    "--url or EVENTWIRE_URL; in your own code, subscribe to the pattern or use bus.record()"
)
_TRACE_MEMORY = (
    f"{_IN_PROCESS}, and it keeps no history. In a test or a script, record the chain with "
    "`async with bus.record() as seen:` and print `render_lineage(seen.lineage(event))` "
    "(eventwire.lineage); or run the app on a broker that keeps history (sqlite, redis, nats, "
    "or amqp with ?history=7d in the app's URL) with EventBus(url, lineage=True) and give "
    "that URL here"
)
_NO_HANDLINGS = (
    "note: handlings were not recorded, so only the events are shown. Run the agents with "
    "EventBus(url, lineage=True) or `eventwire run app:bus --lineage` to see each "
    "subscription's outcome, attempts and time here"
)
_CHUNK = 500
_SHORT = 12

PatternArgument = Annotated[
    str,
    typer.Argument(
        help="Topic pattern, e.g. 'orders.>' or 'user.*'. '>' does not reach the bus's own "
        "topics: name them, e.g. '_dlq.>'.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


# -- shared -------------------------------------------------------------------------------


def _target(url: str | None, memory_explanation: str) -> str:
    """The bus URL to read, checked: a bad URL raises, the in-process bus fails."""
    from eventwire.backends import MEMORY, parse_url, resolve_url

    target = bus_url(url)
    resolve_url(target)
    if parse_url(target).scheme == MEMORY:
        fail(memory_explanation)
    return target


def _check_pattern(pattern: str) -> None:
    from eventwire.topics import validate_pattern

    validate_pattern(pattern)


def _moment(text: str, option: str) -> datetime:
    from eventwire.history import parse_time

    return parse_time(text, option=option)


def _short(event_id: str | None) -> str:
    return "-" if event_id is None else event_id[-_SHORT:]


def _when(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_line(event: Event[Any]) -> str:
    from eventwire.lineage import event_to_json

    return json.dumps(event_to_json(event), ensure_ascii=False, default=str)


def _event_line(event: Event[Any], *, to: str | None = None) -> Any:
    """One event on one line: local time, topic (``→ to``), source, short id and cause,
    payload."""
    from rich.text import Text

    from eventwire.lineage import payload_preview  # the same as `eventwire trace`

    return Text.assemble(
        (event.timestamp.astimezone().strftime("%H:%M:%S.%f")[:-3], "dim"),
        "  ",
        (event.topic, "bold red" if event.topic.startswith("_dlq.") else "bold cyan"),
        ("" if to is None else f" → {to}", "bold cyan"),
        "  ",
        (event.source or "-", "green"),
        f"  id …{_short(event.id)}",
        (f"  cause …{_short(event.causation_id)}" if event.causation_id else "", "dim"),
        "  ",
        payload_preview(event.payload),
    )


async def _read(reader: HistoryReader, timeout: float) -> History:
    """Everything `reader` yields, with a spinner on standard error; exits 1 on timeout."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from eventwire.history import History

    events = History()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        console=error_console(),
        transient=True,
    )
    task = progress.add_task(f"reading history of {reader.where}", total=None)
    try:
        with progress:
            async with asyncio.timeout(timeout), reader:
                async for event in reader:
                    events.append(event)
                    if len(events) % 100 == 0:
                        progress.update(task, description=f"reading history: {len(events)} events")
    except TimeoutError:
        fail(
            f"reading the history of {reader.where} took more than {timeout:g}s "
            f"({len(events)} events read); narrow --since or raise --timeout",
            1,
        )
    events.skipped = reader.skipped
    events.sort(key=lambda event: event.timestamp)
    if events.skipped:
        error_console().print(
            f"note: {events.skipped} stored message(s) were not eventwire events and were "
            "passed over",
            markup=False,
        )
    return events


# -- tail ---------------------------------------------------------------------------------


@app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire tail '>' --url sqlite:///bus.db\n\n"
        "  eventwire tail 'orders.>' --json --url redis://127.0.0.1:6379/0 | jq .payload\n\n"
        "  eventwire tail '_dlq.>' --count 1 --timeout 60 --url nats://127.0.0.1:4222"
    )
)
def tail(
    pattern: PatternArgument,
    url: UrlOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each event as one JSON document per line.")
    ] = False,
    count: Annotated[
        int | None,
        typer.Option(
            "--count", "-n", min=1, help="Stop after this many events.", show_default=False
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.0, help="Stop after this many seconds.", show_default=False),
    ] = None,
) -> None:
    """Show events matching PATTERN as they are published, until Ctrl-C (or --count events,
    or --timeout seconds).

    Each line shows the time, topic, source, short id, short causation id and the start of the
    payload. The app's own subscriptions are not touched: tail reads through a consumer of its
    own, removed when it stops. Works on every broker (sqlite, redis, nats, amqp); events
    published before it started are not shown (see `eventwire replay` and `eventwire trace`).
    """
    from eventwire.history import follow

    _check_pattern(pattern)
    target = _target(url, _TAIL_MEMORY)
    out = console()

    async def watch() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = (signal.SIGINT, signal.SIGTERM)
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        try:
            async with follow(target, pattern) as events:
                error_console().print(
                    f"tailing {pattern} on {events.where} (Ctrl-C to stop)", markup=False
                )

                async def show() -> None:
                    shown = 0
                    async for event in events:
                        if as_json:
                            sys.stdout.write(_json_line(event) + "\n")
                            sys.stdout.flush()
                        else:
                            out.print(_event_line(event), markup=False, soft_wrap=True)
                        shown += 1
                        if count is not None and shown >= count:
                            return

                await _until_stopped(
                    asyncio.ensure_future(show()), stop, timeout, before_cancel=events.stop
                )
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)

    asyncio.run(watch())


async def _until_stopped(
    work: asyncio.Future[None],
    stop: asyncio.Event,
    timeout: float | None,
    *,
    before_cancel: Callable[[], None] | None = None,
) -> None:
    """Wait for `work`, a signal (`stop`) or `timeout`; cancel what is left (calling
    `before_cancel` first: a cancellation may be swallowed); raise what `work` raised."""
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((work, stopped), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if before_cancel is not None:
            before_cancel()
        for future in (work, stopped):
            future.cancel()
        await asyncio.gather(work, stopped, return_exceptions=True)
    error = None if work.cancelled() else work.exception()
    if error is not None:
        raise error


# -- replay -------------------------------------------------------------------------------


@app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire replay 'orders.>' --since 15m --dry-run --url sqlite:///bus.db\n\n"
        "  eventwire replay 'orders.created' --since 2026-01-31T09:00:00Z --until "
        "2026-01-31T10:00:00Z --yes --url redis://127.0.0.1:6379/0\n\n"
        "  eventwire replay 'user.query' --since 1h --to user.query.retry --yes "
        "--url nats://127.0.0.1:4222"
    )
)
def replay(
    pattern: PatternArgument,
    since: Annotated[
        str,
        typer.Option(
            help="Replay events published since then: an age (90s, 15m, 2h, 1d, 1w) or an ISO "
            "8601 time (UTC unless it has an offset).",
            show_default=False,
        ),
    ],
    until: Annotated[
        str | None,
        typer.Option(
            help="...and until then (default: now), same forms as --since.", show_default=False
        ),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to", help="Publish them on this topic instead of their own.", show_default=False
        ),
    ] = None,
    url: UrlOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be replayed; publish nothing.")
    ] = False,
    yes: Annotated[
        bool,
        typer.Option("--yes", "-y", help="Do not ask for confirmation (needed without a TTY)."),
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds allowed for reading the history.")
    ] = 120.0,
) -> None:
    """Publish again the events matching PATTERN that the broker kept from --since to --until.

    Each is published as a new event (a new id) with the same payload, key and metadata plus
    `replayed_from` (the original's id); its causation id is the original's, so `eventwire
    trace` shows it under the original. The subscriptions running now handle them like any
    event. Needs a broker that keeps history: sqlite, redis, nats, or amqp when the app's
    processes run with ?history= in their URL (amqp://guest:guest@127.0.0.1:5672/?history=7d).
    """
    from eventwire.history import HistoryReader
    from eventwire.topics import is_reserved, is_topic

    _check_pattern(pattern)
    if to is not None:
        if not is_topic(to):
            from eventwire.errors import InvalidTopicError
            from eventwire.topics import validate_topic

            try:
                validate_topic(to)
            except InvalidTopicError as error:
                fail(f"--to: {error}")
        if is_reserved(to) and not is_reserved(pattern):
            fail(
                f"--to {to!r} is one of the bus's own topics; replay only application events there"
            )
    start = _moment(since, "--since")
    end = datetime.now(UTC) if until is None else _moment(until, "--until")
    if start > end:
        fail(f"--since ({_when(start)}) is after --until ({_when(end)})")
    target = _target(url, f"{_IN_PROCESS}, and it keeps no history to replay")

    async def work() -> None:
        reader = HistoryReader(target, [pattern], since=start, until=end, purpose="replay")
        events = await _read(reader, timeout)
        where = reader.where
        span = f"{pattern} from {_when(start)} to {_when(end)}"
        if not events:
            console().print(f"no events on {where} match {span}: nothing to replay", markup=False)
            return
        destination = "their own topics" if to is None else to
        if dry_run:
            out = console()
            for event in events:
                out.print(_event_line(event, to=to), markup=False, soft_wrap=True)
            out.print(
                f"{len(events)} event(s) would be replayed to {destination} on {where} "
                "(dry run: nothing published)",
                markup=False,
            )
            return
        if not yes:
            _confirm(f"Replay {len(events)} event(s) matching {span} to {destination} on {where}?")
        await _republish(target, events, to)
        console().print(
            f"replayed {len(events)} event(s) matching {span} to {destination} on {where}",
            markup=False,
        )

    asyncio.run(work())


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        fail("replay asks for confirmation and there is no terminal to ask on; pass --yes")
    if not typer.confirm(question):
        error_console().print("nothing replayed", markup=False)
        raise typer.Exit(1)


def _replayed(original: Event[Any], topic: str | None = None) -> Event[Any]:
    """A new event carrying `original` again: same payload, key, source and metadata plus
    ``replayed_from``; caused by the original, in its chain."""
    from eventwire.event import Event

    return Event(
        topic or original.topic,
        original.payload,
        {**original.metadata, "replayed_from": original.id},
        key=original.key,
        source=original.source,
        correlation_id=original.correlation_id,
        causation_id=original.id,
    )


async def _republish(target: str, events: Sequence[Event[Any]], to: str | None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from eventwire.bus import EventBus

    bar = Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        console=error_console(),
        transient=True,
    )
    task = bar.add_task("replaying", total=len(events))
    async with EventBus(target) as bus:
        with bar:
            for first in range(0, len(events), _CHUNK):
                chunk = events[first : first + _CHUNK]
                await bus.publish_many([_replayed(event, to) for event in chunk])
                bar.advance(task, len(chunk))


# -- trace --------------------------------------------------------------------------------


@app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire trace 0190f3c2-8d4e-7b1a-9c3f-3a5c0e2f41d7 --url sqlite:///bus.db\n\n"
        "  eventwire trace 0190f3c2-8d4e-7b1a-9c3f-3a5c0e2f41d7 --json "
        "--url redis://127.0.0.1:6379/0"
    )
)
def trace(
    event_id: Annotated[
        str,
        typer.Argument(
            metavar="ID",
            help="A chain's correlation id, or the id of any event of the chain.",
            show_default=False,
        ),
    ],
    url: UrlOption = None,
    as_json: JsonOption = False,
    since: Annotated[
        str | None,
        typer.Option(
            help="Read history from then on (default: from shortly before the time in ID): an "
            "age (15m, 2h, 1d) or an ISO 8601 time. Needed for an id that is not a UUIDv7.",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds allowed for reading the history.")
    ] = 60.0,
) -> None:
    """Show how one chain of events went: every event it caused, as a tree, with what each
    subscription did with each event (outcome, attempts, time, last error) and its dead
    letters. The event named by ID is marked.

    Reads the broker's history (sqlite, redis, nats, or amqp when the app's processes run with
    ?history= in their URL, e.g. amqp://guest:guest@127.0.0.1:5672/?history=7d): application
    topics, dead letters and the handling records the agents store when run with
    EventBus(url, lineage=True) or `eventwire run --lineage`.
    """
    from eventwire.history import CLOCK_MARGIN, id_time
    from eventwire.lineage import build_lineage, handling_records, lineage_to_dict, render_lineage

    wanted = event_id.strip()
    start = None if since is None else _moment(since, "--since")
    if start is None:
        created = id_time(wanted)
        if created is None:
            fail(
                f"{wanted!r} is not an eventwire event id (a UUIDv7, which says when to read "
                "from); give --since to read the history from then on"
            )
        start = created - CLOCK_MARGIN
    target = _target(url, _TRACE_MEMORY)

    async def work() -> tuple[list[LineageNode], str | None]:
        events, where = await _chain_history(target, start, timeout)
        found = _locate(events, wanted)
        if found is None:
            fail(
                f"no event or chain {wanted} on {where} since {_when(start)} "
                f"({len(events)} events read); if it is older, give --since",
                1,
            )
        correlation, marked = found
        root_time = id_time(correlation)
        if root_time is not None and root_time - CLOCK_MARGIN < start:
            # ID is a later event of the chain: read again from where the chain began.
            events, where = await _chain_history(target, root_time - CLOCK_MARGIN, timeout)
        nodes = build_lineage(events, handling_records(events), correlation)
        await _with_runs(target, nodes)
        return nodes, marked

    nodes, marked = asyncio.run(work())
    if not any(node.handlings for root in nodes for node in root.walk()):
        error_console().print(_NO_HANDLINGS, markup=False, style="yellow")
    if as_json:
        typer.echo(json.dumps(lineage_to_dict(nodes), ensure_ascii=False, default=str))
        return
    console().print(render_lineage(nodes, marked=marked))


async def _with_runs(target: str, nodes: list[LineageNode]) -> None:
    """Add the durable runs of the chain's handlings, from the backend's journal (if it
    keeps one)."""
    from eventwire.backends import open_backend
    from eventwire.backends.base import BackendCapabilityError
    from eventwire.lineage import add_runs

    if not any(node.handlings for root in nodes for node in root.walk()):
        return
    backend = open_backend(target)
    try:
        journal = backend.journal()
    except BackendCapabilityError:
        return  # no journal (RabbitMQ): no durable runs to show
    await backend.connect()
    try:
        await add_runs(nodes, journal)
    finally:
        await backend.close()


async def _chain_history(
    target: str, start: datetime, timeout: float
) -> tuple[list[Event[Any]], str]:
    from eventwire.history import HistoryReader
    from eventwire.lineage import HANDLED_TOPIC

    reader = HistoryReader(target, [">", "_dlq.>", HANDLED_TOPIC], since=start, purpose="trace")
    return await _read(reader, timeout), reader.where


def _locate(events: Sequence[Event[Any]], wanted: str) -> tuple[str, str | None] | None:
    """(the chain's correlation id, the event id to mark) for an event id or a correlation
    id; None if no event read is either."""
    from eventwire.lineage import HANDLED_TOPIC

    for event in events:
        if event.id == wanted and event.topic != HANDLED_TOPIC:
            return event.correlation_id, event.id
    if any(event.correlation_id == wanted for event in events):
        return wanted, None
    return None
