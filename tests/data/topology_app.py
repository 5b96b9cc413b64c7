"""A sample app for the topology and AsyncAPI tests: the tutorial's pipeline, with a typed
payload, a dataclass payload, a wildcard pattern, a group and a failing subscriber.

`bus` is built at import (from ``$EVENTWIRE_URL``, like an app run by ``eventwire run``);
`build(url)` builds another one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from eventwire import Agent, Event, EventBus, on


class UserQuery(BaseModel):
    user_id: str
    text: str


@dataclass
class Research:
    query: str
    summary: str


class MainAgent(Agent):
    """The front door: it handles nothing and publishes user queries."""

    publishes = ("user.query",)

    async def ask(self, text: str) -> None:
        await self.publish("user.query", {"user_id": "u-1", "text": text})


class ResearchAgent(Agent):
    @on("user.query", publishes=["research.complete"])
    async def research(self, event: Event[UserQuery]) -> None:
        """Research a user's query."""
        await self.publish("research.complete", Research(event.payload.text, "3 reports"))
        await self.publish("research.metrics", {"took_ms": 5})  # not declared: learnt only


class EmailAgent(Agent):
    @on("research.*", group="mailers")
    async def send(self, event: Event[Research]) -> None:
        """Mail each research result."""


def build(url: str | None = None) -> EventBus:
    bus = EventBus(url)
    bus.register(MainAgent(name="main"))
    bus.register(ResearchAgent(name="research"))
    bus.register(EmailAgent(name="email"))

    @bus.subscribe("user.query", name="audit")
    async def audit(event: Event[Any]) -> None:
        pass

    async def analytics(event: Event[Any]) -> None:
        raise ConnectionError("warehouse unreachable")

    bus.subscribe("user.query", analytics, name="analytics")
    return bus


bus = build()
