"""`eventwire run module:bus`: run an app's agents and subscriptions as a process."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console

from eventwire.backends.broker import BrokerBackend
from eventwire.bus import URL_ENVIRONMENT_VARIABLE, EventBus
from eventwire.stats_service import StatsResponder

if TYPE_CHECKING:
    from eventwire.prometheus import MetricsServer


class RunError(Exception):
    """The target cannot be run; the message says why and how to fix it."""


def load_bus(target: str) -> EventBus:
    """Import ``module:attribute`` and return the `EventBus` it names."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise RunError(
            f"{target!r} is not 'module:attribute'; name the module and the bus in it, "
            "e.g. 'myapp.agents:bus'"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the app is usually right here
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RunError(f"cannot import module {module_name!r}: {exc}") from exc
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise RunError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if inspect.isfunction(value) and not inspect.iscoroutinefunction(value):
        required = [
            p
            for p in inspect.signature(value).parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if not required:
            value = value()  # a factory that builds the bus
    if not isinstance(value, EventBus):
        raise RunError(f"{target!r} is a {type(value).__name__}, not an EventBus")
    return value


async def run_bus(
    target: str,
    *,
    url: str | None = None,
    grace: float = 10.0,
    console: Console | None = None,
    metrics_port: int | None = None,
    metrics_addr: str = "127.0.0.1",
    lineage: bool = False,
) -> bool:
    """Run the bus named by `target` until SIGTERM or SIGINT; True if it closed clean.

    On a broker backend the process answers ``eventwire stats`` while it runs. With
    `metrics_port` (0: any free port) it also serves Prometheus metrics; `lineage` stores
    handling records for ``eventwire trace`` (as ``EventBus(lineage=True)``)."""
    console = console or Console(highlight=False)
    if url is not None:
        os.environ[URL_ENVIRONMENT_VARIABLE] = url
    bus = load_bus(target)
    if lineage:
        bus.record_lineage()
    metrics = _serve_metrics(bus, metrics_port, metrics_addr)
    responder: StatsResponder | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await bus.start()
        if isinstance(bus.backend, BrokerBackend):
            responder = StatsResponder(bus)
            await responder.start()
        names = ", ".join(sorted(bus.subscriptions)) or "none"
        console.print(
            f"eventwire: running {len(bus.subscriptions)} subscription(s) on {bus.safe_url} "
            f"[{names}]; SIGTERM or Ctrl-C stops",
            markup=False,
        )
        if metrics is not None:
            console.print(f"eventwire: metrics on {metrics.url}", markup=False)
        await stop.wait()
        console.print(f"eventwire: stopping, up to {grace:g}s for queued work", markup=False)
        if responder is not None:
            await responder.close()  # before the bus closes the broker connection it uses
        report = await bus.close(grace=grace)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if responder is not None:
            await responder.close()
        if bus.running:
            await bus.close(grace=0)
        if metrics is not None:
            await asyncio.to_thread(metrics.close)
    if report.clean:
        console.print("eventwire: stopped, every event handled", markup=False)
    else:
        console.print(
            f"eventwire: stopped with {len(report.unhandled)} unhandled event(s): "
            + ", ".join(f"{u.subscription}<-{u.event.topic}" for u in report.unhandled[:5]),
            markup=False,
        )
    return report.clean


def _serve_metrics(bus: EventBus, port: int | None, addr: str) -> MetricsServer | None:
    if port is None:
        return None
    try:
        from eventwire.prometheus import serve_metrics
    except ImportError as error:
        raise RunError(str(error)) from None
    try:
        return serve_metrics(bus, port, addr)
    except OSError as error:
        raise RunError(
            f"cannot serve metrics on {addr}:{port}: {error.strerror or error}"
        ) from None
