"""The SQLite event log under the sqlite:// backend (`eventwire.backends.sqlite_log`): what
only it has, called directly: ids stored once, competing processes on one file, the cost of a
fetch over a large backlog, per-key order across processes, group commits and its file layout.
The contract every backend keeps is in test_backend_contract.py."""

from __future__ import annotations

import itertools
import multiprocessing
import random
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eventwire.backends import sqlite_log
from eventwire.backends.sqlite_log import Leased, PatternConflictError, SchemaError, SqliteLog


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
    log.ensure_consumer("c", "t.*", start="earliest")
    assert log.append(rows(("a", "t.x", None), ("b", "t.x", None))) == 2
    assert log.append(rows(("a", "t.x", None), ("c", "t.x", None), ("c", "t.x", None))) == 1
    assert [d.event_id for d in log.fetch("c", "p")] == ["a", "b", "c"]


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


# -- fetch cost and a large backlog ----------------------------------------------------------


def test_fetch_moves_only_what_it_leases_from_a_large_backlog(log: SqliteLog) -> None:
    log.ensure_consumer("c", "big.*")
    log.append(rows(*((f"e{n}", "big.x" if n % 3 else "other", None) for n in range(30_000))))
    assert log.consumers() == [("c", "big.*", 20_000)]
    first = log.fetch("c", "p", limit=500)
    assert [d.event_id for d in first] == [f"e{n}" for n in range(1, 751) if n % 3][:500]
    # The rest of the backlog stays past the cursor: no delivery rows for it yet.
    assert log.pending("c") == 500
    assert log.consumers() == [("c", "big.*", 20_000)]  # leased ones are still outstanding
    log.ack("c", [d.seq for d in first])
    assert log.consumers() == [("c", "big.*", 19_500)]
    seen = [d.event_id for d in first]
    while batch := log.fetch("c", "p", limit=512):
        seen.extend(d.event_id for d in batch)
        log.ack("c", [d.seq for d in batch])
    assert seen == [f"e{n}" for n in range(30_000) if n % 3]  # each once, in order
    assert log.pending("c") == 0
    assert log.consumers() == [("c", "big.*", 0)]


def test_a_fetch_goes_past_more_unmatched_events_than_one_scan_budget(log: SqliteLog) -> None:
    log.ensure_consumer("rare", "rare")
    noise = sqlite_log._SCAN_BUDGET * 2 + 10
    log.append(rows(*((f"n{n}", "noise", None) for n in range(noise)), ("hit", "rare", None)))
    assert [d.event_id for d in log.fetch("rare", "p")] == ["hit"]
    assert log.fetch("rare", "p") == []


def test_visible_again_comes_before_new_events_and_counts_attempts(log: SqliteLog) -> None:
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", None), ("2", "t", None)))
    [one] = log.fetch("c", "p", limit=1)
    log.append(rows(("3", "t", None)))
    log.nak("c", one.seq, "p")
    again = log.fetch("c", "p", limit=10)
    assert [(d.event_id, d.attempts) for d in again] == [("1", 2), ("2", 1), ("3", 1)]
    log.release("c", "p")
    assert [(d.event_id, d.attempts) for d in log.fetch("c", "q")] == [
        ("1", 3),
        ("2", 2),
        ("3", 2),
    ]


def test_extend_renews_only_the_holders_leases(log: SqliteLog) -> None:
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", None), ("2", "t", None)))
    [one] = log.fetch("c", "p1", limit=1, lease_seconds=0.3)
    [two] = log.fetch("c", "p2", limit=1, lease_seconds=0.3)
    time.sleep(0.15)
    log.extend("c", [one.seq, two.seq], "p1", 5)  # p2's lease is not p1's to renew
    time.sleep(0.2)  # the lease itself is what this test is about
    assert [d.event_id for d in log.fetch("c", "p3")] == ["2"]


def test_a_late_ack_of_a_lease_taken_over_does_not_count(log: SqliteLog) -> None:
    # p1 stands for a process frozen past its lease: "1" went to p2, which handles it now.
    # p1's late ack must neither finish p2's delivery nor let "2" (same key) go while p2
    # still works on "1": the key would be handled in two processes at once.
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", "k"), ("2", "t", "k")))
    [stale] = log.fetch("c", "p1", limit=1, lease_seconds=0.1)
    assert log.fetch("c", "p2") == []  # "2" is blocked behind p1's "1"
    time.sleep(0.15)  # the lease running out is what this test is about
    taken = log.fetch("c", "p2")
    assert [(d.event_id, d.attempts) for d in taken] == [("1", 2), ("2", 1)]
    assert log.ack("c", [stale.seq], "p1", keys=[stale.key]) == 0
    assert log.ack("c", [stale.seq], "p1") == 0  # keys not given: read, same answer
    assert log.pending("c") == 2  # p2's "1" and "2", both still owed
    assert log.fetch("c", "p1") == []
    assert log.ack("c", [d.seq for d in taken], "p2", keys=[d.key for d in taken]) == 0
    assert log.pending("c") == 0


def test_a_late_ack_unblocks_the_key_only_if_nobody_took_the_lease_over(
    log: SqliteLog,
) -> None:
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", "k"), ("2", "t", "k")))
    [late] = log.fetch("c", "p1", limit=1, lease_seconds=0.1)
    assert log.fetch("c", "p2") == []  # "2" is blocked behind p1's "1"
    time.sleep(0.15)  # the lease running out is what this test is about
    # Nobody holds "1" now but p1 (whose lease ran out): its handled ack counts.
    assert log.ack("c", [late.seq], "p1", keys=[late.key]) == 1
    assert [(d.event_id, d.attempts) for d in log.fetch("c", "p2")] == [("2", 1)]


def test_a_late_ack_of_a_delivery_given_back_meanwhile_does_not_count(
    log: SqliteLog,
) -> None:
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", None)))
    [stale] = log.fetch("c", "p1", lease_seconds=0.1)
    time.sleep(0.15)  # the lease running out is what this test is about
    [taken] = log.fetch("c", "p2")
    log.nak("c", taken.seq, "p2")  # p2 gave it back: it waits for whoever fetches next
    log.ack("c", [stale.seq], "p1", handled_ids=["1"])
    assert log.pending("c") == 1
    assert log.was_handled("c", "1")  # it was handled in p1 all the same
    assert [(d.event_id, d.attempts) for d in log.fetch("c", "p3")] == [("1", 3)]


# -- per-key order -----------------------------------------------------------------------------


def test_a_key_stays_with_the_holder_of_its_earlier_deliveries(log: SqliteLog) -> None:
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", "k"), ("2", "t", "k"), ("3", "t", "other")))
    first = log.fetch("c", "p1")
    assert [d.event_id for d in first] == ["1", "2", "3"]  # publish order, keys and all
    log.append(rows(("4", "t", "k"), ("5", "t", None), ("6", "t", "k")))
    assert [d.event_id for d in log.fetch("c", "p2")] == ["5"]  # "4" and "6" wait for p1's k
    assert log.fetch("c", "p1") == []  # blocked for p1 too: they come after "5" now
    assert log.ack("c", [first[0].seq]) == 0  # "2" is still owed ahead of them
    assert log.fetch("c", "p2") == []
    assert log.ack("c", [first[1].seq]) == 1  # "4" unblocked
    assert [(d.event_id, d.attempts) for d in log.fetch("c", "p2")] == [("4", 1), ("6", 1)]
    assert log.fetch("c", "p1") == []


def test_blocked_deliveries_wait_through_naks_and_expiry_and_follow_the_first(
    log: SqliteLog,
) -> None:
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", "k"), ("2", "t", "k"), ("3", "t", "k")))
    [first] = log.fetch("c", "p1", limit=1)
    assert log.fetch("c", "p2") == []  # "2" and "3" are stored blocked behind p1's "1"
    log.nak("c", first.seq, "p2", delay=0)  # not p2's to give back: nothing changes
    assert log.fetch("c", "p2") == []
    log.nak("c", first.seq, "p1", delay=0.1)
    assert log.fetch("c", "p2") == []  # "1" waits, still ahead of them
    time.sleep(0.15)  # the delay itself is what this test is about
    got = log.fetch("c", "p2", lease_seconds=0.1)
    assert [(d.event_id, d.attempts) for d in got] == [("1", 2), ("2", 1), ("3", 1)]
    time.sleep(0.15)  # the lease itself is what this test is about
    assert [(d.event_id, d.attempts) for d in log.fetch("c", "p3", limit=1)] == [("1", 3)]
    assert log.fetch("c", "p4") == []  # "2" and "3" are visible, but "1" is p3's
    again = log.fetch("c", "p3")
    assert [(d.event_id, d.attempts) for d in again] == [("2", 2), ("3", 2)]
    assert log.ack("c", [first.seq, *(d.seq for d in again)]) == 0
    assert log.pending("c") == 0


def test_per_key_order_with_many_keys_and_competing_holders(log: SqliteLog) -> None:
    log.ensure_consumer("c", "orders.*")
    shuffle = random.Random(7)
    keys = [f"k{n}" for n in range(120)]
    # Each key's events in order, keys interleaved at random: the same key comes up again
    # and again within one fetch.
    queues = {key: [f"{key}-{n}" for n in range(8)] for key in keys}
    specs: list[tuple[str, str, str | None]] = []
    while queues:
        key = shuffle.choice(sorted(queues))
        specs.append((queues[key].pop(0), "orders.placed", key))
        if not queues[key]:
            del queues[key]
        if shuffle.random() < 0.1:
            specs.append((f"free{len(specs)}-0", "orders.placed", None))  # no key
    for start in range(0, len(specs), 400):
        log.append(rows(*specs[start : start + 400]))
    # key (or id of an unkeyed event) -> the holder leasing it and what it holds of it, oldest
    # first (a holder handles a key's deliveries in order, as the bus does in a process)
    held: dict[str, tuple[str, list[Leased]]] = {}
    handled: dict[str, list[str]] = defaultdict(list)
    done: list[str] = []
    for turn in range(10_000):
        holder = f"p{turn % 3}"
        for delivery in log.fetch("c", holder, limit=97):
            key = delivery.event_id.rsplit("-", 1)[0]
            owner, queue = held.setdefault(key, (holder, []))
            assert owner == holder, f"{key} leased to {owner} and {holder} at once"
            assert not queue or queue[-1].seq < delivery.seq, f"{key} leased out of order"
            queue.append(delivery)
        # Handlers finish the oldest delivery of about half the keys held, keys in any order.
        busy = sorted(held)
        finished = []
        for key in shuffle.sample(busy, len(busy) // 2 + 1) if busy else []:
            delivery = held[key][1].pop(0)
            if not held[key][1]:
                del held[key]
            handled[key].append(delivery.event_id)
            done.append(delivery.event_id)
            finished.append(delivery.seq)
        log.ack("c", finished)
        if not held and log.pending("c") == 0 and not log.fetch("c", "p", limit=1):
            break
    assert sorted(done) == sorted(event_id for event_id, _, _ in specs)  # each exactly once
    for key in keys:
        assert handled[key] == [f"{key}-{n}" for n in range(8)]  # in publish order


def _keyed_worker(path: str, holder: str, start: Any, out: multiprocessing.Queue[Any]) -> None:
    log = SqliteLog(path)
    start.wait(10)
    spans: list[tuple[str, float, float]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        batch = log.fetch("keyed", holder, limit=5, lease_seconds=30)
        if not batch:
            if log.pending("keyed") == 0:
                break
            time.sleep(0.001)
            continue
        # Keys in any order, each key's own deliveries in order (as the bus does).
        by_key: dict[str, list[Leased]] = defaultdict(list)
        for delivery in batch:
            by_key[delivery.event_id.split("-")[0]].append(delivery)
        for delivery in itertools.chain.from_iterable(reversed(by_key.values())):
            began = time.monotonic()
            time.sleep(0.0005)  # handling
            spans.append((delivery.event_id, began, time.monotonic()))
        log.ack("keyed", [d.seq for d in batch])
    log.close()
    out.put(spans)


def test_per_key_order_holds_across_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "bus.db")
    log = SqliteLog(path)
    log.ensure_consumer("keyed", "k.>")
    # Runs of three events of a key: a batch of five holds several of one key.
    log.append(
        rows(
            *(
                (f"{key}-{n}", "k.x", key)
                for run in range(5)
                for key in "abcdefgh"
                for n in range(run * 3, run * 3 + 3)
            )
        )
    )
    log.close()
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[Any] = context.Queue()
    start = context.Barrier(3)
    processes = [
        context.Process(target=_keyed_worker, args=(path, f"proc{n}", start, out)) for n in range(3)
    ]
    for process in processes:
        process.start()
    results = [out.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == 0
    spans = sorted((span for result in results for span in result), key=lambda s: s[1])
    assert sorted(s[0] for s in spans) == sorted(f"{k}-{n}" for n in range(15) for k in "abcdefgh")
    for key in "abcdefgh":
        mine = [s for s in spans if s[0].startswith(f"{key}-")]
        assert [s[0] for s in mine] == [f"{key}-{n}" for n in range(15)]  # in order
        for before, after in itertools.pairwise(mine):
            assert before[2] <= after[1]  # one at a time, whichever process
    assert sum(1 for result in results if result) >= 2  # the work was shared


# -- bookkeeping -------------------------------------------------------------------------------


def commit_together(log: SqliteLog, *writes: Callable[[], object]) -> None:
    """Run `writes` in threads of their own while the consumers' file is held, so that they
    queue up and then commit in one group."""
    writer = log._state
    threads = [threading.Thread(target=write) for write in writes]
    with writer.lock:  # hold the connection: the writes queue up behind it
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while len(writer._queue) < len(writes) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(writer._queue) == len(writes)
    for thread in threads:
        thread.join(5)


def test_writes_queued_together_commit_together_and_fail_alone(log: SqliteLog) -> None:
    log.ensure_consumer("c", "t")
    errors: list[BaseException] = []

    def call(operation: Any, *args: Any) -> None:
        try:
            operation(*args)
        except BaseException as error:  # collected for the assertions
            errors.append(error)

    commit_together(
        log,
        lambda: call(log.ensure_consumer, "d", "t"),
        lambda: call(log.ensure_consumer, "c", "other"),
        lambda: call(log.ensure_consumer, "e", "t"),
    )
    assert [type(error) for error in errors] == [PatternConflictError]
    assert [name for name, _, _ in log.consumers()] == ["c", "d", "e"]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every INSERT, UPDATE and DELETE the logs opened from now on run, with the connection's
    ``PRAGMA synchronous`` then (FULL: its commit waits for the disk)."""
    seen: list[tuple[str, str]] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = connect(*args, **kwargs)
        level = ["not set"]

        def trace(statement: str) -> None:
            if statement.startswith("PRAGMA synchronous="):
                level[0] = statement.partition("=")[2]
            elif statement.split(" ", 1)[0] in ("INSERT", "UPDATE", "DELETE"):
                seen.append((statement, level[0]))

        db.set_trace_callback(trace)
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)
    return seen


def levels(writes: list[tuple[str, str]], *starts: str) -> set[str]:
    """The synchronous levels of the writes that start with one of `starts`."""
    return {level for statement, level in writes if statement.startswith(starts)}


def test_only_a_fetch_commits_without_waiting_for_the_disk(
    tmp_path: Path, writes: list[tuple[str, str]]
) -> None:
    log = SqliteLog(tmp_path / "bus.db")
    log.ensure_consumer("c", "t", start="earliest")
    log.append(rows(("1", "t", None), ("2", "t", "k"), ("3", "t", "k")))
    first = log.fetch("c", "p", limit=2)
    log.nak("c", first[0].seq, "p")
    [again] = log.fetch("c", "p", limit=1)
    log.ack("c", [again.seq], handled_ids=["1"])
    log.ack("c", [first[1].seq])  # key k: its next delivery is looked for
    log.ack("c", [], handled_ids=["2"])
    log.close()
    # Losing a fetch's transaction to a power loss only delivers again: it need not wait.
    assert levels(writes, "INSERT INTO deliveries", "UPDATE consumers SET cursor") == {"NORMAL"}
    assert levels(writes, "UPDATE deliveries SET attempts") == {"NORMAL"}
    # What a power loss must not take back waits for the disk.
    assert levels(writes, "INSERT INTO events", "INSERT INTO consumers") == {"FULL"}
    assert levels(writes, "DELETE FROM deliveries", "INSERT OR IGNORE INTO handled") == {"FULL"}
    # Naks and unblocking a key's next delivery.
    assert levels(writes, "UPDATE deliveries SET visible_at") == {"FULL"}


def test_a_fetch_committed_with_an_acknowledgement_waits_for_the_disk(
    log: SqliteLog, writes: list[tuple[str, str]]
) -> None:
    log.ensure_consumer("c", "t", start="earliest")
    log.append(rows(("1", "t", None), ("2", "t", None)))
    [first] = log.fetch("c", "p", limit=1)
    traced = SqliteLog(log.path)  # its connections are traced
    commit_together(traced, lambda: traced.fetch("c", "p"), lambda: traced.ack("c", [first.seq]))
    traced.close()
    assert levels(writes, "INSERT INTO deliveries", "DELETE FROM deliveries") == {"FULL"}
    assert log.pending("c") == 1


def test_publishing_and_consuming_use_separate_files(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "bus.db")
    log.ensure_consumer("c", "t")
    # A transaction on the consumers' file does not stop a publish (nor the reverse).
    with log._state.lock:
        log._state.db.execute("BEGIN IMMEDIATE")
        assert log.append(rows(("1", "t", None))) == 1
        log._state.db.execute("ROLLBACK")
    assert [d.event_id for d in log.fetch("c", "p")] == ["1"]
    log.close()
    assert (tmp_path / "bus.db").exists()
    assert (tmp_path / "bus.db-consumers").exists()


def test_a_file_of_the_previous_layout_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, id TEXT, topic TEXT, body BLOB)")
    old.execute("CREATE TABLE deliveries (consumer TEXT, seq INTEGER)")
    old.commit()
    old.close()
    with pytest.raises(SchemaError, match=r"old\.db holds an eventwire log of another version"):
        SqliteLog(path)


def test_changes_tell_new_topics_and_the_consumers_whose_deliveries_became_visible(
    log: SqliteLog,
) -> None:
    for name in ("a", "b", "c"):
        log.ensure_consumer(name, "t.*")
    start = log.last_seq()
    log.append(rows(("1", "t.x", None), ("2", "t.y", None), ("3", "t.x", None)))
    last, topics, due = log.changes(start, time.time(), time.time(), 100)
    assert last == start + 3
    assert sorted(topics or []) == ["t.x", "t.y"]
    assert due == []  # nothing leased yet: the new events are the news
    assert log.changes(last, 0, time.time(), 1)[1] == []
    assert log.changes(start, 0, time.time(), 2)[1] is None  # more than asked for: unknown

    since = time.time()
    [first] = log.fetch("a", "p", limit=1)
    log.fetch("b", "p", limit=1, lease_seconds=0.01)  # its process dies: the lease runs out
    log.fetch("c", "p", limit=1)
    log.nak("a", first.seq, "p")  # visible at once
    log.release("c", "p")  # given back: visible at once
    now = time.time() + 0.01
    assert sorted(log.changes(last, since, now, 100)[2]) == ["a", "b", "c"]
    # What became visible before the span is not told again.
    assert log.changes(last, now, now + 0.01, 100)[2] == []


def test_an_acknowledgement_that_unblocks_a_key_tells_its_consumer(log: SqliteLog) -> None:
    log.ensure_consumer("c", "t")
    log.append(rows(("1", "t", "k"), ("2", "t", "k")))
    [one] = log.fetch("c", "p", limit=1)
    assert log.fetch("c", "q", limit=1) == []  # "2" is blocked behind "1", held by p
    since = time.time()
    assert log.changes(log.last_seq(), since, time.time(), 10)[2] == []
    log.ack("c", [one.seq], "p")
    assert log.changes(log.last_seq(), since, time.time(), 10)[2] == ["c"]
