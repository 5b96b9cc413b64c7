"""The run journal of the ``sqlite://`` backend (`eventwire.backends.journal`): a third file
beside the bus's two, ``<file>-runs``, in WAL mode with ``synchronous=FULL``, so that a
step's record is on disk when `write` returns, and the processes sharing the bus share it.

One thread per process works the file (calls queue for it): SQLite connections are not to be
shared between threads, and one writer at a time is what SQLite allows anyway.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from eventwire.backends.journal import Journal, RunRecord

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    run TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (run, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
"""


class SqliteJournal(Journal):
    """Runs' records in ``<bus file>-runs``."""

    def __init__(self, path: Path, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eventwire-journal")

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._call, work)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            self._db = db
        return work(self._db)

    async def read(self, run: str) -> dict[str, bytes]:
        def work(db: sqlite3.Connection) -> dict[str, bytes]:
            rows = db.execute("SELECT key, value FROM records WHERE run = ?", (run,))
            return {key: bytes(value) for key, value in rows}

        return await self._run(work)

    async def write(self, run: str, key: str, value: bytes, *, replace: bool = False) -> bytes:
        def work(db: sqlite3.Connection) -> bytes:
            if replace:
                db.execute(
                    "INSERT INTO records VALUES (?, ?, ?) "
                    "ON CONFLICT (run, key) DO UPDATE SET value = excluded.value",
                    (run, key, value),
                )
                return value
            # RETURNING gives nothing when the row was there: then read what stands.
            inserted = db.execute(
                "INSERT INTO records VALUES (?, ?, ?) ON CONFLICT DO NOTHING RETURNING value",
                (run, key, value),
            ).fetchone()
            if inserted is not None:
                return value
            row = db.execute(
                "SELECT value FROM records WHERE run = ? AND key = ?", (run, key)
            ).fetchone()
            return bytes(row[0])

        return await self._run(work)

    async def put_blob(self, digest: str, data: bytes) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO blobs VALUES (?, ?) ON CONFLICT DO NOTHING", (digest, data))

        await self._run(work)

    async def get_blob(self, digest: str) -> bytes | None:
        def work(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT data FROM blobs WHERE digest = ?", (digest,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(work)

    async def runs(self, *, status_key: str) -> list[RunRecord]:
        def work(db: sqlite3.Connection) -> list[RunRecord]:
            rows = db.execute(
                "SELECT run, COUNT(*), MAX(CASE WHEN key = ? THEN value END) "
                "FROM records GROUP BY run ORDER BY run",
                (status_key,),
            )
            return [
                RunRecord(run, count, None if status is None else bytes(status))
                for run, count, status in rows
            ]

        return await self._run(work)

    async def delete(self, runs: Sequence[str]) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM records WHERE run = ?", [(run,) for run in runs])

        await self._run(work)

    async def forget(self, run: str, keys: Sequence[str]) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.executemany(
                "DELETE FROM records WHERE run = ? AND key = ?", [(run, key) for key in keys]
            )

        if keys:
            await self._run(work)

    async def close(self) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.close()

        if self._db is not None:
            await self._run(work)
            self._db = None
        self._thread.shutdown(wait=False)
