"""`eventwire stats` through its real entry point: an `eventwire run` process on a real broker
handles events, and another process reads its counters over that broker."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus
from eventwire.backends import open_backend
from eventwire.backends.base import Message
from eventwire.envelope import encode
from eventwire.stats_service import StatsClient, StatsReport, StatsResponder
from tests.conformance.conftest import backend_url, destroy

EVENTWIRE = str(Path(sys.executable).with_name("eventwire"))

APP = textwrap.dedent(
    """
    from eventwire import Event, EventBus, Retry

    bus = EventBus()

    @bus.subscribe("work.*", name="worker", group="workers", retry=Retry(2, backoff=0))
    async def work(event: Event[str]) -> None:
        if event.payload == "fail":
            raise RuntimeError("this one fails")

    @bus.subscribe("work.*", name="audit")
    def audit(event: Event[str]) -> None:
        pass
    """
)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [EVENTWIRE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )


@pytest.fixture
def run_app(tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    """Starts `eventwire run app:bus --url URL` in tmp_path; stops what it started."""
    (tmp_path / "statsapp.py").write_text(APP, encoding="utf-8")
    started: list[subprocess.Popen[str]] = []

    def start(url: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [EVENTWIRE, "run", "statsapp:bus", "--url", url, "--grace", "2"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        if process.stderr is not None:
            process.stderr.close()


async def wait_for_report(
    url: str, process: subprocess.Popen[str], ready: Callable[[StatsReport], bool]
) -> StatsReport:
    """Ask (as `eventwire stats` does) until `ready` holds; bounded."""
    deadline = time.monotonic() + 30
    async with StatsClient(url) as client:
        while True:
            assert process.poll() is None, f"eventwire run exited: {process.communicate()[1]}"
            report = await client.collect(timeout=0.5)
            if ready(report):
                return report
            assert time.monotonic() < deadline, f"never ready: {report.to_dict()}"


def subscriptions_of(report: StatsReport | dict[str, Any], pid: int) -> dict[str, Any]:
    processes = report.processes if isinstance(report, StatsReport) else report["processes"]
    return {
        sub["name"]: sub
        for process in processes
        if process["process"]["pid"] == pid
        for sub in process["subscriptions"]
    }


@pytest.mark.parametrize("backend", ["sqlite", "redis", "nats", "amqp"])
async def test_stats_reports_a_running_process_and_the_broker_view(
    backend: str, tmp_path: Path, run_app: Callable[[str], subprocess.Popen[str]]
) -> None:
    url = backend_url(backend, tmp_path)
    try:
        # A durable subscription that no process runs: only the broker can tell about it.
        orphan = EventBus(url)
        orphan.subscribe("orphan.*", lambda event: None, name="orphan")
        async with orphan:
            pass
        process = run_app(url)
        await wait_for_report(url, process, lambda report: bool(report.processes))
        async with EventBus(url) as publisher:
            for payload in ["a", "b", "c", "fail"]:
                await publisher.publish("work.x", payload)
            for payload in ["x", "y"]:
                await publisher.publish("orphan.x", payload)

        def handled_all(report: StatsReport) -> bool:
            subs = subscriptions_of(report, process.pid)
            return (
                subs.get("audit", {}).get("handled") == 4
                and subs.get("worker", {}).get("dead_lettered") == 1
            )

        await wait_for_report(url, process, handled_all)

        shown = cli("stats", "--url", url, "--json", "--timeout", "3")
        assert shown.returncode == 0, shown.stderr
        document = json.loads(shown.stdout)
        subs = subscriptions_of(document, process.pid)
        worker, audit = subs["worker"], subs["audit"]
        assert (worker["handled"], worker["failed"], worker["retried"]) == (3, 2, 1)
        assert (worker["dead_lettered"], worker["group"], worker["pattern"]) == (
            1,
            "workers",
            "work.*",
        )
        assert (audit["handled"], audit["failed"], audit["in_flight"], audit["queued"]) == (
            4,
            0,
            0,
            0,
        )
        assert audit["handling"]["count"] == 4
        assert 0 < audit["handling"]["p50"] <= audit["handling"]["max"]
        broker = {sub["name"]: sub for sub in document["subscriptions"]}
        assert broker["orphan"] == {
            "name": "orphan",
            "pattern": "orphan.*",
            "outstanding": 2,
            "processes": 0,
        }
        assert (broker["workers"]["processes"], broker["audit"]["processes"]) == (1, 1)
        assert document["dead_letters"] == 1
        assert ":guest@" not in shown.stdout  # the amqp password, redacted

        table = cli("stats", "--url", url, "--timeout", "3")
        assert table.returncode == 0, table.stderr
        assert f"pid {process.pid}" in table.stdout
        assert "worker (workers)" in table.stdout
        assert "orphan" in table.stdout
        assert "Dead letters kept: 1" in table.stdout

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        # Its stats inbox went with it (brokers that list ephemeral consumers show it).
        checker = open_backend(url)
        assert checker is not None
        await checker.connect()
        try:
            names = [info.name for info in await checker.consumers()]
        finally:
            await checker.close()
        assert not [name for name in names if name.startswith("_eventwire.stats.")]
    finally:
        await destroy(url)


def test_watch_with_json_prints_a_document_per_refresh_until_interrupted(
    tmp_path: Path, run_app: Callable[[str], subprocess.Popen[str]]
) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    runner = run_app(url)
    asyncio.run(wait_for_report(url, runner, lambda report: bool(report.processes)))
    watcher = subprocess.Popen(
        [EVENTWIRE, "stats", "--url", url, "--watch", "--json", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        seen_runner = False
        for _ in range(100):  # each line is one refresh; bounded by the test timeout too
            document = json.loads(watcher.stdout.readline())
            if subscriptions_of(document, runner.pid):
                seen_runner = True
                break
        assert seen_runner
        assert json.loads(watcher.stdout.readline())["url"] == url  # and it goes on
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=30) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
        watcher.communicate(timeout=30)


def test_memory_bus_is_explained_and_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if k != "EVENTWIRE_URL"}
    for args in (["stats"], ["stats", "--url", "memory://"]):
        result = subprocess.run(
            [EVENTWIRE, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "COLUMNS": "200"},
            check=False,
        )
        assert result.returncode == 2, result
        for words in ("in-process", "--metrics-port", "bus.stats()"):
            assert words in result.stderr, (words, result.stderr)


def test_unreachable_broker_and_bad_url_exit_2_without_the_password() -> None:
    unreachable = cli("stats", "--url", "redis://:s3cret@127.0.0.1:1/0")
    assert unreachable.returncode == 2
    assert "127.0.0.1:1" in unreachable.stderr
    assert "s3cret" not in unreachable.stdout + unreachable.stderr
    bad = cli("stats", "--url", "kafka://somewhere")
    assert bad.returncode == 2
    assert "unknown bus URL scheme 'kafka'" in bad.stderr


async def test_nobody_answering_is_said_and_help_shows_examples(tmp_path: Path) -> None:
    missing = cli("stats", "--url", f"sqlite:///{tmp_path}/typo.db")
    assert missing.returncode == 2
    assert "no SQLite bus at" in missing.stderr
    assert not (tmp_path / "typo.db").exists()
    async with EventBus(f"sqlite:///{tmp_path}/quiet.db"):
        pass
    quiet = cli("stats", "--url", f"sqlite:///{tmp_path}/quiet.db", "--timeout", "0.2")
    assert quiet.returncode == 0, quiet.stderr
    assert "No process answered within 0.2s" in quiet.stdout
    shown = cli("stats", "--help")
    assert shown.returncode == 0
    assert "eventwire stats --url sqlite:///bus.db" in shown.stdout


async def test_the_in_process_bus_has_no_responder_nor_client() -> None:
    with pytest.raises(ValueError, match=r"bus\.stats"):
        StatsResponder(EventBus())
    with pytest.raises(ValueError, match="in-process"):
        StatsClient("memory://")


async def test_a_responder_in_your_own_code_answers_and_junk_replies_are_ignored(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    async with EventBus(url) as bus:
        bus.subscribe("own.*", lambda event: None, name="own")
        await bus.publish("own.x", 1)
        async with StatsResponder(bus) as responder, StatsClient(url) as client:
            junk: Event[Any] = Event(client.reply_topic, {"request": "someone else's"})
            await client.backend.publish(
                [
                    Message("junk-1", client.reply_topic, None, b"not an envelope"),
                    Message(junk.id, junk.topic, None, encode(junk)),
                ]
            )
            report = await client.collect(timeout=5)
            assert responder.answered == 1
        [process] = report.processes
        assert process["process"]["pid"] == os.getpid()
        assert process["process"]["url"] == url
        [own] = process["subscriptions"]
        assert own["name"] == "own"
        assert own["handled"] + own["queued"] + own["in_flight"] == 1


def test_a_dead_letter_count_still_being_made_is_shown_as_a_bound() -> None:
    from rich.console import Console

    from eventwire.cli.stats import render

    def shown(report: StatsReport) -> str:
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(render(report, 1.0))
        return console.export_text()

    report = StatsReport(url="redis://h", processes=[], consumers=[], dead_letters=17001)
    assert "Dead letters kept: 17001 (see eventwire dlq)" in shown(report)
    report.dead_letters_exact = False
    assert "Dead letters kept: at most 17001 (the broker was still counting)" in shown(report)
    assert report.to_dict()["dead_letters_exact"] is False
