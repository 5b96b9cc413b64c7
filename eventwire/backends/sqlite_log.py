"""The storage layer of the ``sqlite://`` backend: a durable event log in SQLite, WAL mode.

Two files: the events in ``<path>`` (written by publishers only) and the consumers' state in
``<path>-consumers`` (cursors, deliveries, handled ids), so that publishing and consuming never
wait for each other's write lock. Several processes on one machine may share them. Every
operation runs in a transaction of one file and returns once that has committed, so a process
killed at any point leaves both consistent:

- `append` stores events (each id once) and returns once they are committed;
- a *consumer* (a durable subscription name) has a cursor into the log; `fetch` leases to the
  caller, for `lease_seconds`, first the consumer's deliveries that are visible again (nak,
  expired lease, release), then events past the cursor that match its pattern, moving the
  cursor over them: only as many as it leases, so a fetch costs the same whatever the backlog;
- `ack` removes deliveries; `nak` makes one visible again after a delay; a delivery whose lease
  runs out (its process died) becomes visible again by itself, to any process of the consumer;
  `ack`, `nak` and `extend` only touch deliveries still leased to their caller, so that a
  process that was stopped past its leases cannot finish or give back what another took;
- competing processes of one consumer never hold the same delivery at the same time, and the
  deliveries of one `key` are leased to one holder at a time, oldest first, so per-key order
  holds across processes (the holder handles what it leased of a key in order, as the bus
  does within a process). A keyed event whose key's owed deliveries are all leased to the
  fetching holder is leased to it as well: a holder's fetches keep publish order whatever the
  keys. One whose key is owed elsewhere (leased to another holder, or waiting) is stored
  *blocked* (never visible); acknowledging the last delivery owed ahead of a key's blocked
  ones unblocks the first of them, and whoever leases it takes the blocked ones after it too.

Events are only ever appended, with sequence numbers in commit order (appends hold the write
lock of the events file), so reading past a cursor sees a prefix of the log.

Durability (``synchronous=FULL``): a commit is on disk before the operation returns, so that
not even a power loss takes back a stored event, an acknowledgement, a handled id or a new
consumer. The one exception is the transaction of a fetch (leasing, moving the cursor): it
commits without waiting for the disk, because losing it can only deliver again (at least
once): its leases, attempt counts and cursor move are forgotten together, and the events are
leased again. It is on disk with the next commit of that file that waits (an acknowledgement),
and a process crash loses nothing of it (the operating system holds it); only a power loss
before that commit can. This takes one fsync off the way from publish to handler.

Writes commit in groups: operations that threads of one process start while a transaction on
the same file is running wait for it, then run together in the next one (each in a savepoint
of its own, so that one failing leaves the others alone) and share its commit. Reads use a
connection of their own and never wait for a write.

Blocking sqlite3 calls; the backend runs them in worker threads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from eventwire.backends.base import PRESENCE_KEPT
from eventwire.topics import pattern_matches, validate_pattern

# `PRAGMA user_version` of both files. A file made by an earlier eventwire (one file, whose
# delivery table had no blocked state) is refused with a clear error rather than misread.
SCHEMA_VERSION = 2
CONSUMERS_SUFFIX = "-consumers"

_EVENTS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        topic TEXT NOT NULL,
        key TEXT,
        created_ns INTEGER NOT NULL,
        body BLOB NOT NULL
    )""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
# Deliveries are the events a consumer took past its cursor and has not acknowledged yet.
# `visible_at` is when one may be leased (again): a lease's expiry, a nak's delay, when it was
# given back or unblocked (the time then, so that other processes can tell what became
# visible since they last looked: `changes`; an earlier eventwire stored 0), or
# +inf while it is blocked behind earlier deliveries of its key (a key's blocked deliveries
# always come after all its others).
_CONSUMERS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS consumers (
        name TEXT PRIMARY KEY,
        pattern TEXT NOT NULL,
        cursor INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS deliveries (
        consumer TEXT NOT NULL,
        seq INTEGER NOT NULL,
        key TEXT,
        attempts INTEGER NOT NULL,
        visible_at REAL NOT NULL,
        leased_by TEXT,
        PRIMARY KEY (consumer, seq)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS deliveries_visible ON deliveries (consumer, visible_at, seq)",
    "CREATE INDEX IF NOT EXISTS deliveries_key ON deliveries (consumer, key, seq)"
    " WHERE key IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS handled (
        consumer TEXT NOT NULL,
        event_id TEXT NOT NULL,
        PRIMARY KEY (consumer, event_id)
    ) WITHOUT ROWID""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
# Deliveries by when they become visible: which consumers have some that became visible in a
# span of time (`SqliteLog.changes`), without reading every consumer's. Made on open, so that
# files made before it get it too.
_DUE_INDEX = "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (visible_at, consumer)"
_TABLES = ("events", "consumers", "deliveries", "handled")
# Which processes run which consumers (made on first use: files of this schema version made
# before it have none).
_PRESENCE_SCHEMA = """CREATE TABLE IF NOT EXISTS presence (
    consumer TEXT NOT NULL,
    process TEXT NOT NULL,
    seen REAL NOT NULL,
    PRIMARY KEY (consumer, process)
) WITHOUT ROWID"""
# Whether each consumer is a group's (1) or one subscription's own (0), made on first use like
# `presence`: a consumer without a row was made before eventwire recorded it.
_KINDS_SCHEMA = """CREATE TABLE IF NOT EXISTS consumer_kinds (
    name TEXT PRIMARY KEY,
    grouped INTEGER NOT NULL
) WITHOUT ROWID"""

# Restarts of deliveries that came back, counted before their handler starts again (poison
# events), made on first use like `presence`; a row goes with its delivery's ack.
_RESTARTS_SCHEMA = """CREATE TABLE IF NOT EXISTS restarts (
    consumer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (consumer, seq)
) WITHOUT ROWID"""

_BLOCKED = float("inf")
# Rows one INSERT statement stores (a statement binds at most 999 values on old SQLite). Each
# statement is a round trip between Python and SQLite that gives the GIL up and takes it back,
# which is what costs when the event loop's thread is busy: fewer, larger statements.
_ROWS_PER_INSERT = 100
# Events past its cursor one fetch transaction examines at most (matching or not), so that a
# consumer skipping a large backlog of other topics never holds the write lock for long.
_SCAN_BUDGET = 4096
# New events read per query while a fetch looks for more to lease.
_SCAN_MIN = 64
# (pattern, topic) pairs whose match is remembered (per log), before the memo starts over.
_MATCH_MEMO = 8192

T = TypeVar("T")
Start = Literal["latest", "earliest"] | int


@dataclass(slots=True)
class Leased:
    """One delivery leased to a caller: the stored event and how often it was delivered."""

    consumer: str
    seq: int
    event_id: str
    topic: str
    body: bytes
    attempts: int
    key: str | None = None


class PatternConflictError(ValueError):
    """A consumer exists under this name with another pattern, or as another kind (a
    group's where one subscription's own is wanted, or the reverse)."""

    def __init__(
        self, name: str, existing: str, wanted: str, existing_group: bool | None = None
    ) -> None:
        if existing != wanted:
            what = f"with pattern {existing!r}, not {wanted!r}"
        else:
            what = "as a group's consumer" if existing_group else "as one subscription's"
        super().__init__(
            f"durable consumer {name!r} already exists {what}; use another name, or remove "
            "the old one first"
        )
        self.name = name
        self.existing = existing
        self.wanted = wanted
        self.existing_group = existing_group


class SchemaError(RuntimeError):
    """A file holds an event log of another eventwire version (or something else)."""


class SqliteLog:
    """A durable, multi-process event log in SQLite files (WAL mode); see the module
    docstring."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0) -> None:
        self.path = str(path)
        self.consumers_path = self.path + CONSUMERS_SUFFIX
        self._timeout = busy_timeout
        self._matches: dict[tuple[str, str], bool] = {}
        self._opened: list[sqlite3.Connection] = []
        try:
            self._events = _Writer(self._connect(self.path))
            self._events(_schema(self.path, _EVENTS_SCHEMA))
            self._state = _Writer(self._connect(self.consumers_path, attach_log=True))
            self._state(_schema(self.consumers_path, _CONSUMERS_SCHEMA))
            self._state(lambda db: db.execute(_DUE_INDEX), one_statement=True)
            self._reader = self._connect(self.consumers_path, attach_log=True)
            self._read_lock = threading.Lock()
        except BaseException:
            for db in self._opened:
                db.close()
            raise

    def _connect(self, path: str, *, attach_log: bool = False) -> sqlite3.Connection:
        db = sqlite3.connect(
            _uri(path),
            uri=True,
            timeout=self._timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        self._opened.append(db)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the operation returns, so a crash right after
        # loses nothing that was acknowledged to a publisher.
        db.execute("PRAGMA synchronous=FULL")
        if attach_log:
            # The events, read-only: a write transaction of the consumers' file then never
            # takes the events file's write lock, and reads the events as of its start.
            db.execute("ATTACH DATABASE ? AS log", (_uri(self.path, "ro"),))
        return db

    def close(self) -> None:
        with self._events.lock, self._state.lock, self._read_lock:
            for db in self._opened:
                db.close()

    def _read(self, run: Callable[[sqlite3.Connection], T], *, snapshot: bool = False) -> T:
        """`run(db)` on the read connection, which sees the last commits. `snapshot`: in one
        read transaction, for a consistent view over several statements."""
        with self._read_lock:
            db = self._reader
            if not snapshot:
                return run(db)
            db.execute("BEGIN")
            try:
                return run(db)
            finally:
                db.execute("COMMIT")

    def _matches_pattern(self, pattern: str, topic: str) -> bool:
        memo = self._matches
        matched = memo.get((pattern, topic))
        if matched is None:
            if len(memo) >= _MATCH_MEMO:
                memo.clear()
            matched = memo[(pattern, topic)] = pattern_matches(pattern, topic)
        return matched

    def append(self, events: Iterable[tuple[str, str, str | None, int, bytes]]) -> int:
        """Store ``(id, topic, key, created_ns, body)`` rows in one transaction; return once it
        has committed, with how many were new. An id already stored is not stored twice (a
        retried publish)."""
        rows = list(events)

        def run(db: sqlite3.Connection) -> int:
            stored = 0
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start : start + _ROWS_PER_INSERT]
                stored += db.execute(
                    _insert_sql(
                        "INSERT INTO events (id, topic, key, created_ns, body)",
                        5,
                        len(chunk),
                        " ON CONFLICT(id) DO NOTHING",
                    ),
                    list(chain.from_iterable(chunk)),
                ).rowcount
            return stored

        return self._events(run, one_statement=len(rows) <= _ROWS_PER_INSERT)

    def ensure_consumer(
        self, name: str, pattern: str, start: Start = "latest", *, group: bool = False
    ) -> None:
        """Create the durable consumer `name` if new (a restart resumes where it was).

        `start`: ``"latest"`` (events appended from now on), ``"earliest"`` (everything the
        log holds) or a ``time.time_ns()`` value (events created at or after it). `group`:
        whether it is a group's consumer rather than one subscription's; an existing consumer
        of the other kind (or another pattern) raises `PatternConflictError`.
        """
        validate_pattern(pattern)

        def run(db: sqlite3.Connection) -> None:
            db.execute(_KINDS_SCHEMA)
            row = db.execute(
                "SELECT pattern, grouped FROM consumers LEFT JOIN consumer_kinds USING (name)"
                " WHERE name = ?",
                (name,),
            ).fetchone()
            if row is not None:
                existing_group = None if row[1] is None else bool(row[1])
                if row[0] != pattern or existing_group not in (None, group):
                    raise PatternConflictError(name, row[0], pattern, existing_group)
                return
            if start == "earliest":
                cursor = 0
            elif start == "latest":
                cursor = db.execute("SELECT COALESCE(MAX(seq), 0) FROM log.events").fetchone()[0]
            elif isinstance(start, int):
                cursor = db.execute(
                    "SELECT COALESCE(MAX(seq), 0) FROM log.events WHERE created_ns < ?", (start,)
                ).fetchone()[0]
            else:
                raise ValueError(
                    f"start must be 'latest', 'earliest' or a time in ns, got {start!r}"
                )
            db.execute(
                "INSERT INTO consumers (name, pattern, cursor) VALUES (?, ?, ?)",
                (name, pattern, int(cursor)),
            )
            db.execute(
                "INSERT OR REPLACE INTO consumer_kinds (name, grouped) VALUES (?, ?)",
                (name, int(group)),
            )

        self._state(run)

    def fetch(
        self, name: str, holder: str, *, limit: int = 100, lease_seconds: float = 30.0
    ) -> list[Leased]:
        """Lease up to `limit` visible deliveries of consumer `name` to `holder`, oldest first."""
        return self.lease(name, holder, limit=limit, lease_seconds=lease_seconds)[0]

    def lease(
        self,
        name: str,
        holder: str,
        *,
        limit: int = 100,
        lease_seconds: float = 30.0,
        look_first: bool = True,
    ) -> tuple[list[Leased], bool]:
        """`fetch`, and whether it found everything there was to lease: fewer than `limit`
        (nothing more to fetch until something is published, given back or expires).
        `look_first`: read whether there is anything before taking the write lock (what an
        idle poll wants); False when the caller knows there is (it was told of a publish)."""
        if limit < 1:
            return [], False
        look = look_first
        while True:
            # "Nothing to lease" is the usual answer to an idle poll, and needs no write
            # transaction.
            if look and not self._read(lambda db: _has_work(db, name, time.time())):
                return [], True
            leased, more = self._state(
                lambda db: self._lease(db, name, holder, limit, lease_seconds), synced=False
            )
            # `more`: the scan budget ran out on events that did not match; go on (in a new
            # transaction, so that other processes get the write lock in between).
            if leased or not more:
                return leased, len(leased) < limit
            look = True

    def _lease(
        self, db: sqlite3.Connection, name: str, holder: str, limit: int, lease_seconds: float
    ) -> tuple[list[Leased], bool]:
        """The transaction of `fetch`: leases and whether the scan budget ran out."""
        now = time.time()
        until = now + lease_seconds
        row = db.execute(
            "SELECT pattern, cursor, EXISTS (SELECT 1 FROM deliveries"
            " WHERE consumer = ?1 AND visible_at <= ?2) FROM consumers WHERE name = ?1",
            (name, now),
        ).fetchone()
        if row is None:
            raise LookupError(f"no durable subscription named {name!r}; create it first")
        pattern, cursor, again = row
        # Deliveries visible again, all before the cursor: they come first.
        leased = _lease_visible_again(db, name, holder, limit, now, until) if again else []
        if len(leased) >= limit:
            return leased, False
        scan = _Scan(name, holder, cursor, limit - len(leased), now)
        scan.run(db, lambda topic: self._matches_pattern(pattern, topic))
        scan.store(db, until)
        leased.extend(scan.leased)
        return leased, scan.more

    def ack(
        self,
        name: str,
        seqs: Sequence[int],
        holder: str | None = None,
        *,
        handled_ids: Sequence[str] = (),
        keys: Iterable[str | None] | None = None,
        returned: Sequence[int] = (),
    ) -> int:
        """Finish the deliveries `holder` leases; `handled_ids` are recorded for idempotent
        subscriptions. Returns how many deliveries this made visible (the next of a key whose
        first was finished). `keys`: the deliveries' keys (`Leased.key`), if the caller has
        them: not read then. `returned`: those of `seqs` that came back (attempts above 1),
        whose count of restarts goes with them.

        A delivery leased to another holder meanwhile (this one's lease ran out, another
        process took it) is not finished: that process is handling it, and its key's next
        delivery must wait for it. One whose lease ran out but that nobody took yet is
        finished (it was handled, and nobody else holds it). `holder` None (tools that own
        the consumer alone) finishes the deliveries whoever leases them."""
        finished = _json(list(seqs))
        known = None if keys is None else sorted({key for key in keys if key is not None})

        def run(db: sqlite3.Connection) -> int:
            unblocked = 0
            if seqs:
                keys = known
                if keys is None:
                    keys = [
                        key
                        for (key,) in db.execute(
                            "SELECT DISTINCT key FROM deliveries WHERE consumer = ?"
                            " AND seq IN (SELECT value FROM json_each(?))",
                            (name, finished),
                        )
                        if key is not None
                    ]
                removed = db.execute(
                    "DELETE FROM deliveries WHERE consumer = ?1"
                    " AND seq IN (SELECT value FROM json_each(?2))"
                    " AND (?3 IS NULL OR leased_by = ?3)",
                    (name, finished, holder),
                ).rowcount
                # A key whose delivery was not finished here unblocks nothing (the UPDATE
                # below finds its first owed delivery leased, not blocked).
                if keys and removed:
                    # The first delivery still owed for each of these keys, if blocked, may be
                    # leased now.
                    unblocked = db.execute(
                        "UPDATE deliveries SET visible_at = ?4 WHERE consumer = ?1"
                        " AND visible_at = ?3 AND seq IN (SELECT (SELECT MIN(seq) FROM deliveries"
                        " WHERE consumer = ?1 AND key = value) FROM json_each(?2))",
                        (name, _json(keys), _BLOCKED, time.time()),
                    ).rowcount
            if handled_ids:
                db.execute(
                    "INSERT OR IGNORE INTO handled (consumer, event_id)"
                    " SELECT ?, value FROM json_each(?)",
                    (name, _json(list(handled_ids))),
                )
            if returned:
                db.execute(_RESTARTS_SCHEMA)
                # Only those finished: a delivery another holder took keeps its count.
                db.execute(
                    "DELETE FROM restarts WHERE consumer = ?1"
                    " AND seq IN (SELECT value FROM json_each(?2))"
                    " AND seq NOT IN (SELECT seq FROM deliveries WHERE consumer = ?1"
                    " AND seq IN (SELECT value FROM json_each(?2)))",
                    (name, _json(list(returned))),
                )
            return unblocked

        # Unkeyed deliveries (one DELETE) or handled ids (one INSERT) alone: one statement.
        finishing = 0 if not seqs else 1 if known == [] else 2
        statements = finishing + bool(handled_ids) + 2 * bool(returned)
        return self._state(run, one_statement=statements <= 1)

    def count_restart(self, name: str, seq: int) -> int:
        """One more restart of delivery `seq` of consumer `name`; the count now."""

        def run(db: sqlite3.Connection) -> int:
            db.execute(_RESTARTS_SCHEMA)
            (count,) = db.execute(
                "INSERT INTO restarts (consumer, seq, count) VALUES (?, ?, 1)"
                " ON CONFLICT (consumer, seq) DO UPDATE SET count = count + 1 RETURNING count",
                (name, seq),
            ).fetchone()
            return int(count)

        return self._state(run)

    def nak(self, name: str, seq: int, holder: str, *, delay: float = 0.0) -> None:
        """Make a delivery `holder` leases visible again after `delay` seconds. Nothing if it
        was leased to another holder meanwhile (its lease had run out here)."""
        self._state(
            lambda db: db.execute(
                "UPDATE deliveries SET visible_at = ?, leased_by = NULL"
                " WHERE consumer = ? AND seq = ? AND leased_by = ?",
                (time.time() + delay, name, seq, holder),
            ),
            one_statement=True,
        )

    def extend(self, name: str, seqs: Sequence[int], holder: str, lease_seconds: float) -> None:
        """Restart the lease of deliveries `holder` still holds."""
        held = _json(list(seqs))
        self._state(
            lambda db: db.execute(
                "UPDATE deliveries SET visible_at = ? WHERE consumer = ? AND leased_by = ?"
                " AND seq IN (SELECT value FROM json_each(?))",
                (time.time() + lease_seconds, name, holder, held),
            ),
            one_statement=True,
        )

    def release(self, name: str, holder: str) -> None:
        """Make every delivery `holder` still leases visible again (it is going away)."""
        self._state(
            lambda db: db.execute(
                "UPDATE deliveries SET visible_at = ?, leased_by = NULL"
                " WHERE consumer = ? AND leased_by = ?",
                (time.time(), name, holder),
            ),
            one_statement=True,
        )

    def changes(
        self, after: int, visible_since: float, now: float, most: int
    ) -> tuple[int, list[str] | None, list[str]]:
        """What may have given consumers something to lease since an earlier look: the last
        event's seq; the topics of the events after seq `after` (None if there may be over
        `most` of them); and the consumers with deliveries that became visible in
        (`visible_since`, `now`] (a nak's delay or a lease ran out, or they were given back or
        unblocked: each stores the time it became visible). Reads indexes only: the cost
        grows with what changed, not with the consumers or the log."""

        def run(db: sqlite3.Connection) -> tuple[int, list[str] | None, list[str]]:
            last = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM log.events").fetchone()[0])
            topics: list[str] | None = None
            if last - after <= most:
                topics = [
                    topic
                    for (topic,) in db.execute(
                        "SELECT DISTINCT topic FROM log.events WHERE seq > ? AND seq <= ?",
                        (after, last),
                    )
                ]
            due = [
                name
                for (name,) in db.execute(
                    "SELECT DISTINCT consumer FROM deliveries INDEXED BY deliveries_due"
                    " WHERE visible_at > ? AND visible_at <= ?",
                    (visible_since, now),
                )
            ]
            return last, topics, due

        return self._read(run, snapshot=True)

    def last_seq(self) -> int:
        """The seq of the last event appended (0 if none)."""
        row = self._read(
            lambda db: db.execute("SELECT COALESCE(MAX(seq), 0) FROM log.events").fetchone()
        )
        return int(row[0])

    def handled_among(self, name: str, event_ids: Sequence[str]) -> set[str]:
        """Which of `event_ids` were acknowledged as handled by consumer `name`."""
        if not event_ids:
            return set()
        ids = _json(list(event_ids))
        return self._read(
            lambda db: {
                event_id
                for (event_id,) in db.execute(
                    "SELECT event_id FROM handled WHERE consumer = ?"
                    " AND event_id IN (SELECT value FROM json_each(?))",
                    (name, ids),
                )
            }
        )

    def was_handled(self, name: str, event_id: str) -> bool:
        return bool(self.handled_among(name, [event_id]))

    def consumers(self) -> list[tuple[str, str, int]]:
        """``(name, pattern, outstanding)`` of every consumer: deliveries not acknowledged,
        and events past its cursor that match its pattern."""

        def run(db: sqlite3.Connection) -> list[tuple[str, str, int]]:
            result = []
            for name, pattern, cursor in db.execute(
                "SELECT name, pattern, cursor FROM consumers ORDER BY name"
            ).fetchall():
                owed = db.execute(
                    "SELECT COUNT(*) FROM deliveries WHERE consumer = ?", (name,)
                ).fetchone()[0]
                owed += sum(
                    count
                    for topic, count in db.execute(
                        "SELECT topic, COUNT(*) FROM log.events WHERE seq > ? GROUP BY topic",
                        (cursor,),
                    )
                    if self._matches_pattern(pattern, topic)
                )
                result.append((name, pattern, int(owed)))
            return result

        return self._read(run, snapshot=True)

    def pending(self, name: str) -> int:
        """Deliveries of `name` not yet acknowledged (leased, waiting or blocked)."""
        row = self._read(
            lambda db: db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE consumer = ?", (name,)
            ).fetchone()
        )
        return int(row[0])

    def mark_presence(self, process: str, consumers: Sequence[str], seen: float) -> None:
        """Record when `process` last said it runs each of `consumers` (negative: when it
        stopped), and forget processes gone for over a week."""

        def run(db: sqlite3.Connection) -> None:
            db.execute(_PRESENCE_SCHEMA)
            db.executemany(
                "INSERT OR REPLACE INTO presence (consumer, process, seen) VALUES (?, ?, ?)",
                [(name, process, seen) for name in consumers],
            )
            db.execute("DELETE FROM presence WHERE abs(seen) < ?", (abs(seen) - PRESENCE_KEPT,))

        self._state(run)

    def renew_presence(self, process: str, running: int, added: Sequence[str], seen: float) -> bool:
        """`mark_presence` of the `running` consumers of `process`'s last beat and of `added`
        ones, in two statements rather than a row each (a process may run thousands): False,
        changing nothing, if those of the last beat are not all there (one was deleted
        meanwhile, or left)."""

        def run(db: sqlite3.Connection) -> bool:
            db.execute(_PRESENCE_SCHEMA)
            held = db.execute(
                "SELECT COUNT(*) FROM presence WHERE process = ? AND seen > 0", (process,)
            ).fetchone()[0]
            if held != running:
                return False
            db.execute(
                "UPDATE presence SET seen = ? WHERE process = ? AND seen > 0", (seen, process)
            )
            db.execute(
                "INSERT OR REPLACE INTO presence (consumer, process, seen)"
                " SELECT value, ?, ? FROM json_each(?)",
                (process, seen, _json(list(added))),
            )
            db.execute("DELETE FROM presence WHERE abs(seen) < ?", (seen - PRESENCE_KEPT,))
            return True

        return self._state(run)

    def presences(self) -> list[tuple[str, float]]:
        """``(consumer, seen)`` of every process's latest word on every consumer."""

        def run(db: sqlite3.Connection) -> list[tuple[str, float]]:
            try:
                return db.execute("SELECT consumer, seen FROM presence").fetchall()
            except sqlite3.OperationalError:
                return []  # no process has announced itself yet: no table

        return self._read(run)

    def forget_handled(self, name: str) -> None:
        """Forget the handled ids kept for consumer `name`."""

        def run(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM handled WHERE consumer = ?", (name,))

        self._state(run, one_statement=True)

    def delete_consumer(self, name: str) -> None:
        def run(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM consumers WHERE name = ?", (name,))
            db.execute("DELETE FROM deliveries WHERE consumer = ?", (name,))
            db.execute("DELETE FROM handled WHERE consumer = ?", (name,))
            db.execute(_PRESENCE_SCHEMA)
            db.execute("DELETE FROM presence WHERE consumer = ?", (name,))
            db.execute(_KINDS_SCHEMA)
            db.execute("DELETE FROM consumer_kinds WHERE name = ?", (name,))
            db.execute(_RESTARTS_SCHEMA)
            db.execute("DELETE FROM restarts WHERE consumer = ?", (name,))

        self._state(run)

    def destroy(self) -> None:
        """Remove every consumer, delivery and event."""

        def run(db: sqlite3.Connection) -> None:
            db.execute(_PRESENCE_SCHEMA)
            db.execute(_KINDS_SCHEMA)
            db.execute(_RESTARTS_SCHEMA)
            tables = ("consumers", "deliveries", "handled", "presence", "consumer_kinds")
            for table in (*tables, "restarts"):
                db.execute(f"DELETE FROM {table}")

        self._state(run)
        self._events(lambda db: db.execute("DELETE FROM events"))


def _lease_visible_again(
    db: sqlite3.Connection, name: str, holder: str, limit: int, now: float, until: float
) -> list[Leased]:
    """Lease to `holder`, until `until`, the deliveries of `name` it may take again
    (`_lease_again`), oldest first, each counted as one more attempt."""
    again = _lease_again(db, name, holder, limit, now)
    if not again:
        return []
    visible = _json(again)
    db.execute(
        "UPDATE deliveries SET attempts = attempts + 1, visible_at = ?, leased_by = ?"
        " WHERE consumer = ? AND seq IN (SELECT value FROM json_each(?))",
        (until, holder, name, visible),
    )
    return [
        Leased(name, seq, event_id, topic, body, attempts, key)
        for seq, event_id, topic, body, attempts, key in db.execute(
            "SELECT d.seq, e.id, e.topic, e.body, d.attempts, d.key FROM deliveries d"
            " JOIN log.events e ON e.seq = d.seq"
            " WHERE d.consumer = ? AND d.seq IN (SELECT value FROM json_each(?))"
            " ORDER BY d.seq",
            (name, visible),
        )
    ]


class _Scan:
    """A fetch's walk over the events past a consumer's cursor: those matching its pattern
    become deliveries, leased at once (`leased`, `taken`) unless their key is owed elsewhere
    (then stored blocked: `blocked`), until `need` are leased, the log ends, or the scan
    budget runs out (`more`)."""

    def __init__(self, name: str, holder: str, cursor: int, need: int, now: float) -> None:
        self.name = name
        self.holder = holder
        self.cursor = cursor
        self.need = need
        self.now = now
        self.leased: list[Leased] = []
        self.taken: list[int] = []  # new deliveries leased now
        self.blocked: list[int] = []  # new deliveries stored blocked
        self.scanned = 0
        self.more = False
        # key -> every delivery of it owed is leased to `holder`
        self._ours: dict[str, bool] = {}

    def run(self, db: sqlite3.Connection, matches: Callable[[str], bool]) -> None:
        """Walk the log, reading at least `_SCAN_MIN` events per query."""
        while self.need > 0:
            if self.scanned >= _SCAN_BUDGET:
                self.more = True
                return
            count = max(self.need, _SCAN_MIN)
            rows = db.execute(
                "SELECT seq, id, topic, key, body FROM log.events WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (self.cursor, count),
            ).fetchall()
            self._learn_keys(db, {row[3] for row in rows if row[3] is not None})
            self._take(rows, matches)
            if len(rows) < count:
                return

    def _learn_keys(self, db: sqlite3.Connection, keys: set[str]) -> None:
        """Which of `keys` (not met before) have a delivery owed that is not leased to the
        holder: one query for all, which stops at the first such delivery of each key."""
        keys -= self._ours.keys()
        if not keys:
            return
        elsewhere = {
            key
            for (key,) in db.execute(
                "SELECT value FROM json_each(?2) WHERE EXISTS"
                " (SELECT 1 FROM deliveries WHERE consumer = ?1 AND key = value"
                " AND (leased_by IS NOT ?3 OR visible_at <= ?4))",
                (self.name, _json(list(keys)), self.holder, self.now),
            )
        }
        self._ours.update((key, key not in elsewhere) for key in keys)

    def _take(self, rows: list[Any], matches: Callable[[str], bool]) -> None:
        """Move the cursor over `rows` until `need` are leased, sorting out the matching ones."""
        for seq, event_id, topic, key, body in rows:
            self.cursor = seq
            self.scanned += 1
            if not matches(topic):
                continue
            if key is not None and not self._ours[key]:
                self.blocked.append(seq)
                continue
            self.taken.append(seq)
            self.leased.append(Leased(self.name, seq, event_id, topic, body, 1, key))
            self.need -= 1
            if self.need == 0:
                return

    def store(self, db: sqlite3.Connection, until: float) -> None:
        """Store the new deliveries (leased until `until`, or blocked) and the cursor."""
        for new, attempts, visible_at, leased_by in (
            (self.taken, 1, until, self.holder),
            (self.blocked, 0, _BLOCKED, None),
        ):
            if new:
                db.execute(
                    "INSERT INTO deliveries (consumer, seq, key, attempts, visible_at, leased_by)"
                    " SELECT ?, seq, key, ?, ?, ? FROM log.events"
                    " WHERE seq IN (SELECT value FROM json_each(?))",
                    (self.name, attempts, visible_at, leased_by, _json(new)),
                )
        if self.scanned:
            db.execute("UPDATE consumers SET cursor = ? WHERE name = ?", (self.cursor, self.name))


def _lease_again(
    db: sqlite3.Connection, name: str, holder: str, limit: int, now: float
) -> list[int]:
    """Up to `limit` deliveries of consumer `name` that `holder` may lease again (nak, lease
    run out, release, unblocked), oldest first. One with a key only if its key is free for
    `holder` (`_key_free`); then also the key's blocked deliveries, which wait for nothing
    else once every earlier one is `holder`'s. Reads only: the caller leases them."""
    chosen: list[int] = []
    mine: set[int] = set()
    keys: set[str] = set()  # keys of the deliveries chosen
    last = 0
    while len(chosen) < limit:
        wanted = limit - len(chosen)
        # The index range holds only deliveries visible now, not those leased or blocked,
        # however many the consumer owes.
        rows = db.execute(
            "SELECT seq, key FROM deliveries INDEXED BY deliveries_visible"
            " WHERE consumer = ? AND visible_at <= ? AND seq > ? ORDER BY seq LIMIT ?",
            (name, now, last, wanted),
        ).fetchall()
        for seq, key in rows:
            last = seq
            if key is None:
                chosen.append(seq)
            elif _key_free(db, name, key, holder, now, mine, before=seq):
                chosen.append(seq)
                mine.add(seq)
                keys.add(key)
        if len(rows) < wanted:
            break
    for key in keys:
        if len(chosen) >= limit:
            break
        # Every delivery of the key that is not blocked is (now) leased to `holder`.
        if _key_free(db, name, key, holder, now, mine, before=_BLOCKED):
            chosen.extend(
                blocked
                for (blocked,) in db.execute(
                    "SELECT seq FROM deliveries WHERE consumer = ? AND key = ?"
                    " AND visible_at = ? ORDER BY seq LIMIT ?",
                    (name, key, _BLOCKED, limit - len(chosen)),
                )
            )
    return sorted(chosen)


def _key_free(
    db: sqlite3.Connection,
    name: str,
    key: str,
    holder: str,
    now: float,
    mine: set[int],
    *,
    before: float,
) -> bool:
    """Whether `holder` may lease a delivery of `key` at `before`: every delivery of the key
    still owed before it is leased to `holder` (or in `mine`, chosen for it in this fetch),
    and no other holder leases one. Only the deliveries ahead of the key's blocked ones are
    read: blocked deliveries always come last, and nobody leases them."""
    rows = db.execute(
        "SELECT seq, visible_at, leased_by FROM deliveries WHERE consumer = ? AND key = ?"
        " ORDER BY seq",
        (name, key),
    )
    try:
        for seq, visible_at, leased_by in rows:
            if visible_at == _BLOCKED:
                return True
            if seq == before or seq in mine:
                continue
            held = visible_at > now and leased_by is not None
            if (held and leased_by != holder) or (seq < before and not held):
                return False
        return True
    finally:
        rows.close()


def _has_work(db: sqlite3.Connection, name: str, now: float) -> bool:
    """Whether consumer `name` may have something to lease (true if there is no such
    consumer: the fetch itself raises the error)."""
    row = db.execute(
        "SELECT cursor < (SELECT COALESCE(MAX(seq), 0) FROM log.events)"
        " OR EXISTS (SELECT 1 FROM deliveries WHERE consumer = ?1 AND visible_at <= ?2)"
        " FROM consumers WHERE name = ?1",
        (name, now),
    ).fetchone()
    return row is None or bool(row[0])


def _schema(path: str, statements: tuple[str, ...]) -> Callable[[sqlite3.Connection], None]:
    """Creates the tables of a new file; checks an existing one is of this schema."""

    def create(db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA main.user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        marks = ",".join("?" * len(_TABLES))
        tables = db.execute(
            f"SELECT COUNT(*) FROM main.sqlite_master WHERE type = 'table' AND name IN ({marks})",
            _TABLES,
        ).fetchone()[0]
        if version != 0 or tables:
            raise SchemaError(
                f"{path} holds an eventwire log of another version (schema {version}, this "
                f"eventwire uses schema {SCHEMA_VERSION}): use another file, or delete this one "
                "(with its -wal and -shm files) to start over"
            )
        for statement in statements:
            db.execute(statement)

    return create


def _uri(path: str, mode: str = "rwc") -> str:
    return f"{Path(path).absolute().as_uri()}?mode={mode}"


def _json(values: list[int] | list[str]) -> str:
    """A list for ``IN (SELECT value FROM json_each(?))``: one bound value, however long."""
    return json.dumps(values, separators=(",", ":"))


@lru_cache(maxsize=256)
def _insert_sql(head: str, columns: int, rows: int, tail: str = "") -> str:
    """``<head> VALUES (?, ...), ... <tail>``: an INSERT of `rows` rows."""
    row = "(" + ",".join("?" * columns) + ")"
    return f"{head} VALUES {','.join([row] * rows)}{tail}"


class _Writer:
    """The write transactions of one connection, committed in groups.

    A thread calling it queues its operation, then waits for the connection. The first to get
    it runs every operation queued so far in one transaction and one commit; the others find
    theirs done. So concurrent operations of this process share a commit (and its fsync)
    instead of each waiting for its own. A group waits for the disk if any of its operations
    must (``synced``), which also makes every commit before it durable (the WAL is written in
    order)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.lock = threading.Lock()
        self._queue: list[_Write[Any]] = []
        self._queue_lock = threading.Lock()
        self._synced = True  # the connection's `PRAGMA synchronous` is FULL

    def __call__(
        self,
        run: Callable[[sqlite3.Connection], T],
        *,
        synced: bool = True,
        one_statement: bool = False,
    ) -> T:
        """`run(db)` in a write transaction; its result once that has committed (and, if
        `synced`, is on disk). `one_statement`: `run` executes one statement, which is a
        transaction of its own when it commits alone (two statements fewer to send)."""
        write = _Write(run, synced, one_statement)
        with self._queue_lock:
            self._queue.append(write)
        with self.lock:
            if not write.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._commit(batch)
        if write.error is not None:
            raise write.error
        return write.value  # type: ignore[return-value]

    def _commit(self, batch: list[_Write[Any]]) -> None:
        """Run `batch` in one ``BEGIN IMMEDIATE`` ... ``COMMIT`` (the write lock taken up
        front, so that two processes never both read a cursor and then both move it), each
        write in a savepoint of its own when there are several, or a `one_statement` write
        alone as its own transaction; set each one's value or error."""
        db = self.db
        try:
            self._sync(any(write.synced for write in batch))
            if len(batch) == 1 and batch[0].one_statement:
                batch[0].value = batch[0].run(db)
            else:
                _transaction(db, batch)
        except BaseException as error:
            # Nothing of the batch was committed: every write fails (with the first error).
            for write in batch:
                write.value = None
                if write.error is None:
                    write.error = error
        finally:
            for write in batch:
                write.done = True

    def _sync(self, synced: bool) -> None:
        """Make the next commit wait for the disk (FULL), or not (NORMAL: in WAL mode, safe
        from a process crash but not from a power loss)."""
        if synced != self._synced:
            self.db.execute(f"PRAGMA synchronous={'FULL' if synced else 'NORMAL'}")
            self._synced = synced


class _Write(Generic[T]):
    """One write operation, waiting for a group commit or done by one."""

    __slots__ = ("done", "error", "one_statement", "run", "synced", "value")

    def __init__(
        self, run: Callable[[sqlite3.Connection], T], synced: bool, one_statement: bool
    ) -> None:
        self.run = run
        self.synced = synced
        self.one_statement = one_statement
        self.value: T | None = None
        self.error: BaseException | None = None
        self.done = False


def _transaction(db: sqlite3.Connection, batch: list[_Write[Any]]) -> None:
    """`_Writer._commit`'s transaction: raises if it did not commit."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if len(batch) == 1:
            batch[0].value = batch[0].run(db)
        else:
            for write in batch:
                db.execute("SAVEPOINT write")
                try:
                    write.value = write.run(db)
                except Exception as error:
                    db.execute("ROLLBACK TO write")
                    write.error = error
                db.execute("RELEASE write")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
