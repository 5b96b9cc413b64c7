"""Prometheus export: the real HTTP endpoint of `serve_metrics`, scraped and parsed with
prometheus_client's own parser, reports what `bus.stats()` says."""

from __future__ import annotations

import asyncio
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventwire import Event, EventBus, Retry, __version__
from eventwire.metrics import LatencyHistogram
from tests.conftest import wait_until

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

from eventwire.prometheus import (
    DEFAULT_BUCKETS,
    EventwireCollector,
    MetricsServer,
    histogram_buckets,
    serve_metrics,
)

EVENTWIRE = str(Path(sys.executable).with_name("eventwire"))

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_url(url: str) -> Samples:
    """Every sample on the endpoint, by (sample name, labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = bytes(response.read()).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(server: MetricsServer) -> Samples:
    return await asyncio.to_thread(scrape_url, server.url)


def labels(
    subscription: str, pattern: str, group: str = "", **more: str
) -> frozenset[tuple[str, str]]:
    return frozenset(
        {"subscription": subscription, "pattern": pattern, "group": group, **more}.items()
    )


@pytest.fixture
def metrics_server(bus: EventBus) -> Iterator[MetricsServer]:
    server = serve_metrics(bus, 0)
    yield server
    server.close()


async def test_scraped_counters_and_gauges_match_bus_stats(
    bus: EventBus, metrics_server: MetricsServer
) -> None:
    release = asyncio.Event()
    started: list[int] = []

    async def blocked(event: Event[int]) -> None:
        started.append(event.payload)
        await release.wait()

    def flaky(event: Event[int]) -> None:
        if event.payload < 2:
            raise RuntimeError("no")

    bus.subscribe("p.blocked", blocked, name="blocked", max_pending=2, overflow="drop_oldest")
    bus.subscribe("p.flaky", flaky, name="flaky", group="workers", retry=Retry(2, backoff=0))
    for number in range(5):
        await bus.publish("p.flaky", number)
    await bus.publish("p.blocked", 0)
    await wait_until(lambda: started == [0], timeout=5)
    for number in range(1, 5):
        await bus.publish("p.blocked", number)
    await wait_until(lambda: bus.stats()["flaky"].handling.count == 5, timeout=5)

    samples = await scrape(metrics_server)
    blocked_labels = labels("blocked", "p.blocked")
    flaky_labels = labels("flaky", "p.flaky", "workers")
    for name, field in [
        ("eventwire_events_handled_total", "handled"),
        ("eventwire_handler_failures_total", "failed"),
        ("eventwire_retries_total", "retried"),
        ("eventwire_dead_letters_total", "dead_lettered"),
        ("eventwire_events_dropped_total", "dropped"),
        ("eventwire_events_in_flight", "in_flight"),
        ("eventwire_inbox_depth", "queued"),
    ]:
        for sub_labels, stats in [
            (blocked_labels, bus.stats()["blocked"]),
            (flaky_labels, bus.stats()["flaky"]),
        ]:
            assert samples[(name, sub_labels)] == getattr(stats, field), (name, sub_labels)
    # The numbers themselves, so that a collector reporting zeros everywhere cannot pass.
    assert samples[("eventwire_events_in_flight", blocked_labels)] == 1
    assert samples[("eventwire_inbox_depth", blocked_labels)] == 2
    assert samples[("eventwire_events_dropped_total", blocked_labels)] == 2
    assert samples[("eventwire_events_handled_total", flaky_labels)] == 3
    assert samples[("eventwire_handler_failures_total", flaky_labels)] == 4
    assert samples[("eventwire_retries_total", flaky_labels)] == 2
    assert samples[("eventwire_dead_letters_total", flaky_labels)] == 2
    info = frozenset(
        {"backend": "memory", "namespace": "eventwire", "version": __version__}.items()
    )
    assert samples[("eventwire_info", info)] == 1
    release.set()


async def test_scraped_histogram_reflects_handling_times(
    bus: EventBus, metrics_server: MetricsServer
) -> None:
    async def timed(event: Event[float]) -> None:
        if event.payload:
            await asyncio.sleep(event.payload)

    bus.subscribe("p.timed", timed, name="timed")
    for delay in [0.0] * 10 + [0.03] * 10:
        await bus.publish("p.timed", delay)
    await bus.drain(timeout=10)

    samples = await scrape(metrics_server)
    subscription = labels("timed", "p.timed")

    def bucket(le: str) -> float:
        return samples[("eventwire_handling_seconds_bucket", subscription | {("le", le)})]

    assert bucket("0.025") == 10  # the instant ones only: each sleeper took >= 30 ms
    assert bucket("+Inf") == 20
    assert bucket("1.0") == 20
    counts = [bucket(repr(bound)) for bound in DEFAULT_BUCKETS] + [bucket("+Inf")]
    assert counts == sorted(counts)
    assert samples[("eventwire_handling_seconds_count", subscription)] == 20
    total = samples[("eventwire_handling_seconds_sum", subscription)]
    assert total == pytest.approx(bus.stats()["timed"].handling_seconds)
    assert total >= 10 * 0.03


def test_fixed_buckets_count_what_is_surely_below_each_bound() -> None:
    """Rounding: a duration is counted at the first bound at or above its log bucket's upper
    end, so the count at bound b lies between the true counts at b/1.0625 and at b."""
    rng = random.Random(4)
    durations = [10 ** rng.uniform(-5, 3) for _ in range(5000)]
    histogram = LatencyHistogram()
    for seconds in durations:
        histogram.record(seconds)
    pairs = histogram_buckets(histogram)
    assert [le for le, _ in pairs] == [repr(b) for b in DEFAULT_BUCKETS] + ["+Inf"]
    for (_, count), bound in zip(pairs, DEFAULT_BUCKETS, strict=False):
        assert sum(d <= bound / 1.0625 for d in durations) <= count
        assert count <= sum(d <= bound for d in durations)
    assert pairs[-1] == ("+Inf", 5000.0)
    assert histogram_buckets(LatencyHistogram(), (1.0,)) == [("1.0", 0.0), ("+Inf", 0.0)]


def test_custom_buckets_are_checked() -> None:
    bus = EventBus()
    assert EventwireCollector(bus, buckets=(2, 0.5)).buckets == (0.5, 2.0)
    with pytest.raises(ValueError, match="distinct positive"):
        EventwireCollector(bus, buckets=(0.0, 1.0))
    with pytest.raises(ValueError, match="distinct positive"):
        EventwireCollector(bus, buckets=())


async def test_info_names_a_durable_backend_and_its_namespace(tmp_path: Path) -> None:
    async with EventBus(f"sqlite:///{tmp_path}/bus.db?namespace=shop") as bus:
        server = serve_metrics(bus, 0)
        try:
            samples = await scrape(server)
        finally:
            server.close()
    info = frozenset({"backend": "sqlite", "namespace": "shop", "version": __version__}.items())
    assert samples[("eventwire_info", info)] == 1
    # The process's own metrics come along, as from any Prometheus client.
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)


def test_a_taken_port_is_an_error(bus: EventBus) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="in use"):
            serve_metrics(bus, taken.getsockname()[1])


RUN_APP = textwrap.dedent(
    """
    from eventwire import Agent, Event, EventBus

    bus = EventBus()

    class Greeter(Agent):
        async def on_start(self) -> None:
            await self.publish("greet.start", "hello")

    @bus.subscribe("greet.*", name="greetings")
    async def greetings(event: Event[str]) -> None:
        pass

    bus.register(Greeter("greeter"))
    """
)


def start_run(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    """`eventwire run greetapp:bus ARGS` in tmp_path, and a queue of its output lines."""
    (tmp_path / "greetapp.py").write_text(RUN_APP, encoding="utf-8")
    process = subprocess.Popen(
        [EVENTWIRE, "run", "greetapp:bus", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return process, lines


def line_with(lines: queue.Queue[str], marker: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if marker in line:
            return line
    raise AssertionError(f"{marker!r} never printed; got {seen}")


def test_eventwire_run_serves_metrics_while_the_app_runs(tmp_path: Path) -> None:
    bus_url = f"sqlite:///{tmp_path}/bus.db"
    process, lines = start_run(tmp_path, "--url", bus_url, "--metrics-port", "0", "--grace", "2")
    try:
        endpoint = line_with(lines, "eventwire: metrics on ").split(" on ", 1)[1]
        for payload in ("one", "two"):
            published = subprocess.run(
                [EVENTWIRE, "publish", "greet.cli", payload, "--url", bus_url],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert published.returncode == 0, published.stdout + published.stderr
        handled = ("eventwire_events_handled_total", labels("greetings", "greet.*"))
        count = ("eventwire_handling_seconds_count", labels("greetings", "greet.*"))
        deadline = time.monotonic() + 30
        while (samples := scrape_url(endpoint)).get(handled) != 3:  # start's own + the two
            assert process.poll() is None, "eventwire run exited"
            assert time.monotonic() < deadline, samples.get(handled)
            time.sleep(0.05)
        assert samples[count] == 3
        info = frozenset(
            {"backend": "sqlite", "namespace": "eventwire", "version": __version__}.items()
        )
        assert samples[("eventwire_info", info)] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        line_with(lines, "eventwire: stopped, every event handled")
        with pytest.raises(urllib.error.URLError):  # the endpoint went with the process
            scrape_url(endpoint)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_eventwire_run_with_a_taken_metrics_port_exits_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process, lines = start_run(tmp_path, "--metrics-port", str(port))
        try:
            assert process.wait(timeout=30) == 2
            line_with(lines, f"cannot serve metrics on 127.0.0.1:{port}")
        finally:
            if process.poll() is None:
                process.kill()


async def test_scraping_from_another_thread_never_changes_the_counts() -> None:
    """The HTTP server scrapes on its own thread while the workers record: reading must not
    write, or events are lost or counted twice."""
    stop = threading.Event()
    failures: list[BaseException] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to meet the race
    try:
        async with EventBus() as bus:

            async def fast(event: Event[int]) -> None: ...

            subscription = bus.subscribe("t", fast, name="fast")
            collector = EventwireCollector(bus)

            def scrape() -> None:
                try:
                    while not stop.is_set():
                        list(collector.collect())
                except BaseException as error:  # pragma: no cover - reported below
                    failures.append(error)

            scraper = threading.Thread(target=scrape)
            scraper.start()
            try:
                for _ in range(20_000):
                    for n in range(3):  # short runs: the worker goes idle between them
                        await bus.publish("t", n)
                    await asyncio.sleep(0)
                await bus.drain(timeout=30)
            finally:
                stop.set()
                scraper.join(timeout=10)
            stats = bus.stats()["fast"]
            histogram = subscription.histogram
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
    assert stats.handled == 60_000
    assert stats.handling.count == 60_000
    assert histogram.count == 60_000
    assert histogram.buckets()[-1][1] == 60_000  # the buckets add up to the count
