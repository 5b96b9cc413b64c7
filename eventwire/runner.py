"""`eventwire run module:bus`: run an app's agents and subscriptions as a process."""

from __future__ import annotations

import asyncio
import concurrent.futures.thread
import contextvars
import functools
import importlib
import inspect
import os
import queue
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Collection
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from rich.console import Console

from eventwire.backends.broker import BrokerBackend
from eventwire.bus import URL_ENVIRONMENT_VARIABLE, EventBus
from eventwire.errors import EventwireError
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
    except ModuleNotFoundError as exc:
        if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
            raise RunError(f"importing {target!r} raised ModuleNotFoundError: {exc}") from exc
        raise RunError(f"cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:  # the app's module raised while being imported
        raise RunError(f"importing {target!r} raised {type(exc).__name__}: {exc}") from exc
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
        try:
            await bus.start()
        except (EventwireError, ValueError, TypeError, OSError):
            raise  # eventwire's own start-up errors say what is wrong already
        except Exception as exc:  # the app's code raised, e.g. an agent's on_start
            raise RunError(f"starting {target!r} raised {type(exc).__name__}: {exc}") from exc
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


# Where threads and pools do their own work: a thread with no frame elsewhere is idle (a pool
# worker waiting for work, or exiting as its pool shut down) or finishing a call (setting
# its future's result, waking the event loop), unless a pool is running a call of its own.
_MACHINERY = tuple(
    os.path.abspath(path)
    for path in (
        threading.__file__,
        queue.__file__,
        selectors.__file__,
        socket.__file__,
        os.path.dirname(concurrent.futures.__file__) + os.sep,
        os.path.dirname(asyncio.__file__) + os.sep,
    )
)
_PACKAGE = str(Path(__file__).resolve().parent)
# Plain-function handlers run in threads named after their subscription (see
# `eventwire.subscription`): "eventwire-<subscription>_<n>".
_HANDLER_THREAD_PREFIX = "eventwire-"


def stuck_threads(started_before: Collection[threading.Thread]) -> list[str]:
    """One line per thread not in `started_before` that is still busy and would keep the
    interpreter from exiting, naming its subscription (or the thread) and the function it is
    in, with the line for Python code: "subscription 'billing' is still in charge at
    app.py:12"."""
    frames = sys._current_frames()
    stuck = []
    for thread in threading.enumerate():
        if thread in started_before or thread.daemon or not thread.is_alive():
            continue
        where = _busy_in(frames.get(thread.ident or -1))
        if where is None:
            continue
        name = thread.name
        if name.startswith(_HANDLER_THREAD_PREFIX):
            subscription = name.removeprefix(_HANDLER_THREAD_PREFIX).rpartition("_")[0]
            stuck.append(f"subscription {subscription!r} is still in {where}")
        else:
            stuck.append(f"thread {name!r} is still in {where}")
    return stuck


def _busy_in(frame: FrameType | None) -> str | None:
    """What a thread whose innermost frame is `frame` is busy with; None if it is idle."""
    stack: list[FrameType] = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    stack.reverse()  # outermost first
    own = [f for f in stack if not os.path.abspath(f.f_code.co_filename).startswith(_MACHINERY)]
    if own:
        # The app's function (not eventwire's wrapper around it), where it is now.
        outside = [f for f in own if not f.f_code.co_filename.startswith(_PACKAGE)]
        handler = (outside or own)[0]
        return f"{handler.f_code.co_qualname} at {handler.f_code.co_filename}:{handler.f_lineno}"
    # A pool worker inside a call that has no Python frame (time.sleep handed to
    # asyncio.to_thread): its innermost frame is the work item's run(); name the call.
    work: Any = (
        stack[-1].f_locals.get("self") if stack and stack[-1].f_code.co_name == "run" else None
    )
    if callable(getattr(work, "fn", None)):
        return _call_name(work.fn, getattr(work, "args", ()))
    return None


def _call_name(call: Any, args: tuple[Any, ...]) -> str:
    """The function a pool runs as ``call(*args)``, through partials and `Context.run`."""
    while True:
        if isinstance(call, functools.partial):
            call, args = call.func, (*call.args, *args)
        elif isinstance(getattr(call, "__self__", None), contextvars.Context) and args:
            call, args = args[0], args[1:]
        else:
            break
    module = getattr(call, "__module__", None)
    name = getattr(call, "__qualname__", None) or repr(call)
    return f"{module}.{name}" if module else name
