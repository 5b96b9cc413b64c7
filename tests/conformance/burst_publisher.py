"""A publisher process for the crash tests: publishes `burst.n` events as fast as it can and
writes each event's number to stdout once its `publish` has returned (stored by the broker).

    python -m tests.conformance.burst_publisher URL
"""

from __future__ import annotations

import asyncio
import os
import sys

from eventwire import EventBus


async def main(url: str) -> None:
    async with EventBus(url) as bus:
        n = 0
        while True:
            # Ten at a time, so that a kill can land in the middle of a batch commit.
            batch = range(n, n + 10)
            await asyncio.gather(*(bus.publish("burst.n", i) for i in batch))
            os.write(1, "".join(f"{i}\n" for i in batch).encode())
            n += 10


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
