"""The sqlite:// backend's consumer (`eventwire.backends.sqlite`): what only it has. It
fetches without looking again when nothing was published since it found nothing, and it
acknowledges after a short linger; neither may hide work or undo an acknowledgement. The
contract every backend keeps is in test_backend_contract.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from eventwire.backends import open_backend, sqlite
from eventwire.backends.base import Backend, ConsumerSpec
from tests.backends.helpers import bodies, fetch_all, messages_on


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/bus.db?poll=50ms"


async def opened(url: str) -> Backend:
    """A connected backend: another process on the same file."""
    backend = open_backend(url)
    assert backend is not None
    await backend.connect()
    return backend


async def test_a_fetch_after_finding_nothing_sees_another_process_publish(url: str) -> None:
    here, there = await opened(url), await opened(url)
    spec = ConsumerSpec("seen", "s")
    consumer = await here.consumer(spec)
    try:
        assert await consumer.fetch(5, 0) == []
        await there.publish(messages_on("s", "1"))
        # Not waiting: it looks all the same, although nothing was published here.
        assert bodies(await consumer.fetch(5, 0)) == ["1"]
        assert await consumer.fetch(5, 0) == []
        await there.publish(messages_on("s", "2"))
        started = time.monotonic()
        assert bodies(await consumer.fetch(5, 5.0)) == ["2"]
        assert time.monotonic() - started < 2.0  # a poll (50 ms) away, not the whole wait
    finally:
        await consumer.close()
        for backend in (here, there):
            await backend.close()


async def test_an_acknowledgement_on_its_way_at_close_is_not_given_back(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "_ACK_LINGER", 0.3)  # long enough to close meanwhile
    backend = await opened(url)
    spec = ConsumerSpec("landing", "l", ack_wait=30)
    consumer = await backend.consumer(spec)
    staying = await backend.consumer(spec)
    try:
        await backend.publish(messages_on("l", "1", "2"))
        done, left = await fetch_all(consumer, 2)
        acking = asyncio.get_running_loop().create_task(consumer.ack([done]))
        await asyncio.sleep(0)  # the acknowledgement has started, and lingers
        await consumer.close()  # gives back what it still holds: `left` alone
        assert acking.done()
        again = await staying.fetch(5, 0)
        assert bodies(again) == bodies([left])
        await staying.ack(again)
        assert await staying.fetch(5, 0.2) == []
    finally:
        await staying.close()
        await backend.close()
