"""The typer application every command module registers on, and what they share."""

from __future__ import annotations

import os
from typing import Annotated, NoReturn

import typer
from rich.console import Console

app = typer.Typer(
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


def console() -> Console:
    """Where commands print: plain (no highlighting), so output reads the same piped."""
    return Console(highlight=False)


def error_console() -> Console:
    """Where commands print errors: standard error."""
    return Console(highlight=False, stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` on standard error and exit with `code` (2: bad input)."""
    error_console().print(f"error: {message}", markup=False, style="bold red")
    raise typer.Exit(code)


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
