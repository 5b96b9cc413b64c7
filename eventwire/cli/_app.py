"""The typer application every command module registers on, and what the commands share:
the consoles they print on, the bus URL option, and the one runner every command goes
through, which turns whatever a command raises into one line on standard error and an exit
code (see `exit_codes`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from typer.core import TyperCommand
from typer.exceptions import TyperException
from typer.models import CommandFunctionType

if TYPE_CHECKING:
    from rich.table import Table

T = TypeVar("T")

# Set to 1 to get the traceback of an error instead of its one-line summary.
TRACEBACK_VARIABLE = "EVENTWIRE_TRACEBACK"
# Width of output that is not a terminal: wide enough that rich never wraps a line itself.
_UNWRAPPED_WIDTH = 100_000


class CommandError(Exception):
    """A command cannot go on; `message` says why and how to fix it, `code` is the exit
    status (2: bad input or no broker to talk to, 1: the work failed or found nothing)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def fail(message: str, code: int = 2) -> NoReturn:
    """Stop the command: the runner prints ``error: <message>`` on standard error and exits
    with `code` (2: bad input)."""
    raise CommandError(message, code)


def exit_codes() -> tuple[tuple[type[Exception] | tuple[type[Exception], ...], int], ...]:
    """The table from exception to exit status: the first row whose type matches wins; an
    exception in no row is unexpected (a bug) and exits with 1.

    Imported when an error happens, not before, so that ``eventwire --help`` stays fast."""
    from eventwire.backends.base import BackendCapabilityError, BackendConnectionError
    from eventwire.dlq import DeadLetterError, DeadLetterNotFoundError
    from eventwire.errors import EventwireError
    from eventwire.history import HistoryUnavailableError
    from eventwire.runner import RunError

    return (
        (RunError, 2),  # the app named cannot be imported or started
        (BackendConnectionError, 2),  # no broker at the URL
        (BackendCapabilityError, 2),  # the backend cannot do it (idempotent=True on amqp)
        (HistoryUnavailableError, 2),  # the broker keeps no history to read
        ((DeadLetterNotFoundError, DeadLetterError), 1),  # no such letter, or not retryable
        (TimeoutError, 1),  # the broker or the work took too long
        ((ValueError, TypeError), 2),  # bad input: a URL, topic, payload, handler signature
        (ImportError, 2),  # a backend's client or an extra is not installed
        (ConnectionError, 2),  # cannot reach a broker
        (OSError, 2),  # cannot read or write a file
        (EventwireError, 1),  # the bus could not do it (not running, no reply, ...)
    )


def explain(error: Exception, urls: Iterable[str | None] = ()) -> tuple[int, str]:
    """(exit status, one-line message) for what a command raised; passwords of `urls` and
    of any URL in the message are replaced by ``***``."""
    message = str(error) or type(error).__name__
    if isinstance(error, CommandError):
        return error.code, redact(_one_line(message), urls)
    row = next((row for row in exit_codes() if isinstance(error, row[0])), None)
    if row is None:
        code = 1
        message = (
            f"unexpected {type(error).__name__}: {message} (set {TRACEBACK_VARIABLE}=1 to see "
            "the traceback)"
        )
    else:
        kinds, code = row
        if kinds is ConnectionError:  # a client library's own: say which broker
            message = f"cannot reach {_where(urls)}: {message}"
    return code, redact(_one_line(message), urls)


def _where(urls: Iterable[str | None]) -> str:
    """The first of `urls` given, as safe to print; else "the broker"."""
    from eventwire.backends import parse_url

    for url in urls:
        if url:
            try:
                return parse_url(url).redacted
            except ValueError:
                break
    return "the broker"


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def redact(text: str, urls: Iterable[str | None] = ()) -> str:
    """`text` with the secret of every URL in it (password, token, credential option), and
    every secret of `urls` wherever it appears on its own, replaced by ``***``."""
    from eventwire.backends.url import redact_text

    return redact_text(text, urls)


def report_error(message: str) -> None:
    """Print ``error: <message>`` on standard error, on one line whatever its width."""
    error_console().print(f"error: {message}", markup=False, style="bold red", soft_wrap=True)


class RunnerCommand(TyperCommand):
    """A command run through the one runner: whatever it raises (other than typer's own
    exits and usage errors) is printed by `report_error` and mapped to an exit status by
    `exit_codes`."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except Exception as error:
            if os.environ.get(TRACEBACK_VARIABLE) and not isinstance(error, CommandError):
                raise  # where it came from, for a bug report or the app's own bug
            from eventwire.bus import URL_ENVIRONMENT_VARIABLE

            urls = (ctx.params.get("url"), os.environ.get(URL_ENVIRONMENT_VARIABLE))
            code, message = explain(error, urls)
            report_error(message)
            raise typer.Exit(code) from None


class App(typer.Typer):
    """A typer app whose commands all go through the runner (`RunnerCommand`)."""

    def command(
        self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **options: Any
    ) -> Callable[[CommandFunctionType], CommandFunctionType]:
        return super().command(name, cls=cls or RunnerCommand, **options)


app = App(
    name="eventwire",
    help=(
        "eventwire: an asyncio publish/subscribe event bus for AI agents.\n\n"
        "Example:\n\n"
        "  eventwire demo"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _console(*, stderr: bool = False) -> Console:
    """Plain (no highlighting), so output reads the same piped; when it is not a terminal,
    lines are as long as they are, not cut at 80 columns. COLUMNS is a terminal's width, so
    it is not used then (GNU readline exports COLUMNS=80 to the children of any process that
    loaded it, pytest and Python shells among them)."""
    console = Console(highlight=False, stderr=stderr)
    if not console.is_terminal:
        console.width = _UNWRAPPED_WIDTH
        console.soft_wrap = True
    return console


def console() -> Console:
    """Where commands print their output: standard output."""
    return _console()


def error_console() -> Console:
    """Where commands print errors, warnings and progress: standard error."""
    return _console(stderr=True)


UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="The bus, e.g. sqlite:///bus.db, redis://127.0.0.1:6379/0, nats://127.0.0.1:4222, "
        "amqp://guest:guest@127.0.0.1:5672/ (default: $EVENTWIRE_URL).",
        show_default=False,
    ),
]


def bus_url(url: str | None) -> str:
    """The URL a command talks to: `url`, else ``$EVENTWIRE_URL``, else ``memory://``."""
    from eventwire.bus import URL_ENVIRONMENT_VARIABLE

    return url or os.environ.get(URL_ENVIRONMENT_VARIABLE) or "memory://"


def safe_bus_url(url: str | None) -> str:
    """The URL a command talks to (see `bus_url`), its password replaced: safe to print."""
    from eventwire.backends import parse_url

    return parse_url(bus_url(url)).redacted


def age(seconds: float) -> str:
    """A duration in its largest whole unit: ``45s``, ``12m``, ``3h``, ``2d``."""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def listing(
    rows: Sequence[T],
    as_dict: Callable[[T], dict[str, object]],
    *,
    as_json: bool,
    nothing: str,
    title: str,
    columns: Sequence[str],
    right: Collection[str] = (),
) -> Table | None:
    """Print `rows` as JSON (``--json``), or say `nothing` when there are none; else the
    table to fill, with its `columns` (those in `right` right-aligned)."""
    if as_json:
        console().print(json.dumps([as_dict(row) for row in rows]), markup=False)
        return None
    if not rows:
        error_console().print(nothing, markup=False)
        return None
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table
