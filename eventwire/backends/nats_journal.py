"""The run journal of the ``nats://`` backend (`eventwire.backends.journal`): a JetStream
key-value bucket per namespace, ``eventwire_<ns>_runs`` (file storage, the stream's
replicas), with keys

- ``r.<run>.<record>``: a record (a first write is the bucket's ``create``, which fails when
  the key exists: the record that stands is then read back);
- ``m.<run>``: the run's manifest, the keys of its records (updated by compare-and-set once
  a record is created, so a write that returned is in it);
- ``i.<run>``: the run's id, for listing;
- ``b.<sha256>`` and ``b.<sha256>.<n>``: a blob, as a count of parts and the parts (of at
  most `_PART` bytes: a message may not exceed the server's payload limit, 1 MB by default).

KV keys allow only ``A-Z a-z 0-9 - _ = / .``: ``<run>`` is the SHA-256 of the run id and
``<record>`` the record key in URL-safe base64. A run is read as its manifest, then its
records, fetched at once: a few round trips, where a consumer over ``r.<run>.>`` (the only
way to list keys by prefix on NATS 2.9) costs the server a scan of the bucket's subjects.
Runs are listed (``eventwire runs``) by such a consumer over ``i.>``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from eventwire.backends.journal import Journal, RunRecord

T = TypeVar("T")

_PART = 512 * 1024
# How long a read waits for the next batch of values.
_WATCH_WAIT = 5.0
_READ_BATCH = 256
# A reader consumer left behind (its process died mid-read) is removed by the server.
_READER_IDLE = 30.0


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
        name: str,
        bucket: Callable[[], Awaitable[KeyValue]],
        jetstream: Callable[[], JetStreamContext],
        retry: Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        """`bucket` opens (or creates) the bucket `name` on the current connection, and
        `jetstream` is that connection's JetStream; `retry` runs an operation through lost
        connections (with what it does, for its error)."""
        self._name = name
        self._bucket = bucket
        self._jetstream = jetstream
        self._retry = retry

    async def _retried(self, what: str, operation: Callable[[KeyValue], Awaitable[T]]) -> T:
        async def attempt() -> T:
            return await operation(await self._bucket())

        result: T = await self._retry(what, attempt)
        return result

    async def read(self, run: str) -> dict[str, bytes]:
        hashed = _run_hash(run)

        async def read(kv: KeyValue) -> dict[str, bytes]:
            keys = (await _manifest(kv, hashed))[1]
            entries = await asyncio.gather(
                *(kv.get(f"r.{hashed}.{key}") for key in keys), return_exceptions=True
            )
            found = {}
            for key, entry in zip(keys, entries, strict=True):
                if isinstance(entry, nats.js.errors.NotFoundError):
                    continue  # forgotten since the manifest was read
                if isinstance(entry, BaseException):
                    raise entry
                found[_key_of(key)] = bytes(entry.value or b"")
            return found

        return await self._retried(f"reading the journal of run {run!r}", read)

    async def write(self, run: str, key: str, value: bytes, *, replace: bool = False) -> bytes:
        hashed = _run_hash(run)
        encoded = _record_key(key)
        kv_key = f"r.{hashed}.{encoded}"

        async def write(kv: KeyValue) -> bytes:
            if await _create(kv, kv_key, value):
                await self._listed(kv, run, hashed, encoded)
                return value
            if replace:
                await kv.put(kv_key, value)
                stood = value
            else:
                stood = bytes((await kv.get(kv_key)).value or b"")
            # Its first writer may have died before listing it: a record not in the
            # manifest is not read.
            await self._listed(kv, run, hashed, encoded)
            return stood

        return await self._retried(f"writing the journal of run {run!r}", write)

    async def _listed(self, kv: KeyValue, run: str, hashed: str, encoded: str) -> None:
        """Add a record key to its run's manifest (compare-and-set, retried on a race)."""
        while True:
            revision, keys = await _manifest(kv, hashed)
            if encoded in keys:
                return
            listed = "\n".join([*keys, encoded]).encode()
            if revision is None:
                await _create(kv, f"i.{hashed}", run.encode())  # a new run: list it
                if await _create(kv, f"m.{hashed}", listed):
                    return
                continue
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await kv.update(f"m.{hashed}", listed, last=revision)
                return

    async def _unlisted(self, kv: KeyValue, hashed: str, encoded: set[str]) -> None:
        """Remove record keys from their run's manifest."""
        while True:
            revision, keys = await _manifest(kv, hashed)
            kept = [key for key in keys if key not in encoded]
            if revision is None or len(kept) == len(keys):
                return
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await kv.update(f"m.{hashed}", "\n".join(kept).encode(), last=revision)
                return

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
            for value in (await self._current("i.>")).values():
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
                revision, keys = await _manifest(kv, hashed)
                if revision is None:
                    continue  # never written (a purge would leave a marker for nothing)
                for key in keys:
                    await kv.purge(f"r.{hashed}.{key}")
                await kv.purge(f"m.{hashed}")
                await kv.purge(f"i.{hashed}")

        await self._retried("deleting runs", delete)

    async def forget(self, run: str, keys: Sequence[str]) -> None:
        hashed = _run_hash(run)
        encoded = {_record_key(key) for key in keys}

        async def forget(kv: KeyValue) -> None:
            await self._unlisted(kv, hashed, encoded)
            for key in encoded:
                await kv.purge(f"r.{hashed}.{key}")

        if keys:
            await self._retried(f"forgetting records of run {run!r}", forget)

    async def _current(self, keys: str) -> dict[str, bytes]:
        """The current values of the keys matching `keys`. Read with a pull consumer of the
        bucket's stream (the last message per key): its count of pending messages, taken
        before anything is delivered, says when all are in. (A watch marks the end by the
        count at its first delivery, which races with deliveries already under way; the
        filter of `KeyValue.keys` needs NATS 2.10.)"""
        js = self._jetstream()
        # A bucket's stream and subjects, as the key-value convention names them.
        stream, prefix = f"KV_{self._name}", f"$KV.{self._name}."
        info = await js.add_consumer(
            stream,
            ConsumerConfig(
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=AckPolicy.NONE,
                filter_subject=prefix + keys,
                inactive_threshold=_READER_IDLE,
                mem_storage=True,
            ),
        )
        found: dict[str, bytes] = {}
        try:
            left = info.num_pending or 0
            if not left:
                return found
            reader = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
            try:
                while left > 0:
                    batch = await reader.fetch(min(left, _READ_BATCH), timeout=_WATCH_WAIT)
                    for message in batch:
                        left = message.metadata.num_pending
                        operation = (message.headers or {}).get("KV-Operation")
                        if operation not in ("DEL", "PURGE"):
                            found[message.subject[len(prefix) :]] = bytes(message.data)
            finally:
                await reader.unsubscribe()
        finally:
            with contextlib.suppress(nats.errors.Error):
                await js.delete_consumer(stream, info.name)
        return found


async def _manifest(kv: KeyValue, hashed: str) -> tuple[int | None, list[str]]:
    """A run's manifest: its revision (None: there is none) and the record keys it lists."""
    try:
        entry = await kv.get(f"m.{hashed}")
    except nats.js.errors.NotFoundError:
        return None, []
    listed = (entry.value or b"").decode()
    return entry.revision, listed.split("\n") if listed else []


async def _create(kv: KeyValue, key: str, value: bytes) -> bool:
    """Write `key` unless it exists; whether this call wrote it."""
    try:
        await kv.create(key, value)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    return True
