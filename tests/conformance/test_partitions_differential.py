"""Differential test of ``partitions=``: the same random program (rounds of keyed and unkeyed
events, processes joining and leaving the pool between them) runs on memory and on each
durable backend, and what each key's subscription saw is compared. On memory one process
handles everything; on a broker the work moves between processes as they come and go, and must
come out the same: every event once, each key's in publish order.

``EVENTWIRE_DIFF_SEEDS=20`` runs more programs (the suite runs two per backend)."""

from __future__ import annotations

import asyncio
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from eventwire import Event, EventBus
from tests.conftest import wait_until

DURABLE = ("sqlite", "redis", "nats", "amqp")
SEEDS = range(int(os.environ.get("EVENTWIRE_DIFF_SEEDS", "2")))
KEYS = ("a", "b", "c", "d", "e", "f", None)


@pytest.fixture(params=DURABLE)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


Step = tuple[str, int, list[str | None]]


def program(seed: int) -> list[Step]:
    """Operations: ("publish", first number, the keys of the events), ("join", 0, []),
    ("leave", which, []). The keys are part of the program: drawn while it runs, they would
    depend on how the handlers' calls interleave with the publishes on each backend."""
    rng = random.Random(seed)
    published = 0

    def publish() -> Step:
        nonlocal published
        keys = [rng.choice(KEYS) for _ in range(rng.randint(20, 80))]
        published += len(keys)
        return ("publish", published - len(keys), keys)

    steps: list[Step] = [("join", 0, []), publish()]
    for _ in range(rng.randint(3, 6)):
        steps.append(rng.choice([("join", 0, []), ("leave", rng.randint(0, 9), [])]))
        steps.append(publish())
    return steps


@dataclass
class Seen:
    by_key: dict[str | None, list[int]] = field(default_factory=lambda: defaultdict(list))
    total: int = 0


async def run(url: str, steps: list[Step], seed: int, one_process: bool) -> Seen:
    seen = Seen()
    pause = random.Random(seed + 1)
    pool: list[EventBus] = []
    joined = 0

    async def join() -> None:
        nonlocal joined
        bus = EventBus(url, close_grace=2.0, redeliver_after=3.0)

        async def work(event: Event[int]) -> None:
            await asyncio.sleep(pause.random() / 500)
            seen.by_key[event.key].append(event.payload)
            seen.total += 1

        bus.subscribe("d.*", work, name=f"p{joined}", group="diff", partitions=5, concurrency=3)
        joined += 1
        await bus.start()
        pool.append(bus)

    published = 0
    # memory:// is one process's bus: its subscriber publishes itself.
    separate = None if one_process else EventBus(url)
    try:
        if separate is not None:
            await separate.start()
        for operation, argument, keys in steps:
            if operation == "join" and (not pool or not one_process):
                await join()
            elif operation == "leave" and len(pool) > 1 and not one_process:
                await pool.pop(argument % len(pool)).close()
            elif operation == "publish":
                publisher = separate or pool[0]
                events = [Event("d.x", argument + n, key=key) for n, key in enumerate(keys)]
                await publisher.publish_many(events)
                published += len(events)
        await wait_until(lambda: seen.total >= published, timeout=60)
        await (separate or pool[0]).drain(timeout=30)
    finally:
        for bus in pool:
            await bus.close()
        if separate is not None:
            await separate.close()
    return seen


@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", SEEDS)
async def test_a_pool_sees_what_one_process_sees(bus_url: str, seed: int) -> None:
    steps = program(seed)
    expected = await run("memory://", steps, seed, one_process=True)
    got = await run(bus_url, steps, seed, one_process=False)
    assert got.total == expected.total, "every event handled once"
    for key, numbers in expected.by_key.items():
        if key is None:
            assert sorted(got.by_key[key]) == sorted(numbers), "every unkeyed event, once"
        else:
            assert got.by_key[key] == numbers, f"key {key!r}: the same events, in publish order"
