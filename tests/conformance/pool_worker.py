"""A worker process of the keyed-pool tests: one process of the partitioned group "pool",
handling `pool.work` events (payload: the event's number; key: its customer) and appending
``<key> <number>`` to a file as it handles each (an O_APPEND write lands in the kernel at
once, so a SIGKILL loses none of them).

    python -m tests.conformance.pool_worker URL OUTPUT PARTITIONS [--idempotent]
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from eventwire import Event, EventBus
from tests.conformance.crash_worker import serve


async def main(url: str, output: str, partitions: int, idempotent: bool) -> None:
    log = os.environ.get("EVENTWIRE_POOL_LOG")
    if log:  # the partitions' comings and goings, for debugging
        logging.basicConfig(
            filename=f"{log}.{os.getpid()}",
            level=logging.DEBUG,
            format="%(created).3f %(message)s",
        )
        logging.getLogger("aiormq").setLevel(logging.WARNING)
        logging.getLogger("aio_pika").setLevel(logging.WARNING)
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bus = EventBus(url, redeliver_after=3.0, close_grace=2.0)

    @bus.subscribe(
        "pool.work",
        name=f"pool-{os.getpid()}",
        group="pool",
        partitions=partitions,
        concurrency=8,
        idempotent=idempotent,
    )
    async def work(event: Event[int]) -> None:
        os.write(fd, f"{event.key} {event.payload} {os.getpid()}\n".encode())
        # Paced a little, so that the kill lands in the middle of the stream.
        await asyncio.sleep(0.0005)

    await serve(bus)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), "--idempotent" in sys.argv[4:]))
