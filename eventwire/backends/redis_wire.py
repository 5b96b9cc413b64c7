"""Talking to Redis below redis-py's command layer, for the redis:// backend
(`eventwire.backends.redis`): one command with a bounded wait for its reply, Lua scripts by
EVALSHA, and commands packed as RESP by hand on a connection kept for one user (the
publisher, one consumer), which skips `execute_command`'s per-command work."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from eventwire.backends.base import Message

# Longest wait for a reply (past a blocking read's own wait): a connection that silent is
# dropped and the command fails as retryable. Enforced by `command` with a timer, not by
# redis-py's socket_timeout, which runs every write in a task of its own (`wait_for`): a
# fifth of a publish's CPU time.
SOCKET_TIMEOUT = 10.0


class Script:
    """A Lua script run by EVALSHA, loaded again when the server lost it (a restart)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await command(client, "EVALSHA", self.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            await command(client, "SCRIPT", "LOAD", self.source)
            return await command(client, "EVALSHA", self.sha, len(keys), *keys, *args)


async def command(client: Any, *args: Any, wait: float = 0.0) -> Any:
    """One raw command (redis-py's `execute_command` is untyped), failing with redis-py's
    TimeoutError (retryable) when no reply came within `SOCKET_TIMEOUT` seconds past `wait`
    (a blocking command's own wait); redis-py drops the connection it interrupts. A
    cancellation that redis-py swallowed (one landing as the reply came in) is raised here,
    so that a reader's task stops when cancelled rather than going on with its next
    command."""
    task = asyncio.current_task()
    cancelling = task.cancelling() if task is not None else 0
    try:
        async with asyncio.timeout(SOCKET_TIMEOUT + wait):
            reply = await client.execute_command(*args)
    except TimeoutError:
        raise redis_errors.TimeoutError(f"no reply from Redis to {args[0]}") from None
    if task is not None and task.cancelling() > cancelling:
        raise asyncio.CancelledError
    return reply


async def execute(pipe: Any, **options: Any) -> Any:
    """Run a pipeline, with `command`'s limit on the wait for its replies."""
    try:
        async with asyncio.timeout(SOCKET_TIMEOUT):
            return await pipe.execute(**options)
    except TimeoutError:
        raise redis_errors.TimeoutError("no reply from Redis to a pipeline") from None


def stage(pipe: Any, *args: Any) -> None:
    """Queue a raw command on a pipeline."""
    pipe.pipeline_execute_command(*args)


def bulk(value: bytes | str | int) -> bytes:
    """One RESP bulk string."""
    data = (
        value.encode()
        if isinstance(value, str)
        else b"%d" % value
        if isinstance(value, int)
        else value
    )
    return b"$%d\r\n%s\r\n" % (len(data), data)


def resp(*args: bytes | str | int) -> bytes:
    """A command in RESP, as the server reads it."""
    return b"*%d\r\n%s" % (len(args), b"".join([bulk(arg) for arg in args]))


# XADD <stream> * id <id> topic <topic> body <body> (its stream given packed already).
XADD = b"*9\r\n$4\r\nXADD\r\n%s$1\r\n*\r\n$2\r\nid\r\n%s$5\r\ntopic\r\n%s$4\r\nbody\r\n%s"


def publish_call(
    sha: str, keys: Sequence[str], head: Sequence[int], messages: Sequence[Message]
) -> bytes:
    """One EVALSHA of the publish script for `messages`, in RESP: five arguments each."""
    parts = [b"*%d\r\n" % (3 + len(keys) + len(head) + 5 * len(messages)), bulk("EVALSHA")]
    parts += (bulk(sha), bulk(len(keys)))
    parts += [bulk(key) for key in keys]
    parts += [bulk(value) for value in head]
    none = b"$0\r\n\r\n"
    for m in messages:
        event_id = m.id.encode()
        topic = m.topic.encode()
        key = none if m.key is None else bulk(b"=" + m.key.encode())
        trace = trace_fields(m)
        parts.append(
            b"$%d\r\n%s\r\n$%d\r\n%s\r\n%s$%d\r\n%s\r\n%s"
            % (
                len(event_id),
                event_id,
                len(topic),
                topic,
                key,
                len(m.body),
                m.body,
                none if trace is None else bulk("\n".join(trace)),
            )
        )
    return b"".join(parts)


def trace_fields(message: Message) -> tuple[str] | tuple[str, str] | None:
    """The W3C trace context a message's entry carries in fields of its own (traceparent,
    then tracestate if any), for other systems to read; None without one."""
    headers = message.headers
    parent = headers.get("traceparent") if headers else None
    if not parent:
        return None
    assert headers is not None
    state = headers.get("tracestate")
    return (parent, state) if state else (parent,)


class Link:
    """A connection of the client's pool kept for one user (the publisher, one consumer's
    fetches), to which commands go as RESP the caller packed, their raw replies read back:
    no checkout from the pool, retry wrapper and reply callbacks per command, which are a
    third of `execute_command`'s CPU time. A call while another is under way takes a pooled
    connection of its own.

    With ``keep=False`` no connection is kept: each call borrows one from the pool, holding
    one of `slots` meanwhile (for thousands of users in one process, which would each keep
    a connection otherwise)."""

    def __init__(
        self, client: Redis, *, keep: bool = True, slots: asyncio.Semaphore | None = None
    ) -> None:
        self._client = client
        self._connection: Any = None
        self._busy = False
        self._closed = not keep
        self._slots = slots

    async def call(
        self, payload: bytes, replies: int = 1, *, wait: float = 0.0, raise_errors: bool = True
    ) -> list[Any]:
        """Send `payload` (`replies` commands) and return their replies, error replies as
        exceptions in their place, or the first of them raised (`raise_errors`) once all are
        read. Fails with redis-py's TimeoutError (retryable) after `SOCKET_TIMEOUT` seconds
        past `wait` (a blocking command's own wait) without them."""
        pool: Any = self._client.connection_pool
        if self._busy or self._closed:
            if self._slots is not None:
                async with self._slots:
                    return await _borrowed(pool, payload, replies, wait, raise_errors)
            return await _borrowed(pool, payload, replies, wait, raise_errors)
        self._busy = True
        try:
            if self._connection is None:
                self._connection = await pool.get_connection()
            return await exchange(self._connection, payload, replies, wait, raise_errors)
        finally:
            self._busy = False
            if self._closed:  # closed while this call ran: it gives the connection back
                await self._release()

    async def close(self) -> None:
        """Give the connection back to the pool, at once if no call is under way on it, else
        when that call ends (its replies are its own: nobody else may use the connection
        before); later calls take pooled connections."""
        self._closed = True
        if not self._busy:
            await self._release()

    async def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            pool: Any = self._client.connection_pool
            await pool.release(connection)


async def _borrowed(
    pool: Any, payload: bytes, replies: int, wait: float, raise_errors: bool
) -> list[Any]:
    """`exchange` on a connection borrowed from `pool` for the call."""
    connection = await pool.get_connection()
    try:
        return await exchange(connection, payload, replies, wait, raise_errors)
    finally:
        await pool.release(connection)


async def exchange(
    connection: Any, payload: bytes, replies: int, wait: float, raise_errors: bool = True
) -> list[Any]:
    """Send `payload` (`replies` commands) on `connection` and read their replies (see
    `Link.call`)."""
    task = asyncio.current_task()
    cancelling = task.cancelling() if task is not None else 0
    out: list[Any] = []
    error: redis_errors.ResponseError | None = None
    try:
        async with asyncio.timeout(SOCKET_TIMEOUT + wait):
            # redis-py drops the connection when sending or reading fails or is interrupted,
            # and connects again on the next send.
            await connection.send_packed_command(payload, check_health=False)
            while len(out) < replies:
                try:
                    out.append(await connection.read_response())
                except redis_errors.ResponseError as refused:  # the rest still to be read
                    error = error or refused
                    out.append(refused)
    except TimeoutError:
        raise redis_errors.TimeoutError("no reply from Redis") from None
    except BaseException:
        if len(out) < replies:
            await connection.disconnect(nowait=True)  # replies left unread: unusable
        raise
    if task is not None and task.cancelling() > cancelling:
        raise asyncio.CancelledError
    if error is not None and raise_errors:
        raise error
    return out
