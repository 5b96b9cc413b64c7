"""The run journal of the ``nats://`` backend (`eventwire.backends.journal`): a JetStream
key-value bucket per namespace, ``eventwire_<ns>_runs`` (file storage, the stream's
replicas), with keys

- ``r.<run>.<record>``: a record (a first write is the bucket's ``create``, which fails when
  the key exists: the record that stands is then read back);
- ``i.<run>``: the run's id, for listing;
- ``b.<sha256>`` and ``b.<sha256>.<n>``: a blob, as a count of parts and the parts (of at
  most `_PART` bytes: a message may not exceed the server's payload limit, 1 MB by default).

KV keys allow only ``A-Z a-z 0-9 - _ = / .``: ``<run>`` is the SHA-256 of the run id and
``<record>`` the record key in URL-safe base64. A run's records are read with one watch of
``r.<run>.>`` (its current values, then it stops).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from eventwire.backends.journal import Journal, RunRecord

T = TypeVar("T")

_PART = 512 * 1024
_INDEXED_KEPT = 10_000
# How long a read waits for the next value of its watch.
_WATCH_WAIT = 5.0


def _run_hash(run: str) -> str:
    return hashlib.sha256(run.encode()).hexdigest()


def _record_key(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _key_of(encoded: str) -> str:
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()


class NatsJournal(Journal):
    """Runs' records in a key-value bucket of the backend's namespace."""

    def __init__(
        self,
        bucket: Callable[[], Awaitable[KeyValue]],
        retry: Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        """`bucket` opens (or creates) the bucket on the current connection; `retry` runs
        an operation through lost connections (with what it does, for its error)."""
        self._bucket = bucket
        self._retry = retry
        # Runs whose index key this process wrote (a round trip saved on their next writes).
        self._indexed: set[str] = set()

    async def _retried(self, what: str, operation: Callable[[KeyValue], Awaitable[T]]) -> T:
        async def attempt() -> T:
            return await operation(await self._bucket())

        result: T = await self._retry(what, attempt)
        return result

    async def read(self, run: str) -> dict[str, bytes]:
        prefix = f"r.{_run_hash(run)}."

        async def read(kv: KeyValue) -> dict[str, bytes]:
            found = await _current(kv, prefix + ">")
            return {_key_of(key[len(prefix) :]): value for key, value in found.items()}

        return await self._retried(f"reading the journal of run {run!r}", read)

    async def write(self, run: str, key: str, value: bytes, *, replace: bool = False) -> bytes:
        hashed = _run_hash(run)
        kv_key = f"r.{hashed}.{_record_key(key)}"

        async def write(kv: KeyValue) -> bytes:
            if hashed not in self._indexed:
                await _create(kv, f"i.{hashed}", run.encode())
                if len(self._indexed) >= _INDEXED_KEPT:
                    self._indexed.clear()
                self._indexed.add(hashed)
            if replace:
                await kv.put(kv_key, value)
                return value
            if await _create(kv, kv_key, value):
                return value
            entry = await kv.get(kv_key)
            return bytes(entry.value or b"")

        return await self._retried(f"writing the journal of run {run!r}", write)

    async def put_blob(self, digest: str, data: bytes) -> None:
        parts = [data[start : start + _PART] for start in range(0, len(data), _PART)] or [b""]

        async def put(kv: KeyValue) -> None:
            for number, part in enumerate(parts):
                await kv.put(f"b.{digest}.{number}", part)
            # The count last: a reader that finds it finds every part.
            await _create(kv, f"b.{digest}", str(len(parts)).encode())

        await self._retried("writing a blob", put)

    async def get_blob(self, digest: str) -> bytes | None:
        async def get(kv: KeyValue) -> bytes | None:
            try:
                count = int((await kv.get(f"b.{digest}")).value or b"0")
                parts = [await kv.get(f"b.{digest}.{number}") for number in range(count)]
            except nats.js.errors.KeyNotFoundError:
                return None
            return b"".join(bytes(part.value or b"") for part in parts)

        return await self._retried("reading a blob", get)

    async def runs(self, *, status_key: str) -> list[RunRecord]:
        async def list_runs(kv: KeyValue) -> list[RunRecord]:
            found = []
            for value in (await _current(kv, "i.>")).values():
                run = value.decode()
                records = await self.read(run)
                if records:
                    found.append(RunRecord(run, len(records), records.get(status_key)))
            return sorted(found, key=lambda record: record.run)

        return await self._retried("listing runs", list_runs)

    async def delete(self, runs: Sequence[str]) -> None:
        async def delete(kv: KeyValue) -> None:
            for run in runs:
                hashed = _run_hash(run)
                for key in await self.read(run):
                    await kv.purge(f"r.{hashed}.{_record_key(key)}")
                await kv.purge(f"i.{hashed}")
                self._indexed.discard(hashed)

        await self._retried("deleting runs", delete)


async def _current(kv: KeyValue, keys: str) -> dict[str, bytes]:
    """The current values of the keys matching `keys` (a watch that stops once they are
    in: the filter of `KeyValue.keys` needs NATS 2.10)."""
    watcher = await kv.watch(keys, ignore_deletes=True)
    found: dict[str, bytes] = {}
    try:
        while True:
            entry = await watcher.updates(timeout=_WATCH_WAIT)  # type: ignore[no-untyped-call]
            if entry is None:  # the current values are all in
                return found
            if entry.value is not None:
                found[entry.key] = bytes(entry.value)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


async def _create(kv: KeyValue, key: str, value: bytes) -> bool:
    """Write `key` unless it exists; whether this call wrote it."""
    try:
        await kv.create(key, value)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    return True
