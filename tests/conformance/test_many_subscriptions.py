"""Many durable subscriptions in one bus, on every backend: each event reaches the
subscriptions whose patterns match it, and no other (issue 11 item 4: a process may run
thousands). How their cost grows is measured by bench/bench_many_subscriptions.py."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus
from tests.conftest import wait_until
from tests.services import open_files_allowed, private_server

# As many as every backend opens well within a minute on a CI machine.
SUBSCRIPTIONS = 1_000
# A durable RabbitMQ subscription is a quorum queue, which keeps files open: a thousand of
# them need a broker allowed more than the 1,024 open files a default Linux limit gives (the
# shared broker may run with that and stop answering). RabbitMQ runs on a private broker
# started with a higher limit.
OPEN_FILES_NEEDED = 4_096


@pytest.fixture
def many_url(backend_name: str, bus_url: str, tmp_path: Path) -> Iterator[str]:
    if backend_name != "amqp":
        yield bus_url
        return
    if open_files_allowed() < OPEN_FILES_NEEDED:
        pytest.xfail(
            f"this machine lets a process open at most {open_files_allowed()} files: too few "
            f"for {SUBSCRIPTIONS} quorum queues on one RabbitMQ node"
        )
    with private_server("rabbitmq", tmp_path) as broker:
        yield broker.url


async def test_each_of_many_subscriptions_gets_exactly_its_events(many_url: str) -> None:
    bus_url = many_url
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
