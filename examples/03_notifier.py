"""Step 3 - a notifier: alert people about the events that matter, without slowing anyone.

Run it with:  .venv/bin/python examples/03_notifier.py
"""

from __future__ import annotations

import asyncio
import time

from eventwire import Event, EventBus

PUSH_LATENCY = 0.05  # a push service round trip, simulated


class Notifier:
    """Pages the support team when a session starts and whenever a query is urgent."""

    def __init__(self) -> None:
        self.seen_sessions: set[str] = set()
        self.sent: list[str] = []

    async def on_query(self, event: Event[str]) -> None:
        session = event.metadata["session_id"]
        urgent = event.metadata.get("priority") == "high"
        # Decide and record before the first await: with concurrency > 1 another query from
        # the same session may be handled while this one waits on the push service.
        is_new = session not in self.seen_sessions
        self.seen_sessions.add(session)
        if not (is_new or urgent):
            print(f"[NOTIFY] nothing to send for session {session}")
            return
        reason = "URGENT query" if urgent else "new session"
        await asyncio.sleep(PUSH_LATENCY)
        message = f"{reason} {session} from {event.metadata['user_id']}: {event.payload}"
        self.sent.append(message)
        print(f"[NOTIFY] pushed: {message}")


async def main() -> None:
    bus = EventBus()
    notifier = Notifier()
    started = 0.0
    log_finished: list[float] = []

    async def log_query(event: Event[str]) -> None:
        print(f"[LOG]    {event.metadata['user_id']}: {event.payload}")
        log_finished.append(time.perf_counter() - started)

    bus.subscribe("user.query", log_query, name="log")
    # Pushes are slow I/O that can overlap, so let up to three run at once.
    bus.subscribe("user.query", notifier.on_query, name="notifier", concurrency=3)

    queries = [
        ("user-1", "sess-A", "normal", "I cannot reset my password"),
        ("user-1", "sess-A", "high", "Still locked out and I have a demo in 5 minutes"),
        ("user-2", "sess-B", "normal", "Where can I download last month's invoice?"),
        ("user-1", "sess-A", "normal", "Never mind, it works now"),
    ]
    async with bus:
        started = time.perf_counter()
        for user_id, session_id, priority, text in queries:
            await bus.publish(
                "user.query",
                text,
                metadata={"user_id": user_id, "session_id": session_id, "priority": priority},
            )
        await bus.drain()
    total = time.perf_counter() - started

    # Each subscription has its own inbox and workers: the slow notifier never held up the
    # log, which was done long before the first push came back.
    print(f"log handled all {len(log_finished)} queries within {max(log_finished) * 1000:.1f} ms")
    print(f"notifier sent {len(notifier.sent)} notifications; everything done in {total:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
