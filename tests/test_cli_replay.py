"""`eventwire replay` through its real entry point: history republished as new events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from eventwire import EventBus
from eventwire.history import read_history
from eventwire.record import Recorder
from tests.conformance.conftest import backend_url, destroy
from tests.test_cli_dlq import cli
from tests.test_history import started


@asynccontextmanager
async def listening(url: str, pattern: str) -> AsyncIterator[Recorder]:
    """What a durable subscription on `pattern`, made now, handles from now on."""
    listener = EventBus(url)
    listener.subscribe(pattern, lambda event: None, name="listener")
    async with listener.record() as seen, listener:
        yield seen


@pytest.mark.parametrize("kind", ["sqlite", "redis", "nats", "amqp-history"])
async def test_replays_exactly_the_events_since_a_time_as_new_events(
    kind: str, tmp_path: Path
) -> None:
    url = backend_url(kind, tmp_path)
    async with started(url) as bus:
        before = datetime.now(UTC)
        await bus.publish_many([("orders.created", {"n": n}) for n in range(3)])
        middle = datetime.now(UTC)
        originals = [
            await bus.publish("orders.created", {"n": 3}, metadata={"user": "u-1"}, key="c-1"),
            await bus.publish("orders.paid", {"n": 4}),
        ]
        await bus.publish("shipping.sent", "not matched")
        async with listening(url, "orders.>") as seen:
            done = await asyncio.to_thread(
                cli, "replay", "orders.>", "--since", middle.isoformat(), "--yes", "--url", url
            )
            assert done.returncode == 0, done.stderr
            assert "replayed 2 event(s)" in done.stdout
            received = await seen.wait_for("orders.>", count=2, timeout=20)
        history = await read_history(url, patterns=["orders.>"], since=before, timeout=20)

    assert [event.metadata["replayed_from"] for event in received] == [e.id for e in originals]
    for copy, original in zip(received, originals, strict=True):
        assert copy.id != original.id
        assert (copy.topic, copy.payload, copy.key) == (
            original.topic,
            original.payload,
            original.key,
        )
        assert copy.causation_id == original.id
        assert copy.correlation_id == original.correlation_id
    assert received[0].metadata["user"] == "u-1"
    # Nothing more was published than the two copies.
    assert len(history) == 3 + 2 + 2


async def test_to_sends_them_to_another_topic_and_dry_run_publishes_nothing(
    tmp_path: Path,
) -> None:
    url = backend_url("sqlite", tmp_path)
    async with started(url) as bus:
        since = datetime.now(UTC)
        originals = await bus.publish_many([("jobs.run", n) for n in range(3)])
        dry = await asyncio.to_thread(
            cli,
            "replay",
            "jobs.>",
            "--since",
            "1m",
            "--to",
            "jobs.again",
            "--dry-run",
            "--url",
            url,
        )
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.count("jobs.run → jobs.again") == 3
        assert "3 event(s) would be replayed to jobs.again" in dry.stdout
        assert len(await read_history(url, patterns=[">"], since=since)) == 3

        async with listening(url, "jobs.again") as seen:
            done = await asyncio.to_thread(
                cli, "replay", "jobs.run", "--since", "1m", "--to", "jobs.again", "-y", "--url", url
            )
            assert done.returncode == 0, done.stderr
            received = await seen.wait_for("jobs.again", count=3, timeout=20)
    assert [event.payload for event in received] == [0, 1, 2]
    assert [event.metadata["replayed_from"] for event in received] == [e.id for e in originals]
    assert {event.topic for event in received} == {"jobs.again"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since 'yesterday' is neither"),
        (["--since", "1h", "--until", "later"], "--until 'later' is neither"),
        (["--since", "1m", "--until", "2h"], "is after --until"),
        (["--since", "1h", "--to", "a.*"], "--to: topic 'a.*' contains the wildcard"),
        (["--since", "1h", "--to", "_bus.x"], "one of the bus's own topics"),
    ],
)
def test_bad_input_is_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    shown = cli("replay", "a.>", *args, "--url", backend_url("sqlite", tmp_path))
    assert shown.returncode == 2
    assert message in shown.stderr


def test_the_in_process_bus_has_no_history_to_replay() -> None:
    shown = cli("replay", "a.>", "--since", "1h")
    assert shown.returncode == 2
    assert "memory:// is the in-process bus" in shown.stderr
    assert "keeps no history" in shown.stderr


def test_amqp_has_no_history_to_replay() -> None:
    url = backend_url("amqp", Path())
    try:
        shown = cli("replay", "a.>", "--since", "1h", "--yes", "--url", url)
    finally:
        asyncio.run(destroy(url))
    assert shown.returncode == 2
    assert "amqp:// keeps no history" in shown.stderr
    assert "guest:guest" not in shown.stderr


async def test_without_yes_and_without_a_terminal_it_asks_for_yes(tmp_path: Path) -> None:
    url = backend_url("sqlite", tmp_path)
    async with started(url) as bus:
        await bus.publish("a.b", 1)
        shown = await asyncio.to_thread(cli, "replay", "a.>", "--since", "1m", "--url", url)
        assert len(await read_history(url, patterns=["a.>"], since=None)) == 1
    assert shown.returncode == 2
    assert "pass --yes" in shown.stderr


def test_help_shows_examples() -> None:
    shown = cli("replay", "--help")
    assert shown.returncode == 0
    assert "eventwire replay 'orders.>' --since 15m --dry-run" in shown.stdout
