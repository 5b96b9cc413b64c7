"""`eventwire run module:bus`: run an app's agents and subscriptions as a process."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import signal
import sys
from typing import Any

from rich.console import Console

from eventwire.bus import URL_ENVIRONMENT_VARIABLE, EventBus


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
    target: str, *, url: str | None = None, grace: float = 10.0, console: Console | None = None
) -> bool:
    """Run the bus named by `target` until SIGTERM or SIGINT; True if it closed clean."""
    console = console or Console(highlight=False)
    if url is not None:
        os.environ[URL_ENVIRONMENT_VARIABLE] = url
    bus = load_bus(target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await bus.start()
        names = ", ".join(sorted(bus.subscriptions)) or "none"
        console.print(
            f"eventwire: running {len(bus.subscriptions)} subscription(s) on {bus.safe_url} "
            f"[{names}]; SIGTERM or Ctrl-C stops",
            markup=False,
        )
        await stop.wait()
        console.print(f"eventwire: stopping, up to {grace:g}s for queued work", markup=False)
        report = await bus.close(grace=grace)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if bus.running:
            await bus.close(grace=0)
    if report.clean:
        console.print("eventwire: stopped, every event handled", markup=False)
    else:
        console.print(
            f"eventwire: stopped with {len(report.unhandled)} unhandled event(s): "
            + ", ".join(f"{u.subscription}<-{u.event.topic}" for u in report.unhandled[:5]),
            markup=False,
        )
    return report.clean
