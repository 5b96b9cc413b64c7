"""The ``eventwire`` command line.

Each command is a plain function registered on `app`; add one with ``@app.command()`` and
it shows up in ``eventwire --help``. Commands import what they need lazily so that
``eventwire --help`` stays fast as the list grows.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

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


def _console() -> Console:
    return Console(highlight=False)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire demo\n\n"
        '  eventwire demo -q "What is our refund policy?" -q "Who owns billing?"'
    )
)
def demo(
    queries: Annotated[
        list[str] | None,
        typer.Option(
            "--queries",
            "-q",
            help="A user query to publish instead of the built-in ones; repeat for several.",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also show the bus's own log (retries, dead letters)."
        ),
    ] = False,
) -> None:
    """Run the tutorial's agents on an in-process bus and show what each one does.

    A main agent publishes user queries; an audit logger and a notifier hear every one; a
    research agent publishes research.complete and an email agent reacts to it. A failing
    analytics subscriber is retried, then dead-lettered, while the others carry on. Ends
    with a table of every subscription's counters.
    """
    from eventwire.demo import run_demo

    console = _console()
    if verbose:
        from rich.logging import RichHandler

        logging.basicConfig(
            level=logging.INFO,
            format="%(message)s",
            handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        )
    try:
        asyncio.run(run_demo(console, queries=queries or None))
    except TimeoutError as error:
        console.print(f"[bold red]demo did not finish:[/] {error}")
        raise typer.Exit(1) from None


@app.command()
def version() -> None:
    """Print the installed eventwire version.

    Example: eventwire version
    """
    from eventwire import __version__

    _console().print(f"eventwire {__version__}")


def main() -> None:
    """Entry point of the ``eventwire`` console script."""
    app()


if __name__ == "__main__":
    main()
