"""A private broker, started on a free port for this test only, is restarted while events are
being published: every event whose `publish` returned is delivered. The shared services are
never touched."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventwire import Event, EventBus, PublishTimeoutError
from tests.conftest import wait_until
from tests.services import reachable


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateBroker:
    """A broker process of our own; `restart()` stops it and starts it on the same port and
    data directory."""

    def __init__(self, kind: str, data: Path) -> None:
        self.kind = kind
        self.data = data
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.kind == "redis":
            return f"redis://127.0.0.1:{self.port}/0"
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "redis":
            # appendfsync always: a write the broker acknowledged survives its restart.
            return [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--dir", str(self.data),
            ]  # fmt: skip
        return [
            "nats-server",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.data),
        ]

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    async def wait_up(self) -> None:
        async with asyncio.timeout(20):
            while not reachable("127.0.0.1", self.port, timeout=0.2):  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None

    async def restart(self) -> None:
        await asyncio.to_thread(self.stop)
        self.start()
        await self.wait_up()


@pytest.fixture(params=["redis", "nats"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrivateBroker]:
    kind = str(request.param)
    program = "redis-server" if kind == "redis" else "nats-server"
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed, so no private {kind} broker can be started")
    private = PrivateBroker(kind, tmp_path)
    private.start()
    yield private
    private.stop()


async def test_every_returned_publish_is_delivered_across_a_broker_restart(
    broker: PrivateBroker,
) -> None:
    await broker.wait_up()
    seen: set[int] = set()
    returned: list[int] = []
    bus = EventBus(broker.url, publish_timeout=30, redeliver_after=3)

    async def handle(event: Event[int]) -> None:
        seen.add(event.payload)

    bus.subscribe("restart.n", handle, name="survivor")
    async with bus:

        async def publish_all() -> None:
            for n in range(3000):
                try:
                    await bus.publish("restart.n", n)
                except PublishTimeoutError:
                    continue  # not returned: not promised
                returned.append(n)

        publishing = asyncio.create_task(publish_all())
        await wait_until(lambda: len(returned) >= 500, timeout=30)
        await broker.restart()
        await asyncio.wait_for(publishing, timeout=60)
        assert len(returned) == 3000, "publishes during the outage waited and went through"
        await wait_until(lambda: set(returned) <= seen, timeout=60)


async def test_publish_during_an_outage_waits_then_raises_clearly(broker: PrivateBroker) -> None:
    await broker.wait_up()
    bus = EventBus(broker.url, publish_timeout=0.5, close_grace=0.5)
    seen: list[str] = []
    bus.subscribe("outage.t", lambda e: seen.append(e.payload), name="patient")
    async with bus:
        await bus.publish("outage.t", "before")
        await asyncio.to_thread(broker.stop)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PublishTimeoutError, match=r"not confirmed stored .* within"):
            await bus.publish("outage.t", "during")
        waited = loop.time() - started
        assert 0.4 <= waited < 5, waited
        broker.start()
        await broker.wait_up()

        async def publish_until_stored() -> None:
            while True:  # the client reconnects with backoff; each try is bounded
                try:
                    await bus.publish("outage.t", "after")
                    return
                except PublishTimeoutError:
                    continue

        await asyncio.wait_for(publish_until_stored(), timeout=30)
        await wait_until(lambda: "after" in seen, timeout=30)
    assert seen[0] == "before"
