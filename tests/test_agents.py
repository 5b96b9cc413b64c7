from __future__ import annotations

from typing import Any

import pytest

from eventwire import Agent, Event, EventBus, Retry, on


class ResearchAgent(Agent):
    @on("user.query")
    async def research(self, event: Event[str]) -> None:
        await self.publish(
            "research.complete",
            f"Research result for: {event.payload}",
            metadata={"original_query": event.payload},
        )


class EmailAgent(Agent):
    @on("research.complete")
    async def send(self, event: Event[str]) -> None:
        await self.publish("email.sent", event.payload)


async def test_agents_chain_with_causation_and_correlation_ids(bus: EventBus) -> None:
    bus.register(ResearchAgent(name="research"))
    bus.register(EmailAgent(name="email"))
    async with bus.record() as seen:
        root = await bus.publish("user.query", "What is the revenue?")
        [sent] = await seen.wait_for("email.sent", timeout=2)
    complete = seen.assert_caused(root, "research.complete", direct=True)
    seen.assert_caused(complete, sent, direct=True)
    assert complete.payload == "Research result for: What is the revenue?"
    assert complete.metadata["original_query"] == "What is the revenue?"
    assert complete.source == "research"
    assert sent.source == "email"
    assert root.correlation_id == complete.correlation_id == sent.correlation_id == root.id


async def test_agent_subscriptions_are_named_after_agent_and_method(bus: EventBus) -> None:
    bus.register(ResearchAgent(name="research"))
    bus.register(EmailAgent(name="mailer"))
    assert {"research.research", "mailer.send"} <= set(bus.subscriptions)
    assert bus.subscriptions["mailer.send"].pattern == "research.complete"


async def test_on_accepts_subscribe_options(bus: EventBus) -> None:
    class Flaky(Agent):
        calls = 0

        @on("work", retry=Retry(attempts=3, backoff=0.001), concurrency=2, name="flaky-worker")
        async def work(self, event: Event[Any]) -> None:
            type(self).calls += 1
            if type(self).calls < 3:
                raise RuntimeError("flaky")

    bus.register(Flaky("flaky"))
    sub = bus.subscriptions["flaky-worker"]
    assert sub.concurrency == 2
    assert sub.retry.attempts == 3
    await bus.publish("work", 1)
    await bus.drain(timeout=2)
    assert sub.stats.handled == 1
    assert sub.stats.retried == 2


async def test_agent_publish_outside_handlers_sets_source(bus: EventBus) -> None:
    seen: list[Event[Any]] = []
    bus.subscribe("hello", seen.append, name="seen")
    agent = bus.register(Agent(name="main"))
    event = await agent.publish("hello", "world")
    await bus.drain(timeout=2)
    assert seen[0].source == "main"
    assert event.causation_id is None


async def test_agent_request(bus: EventBus) -> None:
    class Calculator(Agent):
        @on("math.square")
        async def square(self, event: Event[int]) -> int:
            return event.payload**2

    bus.register(Calculator("calc"))
    caller = bus.register(Agent(name="caller"))
    assert await caller.request("math.square", 7, timeout=2) == 49


async def test_lifecycle_hooks_run() -> None:
    calls: list[str] = []

    class Hooked(Agent):
        async def on_start(self) -> None:
            calls.append("start")

        async def on_stop(self) -> None:
            calls.append("stop")

    bus = EventBus()
    bus.register(Hooked("hooked"))
    async with bus:
        assert calls == ["start"]
    assert calls == ["start", "stop"]


async def test_registration_errors_are_clear(bus: EventBus) -> None:
    agent = bus.register(ResearchAgent(name="research"))
    with pytest.raises(ValueError, match="already registered"):
        bus.register(ResearchAgent(name="research"))
    with pytest.raises(ValueError, match="already registered"):
        EventBus().register(agent)
    with pytest.raises(TypeError, match="takes an Agent"):
        bus.register(object())  # type: ignore[type-var]
    from eventwire import BusNotRunningError

    with pytest.raises(BusNotRunningError, match="not registered"):
        await Agent(name="loose").publish("x", 1)
