"""Publish user queries into the distributed pipeline and wait until it has handled them.

.venv/bin/python examples/distributed/ask.py --url URL "What is our refund policy?" ...
"""

from __future__ import annotations

import argparse
import asyncio

from eventwire import EventBus


async def main(url: str, queries: list[str]) -> None:
    async with EventBus(url) as bus:
        for number, text in enumerate(queries):
            event = await bus.publish(
                "user.query", {"user_id": f"user-{number}", "text": text}, key=f"user-{number}"
            )
            print(f"asked {text!r} as {event.id}")
        # Waits for every process: audit, research and the emails research set off.
        await bus.drain(timeout=60)
        print(f"all {len(queries)} queries handled by the pipeline")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("queries", nargs="*", default=["What is our refund policy?"])
    arguments = parser.parse_args()
    asyncio.run(main(arguments.url, arguments.queries))
