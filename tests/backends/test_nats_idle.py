"""Idle NATS consumers (issue 11, many subscriptions): a consumer with nothing to do keeps no
pull request standing at the server, yet a publish reaches it at once, and redeliveries
(a nak's delay, a lease that ran out) reach it when due. A process's presence beat is one
key, however many consumers it runs. Against a real NATS JetStream server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

import eventwire.backends.nats as nats_backend
from eventwire.backends import parse_url
from eventwire.backends.base import Consumer, ConsumerSpec, Delivery
from eventwire.backends.nats import NatsBackend
from tests.backends.helpers import bodies, fetch_all, messages_on
from tests.services import require_service, unique_namespace, with_namespace


@pytest.fixture
async def backend() -> AsyncIterator[NatsBackend]:
    url = with_namespace(require_service("nats"), unique_namespace())
    opened = NatsBackend(parse_url(url))
    await opened.connect()
    yield opened
    await opened.destroy()
    await opened.close()


async def waiting_requests(backend: NatsBackend, consumer: str) -> int:
    info = await backend.js.consumer_info(backend.stream, nats_backend.safe_name(consumer))
    return info.num_waiting or 0


async def fetch_until_resting(backend: NatsBackend, consumer: Consumer, name: str) -> None:
    """Fetch (finding nothing) until the server holds no request of `name`'s."""
    deadline = time.monotonic() + 10
    while True:
        assert await consumer.fetch(10, 0.3) == []
        if await waiting_requests(backend, name) == 0 and backend.idle_consumers:
            return
        assert time.monotonic() < deadline, "the consumer kept a pull request standing"


async def fetch_one(consumer: Consumer, within: float) -> tuple[Delivery, float]:
    """The next delivery, and how long it took; fails after `within` seconds."""
    started = time.monotonic()
    got: list[Delivery] = []
    while not got:
        assert time.monotonic() - started < within, f"nothing came within {within}s"
        got = await consumer.fetch(1, within)
    return got[0], time.monotonic() - started


async def test_an_idle_consumer_keeps_no_request_standing_and_a_publish_wakes_it(
    backend: NatsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Looks for redeliveries a minute apart: only the wake-up can bring the event in time.
    monkeypatch.setattr(nats_backend, "_IDLE_LOOK", 60.0)
    consumer = await backend.consumer(ConsumerSpec("quiet", "quiet.*"))
    await fetch_until_resting(backend, consumer, "quiet")
    waiting = asyncio.create_task(fetch_one(consumer, 30))
    # The fetch waits, and still no request stands at the server.
    await asyncio.sleep(0.5)
    assert not waiting.done()
    assert await waiting_requests(backend, "quiet") == 0
    await backend.publish(messages_on("quiet.ping", "p1"))
    delivery, took = await waiting
    assert bodies([delivery]) == ["p1"]
    assert took < 30
    # Busy again: the next event comes on a standing request, with no wake-up needed.
    await consumer.ack([delivery])
    await backend.publish(messages_on("quiet.ping", "p2"))
    assert bodies(await fetch_all(consumer, 1)) == ["p2"]
    await consumer.close()


async def test_a_nak_with_a_delay_comes_back_to_a_resting_consumer_when_due(
    backend: NatsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nats_backend, "_IDLE_LOOK", 60.0)
    consumer = await backend.consumer(ConsumerSpec("later", "later.*"))
    await backend.publish(messages_on("later.job", "j1"))
    [first] = await fetch_all(consumer, 1)
    await consumer.nak(first, delay=2.0)
    again, took = await fetch_one(consumer, 30)
    assert (bodies([again]), again.attempt) == (["j1"], 2)
    # Not before its delay, and long before the next look for redeliveries (a minute).
    assert 1.5 < took < 30
    await consumer.close()


async def test_a_resting_consumer_takes_over_what_a_lost_lease_gives_back(
    backend: NatsBackend,
) -> None:
    spec = ConsumerSpec("pool", "pool.*", ack_wait=1.0)
    crashed = await backend.consumer(spec)
    survivor = await backend.consumer(spec)
    await fetch_until_resting(backend, survivor, "pool")
    await backend.publish(messages_on("pool.task", "t1"))
    [held] = await fetch_all(crashed, 1)  # never acked: its process "died"
    # The survivor rests (no request stands); it finds the redelivery by looking.
    again, _ = await fetch_one(survivor, 20)
    assert (bodies([again]), again.attempt) == (["t1"], 2)
    assert held.attempt == 1
    await survivor.ack([again])
    await survivor.close()


async def test_a_presence_beat_is_one_key_however_many_consumers(backend: NatsBackend) -> None:
    names = [f"worker-{n}" for n in range(50)]
    await backend.beat("proc-a", names)
    bucket = f"KV_{backend.presence_bucket}"
    first = await backend.js.stream_info(bucket)
    await asyncio.sleep(0.01)
    await backend.beat("proc-a", names)
    second = await backend.js.stream_info(bucket)
    # The beat, and one consumer's key rewritten in turn (each once per _RELIVE_EVERY).
    assert second.state.last_seq - first.state.last_seq == 2
    beat_time = time.time()
    presences = await backend.presences()
    assert set(presences) == set(names)
    for name in names:
        [seen] = presences[name]
        # As recent as the process's latest beat, though most keys were written once.
        assert beat_time - 1 < seen <= beat_time
    await backend.leave("proc-a", names[:10])
    after = await backend.presences()
    assert all(after[name][0] < 0 for name in names[:10])
    assert all(after[name][0] > 0 for name in names[10:])
