"""A 3-node NATS JetStream cluster of one test's own (nats-server routes on free local ports),
and a run that kills and restarts its nodes while eventwire publishes and handles events.

`outage_run` is shared by tests/backends/test_nats_cluster.py, which checks what it promises,
and bench/bench_nats_cluster.py, which reports how long handling stalled over many runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, cast

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from eventwire import Event, EventBus
from eventwire.backends.nats import NatsBackend
from tests.conftest import wait_until
from tests.services import PrivateServer, free_port, unique_namespace

T = TypeVar("T")
Victim = Literal["stream leader", "consumer's server"]


class NatsCluster:
    """Three nats-server processes with JetStream, routed to each other on local ports.

    Each node keeps its client port, cluster port and data over `kill()` and `restart()`,
    the way a machine of a real cluster comes back.
    """

    def __init__(self, root: Path, size: int = 3) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in cluster_ports)
        self.nodes: dict[str, PrivateServer] = {}
        for n, cluster_port in enumerate(cluster_ports):
            name = f"node{n}"
            data = root / name
            data.mkdir(parents=True)
            self.nodes[name] = PrivateServer(
                "nats",
                data,
                *("--server_name", name, "--cluster_name", "eventwire-test"),
                *("--cluster", f"nats://127.0.0.1:{cluster_port}", "--routes", routes),
            )

    def url(self, namespace: str, *, replicas: int = 3) -> str:
        """A bus URL naming every node: the first as its host, the rest in ``?servers=``."""
        first, *rest = (f"127.0.0.1:{node.port}" for node in self.nodes.values())
        return f"nats://{first}?servers={','.join(rest)}&replicas={replicas}&namespace={namespace}"

    async def start(self, timeout: float = 60.0) -> None:
        """Start every node and wait until the cluster can create a 3-replica stream."""
        await asyncio.gather(*(node.start_async() for node in self.nodes.values()))
        await self.wait_until_ready(timeout)

    async def wait_until_ready(self, timeout: float) -> None:
        """Until JetStream's meta group has a leader and peers enough for 3 replicas."""
        probe = f"ready_{free_port()}"

        async def created(js: JetStreamContext) -> bool:
            await js.add_stream(StreamConfig(name=probe, subjects=[probe], num_replicas=3))
            await js.delete_stream(probe)
            return True

        await self._until(created, timeout)

    async def stream_leader(self, stream: str, timeout: float = 30.0) -> str:
        """The name of the node leading `stream` (waits while it has none)."""

        async def leader(js: JetStreamContext) -> str | None:
            info = await js.stream_info(stream)
            return info.cluster.leader if info.cluster else None

        return await self._until(leader, timeout)

    async def wait_until_current(self, stream: str, timeout: float = 60.0) -> None:
        """Until every replica of `stream` is online and caught up with its leader."""

        async def current(js: JetStreamContext) -> bool:
            info = await js.stream_info(stream)
            replicas = (info.cluster.replicas if info.cluster else None) or []
            caught_up = [peer for peer in replicas if peer.current and not peer.offline]
            return len(caught_up) == len(self.nodes) - 1

        await self._until(current, timeout)

    async def _until(
        self, answer: Callable[[JetStreamContext], Awaitable[T | None]], timeout: float
    ) -> T:
        """Ask the cluster (through any live node) until `answer` is truthy; errors while the
        cluster elects leaders count as no answer yet."""
        servers = [node.url for node in self.nodes.values() if node.process is not None]
        nc = await nats.connect(
            servers=servers, connect_timeout=2, max_reconnect_attempts=-1, error_cb=_quiet
        )
        try:
            js = nc.jetstream(timeout=2.0)
            async with asyncio.timeout(timeout):
                while True:
                    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                        found = await answer(js)
                        if found:
                            return found
                    await asyncio.sleep(0.1)  # the cluster has no event to wait on
        finally:
            await nc.close()

    def node_on_port(self, port: int) -> str:
        return next(name for name, node in self.nodes.items() if node.port == port)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()


@contextlib.asynccontextmanager
async def nats_cluster(root: Path) -> AsyncIterator[NatsCluster]:
    """A started `NatsCluster`, killed afterwards."""
    if shutil.which("nats-server") is None:
        pytest.skip("nats-server is not installed, so no NATS cluster can be started")
    cluster = NatsCluster(root)
    try:
        await cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class OutageReport:
    """What an `outage_run` saw."""

    victims: list[str] = field(default_factory=list)
    published: int = 0  # publishes that returned
    handled: int = 0  # distinct events handled
    duplicates: int = 0  # handlings of an event already handled
    # Per kill: the longest time without a handling / a returned publish, from that kill until
    # the node was back and caught up.
    handling_stalls: list[float] = field(default_factory=list)
    publish_stalls: list[float] = field(default_factory=list)
    # The same for a plain nats-py client publishing beside eventwire, retrying at once with
    # a short timeout: the cluster's own failover time, the floor for eventwire's.
    plain_publish_stalls: list[float] = field(default_factory=list)
    # The node the consumer's connection went on to after each kill (it never named it).
    moved_to: list[str] = field(default_factory=list)


async def outage_run(cluster: NatsCluster, victim: Victim, *, rate: float = 400.0) -> OutageReport:
    """Publish `rate` events a second, one awaited publish at a time, while a consumer handles
    them; kill `victim`'s node, restart it once the others carry on, wait until its replica
    caught up, then kill the node leading the stream now and restart it. Every publish that
    returned must then be handled."""
    report = OutageReport()
    namespace = unique_namespace()
    url = cluster.url(namespace)
    handled_at: dict[int, float] = {}
    returned_at: dict[int, float] = {}
    consumer = EventBus(url, publish_timeout=60, redeliver_after=5)

    async def handle(event: Event[int]) -> None:
        if event.payload in handled_at:
            report.duplicates += 1
        handled_at.setdefault(event.payload, time.monotonic())

    consumer.subscribe("cluster.work", handle, name="worker", idempotent=True)
    stop = asyncio.Event()
    async with consumer, EventBus(url, publish_timeout=60) as publisher:
        backend = cast(NatsBackend, consumer.backend)
        stream = backend.stream

        async def handled_another(seconds: float) -> None:
            """Until `seconds` worth of new events more were handled."""
            goal = len(handled_at) + rate * seconds
            await wait_until(lambda: len(handled_at) >= goal, 60)

        plain_at: list[float] = []
        publishing = asyncio.gather(
            _publish_steadily(publisher, rate, stop, returned_at),
            _publish_plainly(cluster, f"{namespace}.plain", stream, rate, stop, plain_at),
        )
        try:
            await handled_another(1.0)
            rounds: list[tuple[float, float]] = []
            for round_ in range(2):
                if round_ == 0 and victim == "consumer's server":
                    name = cluster.node_on_port(_connected_port(backend))
                else:
                    name = await cluster.stream_leader(stream)
                report.victims.append(name)
                killed = time.monotonic()
                cluster.nodes[name].kill()
                # The two others carry on: new events are handled while the node is down.
                await handled_another(1.0)
                report.moved_to.append(cluster.node_on_port(_connected_port(backend)))
                await cluster.nodes[name].start_async()
                await cluster.wait_until_current(stream)
                rounds.append((killed, time.monotonic()))
            await handled_another(0.5)
        finally:
            stop.set()
            await asyncio.wait_for(publishing, 90)
        await wait_until(lambda: returned_at.keys() <= handled_at.keys(), 60)
    report.published, report.handled = len(returned_at), len(handled_at)
    for start, end in rounds:
        # From the kill: the time since the last handling before it counts too.
        report.handling_stalls.append(_longest_gap(handled_at.values(), start, end))
        report.publish_stalls.append(_longest_gap(returned_at.values(), start, end))
        report.plain_publish_stalls.append(_longest_gap(plain_at, start, end))
    return report


async def _publish_steadily(
    bus: EventBus, rate: float, stop: asyncio.Event, returned_at: dict[int, float]
) -> None:
    """Publish n = 0, 1, 2... one awaited publish at a time, `rate` a second, until `stop`."""
    n, started = 0, time.monotonic()
    while not stop.is_set():
        await bus.publish("cluster.work", n)
        returned_at[n] = time.monotonic()
        n += 1
        # Paced by the clock: a stall is not made up for by a burst.
        ahead = started + n / rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)


async def _publish_plainly(
    cluster: NatsCluster,
    subject: str,
    stream: str,
    rate: float,
    stop: asyncio.Event,
    returned_at: list[float],
) -> None:
    """Publish with plain nats-py, trying again at once after a 0.25 s timeout, until `stop`."""
    servers = [node.url for node in cluster.nodes.values()]
    nc = await nats.connect(
        servers=servers, max_reconnect_attempts=-1, error_cb=_quiet, reconnect_time_wait=0.1
    )
    js = nc.jetstream(timeout=0.25)
    try:
        while not stop.is_set():
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await js.publish(subject, b"", stream=stream)
                returned_at.append(time.monotonic())
            await asyncio.sleep(1 / rate)
    finally:
        await nc.close()


async def _quiet(error: Exception) -> None:
    """A plain client's connection errors while nodes die: expected, not printed."""


def _connected_port(backend: NatsBackend) -> int:
    url = backend.nc.connected_url
    assert url is not None, "the consumer is not connected"
    assert url.port is not None
    return url.port


def _longest_gap(times: Iterable[float], start: float, end: float) -> float:
    """The longest time between `start` and `end` with none of `times` in it."""
    ordered = [start, *sorted(t for t in times if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(ordered))
