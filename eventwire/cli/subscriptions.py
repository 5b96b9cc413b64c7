"""``eventwire subscriptions list|delete``: the durable subscriptions kept on a broker, with
their backlog, the processes running them and when one was last heard from."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from eventwire.cli._app import (
    App,
    UrlOption,
    age,
    app,
    bus_url,
    console,
    fail,
    listing,
    safe_bus_url,
)

if TYPE_CHECKING:
    from eventwire.backends.base import ConsumerInfo
    from eventwire.backends.broker import BrokerBackend

T = TypeVar("T")

subscriptions_app = App(
    name="subscriptions",
    help=(
        "List and delete the durable subscriptions a broker keeps: each one's backlog, how "
        "many processes run it now, and when one last did.\n\n"
        "Example:\n\n"
        "  eventwire subscriptions list --url sqlite:///bus.db"
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(subscriptions_app, name="subscriptions")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ToolsOption = Annotated[
    bool, typer.Option("--tools", help="Also list eventwire's own consumers (dead letters...).")
]


@subscriptions_app.command(
    "list",
    epilog=(
        "Examples:\n\n"
        "  eventwire subscriptions list --url sqlite:///bus.db\n\n"
        "  eventwire subscriptions list --json --url nats://127.0.0.1:4222"
    ),
)
def list_subscriptions(
    url: UrlOption = None, as_json: JsonOption = False, tools: ToolsOption = False
) -> None:
    """Every durable subscription of the namespace: its pattern, backlog (events waiting or
    being handled), the processes running it now and when one was last heard from. One that
    no process runs keeps its backlog until one does; `drain()` and `request()` do not wait
    for it."""
    from eventwire.backends.base import is_tooling

    found = _with_broker(url, lambda backend: backend.subscriptions())
    shown = [info for info in found if tools or not is_tooling(info)]
    table = listing(
        shown,
        _as_dict,
        as_json=as_json,
        nothing=f"no durable subscriptions on {safe_bus_url(url)}",
        title=f"Durable subscriptions on {safe_bus_url(url)}",
        columns=("name", "pattern", "backlog", "processes", "last active"),
        right=("backlog", "processes"),
    )
    if table is None:
        return
    now = time.time()
    for info in shown:
        table.add_row(
            info.name,
            info.pattern,
            str(info.outstanding) if info.exact else f"≤{info.outstanding}",
            "?" if info.processes is None else str(info.processes),
            "-" if info.last_active is None else _ago(now - info.last_active),
        )
    console().print(table)


@subscriptions_app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire subscriptions delete billing --url sqlite:///bus.db\n\n"
        "  eventwire subscriptions delete old-worker --yes --url redis://127.0.0.1:6379/0"
    )
)
def delete(
    name: Annotated[str, typer.Argument(help="The subscription's name (its group, if any).")],
    url: UrlOption = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask (needed without a terminal).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Delete it even while a process runs it.")
    ] = False,
) -> None:
    """Delete a durable subscription and its backlog, for every process. Refused while a
    process runs it (stop that process first, or --force)."""

    async def remove(backend: BrokerBackend) -> int:
        found = {info.name: info for info in await backend.subscriptions()}
        info = found.get(name)
        if info is None:
            known = ", ".join(sorted(found)) or "none"
            fail(
                f"no durable subscription named {name!r} on {safe_bus_url(url)} (it has: {known})",
                1,
            )
        if info.processes and not force:
            fail(
                f"subscription {name!r} is run by {info.processes} process(es) now: stop "
                "them first, or pass --force"
            )
        if not yes:
            _confirm(name, info)
        # A partitioned subscription's parts (`<name>#p<n>of<N>`, `<name>#free`) go with it.
        parts = [other for other in found.values() if other.name.startswith(f"{name}#")]
        await backend.delete_consumer(name)
        for part in parts:
            await backend.delete_consumer(part.name)
        return info.outstanding + sum(part.outstanding for part in parts)

    dropped = _with_broker(url, remove)
    console().print(
        f"deleted subscription {name!r} and its backlog of {dropped} event(s) on "
        f"{safe_bus_url(url)}",
        markup=False,
    )


def _confirm(name: str, info: ConsumerInfo) -> None:
    import sys

    if not sys.stdin.isatty():
        fail("deleting needs confirmation: pass --yes (there is no terminal to ask on)")
    if not typer.confirm(
        f"Delete subscription {name!r} ({info.pattern}) and its backlog of "
        f"{info.outstanding} event(s)?"
    ):
        fail("nothing deleted", 1)


def _with_broker(url: str | None, work: Callable[[BrokerBackend], Awaitable[T]]) -> T:
    from eventwire.backends import open_backend
    from eventwire.backends.broker import BrokerBackend

    backend = open_backend(bus_url(url))
    if not isinstance(backend, BrokerBackend):
        fail(
            "the in-process bus (memory://) keeps no durable subscriptions: give the URL of a "
            "broker with --url or EVENTWIRE_URL"
        )

    async def run() -> T:
        await backend.connect()
        try:
            return await work(backend)
        finally:
            await backend.close()

    return asyncio.run(run())


def _as_dict(info: ConsumerInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "pattern": info.pattern,
        "backlog": info.outstanding,
        "backlog_exact": info.exact,
        "processes": info.processes,
        "last_active": info.last_active,
    }


def _ago(seconds: float) -> str:
    return "now" if seconds < 1 else f"{age(seconds)} ago"
