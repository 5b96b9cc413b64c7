"""Commands that run things: ``demo``, ``run``, ``publish``, and ``version`` (also
``eventwire --version``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer

from eventwire.cli._app import app, console


@app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire demo\n\n"
        '  eventwire demo -q "What is our refund policy?" -q "Who owns billing?"\n\n'
        "  eventwire demo --url sqlite:///demo.db\n\n"
        "  eventwire demo --url nats://127.0.0.1:4222"
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
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Run the agents on this backend instead of in-process, e.g. "
            "sqlite:///demo.db, redis://127.0.0.1:6379/0, nats://127.0.0.1:4222, "
            "amqp://guest:guest@127.0.0.1:5672/",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the tutorial's agents on an in-process bus and show what each one does.

    A main agent publishes user queries; an audit logger and a notifier hear every one; a
    research agent publishes research.complete and an email agent reacts to it. A failing
    analytics subscriber is retried, then dead-lettered, while the others carry on. Ends
    with a table of every subscription's counters.
    """
    from eventwire.demo import run_demo

    out = console()
    if verbose:
        from rich.logging import RichHandler

        logging.basicConfig(
            level=logging.INFO,
            format="%(message)s",
            handlers=[RichHandler(console=out, show_path=False, show_time=False)],
        )
    try:
        asyncio.run(run_demo(out, queries=queries or None, url=url))
    except (ValueError, ImportError, ConnectionError) as error:
        out.print(f"[bold red]cannot run the demo:[/] {error}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    except TimeoutError as error:
        out.print(f"[bold red]demo did not finish:[/] {error}")
        raise typer.Exit(1) from None


@app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire run myapp.agents:bus\n\n"
        "  eventwire run myapp.agents:bus --grace 30\n\n"
        "  eventwire run myapp.agents:bus --url sqlite:///bus.db --metrics-port 9464\n\n"
        "  eventwire run myapp.agents:bus --url sqlite:///bus.db --lineage"
    )
)
def run(
    target: Annotated[
        str,
        typer.Argument(
            help="Where the bus is: 'module:attribute', e.g. 'myapp.agents:bus'. The module "
            "is imported from the current directory or the installed packages.",
            show_default=False,
        ),
    ],
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Bus URL to use instead of the app's own (sets EVENTWIRE_URL before import).",
        ),
    ] = None,
    grace: Annotated[
        float,
        typer.Option(help="Seconds to let queued work finish on SIGTERM / Ctrl-C."),
    ] = 10.0,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="Serve Prometheus metrics on this port (0: any free one) at /metrics; needs "
            "eventwire[prometheus].",
            show_default=False,
        ),
    ] = None,
    metrics_addr: Annotated[
        str,
        typer.Option("--metrics-addr", help="Address the metrics server listens on."),
    ] = "127.0.0.1",
    lineage: Annotated[
        bool,
        typer.Option(
            "--lineage",
            help="Store a record of every handling on the broker, for `eventwire trace` "
            "(as EventBus(lineage=True)).",
        ),
    ] = False,
) -> None:
    """Run every agent and subscription registered on a bus until SIGTERM or Ctrl-C.

    Prints one status line on start, then shuts down gracefully on a signal: new events stop,
    queued and in-flight work gets --grace seconds, and whatever is left is reported. On a
    broker the process answers `eventwire stats`; --metrics-port also serves Prometheus metrics.
    """
    from eventwire.backends.base import BackendConnectionError
    from eventwire.runner import RunError, run_bus

    out = console()
    try:
        clean = asyncio.run(
            run_bus(
                target,
                url=url,
                grace=grace,
                console=out,
                metrics_port=metrics_port,
                metrics_addr=metrics_addr,
                lineage=lineage,
            )
        )
    except (RunError, BackendConnectionError) as error:
        out.print(f"error: {error}", markup=False, style="bold red")
        raise typer.Exit(2) from None
    if not clean:
        raise typer.Exit(1)


@app.command(
    epilog=(
        "Examples:\n\n"
        '  eventwire publish user.query \'{"text": "refund policy?"}\' --url sqlite:///bus.db\n\n'
        "  eventwire publish user.query 'plain text' -m user_id=u-1 --key u-1 "
        "--url nats://127.0.0.1:4222"
    )
)
def publish(
    topic: Annotated[str, typer.Argument(help="The topic, e.g. user.query.", show_default=False)],
    payload: Annotated[
        str,
        typer.Argument(
            help="The payload: a JSON document, or (if it is not JSON) the text itself.",
            show_default=False,
        ),
    ],
    metadata: Annotated[
        list[str] | None,
        typer.Option("--metadata", "-m", help="A metadata entry as key=value; repeat for several."),
    ] = None,
    key: Annotated[str | None, typer.Option(help="The event's key (same key, same order).")] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", help="The bus to publish on (default: $EVENTWIRE_URL).", show_default=False
        ),
    ] = None,
) -> None:
    """Publish one event and print its id once the broker has stored it.

    The payload is parsed as JSON when it is JSON (an object, a list, a number, true/false/null
    or a quoted string), and sent as text otherwise. On the in-process default (memory://) no
    other process can see the event, so give --url (or set EVENTWIRE_URL) to a broker.
    """
    import json
    import os

    from eventwire.bus import URL_ENVIRONMENT_VARIABLE, EventBus
    from eventwire.errors import EventwireError

    out = console()

    def fail(message: str) -> typer.Exit:
        out.print(f"error: {message}", markup=False, style="bold red")
        return typer.Exit(2)

    try:
        value = json.loads(payload)
    except ValueError:
        value = payload
    entries: dict[str, str] = {}
    for entry in metadata or []:
        name, separator, text = entry.partition("=")
        if not separator or not name:
            raise fail(f"metadata {entry!r} is not key=value, e.g. -m user_id=u-1")
        entries[name] = text
    target = url or os.environ.get(URL_ENVIRONMENT_VARIABLE) or "memory://"

    async def send() -> str:
        async with EventBus(target) as bus:
            event = await bus.publish(topic, value, metadata=entries or None, key=key)
            return event.id

    try:
        event_id = asyncio.run(send())
    except (EventwireError, ValueError, TypeError, ImportError, ConnectionError) as error:
        raise fail(str(error)) from None
    out.print(event_id, markup=False)


@app.command()
def version() -> None:
    """Print the installed eventwire version.

    Example: eventwire version
    """
    from eventwire import __version__

    console().print(f"eventwire {__version__}", markup=False)


def _print_version_and_exit(requested: bool) -> None:
    if requested:
        version()
        raise typer.Exit()


@app.callback()
def _options_of_every_command(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version_and_exit,
            is_eager=True,
            help="Print the installed eventwire version and exit.",
        ),
    ] = False,
) -> None:
    # Options given before the command name (`eventwire --version`); commands read none.
    pass
