"""The workloads on autogen-core's `SingleThreadedAgentRuntime`.

Subscribers are `RoutedAgent`s with `@message_handler`s, subscribed with `TypeSubscription`;
publishers call `runtime.publish_message`. The runtime takes messages off one queue and
handles each publish in its own task that gathers every recipient's handler, so deliveries
to one agent run concurrently, not in order. `stop_when_idle()` waits for all of them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial

from autogen_core import (
    MessageContext,
    RoutedAgent,
    SingleThreadedAgentRuntime,
    TopicId,
    TypeSubscription,
    message_handler,
)
from common import (
    SLOW_HANDLER_SECONDS,
    W1_SUBSCRIBERS,
    Countdown,
    Handler,
    Metrics,
    Probe,
    Sizes,
    Stopwatch,
    blocking_handler,
    time_beside_slow,
    time_chains,
    traced_bytes_per_event,
    w1_rate,
    w4_rate,
)

SOURCE = "default"


@dataclass
class Tick:
    value: int


@dataclass
class Query:
    value: int


@dataclass
class ResearchComplete:
    value: int


class Counter(RoutedAgent):
    def __init__(self, counts: list[int], index: int) -> None:
        super().__init__("counts ticks")
        self._counts = counts
        self._index = index

    @message_handler
    async def on_tick(self, message: Tick, ctx: MessageContext) -> None:
        self._counts[self._index] += 1


class Researcher(RoutedAgent):
    def __init__(self) -> None:
        super().__init__("answers queries")

    @message_handler
    async def on_query(self, message: Query, ctx: MessageContext) -> None:
        await self.publish_message(
            ResearchComplete(message.value), TopicId("research.complete", self.id.key)
        )


class Reporter(RoutedAgent):
    def __init__(self, probe: Probe) -> None:
        super().__init__("reports research")
        self._probe = probe

    @message_handler
    async def on_research(self, message: ResearchComplete, ctx: MessageContext) -> None:
        self._probe.hit()


class Sleeper(RoutedAgent):
    def __init__(self) -> None:
        super().__init__("slow")

    @message_handler
    async def on_tick(self, message: Tick, ctx: MessageContext) -> None:
        await asyncio.sleep(SLOW_HANDLER_SECONDS)


class Ticker(RoutedAgent):
    def __init__(self, fast: Countdown) -> None:
        super().__init__("fast")
        self._fast = fast

    @message_handler
    async def on_tick(self, message: Tick, ctx: MessageContext) -> None:
        self._fast.tick()


class Gated(RoutedAgent):
    def __init__(self, hold: Handler) -> None:
        super().__init__("blocks on its first message")
        self._hold = hold

    @message_handler
    async def on_tick(self, message: Tick, ctx: MessageContext) -> None:
        await self._hold(message)


async def w1(sizes: Sizes) -> Metrics:
    events = sizes.w1_events
    counts = [0] * W1_SUBSCRIBERS
    runtime = SingleThreadedAgentRuntime()
    for index in range(W1_SUBSCRIBERS):
        agent_type = f"w1_counter{index}"
        await Counter.register(runtime, agent_type, partial(Counter, counts, index))
        await runtime.add_subscription(TypeSubscription("w1.topic", agent_type))
    topic = TopicId("w1.topic", SOURCE)
    runtime.start()
    watch = Stopwatch()
    watch.start()
    for i in range(events):
        await runtime.publish_message(Tick(i), topic)
    await runtime.stop_when_idle()
    seconds = watch.stop()
    return w1_rate(counts, events, seconds)


async def w2(sizes: Sizes) -> Metrics:
    probe = Probe()
    runtime = SingleThreadedAgentRuntime()
    await Researcher.register(runtime, "researcher", Researcher)
    await runtime.add_subscription(TypeSubscription("user.query", "researcher"))
    await Reporter.register(runtime, "reporter", partial(Reporter, probe))
    await runtime.add_subscription(TypeSubscription("research.complete", "reporter"))
    topic = TopicId("user.query", SOURCE)

    async def start_chain(index: int) -> None:
        await runtime.publish_message(Query(index), topic)

    runtime.start()
    result = await time_chains(start_chain, probe, sizes.w2_chains)
    await runtime.stop_when_idle()
    return result


async def w3(sizes: Sizes) -> Metrics:
    events = sizes.w3_events
    fast = Countdown(2 * events)
    runtime = SingleThreadedAgentRuntime()
    await Sleeper.register(runtime, "slow", Sleeper)
    await runtime.add_subscription(TypeSubscription("w3.topic", "slow"))
    for name in ("fast1", "fast2"):
        await Ticker.register(runtime, name, partial(Ticker, fast))
        await runtime.add_subscription(TypeSubscription("w3.topic", name))
    topic = TopicId("w3.topic", SOURCE)

    async def publish(index: int) -> None:
        await runtime.publish_message(Tick(index), topic)

    runtime.start()
    result = await time_beside_slow(publish, events, fast)
    await runtime.stop_when_idle()  # the slow deliveries run concurrently: ~10 ms left
    return result


async def w4(sizes: Sizes) -> Metrics:
    """One agent per topic: `TypeSubscription` maps each topic source to its own instance
    of one agent type (autogen's way to have one subscriber per topic; 10,000 agent types
    would make it match every new topic against 10,000 subscriptions)."""
    counts = [0]
    runtime = SingleThreadedAgentRuntime()
    await Counter.register(runtime, "w4_counter", partial(Counter, counts, 0))
    await runtime.add_subscription(TypeSubscription("w4", "w4_counter"))
    topics = [TopicId("w4", f"t{k}") for k in range(sizes.w4_topics)]
    for topic in topics:  # create the agents up front: setup, not timed
        await runtime.get("w4_counter", key=topic.source, lazy=False)
    runtime.start()
    watch = Stopwatch()
    watch.start()
    for i in range(sizes.w4_events):
        await runtime.publish_message(Tick(i), topics[i % len(topics)])
    await runtime.stop_when_idle()
    seconds = watch.stop()
    return w4_rate(counts[0], sizes.w4_events, seconds)


async def mem(sizes: Sizes) -> Metrics:
    """A message waits in the runtime's queue until its processing loop gets to it."""
    events = sizes.mem_events
    blocked = asyncio.Event()
    payload = Tick(0)
    runtime = SingleThreadedAgentRuntime()
    await Gated.register(runtime, "gated", partial(Gated, blocking_handler(blocked)))
    await runtime.add_subscription(TypeSubscription("mem.topic", "gated"))
    topic = TopicId("mem.topic", SOURCE)

    async def fill() -> None:
        for _ in range(events):
            await runtime.publish_message(payload, topic)  # never suspends: unbounded queue

    runtime.start()
    await runtime.publish_message(payload, topic)
    await blocked.wait()
    result = await traced_bytes_per_event(fill, events, lambda: runtime.unprocessed_messages_count)
    # No stop(): it discards the queue, and the blocked handler's task then fails with
    # "task_done() called too many times". The runtime goes with the event loop, whose
    # teardown cancels the blocked handler, which autogen-core logs as an error: expected.
    logging.getLogger("autogen_core").disabled = True
    return result
