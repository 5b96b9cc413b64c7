"""The ``redis://`` backend: Redis Streams with consumer groups.

URL: ``redis://[[user]:password@]host[:port][/db]?namespace=NAME`` with optional
``&dedup_window=SECONDS`` (default 0: off; see Deduplication) and ``&maxlen=N`` (trim the
stream to about N entries; trimming deletes events that consumers have not read yet, so it can
lose events: off by default).

Storage layout. Every key of a namespace carries the hash tag ``{ns}``, so the Lua scripts
that touch several keys stay valid on Redis Cluster:

- ``{ns}:events``: one stream for the namespace, entry fields ``id``, ``topic``, ``key`` (absent
  when None) and ``body``.
- ``{ns}:consumers``: hash, durable consumer name -> pattern.
- A durable consumer is a consumer group on the stream, named ``safe_name(name)``. Each
  `RedisConsumer` object is a Redis consumer of that group with a unique name, so processes
  sharing the group split its entries.
- ``{ns}:delayed:<group>``: sorted set of nak'ed entries (``"<entry id> <attempts>"``) by due
  time in ms; they left the group's pending list and are claimed back when due.
- ``{ns}:handled:<group>``: sorted set of handled event ids by time, trimmed after
  `base.HANDLED_KEPT` (7 days).
- ``{ns}:wake:<group>``: a one-entry stream that nak and close bump, so fetchers blocked on the
  events stream wake up for entries handed back; the group reads it (XREADGROUP) beside the
  events stream.
- ``{ns}:wakes``: a short stream naming the groups whose entries were handed back (nak,
  close), for the wakers (below).
- ``{ns}:tally:<group>``: hash, how far `consumers()` counted the group's unread entries
  (kept only for long backlogs, such as the dead-letter consumer's, which nothing reads).
- ``{ns}:dedup:<event id>``: only with ``dedup_window``: a marker with that TTL.
- ``{ns}:part:<tag>.<n>`` and ``{ns}:part:<tag>.free``: the streams of a ``partitions=N``
  subscription's partitions (`eventwire.backends.partitions`), one each, so that only their
  consumers read them; ``{ns}:group:<group>``: its table of live members and leases
  (`BrokerBackend.sync_group`, one Lua script on the server's clock). Whoever takes a
  partition first claims every entry pending in its group (``XAUTOCLAIM`` with no idle time),
  oldest first, before reading new ones (`RedisConsumer.take_over`).

Publishing runs one Lua script per up to 1,000 messages, all of a batch in one round trip,
each message as five arguments of a command packed by hand (`redis_wire.publish_call`); one
message alone is one plain ``XADD``.

New entries come by a plain ``XREADGROUP`` (blocking when there are none, on the events
stream and the group's wake stream), their topics checked here and entries of other topics
acknowledged, with the acknowledgements of what was handled in the same write. The fetch Lua
script runs only when it is due: after a bump of the wake stream (given-back entries come
first), when a delayed entry falls due, when it is time to take over deliveries other
consumers held longer than ``ack_wait`` (XAUTOCLAIM; every ``ack_wait``/4, at most 1 s), and
for a backlog mostly of other topics, which it filters inside Redis; it replies with one
packed string per delivery (attempt, entry id, topic, body).

The first 16 consumers of a backend (`_DEDICATED`) have a connection of their own and wait
in a blocking XREADGROUP, the quickest hand-over, until such reads wake them mostly for other
topics' entries (every entry wakes every blocking reader: with many subscriptions on
different topics each publish would cost a read and an acknowledgement per reader). Then
they, like all the others, wait on the backend's `Waker`: one connection that reads each new
entry (XREAD) while anyone waits and wakes the consumers whose pattern matches its topic, or
whose group ``{ns}:wakes`` names, telling a woken group which entries before its own it can
skip (`Wake.skip`: an idle group's position would otherwise lag behind by everything
published meanwhile). The waker also looks every ``ack_wait``/4 (at most 1 s) for waiting
groups with redeliveries due, in one script call per 500 groups, and at most 2,000 groups a
second (10,000 idle groups: every 5 s). Consumers past the first 16 borrow pooled
connections for their calls (at most 64 at once): thousands of subscriptions in one process
hold a few dozen connections.

Deduplication. Redis cannot deduplicate by itself. A publish whose reply was lost (the
connection broke) is retried; before the retry, a script scans the stream entries added since
the first try for the batch's event ids, and only the missing messages are sent again. That
costs nothing when nothing fails. It cannot see a try that the server has not executed yet: if
the reply was lost to a client-side timeout while Redis was still working through the batch,
a message may be stored twice. Delivery is at least once anyway, and ``idempotent=True``
subscriptions skip what they already handled. ``?dedup_window=SECONDS`` adds a marker key per
event (``SET NX`` with that TTL, in the publish script): exact within the window, also across
separate publishes of the same event, at the price of one key per event in Redis's memory
(rate x window) and some publish throughput.

Durability: `publish` returns once Redis replied to the script. Whether that survives a
restart of Redis is the server's persistence setting: AOF with ``appendfsync always`` loses
nothing, ``everysec`` up to a second, no persistence everything. The server's
``maxmemory-policy`` must be ``noeviction`` (an evicted stream loses events and consumer
groups).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from eventwire.backends import redis_lua as lua
from eventwire.backends.base import (
    HANDLED_KEPT,
    OPERATION_RETRY_DEADLINE,
    PRESENCE_KEPT,
    BackendConnectionError,
    Backoff,
    Capabilities,
    Consumer,
    ConsumerInfo,
    ConsumerSpec,
    Delivery,
    Message,
    ReplicationError,
    check_consumer,
    retry_backoff,
    safe_name,
)
from eventwire.backends.broker import BrokerBackend
from eventwire.backends.journal import Journal
from eventwire.backends.partitions import PARTITION_PREFIX, GroupView
from eventwire.backends.redis_journal import RedisJournal
from eventwire.backends.redis_wire import (
    XADD,
    Link,
    Script,
    bulk,
    command,
    exchange,
    execute,
    publish_call,
    resp,
    stage,
    trace_fields,
)
from eventwire.backends.url import BusURL, URLOptions
from eventwire.foreign import ForeignMessage
from eventwire.topics import is_topic, pattern_matches, validate_pattern

logger = logging.getLogger("eventwire")

T = TypeVar("T")

DEFAULT_DEDUP_WINDOW = 0
# The ``?option=`` settings a redis:// URL takes (besides ``namespace``).
OPTIONS = ("dedup_window", "maxlen", "min_replicas", "replica_wait")
# Starts the body of a foreign entry, whose fields follow packed (`pack_fields`): an envelope
# starts with "{".
FIELDS_MARKER = b"\x00eventwire-fields\x00"
_HANDLED_KEPT_MS = int(HANDLED_KEPT * 1000)
# Messages per publish script call (and bytes, past which a call takes no further message).
_PUBLISH_CHUNK = 1000
_PUBLISH_BYTES = 4 << 20
# Ids per extend script call.
_ID_CHUNK = 1000
# A retried publish looks for its messages among the entries added since its first try began,
# by the server's clock, with this much slack (seconds) for clock adjustments; each scan call
# reads at most this many entries.
_CLOCK_SLACK = 5.0
_SCAN_CHUNK = 5000
# Fetch script reply records (big-endian): attempt, then lengths of entry id, topic and body,
# then those bytes.
_ENTRY = struct.Struct(">IIII")
# New entries one fetch script examines at most (matching or not), so a script never blocks
# Redis for long when a consumer skips a large backlog of other topics.
_SCAN_BUDGET = 1000
# Entries `consumers()` reads past a group's position per call to count the matching ones.
_COUNT_SCAN = 1000
# Longest single blocking read: also how often an idle fetcher re-runs the fetch script.
_MAX_BLOCK = 1.0
# Waiting groups the waker looks at per second at most, for due retries and expired leases.
_DUE_GROUPS_PER_SECOND = 2000
# Most new entries one XREADGROUP takes (no more than the fetch asks for).
_READ_COUNT = 1000
# Consumers of one backend that wait for new entries on a connection of their own (a blocking
# XREADGROUP: the quickest hand-over). The others wait on the backend's `Waker`, and borrow
# pooled connections for their calls, at most `_SHARED_CALLS` at once.
_DEDICATED = 16
_SHARED_CALLS = 64
# A blocking reader goes on to wait on the waker once reads that brought only other topics'
# entries outnumber those that brought its own `_FRUITFUL_WEIGHT` to 1 by `_FUTILE_WAKES`:
# at two thirds or more of the stream's traffic for others, it does so before long.
_FUTILE_WAKES = 8
_FRUITFUL_WEIGHT = 2
# The waker's longest blocking read, and the most entries it reads per call; after
# `_WAKER_LAG` entries in a row without catching up it skips to the end and wakes everyone.
_WAKER_BLOCK = 5.0
_WAKER_COUNT = 1000
_WAKER_LAG = 20_000
# Groups per call of the script that finds which waiting consumers have redeliveries due.
_DUE_CHUNK = 500
# Topics whose match against its pattern a consumer remembers, before starting over.
_TOPICS_KEPT = 10_000
_CONNECT_TIMEOUT = 3.0
# Consumers (dead processes) with nothing pending and idle this long are removed from a group.
_PRUNE_IDLE_MS = 3600 * 1000
_PRUNE_EVERY = 600.0

# Failures that a reconnect (or waiting for a restarted server) can cure.
_RETRYABLE: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    OSError,
)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _publish_chunks(messages: Sequence[Message]) -> list[Sequence[Message]]:
    """`messages` cut into chunks of at most `_PUBLISH_CHUNK` messages, each closed once its
    bodies reach `_PUBLISH_BYTES`."""
    chunks: list[Sequence[Message]] = []
    start = size = 0
    for i, message in enumerate(messages):
        size += len(message.body)
        if i + 1 - start == _PUBLISH_CHUNK or size >= _PUBLISH_BYTES:
            chunks.append(messages[start : i + 1])
            start, size = i + 1, 0
    if start < len(messages):
        chunks.append(messages[start:])
    return chunks


def _topic_body(fields: list[bytes] | None) -> tuple[bytes | None, bytes]:
    """The first ``topic`` field of a raw stream entry, and its body: the ``body`` field of
    an entry eventwire wrote (``id``, ``topic``, [``key``,] ``body``[, trace fields]), else
    every field packed (`pack_fields`): a foreign producer's entry may lack either field, or
    have others, and all of it goes to the decoder or the dead letter."""
    if not fields:
        return None, pack_fields([])
    size = len(fields)
    # Those eventwire writes: id, topic, (key,) body.
    if size > 2 and fields[0] == b"id" and fields[2] == b"topic":
        if size == 6 and fields[4] == b"body":
            return fields[3], fields[5]
        if size == 8 and fields[4] == b"key" and fields[6] == b"body":
            return fields[3], fields[7]
    topic: bytes | None = None
    body: bytes | None = None
    for i in range(0, size - 1, 2):
        name = fields[i]
        if name == b"topic":
            if topic is None:
                topic = fields[i + 1]
        elif name == b"body" and body is None:
            body = fields[i + 1]
    if body is None or fields[0] != b"id":
        if topic is None:
            topic = _faststream_topic(fields)
        return topic, pack_fields(fields)
    return topic, body


def _faststream_topic(fields: list[bytes]) -> bytes | None:
    """The ``topic`` header of a FastStream message among an entry's fields, if any."""
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"__data__":
            framed = _faststream_message(fields[i + 1])
            topic = framed[0].get("topic") if framed else None
            return topic.encode() if topic else None
    return None


def pack_fields(fields: Sequence[bytes]) -> bytes:
    """A foreign entry's fields as one body: `FIELDS_MARKER`, then each name and value with
    its length (what the fetch script packs too)."""
    parts = [FIELDS_MARKER]
    for item in fields:
        parts.append(struct.pack(">I", len(item)) + item)
    return b"".join(parts)


def unpack_fields(body: bytes) -> list[tuple[bytes, bytes]] | None:
    """The (name, value) fields `pack_fields` packed into `body`, or None if it did not."""
    if not body.startswith(FIELDS_MARKER):
        return None
    items, at = [], len(FIELDS_MARKER)
    while at + 4 <= len(body):
        (size,) = struct.unpack_from(">I", body, at)
        items.append(body[at + 4 : at + 4 + size])
        at += 4 + size
    return list(zip(items[::2], items[1::2], strict=False))


def foreign_entry(topic: str, body: bytes, entry_id: str) -> ForeignMessage:
    """What a foreign producer wrote in a stream entry: its ``body`` field (else ``data``)
    as the body, every other field as a header, the entry id as its id. A FastStream message
    (one ``__data__`` field in FastStream's binary format) gives its own headers and body. A
    stream has no subject: without a ``topic`` field, a ``topic`` header names the topic."""
    fields = unpack_fields(body)
    if fields is None:
        return ForeignMessage(topic, body, {}, entry_id)
    headers: dict[str, Any] = {}
    content = None
    for name, value in fields:
        key = name.decode("utf-8", "replace")
        framed = _faststream_message(value) if key == "__data__" else None
        if framed is not None:
            headers.update(framed[0])
            content = framed[1]
        elif key == "body" or (key == "data" and content is None):
            content = value
        elif key != "topic":
            headers.setdefault(key, value.decode("utf-8", "replace"))
    message_id = headers.get("message_id") or entry_id
    return ForeignMessage(topic or headers.get("topic", ""), content or b"", headers, message_id)


_FASTSTREAM_MAGIC = b"\x89BIN\r\n\x1a\n"


def _faststream_message(data: bytes) -> tuple[dict[str, str], bytes] | None:
    """FastStream's binary message format (its default on Redis), or None if `data` is not
    in it: a magic number, version 1, where the headers and the body start (big-endian),
    then the headers as length-prefixed names and values."""
    if not data.startswith(_FASTSTREAM_MAGIC):
        return None
    try:
        version, headers_at, body_at = struct.unpack_from(">HII", data, len(_FASTSTREAM_MAGIC))
        (count,) = struct.unpack_from(">H", data, headers_at)
        at, texts = headers_at + 2, []
        for _ in range(2 * count):
            (size,) = struct.unpack_from(">H", data, at)
            texts.append(data[at + 2 : at + 2 + size].decode("utf-8", "replace"))
            at += 2 + size
    except struct.error:
        return None
    if version != 1 or body_at > len(data):
        return None
    return dict(zip(texts[::2], texts[1::2], strict=True)), data[body_at:]


def _unpack_deliveries(records: list[bytes], redelivered: int) -> list[Delivery]:
    """The deliveries of a fetch script's reply (`_ENTRY` records), oldest first."""
    deliveries: list[Delivery] = []
    append = deliveries.append
    head = _ENTRY.unpack_from
    for record in records:
        attempt, id_size, topic_size, _ = head(record)
        topic_at = 16 + id_size
        body_at = topic_at + topic_size
        entry_id = record[16:topic_at].decode()
        topic = record[topic_at:body_at].decode("utf-8", "replace")
        append(Delivery(topic, record[body_at:], attempt, entry_id))
    if redelivered > 1:
        deliveries[:redelivered] = sorted(
            deliveries[:redelivered], key=lambda d: _entry_order(d.handle)
        )
    return deliveries


def _start_id(start: Any) -> str:
    """The consumer group's initial last-delivered id for a `ConsumerSpec.start`."""
    if start == "latest":
        return "$"
    if start == "earliest":
        return "0-0"
    if isinstance(start, datetime):
        if start.tzinfo is None:
            raise ValueError("start= datetime must be timezone-aware (e.g. UTC)")
        ms = int(start.timestamp() * 1000)
        # Stream ids are "<ms>-<seq>" of the server clock at XADD: the group starts just
        # before the first id of that millisecond.
        return f"{ms - 1}-18446744073709551615" if ms > 0 else "0-0"
    raise ValueError(f"start must be 'latest', 'earliest' or a datetime, got {start!r}")


# Between a consumer's name and a process's in the presence hash's fields.
_FIELD_SEPARATOR = "\x1f"
# How often a process writes its consumers' presence fields again (see `presence_key`):
# processes of earlier eventwire versions read them alone (and see the process as gone
# in between, rather than failing on another format).
_RELIVE_EVERY = 30.0


class RedisBackend(BrokerBackend):
    """Redis Streams: one stream per namespace, one consumer group per durable consumer."""

    scheme = "redis"
    tracks_presence = True
    messaging_system = "redis"
    default_port = 6379
    capabilities = Capabilities(
        # Stored by Redis before publish returns; surviving a Redis restart is the server's
        # persistence setting (AOF, see the module docstring).
        durable=True,
        # The stream keeps every event unless `?maxlen=` trims it.
        replay=True,
        # With partitions=: each partition's stream is read by one process at a time.
        key_order_across_processes=True,
        idempotent=True,
        # Pending + delayed + unread matching entries are all visible on the server.
        cross_process_drain=True,
    )

    def __init__(self, url: BusURL) -> None:
        super().__init__(url)
        path = url.path.strip("/")
        try:
            self._db = int(path) if path else 0
        except ValueError:
            raise ValueError(
                f"the database in {url.redacted!r} must be a number such as /0, got {path!r}"
            ) from None
        options = URLOptions(url, OPTIONS)
        self._dedup_window = options.integer("dedup_window", DEFAULT_DEDUP_WINDOW)
        self._maxlen = options.integer("maxlen", 0)
        # Replicas that must have a publish before it returns (Redis's WAIT, on the connection
        # that wrote it), and how long to wait for them.
        self._min_replicas = options.integer("min_replicas", 0)
        # At least 1 ms: WAIT with 0 ms would wait for ever.
        self._replica_wait = options.duration("replica_wait", 5.0, minimum=0.001)
        self._wait_call = (
            resp("WAIT", self._min_replicas, int(self._replica_wait * 1000))
            if self._min_replicas
            else b""
        )
        prefix = "{" + self.namespace + "}:"
        self._prefix = prefix
        self._journal: RedisJournal | None = None
        self.stream = prefix + "events"
        self.registry = prefix + "consumers"
        # Consumer name -> 'group' or 'own' (one subscription's), beside its pattern above.
        self.kinds = prefix + "consumer-kinds"
        # consumer \x1f process -> when the process said it ran the consumer (negative: when
        # it stopped running it). While it runs, the field is written only now and then, and
        # the process's own beat in `processes_key` (process -> time) says how recent it is:
        # a beat is one field however many consumers the process runs.
        self.presence_key = prefix + "presence"
        self.processes_key = prefix + "processes"
        # Consumers this process marked "live", and when to write them all again (another
        # process may have removed a field meanwhile: `eventwire subscriptions delete`).
        self._live_marked: set[str] = set()
        self._relive_at = 0.0
        self._client: Redis | None = None
        # The publisher's own connection (`_send`).
        self._link: Link | None = None
        self._stream_bulk = bulk(self.stream)
        self._publish = Script(lua.PUBLISH)
        self._seen = Script(lua.SEEN)
        self._create = Script(lua.CREATE)
        self._stats = Script(lua.STATS)
        self._delete = Script(lua.DELETE)
        self.fetch_script = Script(lua.FETCH)
        self.nak_script = Script(lua.NAK)
        self.extend_script = Script(lua.EXTEND)
        self.release_script = Script(lua.RELEASE)
        self.prune_script = Script(lua.PRUNE)
        self.due_script = Script(lua.DUE)
        self._sync_group = Script(lua.SYNC_GROUP)
        self._leave_group = Script(lua.LEAVE_GROUP)
        # Names groups whose entries were handed back (nak, close), for the wakers.
        self.wakes = prefix + "wakes"
        # Consumers waiting on a connection of their own (at most `_DEDICATED`).
        self.dedicated = 0
        self.shared_calls = asyncio.Semaphore(_SHARED_CALLS)
        self._waker: Waker | None = None

    @property
    def waker(self) -> Waker:
        """The one reader that waits for new entries on behalf of the shared consumers."""
        if self._waker is None:
            self._waker = Waker(self)
        return self._waker

    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = RedisJournal(
                lambda: self.client, self._prefix, self.retrying, _loop_time
            )
        return self._journal

    def stream_of(self, topic: str) -> str:
        """The stream that holds `topic`'s entries (or a pattern's): a partition's copies
        (``_p.<tag>.<n>``) have a stream each, so that only its consumers read them; every
        other topic is in the namespace's one stream."""
        if topic.startswith(PARTITION_PREFIX):
            return f"{self._prefix}part:{topic[len(PARTITION_PREFIX) :]}"
        return self.stream

    def key(self, kind: str, group: str) -> str:
        """The key of one of a group's structures (``delayed``, ``handled``, ``wake``)."""
        return f"{self._prefix}{kind}:{group}"

    @property
    def client(self) -> Redis:
        if self._client is None:
            raise RuntimeError(f"the redis backend for {self.url.redacted} is not connected")
        return self._client

    async def connect(self) -> None:
        if self._client is not None:
            return
        url = self.url
        client = Redis(
            host=url.host or "localhost",
            port=url.port or 6379,
            db=self._db,
            username=unquote(url.username) if url.username else None,
            password=unquote(url.password) if url.password is not None else None,
            socket_connect_timeout=_CONNECT_TIMEOUT,
            # No socket_timeout: `command` bounds each wait for a reply itself.
            socket_timeout=None,
            # Retries are ours (with backoff, until a deadline); redis-py's own would stretch
            # connect() and hide outages.
            retry=Retry(NoBackoff(), 0),
            max_connections=1000,
            client_name="eventwire",
        )
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT + 2):
                await command(client, "PING")
                # Loaded up front so a server without Lua (or with a broken script) fails here.
                for script in lua.SCRIPTS:
                    await command(client, "SCRIPT", "LOAD", script)
        except (redis_errors.RedisError, OSError, TimeoutError) as error:
            await client.aclose()
            reason = str(error) or type(error).__name__
            raise BackendConnectionError(
                f"cannot connect to Redis at {url.redacted}: {reason}"
            ) from error
        self._client = client
        self._link = Link(client)

    async def close(self) -> None:
        waker, self._waker = self._waker, None
        if waker is not None:
            await waker.close()
        client, self._client = self._client, None
        self._link = None
        if client is not None:
            # Also closes the connections kept by links (in use, to the pool).
            await client.aclose()

    async def retrying(
        self, operation: Callable[[], Awaitable[T]], deadline: float | None = None
    ) -> T:
        """Run `operation`, retrying lost connections with backoff until `deadline` (loop
        time) or forever; past the deadline, raises `BackendConnectionError`."""
        loop = asyncio.get_running_loop()
        backoff = retry_backoff()
        warned = False
        while True:
            try:
                return await operation()
            except _RETRYABLE as error:
                if deadline is not None and loop.time() + backoff.pause > deadline:
                    raise BackendConnectionError(
                        f"lost the connection to Redis at {self.url.redacted}: {error}"
                    ) from error
                if not warned:
                    logger.warning(
                        "eventwire: connection to %s failed (%s); retrying",
                        self.url.redacted,
                        error,
                    )
                    warned = True
                await backoff.wait()

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        if any(m.topic.startswith(PARTITION_PREFIX) for m in messages):
            by_stream: dict[str, list[Message]] = {}
            for m in messages:
                by_stream.setdefault(self.stream_of(m.topic), []).append(m)
            for stream, some in by_stream.items():
                await self._publish_to(stream, some)
            return
        await self._publish_to(self.stream, messages)

    async def _publish_to(self, stream: str, messages: Sequence[Message]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self._send(messages, stream)  # the common case: one try, nothing more
            return
        except _RETRYABLE:
            pass

        async def send_again() -> None:
            todo = messages
            if not self._dedup_window:
                # An earlier try may have stored some of them before its reply was lost.
                stored = await self._stored_since(
                    [m.id for m in messages], loop.time() - started + _CLOCK_SLACK, stream
                )
                todo = [m for m in messages if m.id not in stored]
            if todo:
                await self._send(todo, stream)

        await self.retrying(send_again)

    async def _send(self, messages: Sequence[Message], stream: str) -> None:
        """Store `messages` in one round trip: a publish script call per chunk, or for one
        message with neither a dedup window nor a length cap, the XADD itself (what the
        script would run). Commands go packed by hand on the publisher's own connection."""
        link = self._link
        if link is None:
            raise RuntimeError(f"the redis backend for {self.url.redacted} is not connected")
        if len(messages) == 1 and not self._dedup_window and not self._maxlen:
            m = messages[0]
            trace = trace_fields(m)
            if m.key is None and trace is None:
                stream_bulk = self._stream_bulk if stream == self.stream else bulk(stream)
                payload = XADD % (stream_bulk, bulk(m.id), bulk(m.topic), bulk(m.body))
            else:
                fields: list[str | bytes] = ["id", m.id, "topic", m.topic]
                if m.key is not None:
                    fields += ["key", m.key]
                fields += ["body", m.body]
                for name, value in zip(("traceparent", "tracestate"), trace or (), strict=False):
                    fields += [name, value]
                payload = resp("XADD", stream, "*", *fields)
            replies = await link.call(
                payload + self._wait_call, 1 + bool(self._wait_call), wait=self._waiting()
            )
            self._check_replicas(replies[1:], messages)
            return
        head = (self._maxlen, self._dedup_window)
        calls: list[bytes] = []
        for chunk in _publish_chunks(messages):
            keys = [stream]
            if self._dedup_window:
                keys += [f"{self._prefix}dedup:{m.id}" for m in chunk]
            calls.append(publish_call(self._publish.sha, keys, head, chunk))
        loaded = False
        while calls:
            replies = await link.call(
                b"".join(calls) + self._wait_call,
                len(calls) + bool(self._wait_call),
                wait=self._waiting(),
                raise_errors=False,
            )
            failed: list[bytes] = []
            for call, reply in zip(calls, replies[: len(calls)], strict=True):
                if isinstance(reply, redis_errors.NoScriptError) and not loaded:
                    failed.append(call)  # a restarted server lost its scripts: it did not run
                elif isinstance(reply, Exception):
                    raise reply
            if failed:
                await command(self.client, "SCRIPT", "LOAD", self._publish.source)
                loaded = True
            else:
                self._check_replicas(replies[len(calls) :], messages)
            calls = failed

    def _waiting(self) -> float:
        """How long a publish's WAIT for replicas may block its connection."""
        return self._replica_wait if self._min_replicas else 0.0

    def _check_replicas(self, replies: Sequence[Any], messages: Sequence[Message]) -> None:
        """Raise unless WAIT's reply (if any) counts `min_replicas` replicas."""
        if not replies:
            return
        if isinstance(replies[0], Exception):
            raise replies[0]
        if int(replies[0]) < self._min_replicas:
            raise ReplicationError(
                f"{len(messages)} event(s) from {messages[0].id!r} on {messages[0].topic!r} "
                f"are stored on the Redis primary at {self.url.redacted} but only "
                f"{int(replies[0])} of min_replicas={self._min_replicas} replica(s) had them "
                f"within replica_wait={self._replica_wait:g}s: they may be lost if the primary "
                "fails now. Publish them again (the same event ids: dedup_window= drops "
                "the copies), or check the replicas (INFO replication)"
            )

    async def _stored_since(self, event_ids: list[str], seconds: float, stream: str) -> set[str]:
        """Which of `event_ids` are in `stream`'s entries added in the last `seconds`."""
        found: set[str] = set()
        start = ""
        while True:
            args = [start, int(seconds * 1000), _SCAN_CHUNK, *event_ids]
            start_at, hits = await self._seen(self.client, [stream], args)
            found.update(_text(hit) for hit in hits)
            start = _text(start_at)
            if not start:
                return found

    async def consumer(self, spec: ConsumerSpec) -> Consumer:
        validate_pattern(spec.pattern)
        group = safe_name(spec.name)
        start = _start_id(spec.start)
        reply = await self.retrying(
            lambda: self._create(
                self.client,
                [self.stream_of(spec.pattern), self.registry, self.kinds],
                [spec.name, group, spec.pattern, start, "group" if spec.group else "own"],
            ),
            deadline=asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE,
        )
        if int(reply[0]) == 0:  # refused: another pattern or kind, which the check names
            kind = _text(reply[2]) if len(reply) > 2 and reply[2] else None
            check_consumer(
                spec, self.url, _text(reply[1]), None if kind is None else kind == "group"
            )
        consumer = RedisConsumer(self, spec, group)
        await consumer.prune()
        return consumer

    async def consumers(self) -> list[ConsumerInfo]:
        client = self.client
        deadline = asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE
        registry: dict[Any, Any] = await self.retrying(
            lambda: command(client, "HGETALL", self.registry), deadline
        )
        entries = sorted((_text(name), _text(pattern)) for name, pattern in registry.items())
        if not entries:
            return []
        by_stream: dict[str, list[tuple[str, str]]] = {}
        for name, pattern in entries:
            by_stream.setdefault(self.stream_of(pattern), []).append((name, pattern))
        found: list[ConsumerInfo] = []
        for stream, some in by_stream.items():
            keys = [stream]
            args: list[Any] = [_COUNT_SCAN]
            for name, pattern in some:
                keys += [self.key("delayed", safe_name(name)), self.key("tally", safe_name(name))]
                args += [safe_name(name), pattern]
            counts = await self.retrying(
                functools.partial(self._stats, client, keys, args), deadline
            )
            found += [
                ConsumerInfo(name, pattern, outstanding=int(count), exact=bool(int(exact)))
                for (name, pattern), (count, exact) in zip(some, counts, strict=True)
            ]
        return sorted(found, key=lambda info: info.name)

    async def delete_consumer(self, name: str) -> None:
        group = safe_name(name)
        pattern = await self.retrying(
            lambda: command(self.client, "HGET", self.registry, name),
            asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE,
        )
        keys = [
            self.stream_of(_text(pattern)) if pattern else self.stream,
            self.registry,
            self.key("delayed", group),
            self.key("handled", group),
            self.key("wake", group),
            self.key("tally", group),
            self.kinds,
            self.key("restarts", group),
        ]
        await self.retrying(
            lambda: self._delete(self.client, keys, [name, group]),
            asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE,
        )
        client = self.client
        fields = [
            field
            for field in await command(client, "HKEYS", self.presence_key)
            if _text(field).split(_FIELD_SEPARATOR, 1)[0] == name
        ]
        if fields:
            await command(client, "HDEL", self.presence_key, *fields)
        self._live_marked.discard(name)

    async def beat(self, process: str, consumers: Sequence[str]) -> None:
        now = time.time()
        if now >= self._relive_at:
            self._live_marked.clear()
            self._relive_at = now + _RELIVE_EVERY
        added = [name for name in consumers if name not in self._live_marked]
        client = self.client

        async def send() -> None:
            pipe: Any = client.pipeline(transaction=True)
            stage(pipe, "HSET", self.processes_key, process, repr(now))
            if added:
                fields: list[Any] = []
                for name in added:
                    fields += [f"{name}{_FIELD_SEPARATOR}{process}", repr(now)]
                stage(pipe, "HSET", self.presence_key, *fields)
            try:
                await execute(pipe)
            finally:
                await pipe.reset()

        await self.retrying(send, asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE)
        self._live_marked.update(added)

    async def leave(self, process: str, consumers: Sequence[str]) -> None:
        if not consumers:
            return
        self._live_marked.difference_update(consumers)
        fields: list[Any] = []
        for name in consumers:
            fields += [f"{name}{_FIELD_SEPARATOR}{process}", repr(-time.time())]
        client = self.client
        await self.retrying(
            lambda: command(client, "HSET", self.presence_key, *fields),
            asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE,
        )

    async def presences(self) -> dict[str, list[float]]:
        client = self.client

        async def read() -> tuple[dict[Any, Any], dict[Any, Any]]:
            stored = await command(client, "HGETALL", self.presence_key)
            processes = await command(client, "HGETALL", self.processes_key)
            return stored, processes

        stored, processes = await self.retrying(
            read, asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE
        )
        beats = {_text(process): float(_text(seen)) for process, seen in processes.items()}
        found: dict[str, list[float]] = {}
        stale: list[Any] = []
        horizon = time.time() - PRESENCE_KEPT
        for field, value in stored.items():
            name, _, process = _text(field).partition(_FIELD_SEPARATOR)
            seen = float(_text(value))
            if seen > 0:
                # Running: as recent as the process's own beat (the field is written only
                # now and then).
                seen = max(seen, beats.get(process, 0.0))
            if abs(seen) < horizon:
                stale.append(field)  # a process gone for long: forget it
            else:
                found.setdefault(name, []).append(seen)
        gone = [process for process, seen in beats.items() if seen < horizon]
        if stale or gone:
            with contextlib.suppress(*_RETRYABLE):
                if stale:
                    await command(client, "HDEL", self.presence_key, *stale)
                if gone:
                    await command(client, "HDEL", self.processes_key, *gone)
        return found

    async def first_to_report(self, message_id: str, reporter: str) -> bool:
        # A foreign entry without a topic reaches every subscription of the stream: the first
        # to claim it dead-letters it (the claim lasts as long as handled ids are kept). The
        # claim names its reporter, which claims it again when its letter could not be
        # stored the first time and the entry comes back.
        key = self.key("reported", message_id)
        deadline = asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE
        claimed = await self.retrying(
            lambda: command(self.client, "SET", key, reporter, "NX", "PX", _HANDLED_KEPT_MS),
            deadline,
        )
        if claimed:
            return True
        holder = await self.retrying(lambda: command(self.client, "GET", key), deadline)
        return holder is not None and _text(holder) == reporter

    async def record_handled(self, consumer: str, event_ids: Sequence[str]) -> None:
        key = self.key("handled", safe_name(consumer))
        now = int(time.time() * 1000)
        pairs: list[Any] = []
        for event_id in dict.fromkeys(event_ids):
            pairs += [now, event_id]
        if not pairs:
            return

        async def send() -> None:
            pipe: Any = self.client.pipeline(transaction=False)
            stage(pipe, "ZADD", key, *pairs)
            stage(pipe, "ZREMRANGEBYSCORE", key, "-inf", now - _HANDLED_KEPT_MS)
            stage(pipe, "PEXPIRE", key, _HANDLED_KEPT_MS + 86_400_000)
            try:
                await execute(pipe)
            finally:
                await pipe.reset()

        await self.retrying(send, asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE)

    async def seen_handled(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        ids = list(event_ids)
        if not ids:
            return set()
        key = self.key("handled", safe_name(consumer))
        scores = await self.retrying(
            lambda: command(self.client, "ZMSCORE", key, *ids),
            asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE,
        )
        return {event_id for event_id, score in zip(ids, scores, strict=True) if score is not None}

    async def forget_handled(self, consumer: str) -> None:
        key = self.key("handled", safe_name(consumer))
        await self.retrying(
            lambda: command(self.client, "DEL", key),
            asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE,
        )

    async def sync_group(
        self, group: str, process: str, want: Collection[str], ttl: float
    ) -> GroupView:
        table = self.key("group", safe_name(group))
        args = [process, int(ttl * 1000), *sorted(want)]
        members, held = await self.retrying(
            lambda: self._sync_group(self.client, [table], args),
            asyncio.get_running_loop().time() + ttl / 2,
        )
        return GroupView(
            tuple(sorted(_text(m) for m in members)), frozenset(_text(h) for h in held)
        )

    async def leave_group(self, group: str, process: str) -> None:
        table = self.key("group", safe_name(group))
        await self.retrying(
            lambda: self._leave_group(self.client, [table], [process]),
            asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE,
        )

    async def destroy(self) -> None:
        client = self.client

        async def unlink_all() -> None:
            # SCAN over this namespace's hash tag only: other namespaces are never touched.
            cursor: Any = 0
            while True:
                cursor, found = await command(
                    client, "SCAN", cursor, "MATCH", self._prefix + "*", "COUNT", 1000
                )
                if found:
                    await command(client, "UNLINK", *found)
                if int(cursor) == 0:
                    return

        await self.retrying(unlink_all, asyncio.get_running_loop().time() + 10.0)


class Wake(NamedTuple):
    """Why the waker woke a waiting consumer."""

    # Redeliveries may be due (a delayed entry, a lease that ran out).
    due: bool = False
    # Entries for the group came: every entry after ``since`` up to ``before`` (stream entry
    # ids) is for other topics, so the group may skip them (the fetch script's step 3a).
    skip: tuple[str, str] | None = None


class Waker:
    """Waits for new entries on one connection for a backend's consumers (all but those
    that block in reads of their own, see `RedisConsumer`), which would otherwise each block
    on a connection of their own and be woken by every entry: thousands of subscriptions in
    one process cost one connection, and a publish wakes only the consumers it is for.

    A consumer registers (`expect`) before a read without wait, and when that read brought
    nothing it waits on the future it got. While anyone waits, the waker reads each new
    entry of the stream (XREAD from the last entry it read, blocking when there is none) and
    wakes the waiting consumers whose pattern matches its topic, and those of the groups the
    namespace's wakes stream names (entries handed back by nak or close). A registration
    made before the read misses no entry that came after it. Every ``ack_wait``/4 (at most
    1 s) one script call per `_DUE_CHUNK` waiting groups finds those with redeliveries due
    (a delayed entry due, a lease run out), whose consumers are woken to run the fetch
    script: an idle consumer makes no call of its own.

    An idle group's position falls behind the stream by every entry published for others
    since it last read; a woken group is told which of those it can skip (`Wake.skip`): the
    waker read each entry after the position the stream was at when the group began to wait
    (``since``), and the first for the group came after ``before``. Thousands of idle groups
    are thus never read through entry by entry.
    """

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        # group -> waiting consumer -> its future (result: whether redeliveries are due)
        self._waiting: dict[str, dict[RedisConsumer, asyncio.Future[Wake]]] = {}
        # group -> the last entry the waker had read when the group began to wait (None:
        # not known), for `Wake.skip`.
        self._since: dict[str, bytes | None] = {}
        self._count = 0
        self._wanted = asyncio.Event()
        # Of the shared consumers open: how many per group, each group's shortest min idle
        # time (ms), the groups of each pattern, and the patterns with wildcards.
        self._members: dict[str, int] = {}
        self._min_idle: dict[str, int] = {}
        self._pattern_groups: dict[str, set[str]] = {}
        self._wild: list[str] = []
        # topic -> the groups it is for (None: every group, as for a foreign entry's topic)
        self._routes: dict[bytes | None, tuple[str, ...] | None] = {}
        self._period = _MAX_BLOCK
        # The last entries read of the stream and of the wakes stream (None: to be learned).
        self._ids: tuple[bytes, bytes] | None = None
        self._connection: Any = None
        self._due_link = Link(backend.client, keep=False)
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, consumer: RedisConsumer) -> None:
        """A shared consumer opened."""
        group = consumer.group
        count = self._members.get(group, 0)
        self._members[group] = count + 1
        self._min_idle[group] = min(
            self._min_idle.get(group, consumer.min_idle_ms), consumer.min_idle_ms
        )
        self._period = min(self._period, consumer.reclaim_every)
        if count == 0:
            pattern = consumer.spec.pattern
            groups = self._pattern_groups.setdefault(pattern, set())
            if not groups and not is_topic(pattern):
                self._wild.append(pattern)
            groups.add(group)
            self._routes.clear()

    def remove(self, consumer: RedisConsumer) -> None:
        """A shared consumer closed: its wait, if any, ends."""
        self._wake(consumer, Wake())
        group = consumer.group
        count = self._members.get(group, 0) - 1
        if count > 0:
            self._members[group] = count
            return
        self._members.pop(group, None)
        self._min_idle.pop(group, None)
        pattern = consumer.spec.pattern
        groups = self._pattern_groups.get(pattern)
        if groups is not None:
            groups.discard(group)
            if not groups:
                del self._pattern_groups[pattern]
                if pattern in self._wild:
                    self._wild.remove(pattern)
        self._routes.clear()

    def expect(self, consumer: RedisConsumer) -> asyncio.Future[Wake]:
        """Register `consumer` as waiting for entries that come from now on: the future is
        done once one may have come for it."""
        future: asyncio.Future[Wake] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(consumer.group, {})
        if not waiting:
            self._since[consumer.group] = None if self._ids is None else self._ids[0]
        if consumer not in waiting:
            self._count += 1
        waiting[consumer] = future
        if not self._wanted.is_set():
            self._wanted.set()
        if not self._tasks:
            loop = asyncio.get_running_loop()
            name = f"eventwire:{self.backend.namespace}:waker"
            self._tasks = [
                loop.create_task(self._read_loop(), name=name),
                loop.create_task(self._due_loop(), name=name + ":due"),
            ]
        return future

    def forget(self, consumer: RedisConsumer) -> None:
        """`consumer` waits no more (it registers again before its next wait)."""
        waiting = self._waiting.get(consumer.group)
        if waiting is not None and waiting.pop(consumer, None) is not None:
            self._count -= 1

    def _wake(self, consumer: RedisConsumer, wake: Wake) -> None:
        waiting = self._waiting.get(consumer.group)
        future = None if waiting is None else waiting.pop(consumer, None)
        if future is not None:
            self._count -= 1
            if not future.done():
                future.set_result(wake)

    def _wake_group(self, group: str, wake: Wake) -> None:
        waiting = self._waiting.pop(group, None)
        if waiting:
            self._count -= len(waiting)
            for future in waiting.values():
                if not future.done():
                    future.set_result(wake)

    def _wake_all(self) -> None:
        for group in list(self._waiting):
            self._wake_group(group, Wake())

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        connection, self._connection = self._connection, None
        client = self.backend._client
        if connection is not None and client is not None:
            pool: Any = client.connection_pool
            await pool.release(connection)
        self._wake_all()

    async def _read_loop(self) -> None:
        backend = self.backend
        backoff = retry_backoff()
        lag = 0
        while True:
            if not self._count:
                self._wanted.clear()
                await self._wanted.wait()
            try:
                if self._connection is None:
                    pool: Any = backend.client.connection_pool
                    self._connection = await pool.get_connection()
                connection = self._connection
                if self._ids is None or not connection.is_connected:
                    # (Re)connected: the server may have restarted with other entries.
                    # Whoever waits reads for themselves; new entries count from here.
                    self._ids = None
                    newest = await exchange(
                        connection,
                        resp("XREVRANGE", backend.stream, "+", "-", "COUNT", 1)
                        + resp("XREVRANGE", backend.wakes, "+", "-", "COUNT", 1),
                        2,
                        0.0,
                    )
                    first, second = (reply[0][0] if reply else b"0-0" for reply in newest)
                    self._ids = (first, second)
                    self._wake_all()
                    lag = 0
                    backoff.reset()
                    continue
                args: tuple[Any, ...] = ("XREAD", "COUNT", _WAKER_COUNT)
                if not lag:
                    args += ("BLOCK", int(_WAKER_BLOCK * 1000))
                call = resp(*args, "STREAMS", backend.stream, backend.wakes, *self._ids)
                [reply] = await exchange(connection, call, 1, wait=0.0 if lag else _WAKER_BLOCK)
                backoff.reset()
            except _RETRYABLE as error:
                # Those waiting are woken once the waker reads again (above).
                self._ids = None
                logger.debug("eventwire: the waker of %s failed: %s", backend.url.redacted, error)
                await backoff.wait()
                continue
            except redis_errors.ResponseError:
                logger.exception("eventwire: the waker of %s failed", backend.url.redacted)
                self._ids = None
                await backoff.wait()
                continue
            lag = lag + _WAKER_COUNT if self._route(reply) else 0
            if lag >= _WAKER_LAG:
                self._ids = None  # far behind: skip to the end, and everyone reads

    def _route(self, reply: Any) -> bool:
        """Wake the consumers the entries of an XREAD reply are for; whether it was full."""
        if not reply or self._ids is None:
            return False
        stream = self.backend.stream
        streams = reply.items() if isinstance(reply, dict) else reply
        events_id, wakes_id = self._ids
        full = every = False
        # group -> the entry before the first one for it (None: woken for a handed-back one)
        groups: dict[str, bytes | None] = {}
        for name, entries in streams:
            if not entries:
                continue
            full = full or len(entries) >= _WAKER_COUNT
            if _text(name) != stream:
                wakes_id = entries[-1][0]
                for _, fields in entries:
                    if fields and len(fields) > 1:
                        groups.setdefault(_text(fields[1]), None)
                continue
            routes = self._routes
            previous = events_id
            for entry_id, fields in entries:
                topic, _ = _topic_body(fields)
                route = routes[topic] if topic in routes else self._route_of(topic)
                if route is None:
                    every = True
                    break
                for group in route:
                    groups.setdefault(group, previous)
                previous = entry_id
            events_id = entries[-1][0]
        self._ids = (events_id, wakes_id)
        if every:
            self._wake_all()
            return full
        since = self._since
        for group, before in groups.items():
            start = since.get(group)
            skip = None if start is None or before is None else (_text(start), _text(before))
            self._wake_group(group, Wake(skip=skip))
        return full

    def _route_of(self, topic: bytes | None) -> tuple[str, ...] | None:
        """The groups whose pattern matches `topic` (None: all, as every consumer gets an
        entry without a valid topic), remembered."""
        text = None if topic is None else _text(topic)
        route: tuple[str, ...] | None = None
        if text is not None and is_topic(text):
            groups = set(self._pattern_groups.get(text, ()))
            for pattern in self._wild:
                if pattern_matches(pattern, text):
                    groups.update(self._pattern_groups[pattern])
            route = tuple(groups)
        if len(self._routes) >= _TOPICS_KEPT:
            self._routes.clear()
        self._routes[topic] = route
        return route

    async def _due_loop(self) -> None:
        backend = self.backend
        groups: list[str] = []
        while True:
            # Thousands of idle groups are looked at less often: a look costs per group, and
            # what it finds (a dead process's lease ran out, a delayed retry is due) is not
            # expected to the second.
            await asyncio.sleep(max(self._period, len(groups) / _DUE_GROUPS_PER_SECOND))
            groups = [group for group, waiting in self._waiting.items() if waiting]
            for chunk in _chunks(groups, _DUE_CHUNK):
                # Packed by hand: thousands of arguments a second for an idle process.
                keys = [bulk(backend.key("delayed", group)) for group in chunk]
                args = [bulk(group) + bulk(self._min_idle.get(group, 1)) for group in chunk]
                call = b"*%d\r\n%s%s%s%s%s" % (
                    4 + 3 * len(chunk),
                    bulk("EVALSHA"),
                    bulk(backend.due_script.sha),
                    bulk(1 + len(chunk)),
                    bulk(backend.stream),
                    b"".join(keys + args),
                )
                # Housekeeping: a failed round is tried again in the next.
                try:
                    [found] = await self._due_link.call(call)
                except redis_errors.NoScriptError:  # a restarted server lost its scripts
                    with contextlib.suppress(*_RETRYABLE):
                        source = backend.due_script.source
                        await command(backend.client, "SCRIPT", "LOAD", source)
                    continue
                except _RETRYABLE:
                    continue
                for number in found:
                    self._wake_group(chunk[int(number) - 1], Wake(due=True))


class RedisConsumer(Consumer):
    """One process's member of a consumer group (a Redis consumer with a unique name)."""

    def __init__(self, backend: RedisBackend, spec: ConsumerSpec, group: str) -> None:
        self.backend = backend
        self.spec = spec
        self.group = group
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        # The namespace's events, or a partition's copies (`stream_of`).
        self.stream = backend.stream_of(spec.pattern)
        # Set by `take_over`: the next fetches claim every pending entry of the group at once
        # (and the delayed ones), oldest first, before reading new entries.
        self._taking_over = False
        self._delayed = backend.key("delayed", group)
        self._handled = backend.key("handled", group)
        self._restarts = backend.key("restarts", group)
        self._wake = backend.key("wake", group)
        self.min_idle_ms = max(1, int(spec.ack_wait * 1000))
        # How often a fetcher looks for deliveries that outlived ack_wait: redelivery comes
        # at most this long after ack_wait.
        self.reclaim_every = min(max(spec.ack_wait / 4, 0.05), _MAX_BLOCK)
        self._next_reclaim = 0.0
        self._claim_cursor = "0-0"
        # Whether the next fetch runs the script (first, after a delivery by it or a bump of
        # the wake stream), and when the next delayed entry it knows of is due (loop time).
        self._scan = True
        self._due_at = math.inf
        self._wake_group = False
        self._next_prune = 0.0
        self._closed = False
        # This consumer's own connection for its fetches, and the entry ids of the
        # acknowledgements that go along with its next fetch command (`ack_and_fetch`);
        # another for acknowledgements sent on their own, which go beside fetches. Past the
        # first `_DEDICATED` consumers of the backend, they are shared: pooled connections
        # borrowed per call, and the backend's waker waits for new entries (see `_blocking`).
        # A partition's stream is not the waker's: its consumers always wait on their own.
        own_stream = self.stream != backend.stream
        self._shared = not own_stream and backend.dedicated >= _DEDICATED
        if not self._shared and not own_stream:
            backend.dedicated += 1
        slots = backend.shared_calls if self._shared else None
        self._link = Link(backend.client, keep=not self._shared, slots=slots)
        self._ack_link = Link(backend.client, keep=not self._shared, slots=slots)
        # Whether it waits in a blocking read of its own (else on the waker), and how much
        # more often such reads woke it only for other topics' entries than for its own.
        self._blocking = not self._shared
        self._futile = 0
        # Its registration with the waker (`Waker.expect`) while it waits there.
        self._waiter: asyncio.Future[Wake] | None = None
        # What the waker said the group may skip (`Wake.skip`), for the next script call.
        self._skip: tuple[str, str] | None = None
        if self._shared:
            backend.waker.add(self)
        self._acks_along: list[str] = []
        # Whether the last full read was mostly of other topics: the script, which filters
        # in Redis, then reads the backlog.
        self._sparse = False
        # topic (bytes) -> (topic, whether it is delivered: matches, or is no valid topic)
        self._topics: dict[bytes, tuple[str, bool]] = {}
        # Whether a read saw the wake stream bumped (entries handed back) since the script
        # last ran, and how many of the script's last deliveries were redeliveries.
        self._woken = False
        self._redelivered = 0

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the consumer {self.spec.name!r} is closed")

    async def take_over(self) -> None:
        if self.spec.exclusive:
            self._taking_over = True
            self._claim_cursor = "0-0"

    async def prune(self) -> None:
        """Remove consumers of dead processes from the group (nothing pending, idle 1 h)."""
        loop = asyncio.get_running_loop()
        self._next_prune = loop.time() + _PRUNE_EVERY
        # Housekeeping only: if it fails, the next round tries again.
        with contextlib.suppress(*_RETRYABLE):
            await self.backend.prune_script(
                self.backend.client, [self.stream], [self.group, self.name, _PRUNE_IDLE_MS]
            )

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        self._check_open()
        if limit <= 0:
            return []
        deadline = asyncio.get_running_loop().time() + max(wait, 0.0)
        backoff = retry_backoff()
        while not self._closed:
            try:
                found = await self._fetch_turn(limit, deadline)
                if found is not None:
                    if found and self._waiter is not None:
                        # More may wait: the next fetch reads before it waits again.
                        self._waiter = None
                        self.backend.waker.forget(self)
                    return found
                backoff.reset()
            except redis_errors.ResponseError as error:
                if "NOGROUP" in str(error):
                    if self._closed:
                        return []  # an inbox, removed by its close meanwhile
                    if not self._scan:
                        # Maybe only the wake stream's group is missing: the script tells.
                        self._scan = True
                        self._wake_group = False
                        continue
                    raise LookupError(
                        f"durable consumer {self.spec.name!r} no longer exists in namespace "
                        f"{self.backend.namespace!r} of {self.backend.url.redacted} (deleted?)"
                    ) from error
                if not isinstance(error, _RETRYABLE):
                    raise
                if not await self._pause(backoff, deadline):
                    return []
            except _RETRYABLE:
                if not await self._pause(backoff, deadline):
                    return []
        return []  # closed meanwhile

    async def ack_and_fetch(
        self, acks: Sequence[Delivery], limit: int, wait: float
    ) -> list[Delivery]:
        """The acknowledgements go in the same write as the fetch's first command (an XACK
        ahead of it): no round trip of their own."""
        if not acks:
            return await self.fetch(limit, wait)
        self._acks_along = [d.handle for d in acks]
        try:
            deliveries = await self.fetch(limit, wait)
        except BaseException:
            self._acks_along = []  # the caller sends them again
            raise
        if self._acks_along:  # no command went out (closed, or the wait ran out retrying)
            self._acks_along = []
            await self.ack(acks)
        return deliveries

    async def _call(self, command: bytes, *, wait: float = 0.0) -> Any:
        """The reply to `command`, sent on this consumer's connection behind an XACK of the
        acknowledgements waiting to go along."""
        acks = self._acks_along
        if not acks:
            return (await self._link.call(command, wait=wait))[0]
        payload = resp("XACK", self.stream, self.group, *acks) + command
        acked, reply = await self._link.call(payload, 2, wait=wait, raise_errors=False)
        if not isinstance(acked, Exception):
            self._acks_along = []
        for outcome in (acked, reply):
            if isinstance(outcome, Exception):
                raise outcome
        return reply

    async def _fetch_turn(self, limit: int, deadline: float) -> list[Delivery] | None:
        """One turn of `fetch`: the script when redeliveries or a backlog may wait, else a
        blocking read of new entries. The deliveries (or ``[]`` once the wait is over), or
        None to take another turn."""
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_prune:
            await self.prune()
        now = loop.time()
        waiter = self._waiter
        if waiter is not None and waiter.done():
            # Woken: by redeliveries due, or else by entries that may be for us (the waker
            # looked for redeliveries while we waited).
            self._waiter = None
            wake = Wake() if waiter.cancelled() else waiter.result()
            if wake.due:
                self._next_reclaim = 0.0
            else:
                self._next_reclaim = max(self._next_reclaim, now + self.reclaim_every)
            self._skip = wake.skip
        reclaim = now >= self._next_reclaim and self._waiter is None
        scanned = False
        if (
            self._scan
            or reclaim
            or self._taking_over
            or now >= self._due_at
            or self._skip is not None
        ):
            deliveries = await self._run_script(limit, loop)
            if deliveries:
                return await self._handed(deliveries)
            scanned = True
            if self._scan:  # the script's scan budget ran out: more to look at
                return [] if loop.time() >= deadline else None
        if not self._blocking:
            return await self._wait_turn(limit, deadline)
        remaining = deadline - loop.time()
        if remaining <= 0 and scanned:
            return []
        block = min(
            remaining,
            _MAX_BLOCK,
            max(self._next_reclaim - loop.time(), 0.001),
            max(self._due_at - loop.time(), 0.001),
        )
        deliveries = await self._read(limit, block if remaining > 0 else None)
        if deliveries:
            return await self._handed(deliveries)
        return [] if loop.time() >= deadline else None

    async def _read(self, limit: int, block: float | None) -> list[Delivery]:
        """`_read_new`, and if entries were handed back meanwhile, the script's redeliveries
        ahead of the new entries (they are older)."""
        deliveries = await self._read_new(limit, block)
        if deliveries and self._woken and len(deliveries) < limit:
            found = await self._run_script(limit - len(deliveries), asyncio.get_running_loop())
            split = self._redelivered
            deliveries = found[:split] + deliveries + found[split:]
        return deliveries

    async def _wait_turn(self, limit: int, deadline: float) -> list[Delivery] | None:
        """A shared consumer's turn after the script: new entries without waiting, else a
        wait for the waker (registered before the read, so that nothing that comes after
        the read goes unnoticed). Registered, it only waits."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = self.backend.waker.expect(self)
            deliveries = await self._read(limit, None)
            if deliveries:
                return await self._handed(deliveries)
            if self._scan:  # the wake stream was bumped: the script runs next
                return None
        remaining = deadline - loop.time()
        if remaining <= 0:
            return []
        if waiter.done():
            return None
        # Until woken, the next delayed entry known falls due, or the fetch's wait ends.
        due_in = self._due_at - loop.time()
        await asyncio.wait((waiter,), timeout=max(min(remaining, due_in), 0.001))
        return [] if not waiter.done() and remaining <= due_in else None

    async def _handed(self, deliveries: list[Delivery]) -> list[Delivery]:
        if self._closed:
            # Closed while this fetch ran: what it took goes back at once (an inbox's went
            # with its group).
            if not self.spec.ephemeral:
                await self._release()
            return []
        return deliveries

    async def _run_script(self, limit: int, loop: asyncio.AbstractEventLoop) -> list[Delivery]:
        """Due naks, deliveries held too long by others, then new entries (filtered in
        Redis): the fetch script. Learns when the next delayed entry is due."""
        backend = self.backend
        taking = self._taking_over
        reclaim = taking or loop.time() >= self._next_reclaim
        script = backend.fetch_script
        call = resp(
            "EVALSHA",
            script.sha,
            3,
            self.stream,
            self._delayed,
            self._wake,
            self.group,
            self.name,
            limit,
            self.spec.pattern,
            "1" if reclaim else "0",
            # Taking over: every pending entry at once, and no new ones until all are taken.
            0 if taking else self.min_idle_ms,
            self._claim_cursor,
            0 if taking else _SCAN_BUDGET,
            *(self._skip or ("", "")),
        )
        self._skip = None
        try:
            reply = await self._call(call)
        except redis_errors.NoScriptError:  # a restarted server lost its scripts
            await command(backend.client, "SCRIPT", "LOAD", script.source)
            reply = await self._call(call)
        if reclaim:
            self._claim_cursor = _text(reply[2])
            self._next_reclaim = loop.time() + self.reclaim_every
            if taking and self._claim_cursor == "0-0":
                self._taking_over = False
        if not self._wake_group:
            await self._create_wake_group()
        due_ms, now_ms = int(reply[4]), int(reply[5])
        self._due_at = math.inf if due_ms < 0 else loop.time() + (due_ms - now_ms) / 1000
        redelivered = self._redelivered = int(reply[1])
        self._woken = False
        deliveries = _unpack_deliveries(reply[0], redelivered) if reply[0] else []
        # More may be due when the script stopped at `limit`, or waiting when it stopped at
        # its scan budget; a backlog mostly of other topics is read on by the script, which
        # filters in Redis. Otherwise new entries come by XREADGROUP, whose native reply is
        # much cheaper for Redis than the script's.
        self._scan = (
            bool(int(reply[3]))
            or redelivered >= limit
            or (self._sparse and len(deliveries) >= limit)
        )
        return deliveries

    async def _create_wake_group(self) -> None:
        """The group's reader of the wake stream, so that one blocking XREADGROUP waits for
        new entries and for entries handed back (nak, close) at once."""
        with contextlib.suppress(redis_errors.ResponseError):  # BUSYGROUP: there already
            await self._link.call(resp("XGROUP", "CREATE", self._wake, self.group, "$", "MKSTREAM"))
        self._wake_group = True

    async def _read_new(self, limit: int, block: float | None) -> list[Delivery]:
        """New entries, waiting up to `block` seconds for some (None: no wait): XREADGROUP
        claims them as they arrive, with no script call in between. Entries for other topics
        are acknowledged at once; a bump of the wake stream makes the next fetch run the
        script (entries were handed back)."""
        count = min(limit, _READ_COUNT)
        if block is None:
            args: tuple[Any, ...] = ("XREADGROUP", "GROUP", self.group, self.name, "COUNT", count)
        else:
            millis = max(1, int(block * 1000))
            args = ("XREADGROUP", "GROUP", self.group, self.name, "COUNT", count, "BLOCK", millis)
        reply = await self._call(
            resp(*args, "STREAMS", self.stream, self._wake, ">", ">"), wait=block or 0.0
        )
        if not reply:
            return []
        streams = reply.items() if isinstance(reply, dict) else reply
        deliveries: list[Delivery] = []
        skipped: list[Any] = []
        append = deliveries.append
        topics = self._topics
        for name, entries in streams:
            if _text(name) != self.stream:
                self._scan = self._woken = True
                await self._link.call(
                    resp("XACK", self._wake, self.group, *(e[0] for e in entries))
                )
                continue
            for entry_id, fields in entries:
                topic_raw, body = _topic_body(fields)
                known = topics.get(topic_raw) if topic_raw is not None else None
                if known is None:
                    known = self._classify(topic_raw)
                if known[1]:
                    append(Delivery(known[0], body, 1, entry_id.decode()))
                else:
                    skipped.append(entry_id)
            if len(entries) >= count and len(skipped) * 2 > len(entries):
                # A backlog mostly of other topics: the script filters it in Redis.
                self._scan = self._sparse = True
            else:
                self._sparse = False
        if skipped:
            await self._link.call(resp("XACK", self.stream, self.group, *skipped))
        if block is not None and self._blocking and (deliveries or skipped):
            self._count_wake(bool(deliveries))
        return deliveries

    def _count_wake(self, fruitful: bool) -> None:
        """A blocking read woken mostly by other topics' entries (each publish wakes every
        blocking reader of the stream) costs a read and an acknowledgement per entry: such a
        consumer goes on to wait on the waker, which wakes it only for its own."""
        if fruitful:
            self._futile = max(self._futile - _FRUITFUL_WEIGHT, 0)
            return
        self._futile += 1
        if self._futile >= _FUTILE_WAKES:
            self._blocking = False
            self.backend.waker.add(self)

    def _classify(self, topic_raw: bytes | None) -> tuple[str, bool]:
        """A new entry's topic and whether it is delivered: it matches the pattern, or it is
        no valid topic (a foreign producer's entry, which the bus dead-letters)."""
        topic = None if topic_raw is None else _text(topic_raw)
        delivered = (
            topic is None or not is_topic(topic) or pattern_matches(self.spec.pattern, topic)
        )
        known = (topic or "", delivered)
        if topic_raw is not None:
            if len(self._topics) >= _TOPICS_KEPT:
                self._topics.clear()
            self._topics[topic_raw] = known
        return known

    async def _pause(self, backoff: Backoff, deadline: float) -> bool:
        """Sleep before retrying a lost connection; False when the fetch's wait is over."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return False
        await backoff.wait(remaining)
        return True

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + OPERATION_RETRY_DEADLINE

    async def ack(self, deliveries: Sequence[Delivery], *, handled_ids: Sequence[str] = ()) -> None:
        if not deliveries and not handled_ids:
            return
        backend = self.backend
        client = backend.client
        ids = [d.handle for d in deliveries]
        # Entries that came back may have a count of restarts: forgotten with their ack.
        returned = [d.handle for d in deliveries if d.attempt > 1]

        async def send() -> None:
            if not handled_ids and not returned:
                await self._ack_link.call(resp("XACK", self.stream, self.group, *ids))
                return
            # One MULTI: the handled ids are recorded exactly when the entries are acked.
            pipe: Any = client.pipeline(transaction=True)
            if ids:
                stage(pipe, "XACK", self.stream, self.group, *ids)
            if returned:
                stage(pipe, "HDEL", self._restarts, *returned)
            if handled_ids:
                now = int(datetime.now(UTC).timestamp() * 1000)
                pairs: list[Any] = []
                for event_id in handled_ids:
                    pairs += (now, event_id)
                stage(pipe, "ZADD", self._handled, *pairs)
                stage(pipe, "ZREMRANGEBYSCORE", self._handled, "-inf", now - _HANDLED_KEPT_MS)
                # The whole set goes a day after its last write (a consumer nobody runs).
                stage(pipe, "PEXPIRE", self._handled, _HANDLED_KEPT_MS + 86_400_000)
            try:
                await execute(pipe)
            finally:
                await pipe.reset()

        await backend.retrying(send, self._deadline())

    def foreign(self, delivery: Delivery) -> ForeignMessage:
        return foreign_entry(delivery.topic, delivery.body, str(delivery.handle))

    async def nak(self, delivery: Delivery, delay: float = 0.0) -> None:
        backend = self.backend
        delay_ms = max(0, int(delay * 1000))
        await backend.retrying(
            lambda: backend.nak_script(
                backend.client,
                [self.stream, self._delayed, self._wake, backend.wakes],
                [self.group, self.name, delivery.handle, delay_ms],
            ),
            self._deadline(),
        )

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        backend = self.backend
        for chunk in _chunks([d.handle for d in deliveries], _ID_CHUNK):
            args = [self.group, self.name, *chunk]
            call = functools.partial(backend.extend_script, backend.client, [self.stream], args)
            await backend.retrying(call, self._deadline())

    async def restarted(self, delivery: Delivery) -> int:
        client = self.backend.client

        async def count() -> int:
            pipe: Any = client.pipeline(transaction=True)
            stage(pipe, "HINCRBY", self._restarts, delivery.handle, 1)
            # Like the handled ids: gone a while after the last write (a consumer nobody runs).
            stage(pipe, "PEXPIRE", self._restarts, _HANDLED_KEPT_MS + 86_400_000)
            try:
                return int((await execute(pipe))[0])
            finally:
                await pipe.reset()

        return await self.backend.retrying(count, self._deadline())

    async def handled(self, event_ids: Sequence[str]) -> set[str]:
        return await self.backend.seen_handled(self.spec.name, event_ids)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        backend = self.backend
        if not self._blocking:
            backend.waker.remove(self)
        if not self._shared:
            backend.dedicated -= 1
        await self._link.close()
        await self._ack_link.close()
        if backend._client is None:
            return
        if self.spec.ephemeral:
            await backend.delete_consumer(self.spec.name)
            return
        # What this consumer still holds is due again now, for the group's other consumers;
        # if Redis is unreachable it comes back after ack_wait instead.
        try:
            await self._release()
        except BackendConnectionError:
            logger.warning(
                "eventwire: could not hand back the deliveries of %s to %s; they return after "
                "ack_wait",
                self.spec.name,
                backend.url.redacted,
            )

    async def _release(self) -> None:
        backend = self.backend
        await backend.retrying(
            lambda: backend.release_script(
                backend.client,
                [self.stream, self._delayed, self._wake, backend.wakes],
                [self.group, self.name],
            ),
            self._deadline(),
        )
