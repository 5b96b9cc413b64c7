"""The app the soak runs in its consumer processes (`tests/soak.py`):

    EVENTWIRE_SOAK_OUTPUT=handled.txt eventwire run tests.soak_app:build --url URL

Two durable subscriptions to `soak.work`, one handling an event at a time and one four at a
time (events carry a key, so the second keeps same-key events in order). Each handling
appends one line to the file named by ``EVENTWIRE_SOAK_OUTPUT``: subscription, event number,
pid, publish time (from the payload), handle time. An O_APPEND write is in the kernel before
the handler returns, so a SIGKILL loses no record of a handling that finished.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from eventwire import Event, EventBus

OUTPUT_VARIABLE = "EVENTWIRE_SOAK_OUTPUT"
TOPIC = "soak.work"
SUBSCRIPTIONS = ("soak-serial", "soak-keyed")
# A killed consumer's leases come back to the other one after this long.
REDELIVER_AFTER = 2.0


def build() -> EventBus:
    """The consumer's bus, on $EVENTWIRE_URL (which `eventwire run --url` sets)."""
    output = os.environ.get(OUTPUT_VARIABLE)
    if not output:
        raise RuntimeError(f"set {OUTPUT_VARIABLE} to the file handlings are recorded in")
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()
    bus = EventBus(redeliver_after=REDELIVER_AFTER, close_grace=2.0)

    def record(name: str, event: Event[dict[str, Any]]) -> None:
        payload = event.payload
        os.write(fd, f"{name} {payload['n']} {pid} {payload['t']} {time.time():.6f}\n".encode())

    async def serial(event: Event[dict[str, Any]]) -> None:
        # A little work, so that kills land while events are in flight.
        await asyncio.sleep(0.001)
        record(SUBSCRIPTIONS[0], event)

    async def keyed(event: Event[dict[str, Any]]) -> None:
        await asyncio.sleep(0.001)
        record(SUBSCRIPTIONS[1], event)

    bus.subscribe(TOPIC, serial, name=SUBSCRIPTIONS[0])
    bus.subscribe(TOPIC, keyed, name=SUBSCRIPTIONS[1], concurrency=4)
    return bus
