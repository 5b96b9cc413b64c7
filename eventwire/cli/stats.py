"""``eventwire stats``: live counters of a bus whose processes run elsewhere."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from eventwire.cli._app import UrlOption, app, bus_url, console, fail
from eventwire.metrics import format_seconds

if TYPE_CHECKING:
    from rich.console import Group, RenderableType
    from rich.table import Table

    from eventwire.stats_service import StatsClient, StatsReport

_MEMORY_HELP = (
    "memory:// is the in-process bus: it lives inside the process that created it, so no "
    "other process can read its counters. Serve them from that process instead with "
    "'eventwire run module:bus --metrics-port 9464' (Prometheus), or read bus.stats() in your "
    "code; or give --url (or EVENTWIRE_URL) the broker your processes share."
)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  eventwire stats --url sqlite:///bus.db\n\n"
        "  eventwire stats --url redis://127.0.0.1:6379/0 --watch --interval 1\n\n"
        "  eventwire stats --url nats://127.0.0.1:4222 --json"
    )
)
def stats(
    url: UrlOption = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between refreshes with --watch.")
    ] = 2.0,
    timeout: Annotated[
        float,
        typer.Option(min=0.05, help="Seconds to wait for the processes' answers."),
    ] = 1.5,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON document (with --watch: one per line per refresh)."
        ),
    ] = False,
) -> None:
    """Show each running process's subscription counters and handling-time percentiles.

    Processes started with `eventwire run` on a broker answer a stats request on the bus
    itself: a row per process and subscription with handled, failed, retried, dead-lettered,
    dropped, in-flight and queued events and p50/p90/p99/max handling times. The broker's own
    view comes too: the events each durable subscription still owes, also when no process
    runs it, and the dead letters kept for `eventwire dlq`.
    """
    from eventwire.backends import MEMORY, parse_url

    target = bus_url(url)
    parsed = parse_url(target)
    if parsed.scheme == MEMORY:
        fail(_MEMORY_HELP)
    if parsed.scheme == "sqlite" and not Path(parsed.path[1:]).is_file():
        # Opening it would create an empty bus there: a typo must not look like an idle bus.
        fail(f"no SQLite bus at {parsed.path[1:]!r} (from {parsed.redacted})")
    try:
        asyncio.run(
            _stats(target, watch=watch, interval=interval, timeout=timeout, as_json=as_json)
        )
    except KeyboardInterrupt:
        return  # --watch ends with Ctrl-C
    except TimeoutError as error:
        fail(f"cannot read stats from {parsed.redacted}: {error or 'it did not answer in time'}", 1)


async def _collect(client: StatsClient, timeout: float) -> StatsReport:
    """The processes' answers and the broker's view, with the dead letters counted exactly
    (the broker's first count after a burst may be an upper bound)."""
    from eventwire.dlq import dead_letter_count

    report = await client.collect(timeout)
    if report.dead_letters is not None:
        counted = await dead_letter_count(client.backend)
        if counted is not None:
            report.dead_letters, report.dead_letters_exact = counted
    return report


async def _stats(
    target: str, *, watch: bool, interval: float, timeout: float, as_json: bool
) -> None:
    from eventwire.stats_service import StatsClient

    out = console()
    async with StatsClient(target) as client:
        if not watch:
            report = await _collect(client, timeout)
            if as_json:
                out.print(json.dumps(report.to_dict(), indent=2), markup=False, soft_wrap=True)
            else:
                out.print(render(report, timeout, width=out.width))
            return
        if as_json:
            while True:
                report = await _collect(client, timeout)
                out.print(json.dumps(report.to_dict()), markup=False, soft_wrap=True)
                await asyncio.sleep(interval)
        await _watch(client, interval, timeout)


async def _watch(client: StatsClient, interval: float, timeout: float) -> None:
    from rich.live import Live
    from rich.text import Text

    out = console()
    with Live(console=out, auto_refresh=False, transient=False) as live:
        live.update(Text(f"asking {client.backend.url.redacted} ..."), refresh=True)
        while True:
            report = await _collect(client, timeout)
            view = render(report, timeout, width=out.width, footer="refreshing; Ctrl-C stops")
            live.update(view, refresh=True)
            await asyncio.sleep(interval)


def render(
    report: StatsReport, timeout: float, *, width: int = 200, footer: str | None = None
) -> Group:
    """The report as rich tables: the processes' subscriptions (split in two tables when
    `width` is under 120 columns), then the broker's view."""
    from rich.console import Group
    from rich.text import Text

    when = report.collected_at.astimezone().strftime("%H:%M:%S")
    parts: list[Any] = [Text(f"eventwire stats: {report.url} at {when}", style="bold")]
    if not report.processes:
        parts.append(
            Text(
                f"No process answered within {timeout:g}s. Processes started with "
                "'eventwire run' answer; a bus your own code starts answers while it runs "
                "eventwire.stats_service.StatsResponder.",
                style="yellow",
            )
        )
    elif width >= _WIDE:
        parts.append(_process_table(report, "Subscriptions in running processes", _ALL))
    else:
        parts.append(_process_table(report, "Subscriptions in running processes", _COUNTS))
        parts.append(_process_table(report, "Handling times", _TIMES))
    parts.append(_broker_table(report))
    if report.dead_letters is not None:
        count = (
            f"{report.dead_letters}"
            if report.dead_letters_exact
            else (f"at most {report.dead_letters} (the broker was still counting)")
        )
        parts.append(Text(f"Dead letters kept: {count} (see eventwire dlq)"))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


# (heading, how to show it from a subscription's snapshot)
_Column = tuple[str, Callable[[dict[str, Any]], str]]


def _counter(field: str) -> Callable[[dict[str, Any]], str]:
    return lambda sub: str(sub[field])


def _time(quantile: str) -> Callable[[dict[str, Any]], str]:
    def show(sub: dict[str, Any]) -> str:
        handling = sub["handling"]
        return format_seconds(handling[quantile]) if handling["count"] else "-"

    return show


_COUNTS: tuple[_Column, ...] = (
    ("handled", _counter("handled")),
    ("failed", _counter("failed")),
    ("retried", _counter("retried")),
    ("dead", _counter("dead_lettered")),
    ("dropped", _counter("dropped")),
    ("in flight", _counter("in_flight")),
    ("queued", _counter("queued")),
)
_TIMES: tuple[_Column, ...] = (
    ("timed", lambda sub: str(sub["handling"]["count"])),
    *((q, _time(q)) for q in ("p50", "p90", "p99", "max")),
)
_ALL = _COUNTS + _TIMES[1:]
_WIDE = 120  # columns from which one table holds counters and times side by side


def _table(title: str) -> Table:
    from rich import box
    from rich.table import Table

    return Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )


def _process_table(report: StatsReport, title: str, columns: Sequence[_Column]) -> Table:
    from rich.text import Text

    table = _table(title)
    table.add_column("process / subscription", overflow="fold", min_width=16)
    for heading, _ in columns:
        table.add_column(heading, justify="right", no_wrap=True)
    for snapshot in report.processes:
        process = snapshot["process"]
        table.add_row(Text(f"{process['hostname']} pid {process['pid']}", style="bold"))
        if not snapshot["subscriptions"]:
            table.add_row(Text("  (no subscription)", style="dim"))
        for sub in snapshot["subscriptions"]:
            name = sub["name"] if not sub["group"] else f"{sub['name']} ({sub['group']})"
            table.add_row(Text(f"  {name}"), *(Text(show(sub)) for _, show in columns))
    return table


def _broker_table(report: StatsReport) -> RenderableType:
    from rich.text import Text

    if not report.consumers:
        return Text("The broker has no durable subscription yet.", style="dim")
    table = _table("Durable subscriptions on the broker")
    table.add_column("subscription (or group)", overflow="fold")
    table.add_column("pattern", overflow="fold")
    table.add_column("outstanding", justify="right", no_wrap=True)
    table.add_column("processes", justify="right", no_wrap=True)
    for info in report.consumers:
        running = report.running(info.name)
        # Events owed with no process to handle them: worth a glance.
        style = "red" if info.outstanding and not running else ""
        # An upper bound (Redis, a long backlog): "≤" rather than a number that looks exact.
        owed = str(info.outstanding) if info.exact else f"≤{info.outstanding}"
        table.add_row(Text(info.name), Text(info.pattern), Text(owed), Text(str(running), style))
    return table
