"""The run journal of the ``redis://`` backend (`eventwire.backends.journal`), in the
namespace's keys (same hash tag, so Redis Cluster keeps a run's keys together):

- ``{ns}:run:<run id>``: hash, record key -> record; a first write is ``HSETNX`` and the
  record that stands comes back in the same round trip (``HGET`` pipelined behind it);
- ``{ns}:runs``: set of the run ids, for listing;
- ``{ns}:blob:<sha256>``: one string per blob content, written with ``SET NX``.

A record is as durable as the server's persistence makes it (see the backend's docstring:
AOF with ``appendfsync always`` loses nothing acknowledged).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis

from eventwire.backends.base import OPERATION_RETRY_DEADLINE
from eventwire.backends.journal import Journal, RunRecord

T = TypeVar("T")


class RedisJournal(Journal):
    """Runs' records in hashes of the backend's namespace."""

    def __init__(
        self,
        client: Callable[[], Redis],
        prefix: str,
        retrying: Callable[[Callable[[], Awaitable[Any]], float], Awaitable[Any]],
        clock: Callable[[], float],
    ) -> None:
        """`client` gives the backend's client, `prefix` its namespace's key prefix, and
        `retrying` runs an operation through lost connections until a deadline of `clock`."""
        self._client = client
        self._prefix = prefix
        self._retrying = retrying
        self._clock = clock

    def _run_key(self, run: str) -> str:
        return f"{self._prefix}run:{run}"

    async def _retried(self, operation: Callable[[], Awaitable[T]]) -> T:
        result: T = await self._retrying(operation, self._clock() + OPERATION_RETRY_DEADLINE)
        return result

    async def read(self, run: str) -> dict[str, bytes]:
        async def read() -> dict[Any, Any]:
            found: dict[Any, Any] = await self._client().hgetall(self._run_key(run))
            return found

        records = await self._retried(read)
        return {_text(key): bytes(value) for key, value in records.items()}

    async def write(self, run: str, key: str, value: bytes, *, replace: bool = False) -> bytes:
        hash_key = self._run_key(run)

        async def write() -> bytes:
            pipe = self._client().pipeline(transaction=False)
            if replace:
                pipe.hset(hash_key, key, value)
            else:
                pipe.hsetnx(hash_key, key, value)
            pipe.hget(hash_key, key)
            pipe.sadd(f"{self._prefix}runs", run)
            _, stood, _ = await pipe.execute()
            return bytes(stood)

        return await self._retried(write)

    async def put_blob(self, digest: str, data: bytes) -> None:
        async def put() -> None:
            await self._client().set(f"{self._prefix}blob:{digest}", data, nx=True)

        await self._retried(put)

    async def get_blob(self, digest: str) -> bytes | None:
        async def get() -> bytes | None:
            found: Any = await self._client().get(f"{self._prefix}blob:{digest}")
            return None if found is None else bytes(found)

        return await self._retried(get)

    async def runs(self, *, status_key: str) -> list[RunRecord]:
        async def list_runs() -> list[RunRecord]:
            client = self._client()
            runs = sorted(_text(run) for run in await client.smembers(f"{self._prefix}runs"))
            pipe = client.pipeline(transaction=False)
            for run in runs:
                pipe.hlen(self._run_key(run))
                pipe.hget(self._run_key(run), status_key)
            replies = await pipe.execute()
            return [
                RunRecord(run, int(count), None if status is None else bytes(status))
                for run, count, status in zip(runs, replies[::2], replies[1::2], strict=True)
                if count
            ]

        return await self._retried(list_runs)

    async def delete(self, runs: Sequence[str]) -> None:
        if not runs:
            return

        async def delete() -> None:
            client = self._client()
            await client.unlink(*(self._run_key(run) for run in runs))
            await client.srem(f"{self._prefix}runs", *runs)

        await self._retried(delete)

    async def forget(self, run: str, keys: Sequence[str]) -> None:
        if not keys:
            return

        async def forget() -> None:
            await self._client().hdel(self._run_key(run), *keys)

        await self._retried(forget)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
