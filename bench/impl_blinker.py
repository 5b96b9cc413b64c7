"""The workloads on blinker: `Signal.send()` calls every (sync) receiver inline, in the
publisher's call. Nothing is queued and nothing is isolated: a slow or failing receiver
holds up, or breaks, the publisher. Hence no W3 (it would be 1,000 x 10 ms of publisher
time per run) and no memory figure (nothing ever waits in a queue).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blinker import Namespace
from common import W1_SUBSCRIBERS, Metrics, Probe, Sizes, Stopwatch, time_chains, w1_rate, w4_rate

Receiver = Callable[..., None]


def counting_receiver(counts: list[int], index: int) -> Receiver:
    def receiver(sender: Any, payload: Any) -> None:
        counts[index] += 1

    return receiver


async def w1(sizes: Sizes) -> Metrics:
    events = sizes.w1_events
    counts = [0] * W1_SUBSCRIBERS
    signal = Namespace().signal("w1.topic")
    for index in range(W1_SUBSCRIBERS):
        signal.connect(counting_receiver(counts, index), weak=False)
    watch = Stopwatch()
    watch.start()
    for i in range(events):
        signal.send(None, payload=i)
    seconds = watch.stop()
    return w1_rate(counts, events, seconds)


async def w2(sizes: Sizes) -> Metrics:
    probe = Probe()
    signals = Namespace()
    user_query = signals.signal("user.query")
    research_complete = signals.signal("research.complete")

    @user_query.connect
    def on_query(sender: Any, payload: Any) -> None:
        research_complete.send(sender, payload=payload)

    @research_complete.connect
    def on_research(sender: Any, payload: Any) -> None:
        probe.hit()

    async def start_chain(index: int) -> None:
        user_query.send(None, payload=index)

    return await time_chains(start_chain, probe, sizes.w2_chains)


async def w4(sizes: Sizes) -> Metrics:
    namespace = Namespace()
    signals = [namespace.signal(f"w4.t{k}") for k in range(sizes.w4_topics)]
    counts = [0] * len(signals)
    for index, signal in enumerate(signals):
        signal.connect(counting_receiver(counts, index), weak=False)
    watch = Stopwatch()
    watch.start()
    for i in range(sizes.w4_events):
        signals[i % len(signals)].send(None, payload=i)
    seconds = watch.stop()
    return w4_rate(sum(counts), sizes.w4_events, seconds)
