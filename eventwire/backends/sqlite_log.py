"""The storage layer of the ``sqlite://`` backend: a durable event log in one SQLite file.

Several processes on one machine may share the file. Every operation is one transaction, so a
process killed at any point leaves the log consistent:

- `append` stores events and returns once the transaction has committed;
- a *consumer* (a durable subscription name) has a cursor into the log; `fetch` moves the events
  past the cursor that match its pattern into its delivery list, then leases a batch of them to
  the caller for `lease_seconds`;
- `ack` removes deliveries; `nak` makes one visible again after a delay; a delivery whose lease
  runs out (its process died) becomes visible again by itself, to any process of the consumer;
- competing processes of one consumer never hold the same delivery at the same time, and a
  delivery with a `key` is not leased while an earlier one of the same key is leased or
  waiting, so per-key order holds across processes.

Blocking sqlite3 calls; the backend runs them in a worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from eventwire.topics import pattern_matches, validate_pattern

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    key TEXT,
    created_ns INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    pattern TEXT NOT NULL,
    cursor INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    consumer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL DEFAULT 0,
    leased_by TEXT,
    PRIMARY KEY (consumer, seq)
);
CREATE INDEX IF NOT EXISTS deliveries_visible ON deliveries (consumer, visible_at, seq);
CREATE TABLE IF NOT EXISTS handled (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
"""


@dataclass(frozen=True, slots=True)
class Leased:
    """One delivery leased to a caller: the stored event and how often it was delivered."""

    consumer: str
    seq: int
    event_id: str
    topic: str
    body: bytes
    attempts: int


Start = Literal["latest", "earliest"] | int


class SqliteLog:
    """A durable, multi-process event log in one SQLite file (WAL mode)."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before append() returns, so a crash right after loses
        # nothing that was acknowledged to a publisher.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    def append(self, events: Iterable[tuple[str, str, str | None, int, bytes]]) -> list[int]:
        """Store ``(id, topic, key, created_ns, body)`` rows; their sequence numbers, once
        committed. An id already stored is not stored twice (a retried publish)."""
        with self._transaction() as db:
            seqs: list[int] = []
            for event_id, topic, key, created_ns, body in events:
                row = db.execute(
                    "INSERT INTO events (id, topic, key, created_ns, body) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT(id) DO NOTHING RETURNING seq",
                    (event_id, topic, key, created_ns, body),
                ).fetchone()
                if row is None:
                    row = db.execute("SELECT seq FROM events WHERE id = ?", (event_id,)).fetchone()
                seqs.append(int(row[0]))
            return seqs

    def ensure_consumer(self, name: str, pattern: str, start: Start = "latest") -> None:
        """Create the durable consumer `name` if new (a restart resumes where it was).

        `start`: ``"latest"`` (events appended from now on), ``"earliest"`` (everything the
        log holds) or a ``time.time_ns()`` value (events created at or after it).
        """
        validate_pattern(pattern)
        with self._transaction() as db:
            row = db.execute("SELECT pattern FROM consumers WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if row[0] != pattern:
                    raise ValueError(
                        f"durable subscription {name!r} already exists with pattern {row[0]!r}, "
                        f"not {pattern!r}; use another name, or remove the old one first"
                    )
                return
            if start == "earliest":
                cursor = 0
            elif start == "latest":
                cursor = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
            elif isinstance(start, int):
                cursor = int(
                    db.execute(
                        "SELECT COALESCE(MAX(seq), 0) FROM events WHERE created_ns < ?", (start,)
                    ).fetchone()[0]
                )
            else:
                raise ValueError(
                    f"start must be 'latest', 'earliest' or a time in ns, got {start!r}"
                )
            db.execute(
                "INSERT INTO consumers (name, pattern, cursor) VALUES (?, ?, ?)",
                (name, pattern, cursor),
            )

    def fetch(
        self, name: str, holder: str, *, limit: int = 100, lease_seconds: float = 30.0
    ) -> list[Leased]:
        """Lease up to `limit` visible deliveries of consumer `name` to `holder`, oldest first."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT pattern, cursor FROM consumers WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise LookupError(f"no durable subscription named {name!r}; create it first")
            pattern, cursor = row
            new = db.execute(
                "SELECT seq, topic, key FROM events WHERE seq > ? ORDER BY seq", (cursor,)
            ).fetchall()
            if new:
                db.executemany(
                    "INSERT OR IGNORE INTO deliveries (consumer, seq, key) VALUES (?, ?, ?)",
                    [
                        (name, seq, key)
                        for seq, topic, key in new
                        if pattern_matches(pattern, topic)
                    ],
                )
                db.execute("UPDATE consumers SET cursor = ? WHERE name = ?", (new[-1][0], name))
            candidates = db.execute(
                "SELECT d.seq, d.key, d.attempts, e.id, e.topic, e.body FROM deliveries d"
                " JOIN events e ON e.seq = d.seq"
                " WHERE d.consumer = ? AND d.visible_at <= ? ORDER BY d.seq LIMIT ?",
                (name, now, limit * 4),
            ).fetchall()
            # A keyed delivery waits while an earlier delivery of its key is still owed.
            first_of_key = dict(
                db.execute(
                    "SELECT key, MIN(seq) FROM deliveries WHERE consumer = ? AND key IS NOT NULL"
                    " GROUP BY key",
                    (name,),
                ).fetchall()
            )
            leased: list[Leased] = []
            for seq, key, attempts, event_id, topic, body in candidates:
                if key is not None and first_of_key.get(key) != seq:
                    continue
                leased.append(Leased(name, seq, event_id, topic, bytes(body), attempts + 1))
                if len(leased) == limit:
                    break
            db.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, visible_at = ?, leased_by = ?"
                " WHERE consumer = ? AND seq = ?",
                [(now + lease_seconds, holder, name, item.seq) for item in leased],
            )
            return leased

    def ack(self, name: str, seqs: Sequence[int], *, handled_ids: Sequence[str] = ()) -> None:
        """Finish deliveries; `handled_ids` are recorded for idempotent subscriptions."""
        with self._transaction() as db:
            db.executemany(
                "DELETE FROM deliveries WHERE consumer = ? AND seq = ?",
                [(name, seq) for seq in seqs],
            )
            db.executemany(
                "INSERT OR IGNORE INTO handled (consumer, event_id) VALUES (?, ?)",
                [(name, event_id) for event_id in handled_ids],
            )

    def nak(self, name: str, seq: int, *, delay: float = 0.0) -> None:
        """Make a leased delivery visible again after `delay` seconds."""
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET visible_at = ?, leased_by = NULL"
                " WHERE consumer = ? AND seq = ?",
                (time.time() + delay, name, seq),
            )

    def extend(self, name: str, seqs: Sequence[int], holder: str, lease_seconds: float) -> None:
        """Restart the lease of deliveries `holder` still holds."""
        until = time.time() + lease_seconds
        with self._transaction() as db:
            db.executemany(
                "UPDATE deliveries SET visible_at = ? WHERE consumer = ? AND seq = ?"
                " AND leased_by = ?",
                [(until, name, seq, holder) for seq in seqs],
            )

    def release(self, name: str, holder: str) -> None:
        """Make every delivery `holder` still leases visible again (it is going away)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET visible_at = 0, leased_by = NULL"
                " WHERE consumer = ? AND leased_by = ?",
                (name, holder),
            )

    def handled_among(self, name: str, event_ids: Sequence[str]) -> set[str]:
        """Which of `event_ids` were acknowledged as handled by consumer `name`."""
        with self._lock:
            return {
                event_id
                for event_id in event_ids
                if self._db.execute(
                    "SELECT 1 FROM handled WHERE consumer = ? AND event_id = ?", (name, event_id)
                ).fetchone()
            }

    def consumers(self) -> list[tuple[str, str, int]]:
        """``(name, pattern, outstanding)`` of every consumer: deliveries not acknowledged,
        and events past its cursor that match its pattern."""
        with self._lock:
            rows = self._db.execute("SELECT name, pattern, cursor FROM consumers").fetchall()
            result = []
            for name, pattern, cursor in rows:
                owed = self._db.execute(
                    "SELECT COUNT(*) FROM deliveries WHERE consumer = ?", (name,)
                ).fetchone()[0]
                owed += sum(
                    1
                    for (topic,) in self._db.execute(
                        "SELECT topic FROM events WHERE seq > ?", (cursor,)
                    )
                    if pattern_matches(pattern, topic)
                )
                result.append((name, pattern, int(owed)))
            return result

    def delete_consumer(self, name: str) -> None:
        with self._transaction() as db:
            for table, column in (("consumers", "name"), ("deliveries", "consumer")):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))
            db.execute("DELETE FROM handled WHERE consumer = ?", (name,))

    def destroy(self) -> None:
        """Remove every event, consumer and delivery."""
        with self._transaction() as db:
            for table in ("events", "consumers", "deliveries", "handled"):
                db.execute(f"DELETE FROM {table}")

    def was_handled(self, name: str, event_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM handled WHERE consumer = ? AND event_id = ?", (name, event_id)
            ).fetchone()
        return row is not None

    def pending(self, name: str) -> int:
        """Deliveries of `name` not yet acknowledged (leased or waiting)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE consumer = ?", (name,)
            ).fetchone()
        return int(row[0])


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: takes the write lock up front, so two processes never
    both read a cursor and then both move it."""

    def __init__(self, log: SqliteLog) -> None:
        self._log = log

    def __enter__(self) -> sqlite3.Connection:
        self._log._lock.acquire()
        try:
            self._log._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._log._lock.release()
            raise
        return self._log._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._log._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            self._log._lock.release()
