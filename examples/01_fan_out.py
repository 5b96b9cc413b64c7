"""Step 1 - publish/subscribe basics: one event, two subscribers, neither aware of the other.

Run it with:  .venv/bin/python examples/01_fan_out.py
"""

from __future__ import annotations

import asyncio

from eventwire import Event, EventBus


async def main() -> None:
    bus = EventBus()

    # Subscribe before publishing: an event reaches only the subscriptions that exist at the
    # moment it is published. Nothing is stored for latecomers. The `Event[str]` annotation
    # is more than documentation: the bus checks that the payload is a str before calling.
    @bus.subscribe("user.query", name="printer")
    async def print_query(event: Event[str]) -> None:
        print(f"[printer]  {event.metadata['user_id']} asked: {event.payload}")

    @bus.subscribe("user.query", name="sessions")
    async def track_session(event: Event[str]) -> None:
        print(f"[sessions] query in session {event.metadata['session_id']}")

    # `async with` starts one worker per subscription and, on the way out, lets them finish.
    async with bus:
        # A full Event, built by hand...
        first = await bus.publish(
            Event(
                topic="user.query",
                payload="Which plan includes single sign-on?",
                metadata={"user_id": "user-42", "session_id": "sess-a1"},
            )
        )
        # ...or the short form, which builds the Event for you.
        await bus.publish(
            "user.query",
            "Can I export my data as CSV?",
            metadata={"user_id": "user-77", "session_id": "sess-b2"},
        )
        # Nobody listens to this topic. That is fine: the publisher never needs to know who,
        # if anyone, reacts - which is what keeps producers and consumers decoupled.
        await bus.publish("user.logout", None, metadata={"user_id": "user-42"})

        # publish() only queues the event; drain() waits until every subscriber is done.
        await bus.drain()

    print(f"first event id: {first.id}")
    # Every subscriber received this very object, so it is read-only: no subscriber can
    # change what the others see. (mypy rejects this line too.)
    try:
        first.metadata["user_id"] = "someone-else"  # type: ignore[index]
    except TypeError:
        print("metadata is read-only: every subscriber saw the same values")
    for name, stats in bus.stats().items():
        print(f"{name}: handled {stats.handled} events")
    print("Every subscriber handled every query.")


if __name__ == "__main__":
    asyncio.run(main())
