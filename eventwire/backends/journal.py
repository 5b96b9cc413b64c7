"""Run journals: where a durable handler's runs keep what their steps returned
(`eventwire.runs`), so that a run started again after a crash or a wait replays them instead
of calling them again.

A journal holds, per run (a string id), records by key, each a small byte string written
once: the first write of a key wins, and a later one gets the record that stands (two
processes that ran the same step after a lease ran out agree on one result). A few keys are
overwritten on purpose (a run's status, a step's last error): `write(..., replace=True)`.
Large values go to content-addressed blobs, written once per content, so that a long
conversation whose every step repeats the context does not store it again and again.

Every backend that keeps events durably gives its own journal (`Backend.journal`); the
memory backend keeps one in the process, for tests.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run as its journal lists it: id, how many records, and its status record."""

    run: str
    records: int
    status: bytes | None


class Journal(abc.ABC):
    """The records of runs, and blobs by content digest."""

    @abc.abstractmethod
    async def read(self, run: str) -> dict[str, bytes]:
        """Every record of `run`, by key (empty for a run never written)."""

    @abc.abstractmethod
    async def write(self, run: str, key: str, value: bytes, *, replace: bool = False) -> bytes:
        """Record `value` under `key` of `run`, unless a record is there already (or
        `replace`); the record that stands afterwards."""

    @abc.abstractmethod
    async def put_blob(self, digest: str, data: bytes) -> None:
        """Keep `data` under its `digest` (content address: written once)."""

    @abc.abstractmethod
    async def get_blob(self, digest: str) -> bytes | None:
        """The blob of `digest`, or None if there is none."""

    @abc.abstractmethod
    async def runs(self, *, status_key: str) -> list[RunRecord]:
        """Every run the journal holds, with the record under `status_key` of each."""

    @abc.abstractmethod
    async def delete(self, runs: Sequence[str]) -> None:
        """Forget these runs and their records (blobs stay: others may share them)."""

    @abc.abstractmethod
    async def forget(self, run: str, keys: Sequence[str]) -> None:
        """Remove these records of `run` (those that are not there are ignored)."""

    async def close(self) -> None:  # noqa: B027 (a hook: nothing to release by default)
        """Release what the journal holds open."""


class MemoryJournal(Journal):
    """A journal in this process (the memory backend's): gone with it."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, bytes]] = {}
        self._blobs: dict[str, bytes] = {}

    async def read(self, run: str) -> dict[str, bytes]:
        return dict(self._runs.get(run, {}))

    async def write(self, run: str, key: str, value: bytes, *, replace: bool = False) -> bytes:
        records = self._runs.setdefault(run, {})
        if replace or key not in records:
            records[key] = bytes(value)
        return records[key]

    async def put_blob(self, digest: str, data: bytes) -> None:
        self._blobs.setdefault(digest, bytes(data))

    async def get_blob(self, digest: str) -> bytes | None:
        return self._blobs.get(digest)

    async def runs(self, *, status_key: str) -> list[RunRecord]:
        return [
            RunRecord(run, len(records), records.get(status_key))
            for run, records in self._runs.items()
        ]

    async def delete(self, runs: Sequence[str]) -> None:
        for run in runs:
            self._runs.pop(run, None)

    async def forget(self, run: str, keys: Sequence[str]) -> None:
        records = self._runs.get(run)
        if records is None:
            return
        for key in keys:
            records.pop(key, None)
        if not records:
            del self._runs[run]
