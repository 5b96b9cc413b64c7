"""``eventwire dlq list|show|retry|purge``: the dead letters kept on a broker."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from eventwire.cli._app import (
    App,
    UrlOption,
    age,
    app,
    bus_url,
    console,
    error_console,
    fail,
    safe_bus_url,
)

if TYPE_CHECKING:
    from rich.table import Table

    from eventwire.dlq import DeadLetter, DeadLetterQueue, Progress

T = TypeVar("T")

dlq_app = App(
    name="dlq",
    help=(
        "Inspect, retry and purge the dead letters kept on a broker: the events a "
        "subscription gave up on, with the error and the number of attempts.\n\n"
        "Example:\n\n"
        "  eventwire dlq list --url sqlite:///bus.db"
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(dlq_app, name="dlq")

SubscriptionOption = Annotated[
    str | None,
    typer.Option(
        "--subscription",
        "-s",
        help="Only letters of this subscription (its name or group).",
        show_default=False,
    ),
]
TopicOption = Annotated[
    str | None,
    typer.Option(
        "--topic",
        "-t",
        help="Only letters whose original topic matches this pattern, e.g. 'orders.>'.",
        show_default=False,
    ),
]
ErrorOption = Annotated[
    str | None,
    typer.Option(
        "--error",
        "-e",
        help="Only letters of this error type, e.g. ValueError.",
        show_default=False,
    ),
]
SinceOption = Annotated[
    str | None,
    typer.Option(
        help="Only letters written since then: an age (30s, 10m, 2h, 7d) or an ISO date/time.",
        show_default=False,
    ),
]
UntilOption = Annotated[
    str | None,
    typer.Option(
        help="Only letters written until then: an age (30s, 10m, 2h, 7d) or an ISO date/time.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
IdsArgument = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="[ID]...",
        help="Letter ids: the full id, the short id `dlq list` shows, or the original event's id.",
        show_default=False,
    ),
]
AllOption = Annotated[bool, typer.Option("--all", help="Every dead letter.")]
YesOption = Annotated[
    bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (needed without a TTY).")
]


@dlq_app.command(
    "list",
    epilog=(
        "Examples:\n\n"
        "  eventwire dlq list --url sqlite:///bus.db\n\n"
        "  eventwire dlq list -s billing --topic 'orders.>' --since 1h --url nats://127.0.0.1:4222"
        "\n\n"
        "  eventwire dlq list --error ValueError --json --url redis://127.0.0.1:6379/0"
    ),
)
def list_letters(
    url: UrlOption = None,
    subscription: SubscriptionOption = None,
    topic: TopicOption = None,
    error: ErrorOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, help="Show at most this many (oldest first).")
    ] = 50,
    as_json: JsonOption = False,
) -> None:
    """List dead letters, oldest first: id, age, original topic, subscription, attempts and
    error. Reading leaves them all in place."""
    filters = _filters(subscription, topic, error, since, until)

    async def read(dlq: DeadLetterQueue) -> tuple[list[DeadLetter], int]:
        # Counted first: a reader gives back what it read when it closes, and a broker may
        # not count those again for a moment (RabbitMQ requeues them asynchronously).
        size = await dlq.size()
        with _progress() as progress:
            letters = await dlq.list(limit=limit, on_progress=progress, **filters)
        return letters, size

    letters, size = _with_queue(url, read)
    out = console()
    if as_json:
        typer.echo(_json([letter.to_dict(event=False) for letter in letters]))
        return
    where = safe_bus_url(url)
    if not letters:
        matching = " matching the filters" if filters else ""
        out.print(f"no dead letters{matching} on {where}", markup=False)
        return
    out.print(_table(letters))
    line = f"{len(letters)} dead letter(s) on {where}"
    if len(letters) == limit and size > limit:
        line += f"; showing the {limit} oldest (the queue holds {size}; raise --limit)"
    out.print(f"{line} (details: eventwire dlq show ID)", markup=False)


@dlq_app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire dlq show 3a5c0e2f41d7 --url sqlite:///bus.db\n\n"
        "  eventwire dlq show 0190f3c2-8d4e-7b1a-9c3f-3a5c0e2f41d7 --json --url "
        "nats://127.0.0.1:4222"
    )
)
def show(
    letter_id: Annotated[
        str,
        typer.Argument(
            metavar="ID",
            help="The letter's id, its short id (as `dlq list` shows) or the original event's id.",
            show_default=False,
        ),
    ],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one dead letter in full: the original event (payload, metadata, ids) and the
    error that made its subscription give up."""

    async def find(dlq: DeadLetterQueue) -> DeadLetter:
        return await dlq.show(letter_id)

    letter = _with_queue(url, find)
    data = letter.to_dict()
    out = console()
    if as_json:
        typer.echo(_json(data))
        return
    fields = [
        ("letter", letter.id),
        ("topic", letter.topic),
        ("subscription", letter.subscription or "-"),
        ("group", letter.group),
        ("attempts", str(letter.attempts)),
        ("error", letter.error),
        ("dead-lettered", f"{data['dead_lettered_at']} ({_age(letter.dead_lettered_at)} ago)"),
        ("retryable", "yes" if letter.retryable else "no (purge it)"),
    ]
    for name, value in fields:
        if value is not None:
            out.print(f"{name + ':':<15}{value}", markup=False)
    if letter.event is not None:
        out.print("event:", markup=False)
        typer.echo(_json(data["event"], indent=2))
    else:
        out.print("message (not an eventwire envelope):", markup=False)
        for name, value in (letter.headers or {}).items():
            out.print(f"  {name}: {value}", markup=False)
        typer.echo(letter.body if letter.body is not None else f"base64: {letter.body_base64}")


@dlq_app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire dlq retry 3a5c0e2f41d7 --url sqlite:///bus.db\n\n"
        "  eventwire dlq retry --subscription billing --error TimeoutError --url "
        "nats://127.0.0.1:4222\n\n"
        "  eventwire dlq retry --all --yes --url redis://127.0.0.1:6379/0"
    )
)
def retry(
    ids: IdsArgument = None,
    url: UrlOption = None,
    everything: AllOption = False,
    subscription: SubscriptionOption = None,
    topic: TopicOption = None,
    error: ErrorOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    yes: YesOption = False,
) -> None:
    """Send dead letters back to the subscription that gave up on them (and only to it: other
    subscriptions of the topic do not see the event again), then remove them.

    Name letters by id, or select them with --all or filters; a selection asks for
    confirmation first unless --yes. Run it once the cause is fixed (a deployed fix, a service
    back up), with the subscription's app running: the events are handled there.
    """
    filters = _filters(subscription, topic, error, since, until)
    _check_selection("retry", ids, everything, filters)
    chosen = None if ids or yes else _confirm("Retry", url, filters)

    async def send(dlq: DeadLetterQueue) -> tuple[int, dict[str, str]]:
        with _progress("retried") as progress:
            if chosen is not None:
                result = await dlq.retry(chosen, missing_ok=True, on_progress=progress)
            elif ids:
                result = await dlq.retry(ids, on_progress=progress)
            else:
                result = await dlq.retry(all=everything, on_progress=progress, **filters)
        return result.retried, dict(result.skipped)

    retried, skipped = _with_queue(url, send)
    console().print(f"retried {retried} dead letter(s) on {safe_bus_url(url)}", markup=False)
    if skipped:
        errors = error_console()
        for letter_id, reason in skipped.items():
            errors.print(f"left {letter_id} in the queue: {reason}", markup=False)
        raise typer.Exit(1)


@dlq_app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire dlq purge 3a5c0e2f41d7 --url sqlite:///bus.db\n\n"
        "  eventwire dlq purge --topic 'test.>' --until 7d --url nats://127.0.0.1:4222\n\n"
        "  eventwire dlq purge --all --yes --url redis://127.0.0.1:6379/0"
    )
)
def purge(
    ids: IdsArgument = None,
    url: UrlOption = None,
    everything: AllOption = False,
    subscription: SubscriptionOption = None,
    topic: TopicOption = None,
    error: ErrorOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    yes: YesOption = False,
) -> None:
    """Remove dead letters for good, without retrying them.

    Name letters by id, or select them with --all or filters. Asks for confirmation (showing
    what goes) unless --yes; without a terminal to ask on, --yes is required.
    """
    filters = _filters(subscription, topic, error, since, until)
    _check_selection("purge", ids, everything, filters)
    chosen = None if yes else _confirm("Purge", url, filters, ids)

    async def remove(dlq: DeadLetterQueue) -> int:
        with _progress("purged") as progress:
            if chosen is not None:
                return await dlq.purge(chosen, missing_ok=True, on_progress=progress)
            if ids:
                return await dlq.purge(ids, on_progress=progress)
            return await dlq.purge(all=everything, on_progress=progress, **filters)

    purged = _with_queue(url, remove)
    console().print(f"purged {purged} dead letter(s) on {safe_bus_url(url)}", markup=False)


# -- shared -------------------------------------------------------------------------------


def _with_queue(url: str | None, work: Callable[[DeadLetterQueue], Awaitable[T]]) -> T:
    """Run `work` on the dead-letter queue of the bus at `url` (the runner turns failures
    into messages and exit codes: 1 for no such letter, 2 for bad input or no broker)."""
    from eventwire.bus import EventBus
    from eventwire.dlq import MEMORY_EXPLANATION, DeadLetterQueue

    bus = EventBus(bus_url(url))
    if not bus.capabilities.durable:
        fail(MEMORY_EXPLANATION)

    async def run() -> T:
        async with bus:
            return await work(DeadLetterQueue(bus))

    return asyncio.run(run())


def _filters(
    subscription: str | None,
    topic: str | None,
    error: str | None,
    since: str | None,
    until: str | None,
) -> dict[str, Any]:
    from eventwire.errors import InvalidTopicError
    from eventwire.topics import validate_pattern

    if topic is not None:
        try:
            validate_pattern(topic)
        except InvalidTopicError as problem:
            fail(f"--topic: {problem}")
    given = {
        "subscription": subscription,
        "topic": topic,
        "error_type": error,
        "since": None if since is None else _moment("--since", since),
        "until": None if until is None else _moment("--until", until),
    }
    return {name: value for name, value in given.items() if value is not None}


def _moment(option: str, text: str) -> datetime:
    """An age (``10m``: that long ago) or an ISO 8601 date/time (local time if naive)."""
    from eventwire.history import parse_time

    return parse_time(text, option=option)


def _check_selection(
    operation: str, ids: Sequence[str] | None, everything: bool, filters: dict[str, Any]
) -> None:
    if ids and (everything or filters):
        fail(f"{operation}: give letter ids, or --all / filters, not both")
    if not ids and not everything and not filters:
        fail(
            f"{operation}: say which letters: their ids, --all, or filters (--subscription, "
            f"--topic, --error, --since, --until); e.g. eventwire dlq {operation} --all"
        )


def _confirm(
    verb: str, url: str | None, filters: dict[str, Any], ids: Sequence[str] | None = None
) -> list[str]:
    """Show what the operation would touch and ask; the ids of the letters agreed to."""
    if not sys.stdin.isatty():
        fail(
            f"{verb.lower()} asks for confirmation, and there is no terminal to ask on; "
            "pass --yes to go ahead without asking"
        )

    async def read(dlq: DeadLetterQueue) -> list[DeadLetter]:
        with _progress() as progress:
            return await dlq.list(ids or (), on_progress=progress, **filters)

    letters = _with_queue(url, read)
    out = console()
    if not letters:
        out.print(f"no dead letters to {verb.lower()} on {safe_bus_url(url)}", markup=False)
        raise typer.Exit(0)
    shown = letters[:20]
    out.print(_table(shown))
    if len(letters) > len(shown):
        out.print(f"... and {len(letters) - len(shown)} more", markup=False)
    if not typer.confirm(f"{verb} {len(letters)} dead letter(s) on {safe_bus_url(url)}?"):
        error_console().print("nothing done", markup=False)
        raise typer.Exit(1)
    return [letter.id for letter in letters]


@contextmanager
def _progress(done_word: str | None = None) -> Iterator[Progress]:
    """A progress bar on standard error (gone once done), fed by the queue's callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        console=error_console(),
        transient=True,
    )
    task = bar.add_task("reading dead letters", total=None)

    def update(read: int, total: int, done: int) -> None:
        suffix = "" if done_word is None else f", {done} {done_word}"
        bar.update(task, completed=read, total=total, description=f"reading dead letters{suffix}")

    with bar:
        yield update


def _table(letters: Sequence[DeadLetter]) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "AGE", "TOPIC", "SUBSCRIPTION", "ATTEMPTS", "ERROR"):
        table.add_column(
            column, overflow="fold", justify="right" if column == "ATTEMPTS" else "left"
        )
    for letter in letters:
        # Text, not markup: an error such as "pip install 'eventwire[redis]'" shows as is.
        table.add_row(
            *map(
                Text,
                (
                    letter.short_id,
                    _age(letter.dead_lettered_at),
                    letter.topic,
                    letter.target or "-",
                    str(letter.attempts),
                    letter.error,
                ),
            )
        )
    return table


def _age(moment: datetime) -> str:
    return age((datetime.now(UTC) - moment).total_seconds())


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=str, ensure_ascii=False)
