"""The tutorial's pipeline, split into processes that share nothing but the broker.

Each process runs one of the buses below with ``eventwire run``; they find each other only
through topics on the broker named by ``--url`` (or ``EVENTWIRE_URL``):

- ``agents:audit_bus``    hears every ``user.query`` and logs it;
- ``agents:research_bus`` answers each ``user.query`` with ``research.complete`` (run two
  copies: they share the work, each query is researched once);
- ``agents:email_bus``    reacts to ``research.complete`` and "sends" the summary.

``ask.py`` publishes queries and waits until the whole pipeline has handled them.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from eventwire import Agent, Event, EventBus, Retry, on


class UserQuery(BaseModel):
    user_id: str
    text: str


class Research(BaseModel):
    user_id: str
    query: str
    summary: str


def log(line: str) -> None:
    print(f"[{os.getpid()}] {line}", flush=True)


# -- the audit process -------------------------------------------------------------------
audit_bus = EventBus()


@audit_bus.subscribe("user.query", name="audit")
async def audit(event: Event[UserQuery]) -> None:
    log(f"AUDIT  {event.payload.user_id} asked {event.payload.text!r} (id {event.id})")


# -- the research process (run as many copies as you like) -------------------------------
class ResearchAgent(Agent):
    @on("user.query", retry=Retry(attempts=3, backoff=0.2), publishes=["research.complete"])
    async def research(self, event: Event[UserQuery]) -> None:
        await asyncio.sleep(0.05)  # the LLM call
        query = event.payload
        log(f"RESEARCH {query.text!r}")
        await self.publish(
            "research.complete",
            Research(user_id=query.user_id, query=query.text, summary="3 relevant reports"),
        )


research_bus = EventBus()
research_bus.register(ResearchAgent(name="research"))


# -- the email process -------------------------------------------------------------------
class EmailAgent(Agent):
    @on("research.complete", idempotent=True)
    async def send(self, event: Event[Research]) -> None:
        result = event.payload
        log(
            f"EMAIL  to {result.user_id}: {result.query!r}: {result.summary} "
            f"(correlation {event.correlation_id})"
        )


email_bus = EventBus()
email_bus.register(EmailAgent(name="email"))
