"""Step 4 - agents talking through events: research finishes, email follows, and the ids
on every event let you trace one user's query through the whole chain.

Run it with:  .venv/bin/python examples/04_cross_agent_chain.py
"""

from __future__ import annotations

import asyncio
from typing import Any

from eventwire import Agent, Event, EventBus, on


class ResearchAgent(Agent):
    @on("user.query")
    async def research(self, event: Event[str]) -> None:
        print(f"[RESEARCH] working on: {event.payload}")
        await asyncio.sleep(0.01)  # stands in for calls to a model and a search index
        # Publishing from inside a handler is all it takes to chain agents: the bus fills in
        # correlation_id and causation_id from the event being handled, and `source` from
        # this agent's name. Metadata is not copied over, so pass on what others need.
        await self.publish(
            "research.complete",
            f"Three sources agree on an answer to {event.payload!r}",
            metadata={"original_query": event.payload, "user_id": event.metadata["user_id"]},
        )


class EmailAgent(Agent):
    """Reacts to finished research; it does not know, or care, which agent produced it."""

    @on("research.complete")
    async def send_summary(self, event: Event[str]) -> None:
        print(f"[EMAIL]    to {event.metadata['user_id']}: {event.payload}")
        await self.publish("email.sent", {"to": event.metadata["user_id"]})


async def main() -> None:
    bus = EventBus()
    bus.register(ResearchAgent(name="research"))
    bus.register(EmailAgent(name="email"))

    # A tracer sees every ordinary topic (`>` matches one or more tokens of any name), so
    # we can print each chain once everything has settled.
    seen: list[Event[Any]] = []

    async def trace(event: Event[Any]) -> None:
        seen.append(event)

    bus.subscribe(">", trace, name="tracer")

    async with bus:
        queries = [
            await bus.publish(
                "user.query", "How do we rotate API keys?", metadata={"user_id": "ana"}
            ),
            await bus.publish(
                "user.query", "Who approves new vendors?", metadata={"user_id": "ben"}
            ),
        ]
        await bus.drain()  # waits for the follow-ups the handlers published, too

    topics = {event.id: event.topic for event in seen}
    for query in queries:
        # The first event of a chain is its own correlation id; everything downstream
        # carries it, however many agents away.
        chain = [event for event in seen if event.correlation_id == query.id]
        print(f"Chain of {query.metadata['user_id']}'s query (correlation_id {query.id}):")
        for event in chain:
            # causation_id points one step back: the event whose handler published this one.
            cause = topics.get(event.causation_id or "", "-")
            print(f"  {event.topic:<18} source={event.source or '-':<9} caused by {cause}")


if __name__ == "__main__":
    asyncio.run(main())
