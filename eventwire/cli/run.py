"""Commands that run things: ``demo``, ``run``, ``publish``, and ``version`` (also
``eventwire --version``)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from typing import Annotated, Any, NoReturn

import typer

from eventwire.cli._app import app, console, error_console, fail


@app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire demo\n\n"
        '  eventwire demo -q "What is our refund policy?" -q "Who owns billing?"\n\n'
        "  eventwire demo --url sqlite:///demo.db\n\n"
        "  eventwire demo --url nats://127.0.0.1:4222\n\n"
        "  eventwire demo --durable"
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
    durable: Annotated[
        bool,
        typer.Option(
            "--durable",
            help="Show a durable run instead: the research and email agents as one run that "
            "is killed mid-way, resumes in a new process and waits for an approval (on "
            "SQLite in a temporary folder unless --url names a durable backend).",
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

    out = console()
    if durable:
        from eventwire.durable_demo import run_durable_demo

        asyncio.run(run_durable_demo(out, url=url))
        return
    if verbose:
        from rich.logging import RichHandler

        logging.basicConfig(
            level=logging.INFO,
            format="%(message)s",
            handlers=[RichHandler(console=out, show_path=False, show_time=False)],
        )
    asyncio.run(run_demo(out, queries=queries or None, url=url))


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
    from eventwire.runner import run_bus, stuck_threads

    started_before = set(threading.enumerate())
    with asyncio.Runner() as runner:
        clean = runner.run(
            run_bus(
                target,
                url=url,
                grace=grace,
                console=console(),
                metrics_port=metrics_port,
                metrics_addr=metrics_addr,
                lineage=lineage,
            )
        )
        # Checked before the runner closes: closing waits for the loop's default executor,
        # whose stuck threads would hang it as the handlers' own threads hang the exit.
        stuck = stuck_threads(started_before)
        if stuck:
            _exit_leaving(stuck, grace)
    if not clean:
        raise typer.Exit(1)


def _exit_leaving(stuck: list[str], grace: float) -> NoReturn:
    """Say which handlers are still running after the grace period, and end the process
    without waiting for their threads (a thread cannot be interrupted, and the interpreter
    would wait for it at exit, for ever)."""
    errors = error_console()
    for where in stuck:
        errors.print(
            f"error: {where} after the {grace:g}s grace period",
            markup=False,
            style="bold red",
            soft_wrap=True,
        )
    errors.print(
        f"error: exiting without waiting for {'it' if len(stuck) == 1 else 'them'}: a thread "
        "cannot be interrupted; make the handler return in time, or raise --grace",
        markup=False,
        style="bold red",
        soft_wrap=True,
    )
    logging.shutdown()  # flush the app's log handlers: os._exit skips interpreter cleanup
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(1)


@app.command(
    epilog=(
        "Examples:\n\n"
        '  eventwire publish user.query \'{"text": "refund policy?"}\' --url sqlite:///bus.db\n\n'
        "  eventwire publish user.query 'plain text' -m user_id=u-1 --key u-1 "
        "--url nats://127.0.0.1:4222\n\n"
        "  eventwire publish orders.created @order.json --url redis://127.0.0.1:6379/0\n\n"
        "  cat notes.md | eventwire publish notes.added - --text --url sqlite:///bus.db"
    )
)
def publish(
    topic: Annotated[str, typer.Argument(help="The topic, e.g. user.query.", show_default=False)],
    payload: Annotated[
        str,
        typer.Argument(
            help="The payload: a JSON document, or the text itself; '-' reads it from standard "
            "input, '@PATH' from the file PATH.",
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
            "--url",
            help="The broker to publish on, e.g. sqlite:///bus.db (default: $EVENTWIRE_URL; "
            "one of them is required).",
            show_default=False,
        ),
    ] = None,
    as_text: Annotated[
        bool,
        typer.Option(
            "--text", help="Send the payload as a plain string, even if it is or looks like JSON."
        ),
    ] = False,
) -> None:
    """Publish one event and print its id once the broker has stored it.

    The payload is parsed as JSON when it is JSON (an object, a list, a number, true/false/null
    or a quoted string) and sent as text otherwise; text that starts like JSON ({, [ or ") but
    does not parse is refused, so that a typo is not sent as a string: fix it, or pass --text.
    Publishing needs the broker the app runs on (--url or EVENTWIRE_URL): the in-process bus
    (memory://) would end with this command, heard by no one.
    """
    from eventwire.bus import EventBus

    target = _broker_to_publish_on(url)
    entries: dict[str, str] = {}
    for entry in metadata or []:
        name, separator, text = entry.partition("=")
        if not separator or not name:
            fail(f"metadata {entry!r} is not key=value, e.g. -m user_id=u-1")
        entries[name] = text
    value = _payload(payload, as_text=as_text)

    async def send() -> str:
        async with EventBus(target) as bus:
            event = await bus.publish(topic, value, metadata=entries or None, key=key)
            return event.id

    console().print(asyncio.run(send()), markup=False)


def _broker_to_publish_on(url: str | None) -> str:
    from eventwire.backends import MEMORY, parse_url
    from eventwire.bus import URL_ENVIRONMENT_VARIABLE

    target = url or os.environ.get(URL_ENVIRONMENT_VARIABLE)
    if not target:
        fail(
            f"no broker to publish on: pass --url (e.g. --url sqlite:///bus.db) or set "
            f"{URL_ENVIRONMENT_VARIABLE} to the URL your app runs on"
        )
    if parse_url(target).scheme == MEMORY:
        fail(
            "memory:// is the in-process bus: an event published on it by this command ends "
            "with the command, heard by no one; pass --url (or set "
            f"{URL_ENVIRONMENT_VARIABLE}) to the broker your app runs on, e.g. sqlite:///bus.db"
        )
    return target


def _payload(argument: str, *, as_text: bool) -> Any:
    """The value PAYLOAD stands for: its text ('-': standard input, '@PATH': a file's)
    as JSON if it is JSON, else as a string."""
    import json
    from pathlib import Path

    if argument == "-" or argument.startswith("@"):
        source = "standard input" if argument == "-" else argument[1:]
        try:
            text = sys.stdin.read() if argument == "-" else Path(source).read_text("utf-8")
        except UnicodeDecodeError:
            fail(f"the payload from {source} is not UTF-8 text")
        except OSError as error:
            fail(f"cannot read the payload from {source}: {error.strerror or error}")
        # As `$(cat file)` would: the line end that closes a file is not part of the text.
        text = text.removesuffix("\n").removesuffix("\r")
    else:
        text = argument
    if as_text:
        return text
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError as error:
        if text.lstrip()[:1] in _JSON_STARTS:
            fail(
                f"the payload looks like JSON but does not parse: {error}; fix it, or pass "
                "--text to send it as a plain string"
            )
        return text


# How JSON that is a document, not a bare word or number, begins.
_JSON_STARTS = ("{", "[", '"')


def _not_json(constant: str) -> Any:
    # NaN and Infinity are not JSON (brokers refuse them): such a payload is text.
    raise ValueError(f"{constant} is not JSON")


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
