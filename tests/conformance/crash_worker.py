"""A worker process for the crash tests: handles `crash.work` events for the durable
subscription "crashers", appending each payload to a file as it handles it (an O_APPEND write
lands in the kernel before the next event, so a SIGKILL loses none of them).

    python -m tests.conformance.crash_worker URL OUTPUT [--idempotent]
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from eventwire import Event, EventBus


async def main(url: str, output: str, idempotent: bool) -> None:
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bus = EventBus(url, redeliver_after=2.0, close_grace=2.0)

    @bus.subscribe("crash.work", name="crashers", idempotent=idempotent)
    async def work(event: Event[int]) -> None:
        os.write(fd, f"{event.payload}\n".encode())
        # Paced a little, so that the test's kill lands in the middle of the stream.
        await asyncio.sleep(0.0002)

    await serve(bus)


async def serve(bus: EventBus) -> None:
    """Run `bus`, say "ready" on standard output once its subscriptions receive events
    (their durable consumers exist), and stop at SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with bus:
        for subscription in list(bus.subscriptions.values()):
            await subscription.ready()
        print("ready", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], "--idempotent" in sys.argv[3:]))
