"""A worker process for the poison-event test: handles `poison.work` events for the durable
subscription "poisoned", writing ``start N`` before and ``done N`` after each handling (O_APPEND
writes: a killed process loses none), and kills itself with SIGKILL when it starts event
`POISON`, the way a handler that crashes its process does.

    python -m tests.conformance.poison_worker URL OUTPUT POISON MAX_RESTARTS
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from eventwire import Event, EventBus
from tests.conformance.crash_worker import serve


async def main(url: str, output: str, poison: int, max_restarts: int) -> None:
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bus = EventBus(url, redeliver_after=1.5, close_grace=2.0)

    @bus.subscribe("poison.work", name="poisoned", max_restarts=max_restarts)
    async def work(event: Event[int]) -> None:
        os.write(fd, f"start {event.payload}\n".encode())
        if event.payload == poison:
            os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(0.001)  # paced: events wait in the process when the kill comes
        os.write(fd, f"done {event.payload}\n".encode())

    await serve(bus)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
