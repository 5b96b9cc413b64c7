"""Many durable subscriptions in one bus, on every backend: each event reaches the
subscriptions whose patterns match it, and no other (issue 11 item 4: a process may run
thousands). How their cost grows is measured by bench/bench_many_subscriptions.py."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

from eventwire import Event, EventBus
from tests.conftest import wait_until

# As many as every backend opens well within a minute on a CI machine.
SUBSCRIPTIONS = 1_000
# Backends that cannot run this many subscriptions in one process yet: name -> why. Run,
# and expected to fail (strict: once one passes, its entry goes).
NOT_YET: dict[str, str] = {}
# Not even run: trying harms the shared service other tests use.
HARMFUL: dict[str, str] = {
    "amqp": "a durable subscription is a quorum queue, which keeps files open: 1,000 of them "
    "exhausted the shared RabbitMQ's limit of 1,024 open files (the machine starts it so) and "
    "left it unresponsive; with the limit raised to 20,000 they run (bench/results/"
    "bench_many_subscriptions.md)",
}


async def test_each_of_many_subscriptions_gets_exactly_its_events(
    backend_name: str, bus_url: str, request: pytest.FixtureRequest
) -> None:
    if backend_name in HARMFUL:
        pytest.xfail(HARMFUL[backend_name])
    if backend_name in NOT_YET:
        request.applymarker(pytest.mark.xfail(reason=NOT_YET[backend_name], strict=True))
    got: dict[str, list[int]] = defaultdict(list)

    def handler(name: str) -> Any:
        def handle(event: Event[int]) -> None:
            got[name].append(event.payload)

        return handle

    # Subscribed before the bus starts: they all open at start.
    bus = EventBus(bus_url, close_grace=2.0, redeliver_after=5.0)
    for number in range(SUBSCRIPTIONS):
        bus.subscribe(f"many.{number}", handler(f"s{number}"), name=f"s{number}")
    bus.subscribe("many.*", handler("every"), name="every")  # one pattern over all of them
    bus.subscribe("many.7", handler("seventh"), name="seventh")  # two on one topic
    targets = [0, 7, SUBSCRIPTIONS // 2, SUBSCRIPTIONS - 1]
    async with bus:
        for number in targets:
            await bus.publish(f"many.{number}", number)
        await bus.publish("elsewhere", -1)  # nobody's
        await wait_until(lambda: sum(map(len, got.values())) >= 2 * len(targets) + 1, 30)
        await bus.drain(timeout=30)
    expected = {f"s{number}": [number] for number in targets}
    expected["every"] = targets
    expected["seventh"] = [7]
    assert dict(got) == expected
