"""The SQLite event log under the sqlite:// backend: durability, leases, competing processes."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventwire.backends.sqlite_log import SqliteLog


def rows(*specs: tuple[str, str, str | None]) -> list[tuple[str, str, str | None, int, bytes]]:
    return [
        (event_id, topic, key, time.time_ns(), event_id.encode()) for event_id, topic, key in specs
    ]


@pytest.fixture
def log(tmp_path: Path) -> Iterator[SqliteLog]:
    opened = SqliteLog(tmp_path / "bus.db")
    yield opened
    opened.close()


def test_append_is_idempotent_per_id(log: SqliteLog) -> None:
    first = log.append(rows(("a", "t.x", None), ("b", "t.x", None)))
    again = log.append(rows(("a", "t.x", None)))
    assert again == first[:1]


def test_consumer_starts_latest_by_default_and_earliest_on_request(log: SqliteLog) -> None:
    log.append(rows(("old", "t.x", None)))
    log.ensure_consumer("late", "t.*")
    log.ensure_consumer("history", "t.*", start="earliest")
    log.append(rows(("new", "t.x", None)))
    assert [d.event_id for d in log.fetch("late", "p1")] == ["new"]
    assert [d.event_id for d in log.fetch("history", "p1")] == ["old", "new"]


def test_start_at_a_time(log: SqliteLog) -> None:
    log.append([("before", "t", None, 100, b"")])
    log.append([("after", "t", None, 300, b"")])
    log.ensure_consumer("from-200", "t", start=200)
    assert [d.event_id for d in log.fetch("from-200", "p")] == ["after"]


def test_pattern_filters_and_wildcard_rules_hold(log: SqliteLog) -> None:
    log.ensure_consumer("c", "user.*")
    log.append(rows(("1", "user.query", None), ("2", "user.query.x", None), ("3", "other", None)))
    assert [d.event_id for d in log.fetch("c", "p")] == ["1"]


def test_lease_hides_a_delivery_until_ack_or_expiry(log: SqliteLog) -> None:
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", None)))
    [first] = log.fetch("c", "p1", lease_seconds=0.2)
    assert first.attempts == 1
    assert log.fetch("c", "p2") == []  # leased to p1
    time.sleep(0.25)  # the lease itself is what this test is about
    [again] = log.fetch("c", "p2")
    assert (again.event_id, again.attempts) == ("1", 2)  # redelivered after the lease ran out
    log.ack("c", [again.seq])
    assert log.pending("c") == 0
    assert log.fetch("c", "p1") == []


def test_nak_with_delay(log: SqliteLog) -> None:
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", None)))
    [delivery] = log.fetch("c", "p")
    log.nak("c", delivery.seq, delay=60)
    assert log.fetch("c", "p") == []
    log.nak("c", delivery.seq, delay=0)
    assert [d.attempts for d in log.fetch("c", "p")] == [2]


def test_same_key_waits_for_the_earlier_delivery(log: SqliteLog) -> None:
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", "k"), ("2", "t", "k"), ("3", "t", "other")))
    first = log.fetch("c", "p1")
    assert [d.event_id for d in first] == ["1", "3"]
    assert log.fetch("c", "p2") == []  # "2" waits behind "1"
    log.ack("c", [first[0].seq])
    assert [d.event_id for d in log.fetch("c", "p2")] == ["2"]


def test_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    log = SqliteLog(path)
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", None), ("2", "t", None)))
    [one, _] = log.fetch("c", "p", lease_seconds=0)
    log.ack("c", [one.seq], handled_ids=["1"])
    log.close()
    reopened = SqliteLog(path)
    assert [d.event_id for d in reopened.fetch("c", "p")] == ["2"]
    assert reopened.was_handled("c", "1")
    assert not reopened.was_handled("c", "2")
    reopened.close()


def test_changing_a_durable_pattern_is_refused(log: SqliteLog) -> None:
    log.ensure_consumer("c", "a.*")
    log.ensure_consumer("c", "a.*")  # the same again is fine (a restart)
    with pytest.raises(ValueError, match=r"already exists with pattern 'a\.\*'"):
        log.ensure_consumer("c", "b.*")
    with pytest.raises(LookupError, match="no durable subscription named 'nope'"):
        log.fetch("nope", "p")


def _compete(path: str, holder: str, start: Any, out: multiprocessing.Queue[list[str]]) -> None:
    log = SqliteLog(path)
    start.wait(10)  # all processes begin together
    got: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = log.fetch("workers", holder, limit=7, lease_seconds=30)
        if not batch:
            if log.pending("workers") == 0:
                break
            continue
        got.extend(d.event_id for d in batch)
        time.sleep(0.002)  # stands in for handling the batch, outside the write lock
        log.ack("workers", [d.seq for d in batch])
    log.close()
    out.put(got)


def test_competing_processes_share_without_duplicates(tmp_path: Path) -> None:
    path = str(tmp_path / "bus.db")
    log = SqliteLog(path)
    log.ensure_consumer("workers", "jobs.>")
    log.append(rows(*((f"e{n}", "jobs.run", None) for n in range(500))))
    log.close()
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[list[str]] = context.Queue()
    start = context.Barrier(3)
    processes = [
        context.Process(target=_compete, args=(path, f"proc{n}", start, out)) for n in range(3)
    ]
    for process in processes:
        process.start()
    results = [out.get(timeout=30) for _ in processes]
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == 0
    everything = [event_id for result in results for event_id in result]
    assert sorted(everything) == sorted(f"e{n}" for n in range(500))  # each exactly once
    assert sum(1 for result in results if result) >= 2  # the work was shared
