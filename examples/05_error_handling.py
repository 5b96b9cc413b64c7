"""Step 5 - failures stay contained: retries for the transient ones, a dead-letter queue for
the rest, and the healthy subscribers never notice either.

Run it with:  .venv/bin/python examples/05_error_handling.py
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from eventwire import Event, EventBus, Retry

# Quick retries keep the example fast; real services usually want longer waits, and
# Retry(jitter=...) so that many clients do not all retry in the same instant.
QUICK_RETRY = Retry(attempts=3, backoff=0.01)


async def main() -> None:
    # eventwire logs every dead letter at ERROR level, traceback included - keep that in
    # production. Here the dead-letter watcher below tells the story, so the log is muted.
    logging.getLogger("eventwire").setLevel(logging.CRITICAL)

    bus = EventBus()
    tries: Counter[tuple[str, str]] = Counter()

    async def audit(event: Event[str]) -> None:
        print(f"[AUDIT]  logged: {event.payload}")

    async def search_index(event: Event[str]) -> None:
        # Fails the first try of every event, like a service that drops the odd connection.
        tries["search", event.id] += 1
        attempt = tries["search", event.id]
        if attempt == 1:
            print(f"[SEARCH] try 1 failed for: {event.payload}")
            raise ConnectionError("search index reset the connection")
        print(f"[SEARCH] try {attempt} indexed: {event.payload}")

    async def crm_sync(event: Event[str]) -> None:
        # Down for the whole run: no number of retries will help.
        tries["crm", event.id] += 1
        print(f"[CRM]    try {tries['crm', event.id]} failed for: {event.payload}")
        raise TimeoutError("CRM did not answer")

    bus.subscribe("user.query", audit, name="audit")
    bus.subscribe("user.query", search_index, name="search", retry=QUICK_RETRY)
    bus.subscribe("user.query", crm_sync, name="crm", retry=QUICK_RETRY)

    # A handler that fails every try lands here, on `_dlq.<topic>`. The payload is the original
    # event, untouched, so it can be inspected now and published again once the fault is
    # fixed. (Every failure is also announced on `_bus.error`, handy for metrics.)
    async def on_dead_letter(letter: Event[Any]) -> None:
        original: Event[Any] = letter.payload
        print(
            f"[DLQ]    {letter.metadata['subscription']} gave up on {original.payload!r} after "
            f"{letter.metadata['attempts']} attempts: {letter.metadata['error']}"
        )

    bus.subscribe("_dlq.>", on_dead_letter, name="dead-letters")

    queries = [
        "Cancel my subscription",
        "Update my billing address",
        "Is there a student discount?",
    ]
    async with bus:
        for text in queries:
            await bus.publish("user.query", text, metadata={"user_id": "user-9"})
        # Retries and dead letters count as part of the work: drain() waits for those too.
        await bus.drain()

    print("Subscription results:")
    for name, stats in bus.stats().items():
        print(
            f"  {name:<12} handled={stats.handled} retried={stats.retried} "
            f"dead_lettered={stats.dead_lettered}"
        )
    audited = bus.stats()["audit"].handled
    print(f"audit handled {audited} of {len(queries)} queries: failures elsewhere did not touch it")


if __name__ == "__main__":
    asyncio.run(main())
