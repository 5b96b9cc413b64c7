"""The ``nats://[user:password@]host:port?namespace=...`` backend: NATS JetStream.

Layout on the server, per namespace ``ns``:

- stream ``eventwire_<ns>`` (file storage, limits retention) holds subjects ``<ns>.>``: topic
  ``a.b`` is subject ``<ns>.a.b``; each message carries ``Nats-Msg-Id: <event id>`` so a
  retried publish is stored once (within the stream's 2-minute duplicate window);
- one durable pull consumer per subscription name (`safe_name`), filtered on ``<ns>.<pattern>``
  (eventwire's ``*`` and ``>`` are NATS's), explicit acks, unlimited redeliveries (the bus
  dead-letters); its description records the subscription's name and pattern;
- KV bucket ``eventwire_<ns>_handled`` (created on first use, TTL `base.HANDLED_KEPT`: 7 days)
  holds handled event ids under ``<consumer>.<event id>``.
- A ``partitions=N`` subscription's partitions (`eventwire.backends.partitions`) are subjects
  ``<ns>._p.<tag>.<n>`` of the same stream, a durable consumer each; KV bucket
  ``eventwire_<ns>_groups`` holds each such subscription's table of members and leases (one
  JSON entry, changed by compare-and-set; wall-clock times). JetStream redelivers what a dead
  process held only after ``ack_wait``, behind newer messages, so whoever takes a partition
  whose consumer has deliveries beyond its acknowledgement floor starts it again just after
  that floor (`take_over`).

When the server closes the connection on an error of its own (a ``-ERR`` such as a protocol
line over its limit), nats-py gives the connection up for good; the backend then opens a new
one, logs the server's error, and raises it to the publishes that were in flight (each may or
may not have been stored: the event id deduplicates a retry).

Optional URL settings: ``?max_age=<duration>`` (seconds, or ``12h``, ``7d``...) caps how long
the stream keeps events (default 0: forever) and ``?replicas=<n>`` sets its replication in a
cluster (default 1), for the stream and the KV buckets; both apply only when they are created.
``?servers=host:port,...`` names more nodes of a cluster to connect through when the URL's
host is down; once connected, the client also learns the cluster's other nodes from the server
and reconnects to any of them (docs/backends.md, "Running on a NATS cluster").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import heapq
import itertools
import json
import logging
import math
import random
import re
import time
import weakref
from collections import deque
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast
from urllib.parse import unquote

import nats.aio.client
import nats.errors
import nats.js.errors
from nats.aio.client import Client, Server
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.api import (
    ConsumerInfo as NatsConsumerInfo,
)
from nats.js.kv import KeyValue

from eventwire.backends.base import (
    EPHEMERAL_KEPT,
    HANDLED_KEPT,
    OPERATION_RETRY_DEADLINE,
    PRESENCE_KEPT,
    BackendCapabilityError,
    BackendConnectionError,
    Backoff,
    Capabilities,
    Consumer,
    ConsumerInfo,
    ConsumerSpec,
    Delivery,
    Message,
    check_consumer,
    retry_backoff,
    safe_name,
)
from eventwire.backends.broker import BrokerBackend
from eventwire.backends.journal import Journal
from eventwire.backends.nats_journal import NatsJournal
from eventwire.backends.partitions import GroupView
from eventwire.backends.url import BusURL, URLOptions
from eventwire.errors import EventwireError
from eventwire.foreign import ForeignMessage
from eventwire.topics import is_reserved, validate_pattern

logger = logging.getLogger("eventwire")

T = TypeVar("T")

_DEFAULT_PORT = 4222
# The ``?option=`` settings a nats:// URL takes (besides ``namespace``).
OPTIONS = ("max_age", "replicas", "servers")
_CONNECT_TIMEOUT = 5.0  # the whole of connect(), first attempt to stream ready
_ATTEMPT_TIMEOUT = 2  # one TCP connect attempt
_REQUEST_TIMEOUT = 5.0  # one JetStream API call, publish or ack round trip
# How long a publish sent again waits for its PubAck, for one message (a full window waits
# `_REQUEST_TIMEOUT`). A stream whose leader died drops what was sent to it: a cluster elects
# a new leader in about 5 s, and a retry that waited the whole timeout again would stall
# publishing twice as long. Sending again is harmless: the event id deduplicates it.
_RETRY_PATIENCE = 1.0
_PUBLISH_WINDOW = 512  # publishes in flight at once (one round trip per window)
_GRACE = 0.5  # round-trip allowance past a fetch's `wait` when the server is slow
# How late a standing request's status may come before it counts as dropped.
_LATE_STATUS = 0.02
# Longest a pull request stands (its expiry): what stopping a consumer may wait for.
_STANDING_PULL = 0.25
# An idle consumer (two standing requests in a row brought nothing) keeps none standing: a
# subscription to its own subjects wakes it when an event is published there, and it asks
# for what is ready now (a redelivery: a lease ran out, a nak's delay passed) every
# _IDLE_LOOK seconds, or less often with many idle consumers: at most _IDLE_LOOKS_PER_SECOND
# asks a second on a connection, on the ticks of a _LOOK_TICK clock (sent together).
_IDLE_LOOK = 1.0
_IDLE_LOOKS_PER_SECOND = 100.0
_LOOK_TICK = 0.5
# Consumers asking at once whether they still exist (see `NatsBackend.existence_checks`).
_EXISTENCE_CHECKS = 4
# A process's beat is one presence key, `processes.<process>`; each consumer's own key,
# `<consumer>.<process>`, is written when the process starts running it and rewritten in
# turn so that each is rewritten every _RELIVE_EVERY seconds (another process may have
# removed it meanwhile: `eventwire subscriptions delete`).
_BEATS = "processes"
_RELIVE_EVERY = 300.0
_ACK_PREFIX = "$JS.ACK."
# Part of ack_wait after which a consumer counts a delivery it holds (since it came or was last
# extended) as lost: JetStream may have delivered it to another process already. JetStream's
# clock started a little earlier than ours, when it sent the message.
_LEASE_SURE = 0.9
# Consumers each page of a listing repeats from the one before (see `consumers`).
_LISTING_OVERLAP = 64
# Times one listing steps back after a page that skipped some, before it takes what it got.
_LISTING_BACKS = 20
# JetStream's "temporarily unavailable": a cluster electing its meta leader.
_JETSTREAM_UNAVAILABLE = 10008
# How long connecting waits for a cluster that lost a node to elect its meta and stream
# leaders (nats-server 2.9 waits 4 to 9 s before each election; a loaded machine, longer),
# asking every _ELECTION_ASK seconds.
_ELECTION_WAIT = 30.0
_ELECTION_ASK = 2.0
_DIRECT_ID = re.compile(r"[A-Za-z0-9_=-]{1,200}")

# Errors that a reconnect or a JetStream restart cures: retry them.
_TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)
# A connection nats-py closed after a server error is replaced (see `NatsBackend._reopen`):
# retried like the transient errors, until `close()`.
_TRANSIENT_OR_REPLACED: tuple[type[BaseException], ...] = (
    *_TRANSIENT,
    nats.errors.ConnectionClosedError,
)


class _LenientClient(Client):
    """A NATS client that survives foreign messages nats-py would choke on: a subject that is
    not UTF-8 or an undecodable header line raises inside its read loop, which would wedge
    every consumer of the stream on that message forever."""

    async def _process_headers(self, headers: Any) -> dict[str, str] | None:
        if _PLAIN_HEADERS and headers and headers[:10] == b"NATS/1.0\r\n":
            # Every delivery carries headers (its Nats-Msg-Id): plain ``Name: value`` lines
            # are read here in one pass, as nats-py reads them; anything else goes to it.
            found = _plain_headers(headers[10:])
            if found is not None:
                return found or None
        try:
            return await super()._process_headers(headers)
        except Exception:
            return None

    def _build_message(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> Any:
        return super()._build_message(sid, _utf8(subject), _utf8(reply), data, headers)


def _utf8(raw: bytes) -> bytes:
    if raw.isascii():
        return raw  # what every subject eventwire makes is
    return raw.decode("utf-8", "replace").encode()


# nats-py parses header lines itself unless fast_mail_parser is installed (then with other
# rules): `_plain_headers` reads them the same way as its own parser.
_PLAIN_HEADERS = getattr(nats.aio.client, "parse_email", None) is None


def _plain_headers(raw: bytes) -> dict[str, str] | None:
    """``Name: value`` header lines whose names are plain tokens (letters, digits, ``-``),
    as nats-py's own parser reads them; None when a line is anything else (nats-py then
    parses the block)."""
    found: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        name = name.strip()
        if not sep or not name.replace(b"-", b"").isalnum():
            return None
        found[name.decode("ascii")] = value.strip().decode("utf-8", "replace")
    return found


def _more_servers(options: URLOptions) -> list[str]:
    """``?servers=host:port,host:port``: more of a cluster's nodes to connect through when the
    URL's own host is down (the client learns the rest of the cluster from the one it reaches)."""
    raw = options.text("servers")
    if raw is None:
        return []
    found = []
    for item in raw.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
            raise options.invalid("servers", "a comma-separated list of host:port")
        found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return found


def _reconnect_delay(servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
    """nats-py's reconnect hook: reconnect forever, backing off per failed attempt."""
    server = min(servers, key=lambda s: s.reconnects)
    return server, retry_backoff().after(server.reconnects)


class NatsBackend(BrokerBackend):
    """Events in a NATS JetStream stream; see the module docstring."""

    scheme = "nats"
    tracks_presence = True
    messaging_system = "nats"
    default_port = 4222
    capabilities = Capabilities(
        durable=True,
        replay=True,
        # With partitions=: each partition's subject is consumed by one process at a time.
        key_order_across_processes=True,
        idempotent=True,
        cross_process_drain=True,
    )

    def __init__(self, url: BusURL) -> None:
        super().__init__(url)
        self.stream = f"eventwire_{self.namespace}"
        self.prefix = f"{self.namespace}."
        self.bucket = f"eventwire_{self.namespace}_handled"
        # Which processes run which consumers (`beat`): key <consumer>.<process>.
        self.presence_bucket = f"eventwire_{self.namespace}_presence"
        self._presence_kv: KeyValue | None = None
        # Durable runs' journal (`NatsJournal`).
        self.runs_bucket = f"eventwire_{self.namespace}_runs"
        self._runs_kv: KeyValue | None = None
        # Partitioned consumers' tables (`sync_group`): key <consumer>, one JSON document.
        self.groups_bucket = f"eventwire_{self.namespace}_groups"
        self._groups_kv: KeyValue | None = None
        self._journal: NatsJournal | None = None
        # Consumers whose presence key this process wrote, oldest write first.
        self._marked: dict[str, None] = {}
        options = URLOptions(url, OPTIONS)
        self.max_age = options.duration("max_age", 0.0)
        self.replicas = options.integer("replicas", 1, minimum=1)
        self.seeds = [self._hostport(), *_more_servers(options)]
        clustered = self.replicas > 1 or len(self.seeds) > 1
        self._retry_deadline = _ELECTION_WAIT if clustered else OPERATION_RETRY_DEADLINE
        self._nc: _LenientClient | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        # Done (and replaced) when the connection drops: requests in flight on it give up.
        # A future, not an Event: waiting for it beside a request takes no extra task.
        self._lost: asyncio.Future[None] | None = None
        # Opens a new connection when the server closed the current one for good.
        self._reopening: asyncio.Task[None] | None = None
        # Counts connections lost: what a consumer set up before the last loss is gone.
        self.links_lost = 0
        # Set while connected: fetches wait on it through an outage rather than polling.
        self._up = asyncio.Event()
        self._consumers: weakref.WeakSet[_NatsConsumer] = weakref.WeakSet()
        # How many consumers are idle, watching for publishes (see _IDLE_LOOK): how often
        # each looks for redeliveries.
        self.idle_consumers = 0
        self.ticker = _Ticker()
        # Unanswered pull requests make a consumer ask whether it still exists: a few at a
        # time, lest a slow server get thousands of questions more.
        self.existence_checks = asyncio.Semaphore(_EXISTENCE_CHECKS)
        # PubAcks come to one inbox per connection, `<inbox>.<token>`: token -> its waiter.
        self._puback_link: _LenientClient | None = None
        self._puback_prefix = ""
        self._pubacks: dict[str, asyncio.Future[Msg]] = {}
        self._puback_tokens = itertools.count()

    # -- connection ------------------------------------------------------------------------

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("the nats backend is not connected; start the bus first")
        return self._js

    @property
    def nc(self) -> _LenientClient:
        if self._nc is None:
            raise RuntimeError("the nats backend is not connected; start the bus first")
        return self._nc

    async def connect(self) -> None:
        if self._nc is not None:
            return
        nc = _LenientClient()
        self._lost = asyncio.get_running_loop().create_future()
        try:
            await self._open(nc)
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._nc, self._js = nc, nc.jetstream(timeout=_REQUEST_TIMEOUT)
        self._up.set()

    async def _open(self, nc: _LenientClient) -> None:
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[Exception] = loop.create_future()
        connected = False
        failures = 0

        async def on_error(error: Exception) -> None:
            nonlocal failures
            if not connected:
                failures += 1  # connect() gives up once every seed server has failed once
                if failures >= len(self.seeds) and not failed.done():
                    failed.set_result(error)
            elif isinstance(error, _TRANSIENT):
                # Failed reconnect attempts: the disconnect itself was logged once.
                logger.debug("eventwire: NATS at %s: %r", self.url.redacted, error)
            else:
                logger.warning("eventwire: NATS at %s: %r", self.url.redacted, error)

        async def on_disconnect() -> None:
            self._dropped(nc)

        async def on_reconnect() -> None:
            logger.warning("eventwire: reconnected to NATS at %s", self.url.redacted)
            if self._nc is nc:
                self._up.set()

        async def on_closed() -> None:
            if self._nc is nc:  # not closed by close(): nats-py gave up after a server error
                logger.warning(
                    "eventwire: NATS at %s closed the connection (%s); opening a new one",
                    self.url.redacted,
                    nc.last_error,
                )
                self._reopen_soon()

        user = unquote(self.url.username) if self.url.username else None
        password = unquote(self.url.password) if self.url.password is not None else None
        attempt = loop.create_task(
            nc.connect(
                # No credentials in the server URL: nats-py may show it in errors.
                servers=[f"nats://{seed}" for seed in self.seeds],
                name=f"eventwire:{self.namespace}",
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                closed_cb=on_closed,
                connect_timeout=_ATTEMPT_TIMEOUT,
                max_reconnect_attempts=-1,
                reconnect_to_server_handler=_reconnect_delay,
                ping_interval=10,
                max_outstanding_pings=3,
                user=user if password is not None else None,
                password=password,
                token=user if password is None else None,  # nats://TOKEN@host
            )
        )
        try:
            # A failed attempt on every seed ends connect(): the client would retry forever.
            either: set[asyncio.Future[Any]] = {attempt, failed}
            # Each unreachable seed may take a whole attempt before the next is tried.
            budget = _CONNECT_TIMEOUT + _ATTEMPT_TIMEOUT * (len(self.seeds) - 1)
            done, _ = await asyncio.wait(
                either, timeout=budget, return_when=asyncio.FIRST_COMPLETED
            )
            if attempt not in done:
                error = failed.result() if failed.done() else TimeoutError("no answer")
                raise BackendConnectionError(
                    f"cannot connect to NATS at {self.url.redacted}: "
                    f"{type(error).__name__}: {error}"
                )
            try:
                attempt.result()
            except Exception as error:
                raise BackendConnectionError(
                    f"cannot connect to NATS at {self.url.redacted}: "
                    f"{type(error).__name__}: {error}"
                ) from error
        finally:
            if not attempt.done():
                attempt.cancel()
                await asyncio.wait({attempt})
        connected = True
        try:
            await self._ensure_stream_soon(nc.jetstream(timeout=_ELECTION_ASK))
        except Exception as error:
            raise BackendConnectionError(
                f"cannot use JetStream on NATS at {self.url.redacted} (is nats-server started "
                f"with -js?): {type(error).__name__}: {error}"
            ) from error

    def _hostport(self) -> str:
        host = self.url.host or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.url.port or _DEFAULT_PORT}"

    async def _ensure_stream_soon(self, js: JetStreamContext) -> None:
        """`_ensure_stream`, retried for `_ELECTION_WAIT` seconds while a cluster has no
        JetStream leader (a node just died); a server without JetStream fails at once."""
        deadline = time.monotonic() + _ELECTION_WAIT
        backoff = retry_backoff()
        while True:
            try:
                return await self._ensure_stream(js)
            except (nats.errors.TimeoutError, nats.js.errors.APIError) as error:
                electing = not isinstance(error, nats.js.errors.APIError) or (
                    error.err_code == _JETSTREAM_UNAVAILABLE
                )
                if not electing or time.monotonic() >= deadline:
                    raise
            await backoff.wait()

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            await js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        config = StreamConfig(
            name=self.stream,
            description=f"eventwire events of namespace {self.namespace}",
            subjects=[f"{self.prefix}>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=self.max_age,
            num_replicas=self.replicas,
            duplicate_window=120.0,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.APIError:
            # Another process may have created it meanwhile (with other settings).
            await js.stream_info(self.stream)

    def _reopen_soon(self) -> None:
        """Start replacing the connection, closed for good by nats-py, unless already doing so."""
        if self._reopening is None or self._reopening.done():
            self._reopening = asyncio.get_running_loop().create_task(
                self._reopen(self.nc), name="eventwire:nats:reopen"
            )

    async def _reopen(self, closed: _LenientClient) -> None:
        backoff = retry_backoff()
        failures = 0
        while self._nc is closed:
            fresh = _LenientClient()
            try:
                await self._open(fresh)
            except Exception as error:
                with contextlib.suppress(Exception):
                    await fresh.close()
                failures += 1
                # Warned once; the server may be down for a while.
                logger.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "eventwire: opening a new connection to NATS at %s failed (%s); retrying",
                    self.url.redacted,
                    error,
                )
                await backoff.wait()
                continue
            if self._nc is not closed:  # close() was called meanwhile
                await fresh.close()
                return
            self._nc, self._js, self._kv = fresh, fresh.jetstream(timeout=_REQUEST_TIMEOUT), None
            self._presence_kv = self._runs_kv = self._groups_kv = None
            self._link_lost()
            self._up.set()
            logger.warning("eventwire: opened a new connection to NATS at %s", self.url.redacted)

    def _dropped(self, nc: _LenientClient) -> None:
        """`nc` lost its server (nats-py reconnects it)."""
        lost, self._lost = self._lost, asyncio.get_running_loop().create_future()
        if lost is not None and not lost.done():
            lost.set_result(None)
        if self._nc is nc:
            self._link_lost()
            # Not when nats-py gave the connection up (see on_closed in `_open`).
            if not nc.is_closed:
                logger.warning("eventwire: lost NATS at %s; reconnecting", self.url.redacted)

    def _link_lost(self) -> None:
        """The connection dropped or was replaced: what consumers set up on it is gone."""
        self._up.clear()
        self.links_lost += 1
        for consumer in list(self._consumers):
            consumer.wake()

    async def wait_up(self, deadline: float) -> bool:
        """Wait until connected, or until `deadline` (loop time): whether connected."""
        loop = asyncio.get_running_loop()
        while not self.nc.is_connected:
            if self.nc.is_closed:
                self._reopen_soon()
            left = deadline - loop.time()
            if left <= 0:
                return False
            # The event is a hint (set a moment before nats-py says connected): bounded waits.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.05 if self._up.is_set() else 1.0)):
                    await self._up.wait()
                    if not self.nc.is_connected:
                        await asyncio.sleep(min(left, 0.05))
        return True

    def idle_look_period(self) -> float:
        """Seconds between an idle consumer's looks for redeliveries (see _IDLE_LOOK)."""
        return max(_IDLE_LOOK, self.idle_consumers / _IDLE_LOOKS_PER_SECOND)

    def _closed_by_server(self, link: _LenientClient) -> bool:
        """Whether `link` was given up by nats-py after a server error (not by `close()`)."""
        return link.is_closed and self._nc is not None

    async def close(self) -> None:
        await self.ticker.stop()
        nc, self._nc, self._js, self._kv = self._nc, None, None, None
        self._presence_kv = self._runs_kv = self._groups_kv = None
        reopening, self._reopening = self._reopening, None
        if reopening is not None and not reopening.done():
            reopening.cancel()
            await asyncio.wait({reopening})
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        waiting = list(messages)
        backoff: Backoff | None = None  # made on the first retry (most publishes need none)
        while waiting:
            await self._connected()
            link = self.nc
            failed: list[Message] = []
            last: BaseException | None = None
            for start in range(0, len(waiting), _PUBLISH_WINDOW):
                window = waiting[start : start + _PUBLISH_WINDOW]
                results: list[BaseException | None]
                patience = _REQUEST_TIMEOUT
                if backoff is not None:  # a retry
                    share = len(window) / _PUBLISH_WINDOW
                    patience = _RETRY_PATIENCE + share * (_REQUEST_TIMEOUT - _RETRY_PATIENCE)
                try:
                    results = await self._on_this_link(self._store_window(link, window, patience))
                except nats.errors.ConnectionReconnectingError as error:
                    results = [error] * len(window)
                if self._closed_by_server(link) and any(
                    isinstance(result, BaseException) for result in results
                ):
                    # Retrying what may have caused the error could close the next one too.
                    raise BackendConnectionError(
                        f"NATS at {self.url.redacted} closed the connection ({link.last_error}) "
                        f"while {len(window)} event(s) were being stored, from {window[0].id!r} "
                        f"on {window[0].topic[:40]!r}: they may not be stored; publish them "
                        "again (a new connection is being opened)"
                    )
                for message, result in zip(window, results, strict=True):
                    if isinstance(result, BaseException):
                        if isinstance(result, nats.errors.ConnectionClosedError):
                            raise BackendConnectionError(
                                f"the connection to {self.url.redacted} was closed"
                            ) from result
                        if not isinstance(result, _TRANSIENT):
                            raise EventwireError(
                                f"NATS at {self.url.redacted} refused event {message.id!r} on "
                                f"{message.topic!r}: {type(result).__name__}: {result}"
                            ) from result
                        failed.append(message)
                        last = result
            waiting = failed
            if waiting:
                logger.debug(
                    "eventwire: %d publish(es) to NATS not confirmed (%r); retrying",
                    len(waiting),
                    last,
                )
                if backoff is None:
                    backoff = retry_backoff()
                await backoff.wait()

    async def _store_window(
        self, link: _LenientClient, window: Sequence[Message], patience: float
    ) -> list[BaseException | None]:
        """Publish `window` to the stream, every message sent before the first PubAck is
        awaited, and wait (up to `patience` seconds) for their PubAcks: what failed for each.
        The PubAcks come to one inbox of ours rather than through a request each (no task,
        no timer, no random token per message)."""
        prefix = await self._puback_inbox(link)
        loop = asyncio.get_running_loop()
        waiting: list[tuple[str, asyncio.Future[Msg]]] = []
        try:
            for message in window:
                token = str(next(self._puback_tokens))
                acked: asyncio.Future[Msg] = loop.create_future()
                self._pubacks[token] = acked
                waiting.append((token, acked))
                try:
                    await link.publish(
                        self.prefix + message.topic,
                        message.body,
                        reply=prefix + token,
                        headers=_headers_of(message, self.stream),
                    )
                except Exception as error:  # refused by the client (too big, closed, ...)
                    acked.set_exception(error)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(patience):
                    if len(waiting) == 1:
                        with contextlib.suppress(Exception):  # read below, by _answer
                            await waiting[0][1]
                    else:
                        await asyncio.wait([acked for _, acked in waiting])
        finally:
            for token, acked in waiting:
                self._pubacks.pop(token, None)
                acked.cancel()  # no-op once answered
        return [_answer(acked) for _, acked in waiting]

    async def _puback_inbox(self, link: _LenientClient) -> str:
        """The prefix of the inbox PubAcks come to on `link` (subscribed once per connection;
        nats-py renews it across reconnects)."""
        if self._puback_link is not link:
            prefix = link.new_inbox() + "."
            await link.subscribe(prefix + "*", cb=self._on_puback)
            self._puback_link, self._puback_prefix = link, prefix
        return self._puback_prefix

    async def _on_puback(self, msg: Msg) -> None:
        acked = self._pubacks.pop(msg.subject.rpartition(".")[2], None)
        if acked is not None and not acked.done():
            acked.set_result(msg)

    async def _connected(self) -> None:
        """Wait (forever, with backoff) until the client is connected."""
        if self.nc.is_connected:
            return
        backoff = retry_backoff()
        while not self.nc.is_connected:
            if self.nc.is_closed:
                self._reopen_soon()
            await backoff.wait()

    async def _on_this_link(self, call: Awaitable[T]) -> T:
        """Await `call`, but give up at once if the connection it went out on is lost: its
        answer will never come, and a retry on the next connection need not wait for the
        request timeout first. Awaited in this task (no task of its own per call): the
        loss cancels this task, and that cancellation becomes the error raised here."""
        lost = self._lost
        assert lost is not None
        task = asyncio.current_task()
        assert task is not None
        if lost.done():
            _discard(call)
            raise nats.errors.ConnectionReconnectingError
        # Cancellations already owed when the call began (cleanup after a cancelled close):
        # only ours is taken back.
        owed = task.cancelling()
        waiting, gave_up = True, False

        def give_up(_: object) -> None:
            nonlocal gave_up
            # Scheduled when the loss is noticed, this may run after the call has ended in
            # the same loop turn: the task has moved on then, and cancelling it would stop
            # whatever it does next (a subscription's worker, for good).
            if waiting:
                gave_up = True
                task.cancel()

        lost.add_done_callback(give_up)
        try:
            return await call
        except asyncio.CancelledError:
            if gave_up:
                gave_up = False
                if task.uncancel() <= owed:  # only the loss cancelled it meanwhile
                    raise nats.errors.ConnectionReconnectingError from None
            raise
        finally:
            waiting = False
            lost.remove_done_callback(give_up)
            if gave_up and task.cancelling() > owed:
                # The client swallowed the cancellation, or raised another error instead:
                # take back the request to cancel, which would otherwise hit a later await.
                task.uncancel()

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, retried through transient errors for `OPERATION_RETRY_DEADLINE` seconds,
        or on a cluster `_ELECTION_WAIT`: losing a node there sets off an election in each
        raft group it led (the meta group, the stream, each consumer and bucket)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_deadline
        backoff = retry_backoff()
        while True:
            try:
                return await self._on_this_link(call())
            except _TRANSIENT_OR_REPLACED as error:
                if self._nc is None:
                    raise BackendConnectionError(
                        f"{what} failed: the connection to {self.url.redacted} is closed"
                    ) from error
                if self._nc.is_closed:
                    self._reopen_soon()
                if loop.time() >= deadline:
                    raise BackendConnectionError(
                        f"{what} failed on NATS at {self.url.redacted}: "
                        f"{type(error).__name__}: {error}"
                    ) from error
            await backoff.wait()

    # -- consumers -------------------------------------------------------------------------

    async def consumer(self, spec: ConsumerSpec) -> Consumer:
        validate_pattern(spec.pattern)
        if isinstance(spec.start, datetime) and spec.start.tzinfo is None:
            raise ValueError("start= datetime must be timezone-aware (e.g. UTC)")
        durable = safe_name(spec.name)
        await self._open_consumer(spec, durable)
        consumer = _NatsConsumer(self, spec, durable)
        await consumer._subscribe()
        self._consumers.add(consumer)
        return consumer

    async def _open_consumer(self, spec: ConsumerSpec, durable: str) -> None:
        info = await self._consumer_info(durable)
        if info is None:
            try:
                info = await self._retry(
                    f"creating consumer {spec.name!r}",
                    lambda: self.js.add_consumer(self.stream, self._consumer_config(spec, durable)),
                )
            except nats.js.errors.APIError:
                # Created by another process meanwhile (with another start time)?
                info = await self._consumer_info(durable)
                if info is None:
                    raise
        group = _described(info).get("group")
        check_consumer(
            spec,
            self.url,
            _pattern_of(info, self.prefix),
            group if isinstance(group, bool) else None,
        )
        config = info.config
        if config.ack_wait is not None and abs(config.ack_wait - spec.ack_wait) > 1e-3:
            config.ack_wait = spec.ack_wait
            try:
                await self.js.add_consumer(self.stream, config)
            except nats.js.errors.APIError as error:
                # JetStream refuses some updates (e.g. of a consumer that started at a time).
                logger.warning(
                    "eventwire: consumer %r keeps its ack_wait: %s", spec.name, error.description
                )

    def _consumer_config(self, spec: ConsumerSpec, durable: str) -> ConsumerConfig:
        config = ConsumerConfig(
            durable_name=durable,
            description=json.dumps(
                {"name": spec.name, "pattern": spec.pattern, "group": spec.group}
            ),
            filter_subject=self.prefix + spec.pattern,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait,
            max_deliver=-1,
            # Unlimited: messages naked with a long delay count as pending acks and would
            # otherwise stall the consumer once there are enough of them.
            max_ack_pending=-1,
            deliver_policy=DeliverPolicy.NEW,
        )
        if spec.start == "earliest":
            config.deliver_policy = DeliverPolicy.ALL
        elif isinstance(spec.start, datetime):
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = spec.start.astimezone(UTC)
        if spec.ephemeral:
            config.inactive_threshold = max(EPHEMERAL_KEPT, 2 * spec.ack_wait)
        return config

    async def _consumer_info(self, durable: str) -> NatsConsumerInfo | None:
        async def get() -> NatsConsumerInfo | None:
            try:
                info = await self.js.consumer_info(self.stream, durable)
            except nats.js.errors.NotFoundError:
                return None
            return cast(NatsConsumerInfo, info)

        return await self._retry(f"looking up consumer {durable!r}", get)

    async def consumers(self) -> list[ConsumerInfo]:
        # JetStream lists consumers a page at a time, by offset: one deleted meanwhile before
        # the offset (another process's inbox) shifts the rest, and the first of the next
        # page was skipped (a listing in three missed one while others came and went), so
        # drain() could miss work. Pages overlap, and the names seen twice are dropped.
        # Pages come sorted by name: one that starts past the last name seen may have
        # skipped some (more deleted than the overlap), and is read again from further back.
        infos: dict[str, NatsConsumerInfo] = {}
        offset, last, backs = 0, "", 0
        while True:
            page = await self._retry(
                "listing consumers", functools.partial(self._consumer_page, offset)
            )
            if page and last and page[0].name > last and offset and backs < _LISTING_BACKS:
                offset, backs = max(0, offset - len(page)), backs + 1
                continue
            new = {info.name: info for info in page if info.name not in infos}
            if not new:
                break
            infos.update(new)
            last = max(last, page[-1].name)
            offset += max(1, len(page) - _LISTING_OVERLAP)
        found = []
        for info in infos.values():
            name = _described(info).get("name") or info.name
            outstanding = (info.num_pending or 0) + (info.num_ack_pending or 0)
            found.append(ConsumerInfo(str(name), _pattern_of(info, self.prefix), outstanding))
        return found

    async def _consumer_page(self, offset: int) -> list[NatsConsumerInfo]:
        # Not nats-py's `consumers_info`: JetStream lists a consumer deleted while it builds
        # the page as null, on which that fails (AttributeError, taken for a bug, not retried).
        answer = await self._api(f"CONSUMER.LIST.{self.stream}", {"offset": offset})
        return [NatsConsumerInfo.from_response(c) for c in answer.get("consumers") or [] if c]

    async def _api(self, call: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """The answer to one JetStream API request, ``$JS.API.<call>``; `APIError` when it is
        an error. For what nats-py's own wrappers get wrong."""
        answer = await self.nc.request(
            f"$JS.API.{call}", json.dumps(request).encode(), timeout=_REQUEST_TIMEOUT
        )
        found: dict[str, Any] = json.loads(answer.data)
        if "error" in found:
            raise nats.js.errors.APIError.from_error(found["error"])
        return found

    async def delete_consumer(self, name: str) -> None:
        durable = safe_name(name)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._retry(
                f"deleting consumer {name!r}", lambda: self.js.delete_consumer(self.stream, durable)
            )
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._retry(
                f"forgetting who ran {name!r}",
                lambda: self.js.purge_stream(
                    f"KV_{self.presence_bucket}",
                    subject=f"$KV.{self.presence_bucket}.{durable}.>",
                ),
            )
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._retry(
                f"forgetting handled ids of {name!r}",
                lambda: self.js.purge_stream(
                    f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.{durable}.>"
                ),
            )

    # -- presence ----------------------------------------------------------------------------

    async def _open_bucket(self, name: str, description: str, ttl: float | None) -> KeyValue:
        """The key-value bucket `name`, created if missing (another process may create it
        at the same moment)."""
        try:
            return await self.js.key_value(name)
        except nats.js.errors.NotFoundError:
            config = KeyValueConfig(
                bucket=name,
                description=description,
                history=1,
                ttl=ttl,
                storage=StorageType.FILE,
                replicas=self.replicas,
            )
            try:
                return await self.js.create_key_value(config)
            except nats.js.errors.APIError:
                return await self.js.key_value(name)  # made by another process

    async def _presence_store(self) -> KeyValue:
        # Looked up on every call after a reconnection: a new connection needs a new handle.
        if self._presence_kv is None:
            self._presence_kv = await self._open_bucket(
                self.presence_bucket,
                f"eventwire processes running consumers of {self.namespace}",
                PRESENCE_KEPT,
            )
        return self._presence_kv

    async def _runs_store(self) -> KeyValue:
        if self._runs_kv is None:
            self._runs_kv = await self._open_bucket(
                self.runs_bucket, f"eventwire durable runs of {self.namespace}", None
            )
        return self._runs_kv

    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = NatsJournal(
                self.runs_bucket, self._runs_store, lambda: self.js, self._retry
            )
        return self._journal

    async def beat(self, process: str, consumers: Sequence[str]) -> None:
        now = time.time()
        marked = self._marked
        fresh = [name for name in consumers if name not in marked]
        # The oldest few again: all of them once per _RELIVE_EVERY beats (one a second).
        due = max(1, int(len(marked) / _RELIVE_EVERY + 0.999))
        running = set(consumers)
        again = [name for name in itertools.islice(marked, due) if name in running]

        async def put_beat() -> None:
            kv = await self._presence_store()
            beat = json.dumps({"process": process, "seen": now}).encode()
            await kv.put(f"{_BEATS}.{safe_name(process)}", beat)

        await self._put_presence(process, [*fresh, *again], now)
        await self._retry("announcing this process", put_beat)
        for name in itertools.islice(list(marked), due):
            del marked[name]  # back in at the end if still running, as the newest write
        marked.update(dict.fromkeys([*again, *fresh]))

    async def leave(self, process: str, consumers: Sequence[str]) -> None:
        await self._put_presence(process, consumers, -time.time())
        for name in consumers:
            self._marked.pop(name, None)

    async def _put_presence(self, process: str, consumers: Sequence[str], seen: float) -> None:
        """Say that `process` runs `consumers` (`seen` > 0), or stopped at -`seen`."""

        async def put(window: Sequence[str]) -> None:
            kv = await self._presence_store()
            await _gather_all(
                kv.put(
                    f"{safe_name(name)}.{safe_name(process)}",
                    json.dumps({"consumer": name, "process": process, "seen": seen}).encode(),
                )
                for name in window
            )

        for start in range(0, len(consumers), _PUBLISH_WINDOW):
            window = consumers[start : start + _PUBLISH_WINDOW]
            await self._retry("announcing this process", functools.partial(put, window))

    async def presences(self) -> dict[str, list[float]]:
        async def read_all() -> list[bytes]:
            kv = await self._presence_store()
            keys = await self._keys_of(self.presence_bucket)

            async def value(key: str) -> bytes | None:
                try:
                    return (await kv.get(key)).value
                except nats.js.errors.NotFoundError:  # deleted since the keys were listed
                    return None

            # Any other error fails the whole read, to be retried: a process whose beat went
            # unread would look gone, and drain() would stop waiting for what it runs.
            values: list[bytes] = []
            for start in range(0, len(keys), _PUBLISH_WINDOW):
                window = keys[start : start + _PUBLISH_WINDOW]
                values += [found for found in await _gather_all(map(value, window)) if found]
            return values

        records = []
        for value in await self._retry("reading who runs what", read_all):
            with contextlib.suppress(ValueError):
                records.append(json.loads(value))
        # A process's own beat says how recent its running consumers' keys are.
        beats: dict[str, float] = {}
        for record in records:
            if isinstance(record, dict) and "consumer" not in record:
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    beats[str(record["process"])] = float(record["seen"])
        found: dict[str, list[float]] = {}
        for record in records:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                seen = float(record["seen"])
                if seen > 0:
                    seen = max(seen, beats.get(str(record.get("process")), 0.0))
                found.setdefault(str(record["consumer"]), []).append(seen)
        return found

    async def _keys_of(self, bucket: str) -> list[str]:
        """Every key bucket `bucket` holds now (deleted ones included), as the server lists
        its subjects at one moment. nats-py's `KeyValue.keys()` reads them through a consumer
        that ends early when a key is rewritten meanwhile: beats rewrite presence keys every
        second, and about one listing in twenty missed a key."""
        prefix = f"$KV.{bucket}."
        keys: list[str] = []
        while True:
            request = {"subjects_filter": f"{prefix}>", "offset": len(keys)}
            info = await self._api(f"STREAM.INFO.KV_{bucket}", request)
            page = [subject[len(prefix) :] for subject in info["state"].get("subjects") or {}]
            keys.extend(page)
            if not page or len(keys) >= int(info.get("total") or 0):
                return keys

    async def destroy(self) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._retry("deleting the stream", lambda: self.js.delete_stream(self.stream))
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._retry(
                "deleting the handled-ids bucket", lambda: self.js.delete_key_value(self.bucket)
            )
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._retry(
                "deleting the presence bucket",
                lambda: self.js.delete_key_value(self.presence_bucket),
            )
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._retry(
                "deleting the runs bucket", lambda: self.js.delete_key_value(self.runs_bucket)
            )
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._retry(
                "deleting the groups bucket", lambda: self.js.delete_key_value(self.groups_bucket)
            )
        self._kv = self._presence_kv = self._runs_kv = self._groups_kv = None

    # -- partitioned consumers' tables -----------------------------------------------------

    async def sync_group(
        self, group: str, process: str, want: Collection[str], ttl: float
    ) -> GroupView:
        # One JSON document per group, changed by compare-and-set on its revision. Leases
        # are wall-clock times: the processes of a group need clocks within a second or so.
        if self._groups_kv is None:
            self._groups_kv = await self._open_bucket(
                self.groups_bucket, f"eventwire partitioned consumers of {self.namespace}", None
            )
        kv = self._groups_kv
        key = safe_name(group)
        while True:
            try:
                entry = await self._retry("reading a group", lambda: kv.get(key))
                table, revision = json.loads(entry.value or b"{}"), entry.revision
            except nats.js.errors.KeyNotFoundError:
                table, revision = {}, None
            view, table = _synced(table, process, set(want), ttl, time.time())
            write = (
                functools.partial(kv.create, key, json.dumps(table).encode())
                if revision is None
                else functools.partial(kv.update, key, json.dumps(table).encode(), last=revision)
            )
            try:
                await self._retry("writing a group", write)
                return view
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another member wrote it meanwhile: look again

    async def leave_group(self, group: str, process: str) -> None:
        await self.sync_group(group, process, (), 0.0)

    # -- handled ids -----------------------------------------------------------------------

    async def record_handled(self, consumer: str, event_ids: Sequence[str]) -> None:
        await self._record_handled(safe_name(consumer), event_ids)

    async def seen_handled(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        return await self._handled(safe_name(consumer), event_ids)

    async def forget_handled(self, consumer: str) -> None:
        durable = safe_name(consumer)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._retry(
                f"forgetting handled ids of {consumer!r}",
                lambda: self.js.purge_stream(
                    f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.{durable}.>"
                ),
            )

    async def _bucket(self, create: bool) -> KeyValue | None:
        if self._kv is not None:
            return self._kv
        try:
            self._kv = await self._retry(
                "opening the handled-ids bucket", lambda: self.js.key_value(self.bucket)
            )
        except nats.js.errors.NotFoundError:
            if not create:
                return None
            config = KeyValueConfig(
                bucket=self.bucket,
                description=f"eventwire handled event ids of namespace {self.namespace}",
                history=1,
                ttl=HANDLED_KEPT,
                storage=StorageType.FILE,
                replicas=self.replicas,
            )
            try:
                self._kv = await self._retry(
                    "creating the handled-ids bucket", lambda: self.js.create_key_value(config)
                )
            except nats.js.errors.APIError:
                self._kv = await self.js.key_value(self.bucket)  # created by another process
        return self._kv

    async def _record_handled(self, durable: str, event_ids: Sequence[str]) -> None:
        keys = [f"{durable}.{_id_key(event_id)}" for event_id in dict.fromkeys(event_ids)]

        async def put(window: list[str]) -> None:
            # The bucket is looked up on every try: a new connection needs a new handle.
            kv = await self._bucket(create=True)
            assert kv is not None
            await _gather_all(kv.put(key, b"") for key in window)

        for start in range(0, len(keys), _PUBLISH_WINDOW):
            window = keys[start : start + _PUBLISH_WINDOW]
            await self._retry("recording handled ids", functools.partial(put, window))

    async def _handled(self, durable: str, event_ids: Sequence[str]) -> set[str]:
        if not event_ids or await self._bucket(create=False) is None:
            return set()
        unique = list(dict.fromkeys(event_ids))
        found: set[str] = set()

        async def known(kv: KeyValue, event_id: str) -> bool:
            try:
                await kv.get(f"{durable}.{_id_key(event_id)}")
            except nats.js.errors.NotFoundError:  # KeyNotFoundError, also a deleted key
                return False
            return True

        async def look_up(window: list[str]) -> list[bool]:
            kv = await self._bucket(create=False)  # on every try, as in _record_handled
            assert kv is not None
            return await _gather_all(known(kv, event_id) for event_id in window)

        for start in range(0, len(unique), _PUBLISH_WINDOW):
            window = unique[start : start + _PUBLISH_WINDOW]
            results = await self._retry(
                "looking up handled ids", functools.partial(look_up, window)
            )
            found.update(event_id for event_id, hit in zip(window, results, strict=True) if hit)
        return found

    async def _count_restart(self, durable: str, sequence: int) -> int:
        """Add one to the restarts of stream message `sequence` for `durable`, kept in the
        handled-ids bucket (expiring with it: a message's sequence is never reused, so a
        count left by a message acknowledged since is never read again)."""
        key = f"{durable}.restarts.{sequence}"

        async def add_one() -> int:
            kv = await self._bucket(create=True)  # on every try, as in _record_handled
            assert kv is not None
            while True:  # compare-and-set: another process may count the same message
                try:
                    entry = await kv.get(key)
                except nats.js.errors.NotFoundError:
                    try:
                        await kv.create(key, b"1")
                    except nats.js.errors.KeyWrongLastSequenceError:
                        continue
                    return 1
                count = _count(entry.value) + 1
                try:
                    await kv.update(key, str(count).encode(), last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
                return count

        return await self._retry("counting a restart", add_one)


def _count(value: bytes | None) -> int:
    try:
        return max(0, int(value or b"0"))
    except ValueError:
        return 0


class _Ticker:
    """Wakes resting consumers on the ticks of one clock (every `_LOOK_TICK` seconds), with
    one timer, where a timer each would cost ten thousand resting consumers dearly."""

    def __init__(self) -> None:
        self._due: dict[float, list[_NatsConsumer]] = {}
        self._task: asyncio.Task[None] | None = None

    def wake_at(self, when: float, consumer: _NatsConsumer) -> None:
        """Wake `consumer` at the first tick at or after `when` (loop time)."""
        tick = math.ceil(when / _LOOK_TICK) * _LOOK_TICK
        self._due.setdefault(tick, []).append(consumer)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="eventwire:nats:ticker"
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._due:
            # Every tick while anything is due: a consumer may ask for the next one anytime.
            now = loop.time()
            await asyncio.sleep(math.floor(now / _LOOK_TICK + 1) * _LOOK_TICK - now)
            now = loop.time()
            for tick in [tick for tick in self._due if tick <= now]:
                for consumer in self._due.pop(tick):
                    consumer.wake()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        for consumers in self._due.values():
            for consumer in consumers:
                consumer.wake()
        self._due.clear()


@dataclass(slots=True)
class _Pull:
    """One pull request to the consumer: done when `batch` messages or a status came."""

    token: str
    batch: int
    # When it should have ended at the latest (loop time): expiry plus a grace period.
    answer_by: float
    # When it expires (loop time): its status comes a moment later.
    expires_at: float
    # `NatsBackend.links_lost` when it was sent: a lost connection took it along.
    link: int
    # Whether it waits for messages (else it asks for what is ready now, ``no_wait``).
    waits: bool
    received: int = 0
    status: str | None = None
    description: str = ""
    done: bool = False

    @property
    def came_empty(self) -> bool:
        """It expired having brought nothing."""
        return self.waits and self.done and self.received == 0 and self.status == "408"

    @property
    def consumer_deleted(self) -> bool:
        return self.status == "409" and "deleted" in self.description.lower()


def _synced(
    table: dict[str, Any], process: str, want: set[str], ttl: float, now: float
) -> tuple[GroupView, dict[str, Any]]:
    """`BrokerBackend.sync_group` on a group's table ``{"m": {process: until}, "l": {slot:
    [holder, until]}}``: the view, and the table to write back."""
    members = {p: t for p, t in table.get("m", {}).items() if t > now and p != process}
    if ttl > 0:
        members[process] = now + ttl
    leases: dict[str, list[Any]] = {}
    held: set[str] = set()
    for slot, (holder, until) in table.get("l", {}).items():
        if holder == process or until <= now:
            continue  # ours is renewed below, if still wanted; a run-out one is free
        leases[slot] = [holder, until]
    if ttl > 0:
        for slot in want:
            if slot not in leases:
                leases[slot] = [process, now + ttl]
                held.add(slot)
    view = GroupView(tuple(sorted(members)), frozenset(held))
    return view, {"m": members, "l": leases}


class _NatsConsumer(Consumer):
    """One process's handle on a durable pull consumer.

    Pull requests are answered on a private inbox ``<inbox>.<n>``; messages go to a buffer
    and each request ends with either its batch or a status (404 no messages, 408 expired).
    One waiting request stands at a time: `fetch` returns as soon as a message came and the
    next `fetch` takes what the same request brought since, so a busy consumer sends one
    request per batch or per expiry (`_STANDING_PULL`), not one per message. Stopping waits
    for the standing request to end before anything is given back (see `stop_fetching`).

    A consumer whose standing request expired empty starts *watching*: a plain subscription
    to its own subjects wakes it when an event is published there. If the next request
    expires empty too, it *rests*: it keeps no request standing, and looks for redeliveries
    now and then (see `_IDLE_LOOK`). So ten thousand idle consumers cost the server nothing
    per second but those looks. The subscription is in place a whole request before the
    last one ends: an event published in between is either in that request or wakes it.
    """

    def __init__(self, backend: NatsBackend, spec: ConsumerSpec, durable: str) -> None:
        self._backend = backend
        self._spec = spec
        self._durable = durable
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{backend.stream}.{durable}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._link: _LenientClient | None = None  # the connection `_sub` is on
        self._buffer: deque[tuple[float, Msg]] = deque()
        self._pull: _Pull | None = None
        self._pulls = 0
        # Watching and resting (see the class docstring): the wake-up subscription, and on
        # which connection. A consumer starts resting (`_fresh`): thousands starting
        # together send no requests that stand, only one look each.
        self._fresh = True
        self._wake_sub: Subscription | None = None
        self._watch_link = -1
        self._woken = False
        self._resting = False
        # Whether the last request went unanswered past its expiry (see `fetch`).
        self._missed = False
        # When an idle consumer next asks for what is ready (loop time), and when naks sent
        # from here are ready again (a heap).
        self._look_at = 0.0
        self._due: list[float] = []
        # Set when a message is buffered or a pull request ends: a waiting fetch looks again.
        self._news = asyncio.Event()
        self._lock = asyncio.Lock()
        # Deliveries handed out and not yet acked or naked, by ack subject, with when their
        # lease last started here: given back on close.
        self._held: dict[str, tuple[float, Msg]] = {}
        self._closed = False
        # Broker wildcards also reach the bus's own `_` topics; only `_` patterns want them.
        self._wants_reserved = spec.pattern.startswith("_")
        # The newest first delivery (stream sequence, ack subject) this consumer took, and
        # whether it was acked: JetStream may send that message again as new (see `_take`).
        self._newest = 0
        self._newest_reply = ""
        self._newest_acked = False
        # The last delivery acked without waiting for JetStream's answer, if that answer is
        # still owed: closing an exclusive consumer waits for it (see `close`).
        self._unconfirmed_ack: Msg | None = None

    async def take_over(self) -> None:
        """JetStream hands what a dead process held to the next fetch only after its
        ack_wait, after newer messages: when anything delivered is not acknowledged, the
        consumer starts again just after its acknowledgement floor (what was acknowledged
        beyond it comes again; idempotent subscriptions skip it)."""
        if not self._spec.exclusive:
            return
        backend = self._backend
        info = await backend._consumer_info(self._durable)
        if info is None or info.delivered is None or info.ack_floor is None:
            return
        floor = info.ack_floor.stream_seq or 0
        if (info.delivered.stream_seq or 0) <= floor:
            return
        config = info.config
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = floor + 1
        config.opt_start_time = None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await backend._retry(
                "resetting a partition",
                lambda: backend.js.delete_consumer(backend.stream, self._durable),
            )
        await backend._retry(
            "resetting a partition", lambda: backend.js.add_consumer(backend.stream, config)
        )

    async def _subscribe(self) -> None:
        """Subscribe to a new inbox on the backend's current connection."""
        link = self._backend.nc
        self._inbox = link.new_inbox()
        self._pull = None  # answered on the old connection's inbox, if at all
        self._sub = await link.subscribe(f"{self._inbox}.*", cb=self._on_message)
        self._link = link
        self._fresh = True

    def wake(self) -> None:
        """Make a waiting fetch look again (the connection changed)."""
        self._news.set()

    async def _on_wake(self, msg: Msg) -> None:
        self._woken = True
        self._news.set()

    @property
    def watching(self) -> bool:
        return self._wake_sub is not None

    async def _watch(self) -> None:
        """Be woken by publishes to this consumer's subjects."""
        backend = self._backend
        self._wake_sub = await backend.nc.subscribe(
            backend.prefix + self._spec.pattern, cb=self._on_wake
        )
        self._watch_link = backend.links_lost
        backend.idle_consumers += 1
        self._woken = False

    def _rest(self, *, look_now: bool) -> None:
        """Keep no request standing (while watching), looking now and then."""
        self._resting = True
        if look_now:
            self._look_at = 0.0
        else:
            self._look_at = asyncio.get_running_loop().time() + self._backend.idle_look_period()

    async def _wake_up(self) -> None:
        """Stop watching and resting: the next fetch keeps a request standing again."""
        sub, self._wake_sub, self._resting = self._wake_sub, None, False
        if sub is None:
            return
        self._backend.idle_consumers -= 1
        with contextlib.suppress(Exception):  # on a lost connection, gone with it
            await sub.unsubscribe()

    def _look_soon(self, delay: float) -> None:
        """A nak: the message is ready again after `delay` seconds, to be looked for then
        if this consumer rests by that time."""
        now = asyncio.get_running_loop().time()
        while self._due and self._due[0] <= now:  # passed while busy: nothing to look for
            heapq.heappop(self._due)
        # A little late: JetStream's own timer must have run out.
        heapq.heappush(self._due, now + delay + _GRACE / 5)
        self._news.set()

    async def _on_message(self, msg: Msg) -> None:
        pull = self._pull
        self._missed = False
        if msg.reply.startswith(_ACK_PREFIX):
            self._buffer.append((asyncio.get_running_loop().time(), msg))
            if pull is not None:
                pull.received += 1
                if pull.received >= pull.batch:
                    pull.done = True
            self._news.set()
            return
        # A status ends the pull request named by the inbox's last token.
        if pull is not None and msg.subject.rpartition(".")[2] == pull.token:
            headers = msg.headers or {}
            pull.status = headers.get("Status")
            pull.description = str(headers.get("Description", ""))
            pull.done = True
            self._news.set()

    async def _send_pull(self, batch: int, expires: float | None) -> _Pull:
        """Send one pull request: waiting up to `expires` seconds for messages, or None for
        what is ready now (``no_wait``)."""
        self._pulls += 1
        expires_at = asyncio.get_running_loop().time() + (expires or 0.0)
        pull = _Pull(
            token=str(self._pulls),
            batch=batch,
            answer_by=expires_at + _GRACE,
            expires_at=expires_at,
            link=self._backend.links_lost,
            waits=expires is not None,
        )
        request: dict[str, Any] = {"batch": batch}
        if expires is None:
            request["no_wait"] = True
        else:
            request["expires"] = int(expires * 1e9)
        self._pull = pull
        link = self._backend.nc
        try:
            await link.publish(
                self._next_subject,
                json.dumps(request).encode(),
                reply=f"{self._inbox}.{pull.token}",
            )
        except nats.errors.ConnectionClosedError as error:
            self._pull = None
            if self._backend._closed_by_server(link):
                pull.done = True  # the next fetch waits for the new connection
                return pull
            raise BackendConnectionError(
                f"the connection to {self._backend.url.redacted} is closed"
            ) from error
        return pull

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        if limit < 1:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        asked = False  # whether this fetch sent a request
        async with self._lock:
            while not self._closed:
                self._news.clear()
                taken = await self._take(limit)
                if taken:
                    await self._wake_up()
                    return taken
                if not await self._wait_connected(deadline):
                    return []
                pull = await self._standing()
                now = loop.time()
                left = deadline - now
                if pull is None or pull.done:
                    await self._quieten(pull)
                    if self._resting:
                        if left <= 0 and now < self._next_look():
                            return []
                        asked = await self._idle_turn(limit, deadline) or asked
                        continue
                    if asked and left < 0.01:
                        return []
                    # A standing request (this fetch and the next ones share it), or what
                    # is ready now when there is no time left to wait.
                    await self._send_pull(
                        limit, min(left, _STANDING_PULL) if left >= 0.01 else None
                    )
                    asked = True
                    continue
                now = loop.time()
                overdue = pull.expires_at + _LATE_STATUS if pull.waits and not self._missed else 0
                if overdue and now >= overdue:
                    # JetStream drops a request that expires as a message comes, with no
                    # status: ask again (the message is for the next request), and ask
                    # whether the consumer exists only if that one goes unanswered too.
                    self._missed, self._pull = True, None
                    continue
                if now >= pull.answer_by:
                    # Connected, yet JetStream did not answer: is the consumer gone?
                    self._pull = None
                    await self._check_exists()
                    continue
                if left <= 0 and not asked:
                    return []  # the request stands: what it brings is for the next fetch
                until = min(overdue, pull.answer_by) if overdue else pull.answer_by
                until = until if left <= 0 else min(deadline, until)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(until):
                        await self._news.wait()
            return []

    async def _quieten(self, ended: _Pull | None) -> None:
        """Watch, or rest, as the request that `ended` (or a fresh start) says."""
        if self._fresh:
            self._pull, self._fresh = None, False
            if not self.watching:
                await self._watch()
            # What was published before the subscription reached the server.
            self._rest(look_now=True)
        elif ended is not None and ended.came_empty:
            self._pull = None
            if not self.watching:
                await self._watch()  # and one more request
            elif not self._resting:
                self._rest(look_now=False)

    async def _standing(self) -> _Pull | None:
        """The last pull request, unless a lost connection took it; stops watching if
        woken."""
        links_lost = self._backend.links_lost
        pull = self._pull
        if pull is not None and pull.link != links_lost:
            pull = self._pull = None
        if self.watching and (self._woken or self._watch_link != links_lost):
            await self._wake_up()
        if pull is not None and pull.consumer_deleted:
            pull = self._pull = None
            await self._check_exists()
        return pull

    async def _idle_turn(self, limit: int, deadline: float) -> bool:
        """Ask for what is ready if a resting consumer's look is due, else wait for a
        wake-up, the next look or `deadline`. Whether a request was sent."""
        now = asyncio.get_running_loop().time()
        if now >= self._next_look():
            while self._due and self._due[0] <= now:
                heapq.heappop(self._due)
            period = self._backend.idle_look_period()
            # Spread out (consumers that went idle together look apart), yet on the ticks of
            # a clock: the looks due at one tick go out in one write, answered in one read.
            look_at = now + period * random.uniform(0.5, 1.5)
            self._look_at = math.ceil(look_at / _LOOK_TICK) * _LOOK_TICK
            await self._send_pull(limit, None)
            return True
        # On the backend's clock: thousands resting, no timer each.
        self._backend.ticker.wake_at(min(deadline, self._next_look()), self)
        await self._news.wait()
        return False

    def _next_look(self) -> float:
        return min(self._look_at, self._due[0]) if self._due else self._look_at

    async def _wait_connected(self, deadline: float) -> bool:
        """Wait until connected (False at `deadline`); on a new connection, subscribe anew."""
        backend = self._backend
        if not await backend.wait_up(deadline):
            return False
        if self._link is not backend.nc:
            # Pulls are answered on the connection that sent them: the old inbox is gone.
            await self._subscribe()
        return True

    async def _check_exists(self) -> None:
        """JetStream ignores pull requests for a consumer that does not exist."""
        backend = self._backend
        try:
            async with backend.existence_checks:
                await backend.js.consumer_info(backend.stream, self._durable, timeout=_GRACE)
            return
        except nats.js.errors.NotFoundError:
            pass
        except _TRANSIENT_OR_REPLACED:
            return  # the server is slow or restarting: the next fetch tries again
        if self._spec.ephemeral:
            # Removed after a long pause in fetching (see EPHEMERAL_KEPT): start again.
            await backend._open_consumer(self._spec, self._durable)
            return
        raise LookupError(
            f"the durable subscription {self._spec.name!r} no longer exists on "
            f"{backend.url.redacted} (deleted by another process?)"
        )

    async def _take(self, limit: int) -> list[Delivery]:
        now = asyncio.get_running_loop().time()
        taken: list[Delivery] = []
        skipped: list[Msg] = []
        while self._buffer and len(taken) < limit:
            arrived, msg = self._buffer.popleft()
            if now - arrived > self._spec.ack_wait:
                continue  # held here past ack_wait: JetStream has delivered it again already
            attempt, sequence = _numbers(msg.reply)
            if attempt == 1 and sequence:
                if sequence == self._newest:
                    # Sent again as new: JetStream (2.9) moves its cursor back one message
                    # when a redelivery finds no pull request to take it (the only one just
                    # expired), so the newest message goes out again as a first delivery.
                    if self._newest_acked:
                        skipped.append(msg)  # its new lease is settled like the first one
                        continue
                    if self._newest_reply in self._held:
                        # Still being handled: that delivery's ack or nak settles the message
                        # (JetStream keys a lease by stream sequence).
                        continue
                elif sequence > self._newest:
                    self._newest, self._newest_acked = sequence, False
                self._newest_reply = msg.reply
            topic = msg.subject.removeprefix(self._backend.prefix)
            if is_reserved(topic) and not self._wants_reserved:
                skipped.append(msg)
                continue
            self._held[msg.reply] = (arrived, msg)
            taken.append(Delivery(topic, msg.data, attempt, msg, now - arrived))
        if skipped:
            self._acked(skipped)
            await self._settle(skipped, b"+ACK", quiet=True)
        return taken

    def _acked(self, msgs: Iterable[Msg]) -> None:
        """Note that `msgs` are acked: they are no longer held, and if the newest first
        delivery is among them, its sending again as new is acked unseen."""
        newest = self._newest_reply
        for msg in msgs:
            self._held.pop(msg.reply, None)
            if msg.reply == newest:
                self._newest_acked = True

    async def _settle(self, msgs: Iterable[Msg], payload: bytes, *, quiet: bool = False) -> None:
        """Send `payload` (+ACK, -NAK, +WPI) for every message and wait until JetStream has
        processed each (it answers an ack sent as a request once applied)."""
        backend = self._backend
        replies = list(dict.fromkeys(msg.reply for msg in msgs))

        async def send(window: list[str]) -> None:
            nc = backend.nc  # on every try: the connection may have been replaced
            await _gather_all(
                nc.request(reply, payload, timeout=_REQUEST_TIMEOUT) for reply in window
            )

        try:
            for start in range(0, len(replies), _PUBLISH_WINDOW):
                window = replies[start : start + _PUBLISH_WINDOW]
                await self._backend._retry(
                    f"sending {payload.decode()} for {len(window)} deliveries",
                    functools.partial(send, window),
                )
        except Exception:
            if not quiet:
                raise
            logger.debug("eventwire: acknowledging skipped deliveries failed", exc_info=True)

    def _msgs(self, deliveries: Sequence[Delivery]) -> list[Msg]:
        msgs = []
        for delivery in deliveries:
            msg = delivery.handle
            if not isinstance(msg, Msg) or not msg.reply.startswith(_ACK_PREFIX):
                raise BackendCapabilityError("this delivery did not come from the nats backend")
            msgs.append(msg)
        return msgs

    async def ack(self, deliveries: Sequence[Delivery], *, handled_ids: Sequence[str] = ()) -> None:
        msgs = self._msgs(deliveries)
        lost = self._lost_before()
        late = [
            m for m in msgs if (held := self._held.get(m.reply)) is not None and held[0] <= lost
        ]
        if late:
            # Their leases may have run out: JetStream takes an ack of an earlier delivery
            # as the ack of the message, which another process may hold (and fail) now.
            replies = {msg.reply for msg in late}
            for reply in replies:
                self._held.pop(reply, None)
            msgs = [m for m in msgs if m.reply not in replies]
        if handled_ids:
            # Recorded before the ack: a crash in between redelivers an event that the bus
            # then finds handled, instead of losing the record.
            await self._backend._record_handled(self._durable, handled_ids)
        if msgs:
            # Acks are published, not requested: one flush (a PING round trip) per batch
            # instead of a reply per ack. An ack lost on the way means a redelivery (at least
            # once), never a loss.
            try:
                # Nothing to wait for: no answer is awaited, so the usual ack goes straight out.
                await self._publish_acks(self._backend, msgs)
            except _TRANSIENT_OR_REPLACED:
                # Through a reconnect, with retries (acknowledging twice is harmless).
                await self._backend._retry(
                    f"acknowledging {len(msgs)} deliveries",
                    functools.partial(self._publish_acks, self._backend, msgs),
                )
            self._unconfirmed_ack = msgs[-1]
        self._acked(msgs)

    @staticmethod
    async def _publish_acks(backend: NatsBackend, msgs: Sequence[Msg]) -> None:
        nc = backend.nc  # on every try: the connection may have been replaced
        # No flush (a PING round trip): the client writes them out at its next turn, and
        # JetStream applies acks asynchronously anyway, so a PONG proved nothing more.
        for reply in dict.fromkeys(msg.reply for msg in msgs):
            await nc.publish(reply, b"+ACK")

    def _still_held(self, msgs: Iterable[Msg]) -> list[Msg]:
        """Those of `msgs` whose lease this consumer surely still holds. JetStream takes a
        nak or an extend of a delivery it has given to another process since as that
        process's own: it must not be sent then."""
        lost = self._lost_before()
        return [
            msg
            for msg in msgs
            if (held := self._held.get(msg.reply)) is not None and held[0] > lost
        ]

    def _lost_before(self) -> float:
        """A delivery whose lease last started here before this time may be lost."""
        return asyncio.get_running_loop().time() - self._spec.ack_wait * _LEASE_SURE

    def foreign(self, delivery: Delivery) -> ForeignMessage:
        msg: Msg = delivery.handle
        headers = dict(msg.headers or {})
        sequence = _numbers(msg.reply)[1]
        message_id = headers.get("Nats-Msg-Id") or (
            f"{self._backend.stream}:{sequence}" if sequence else None
        )
        return ForeignMessage(delivery.topic, delivery.body, headers, message_id)

    async def nak(self, delivery: Delivery, delay: float = 0.0) -> None:
        [msg] = self._msgs([delivery])
        payload = b"-NAK"
        if delay > 0:
            payload += b" " + json.dumps({"delay": int(delay * 1e9)}).encode()
        if self._still_held([msg]):
            await self._settle([msg], payload)
            self._look_soon(delay)
        self._held.pop(msg.reply, None)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        renewed = asyncio.get_running_loop().time()
        msgs = self._still_held(self._msgs(deliveries))
        await self._settle(msgs, b"+WPI")
        for msg in msgs:
            if msg.reply in self._held:
                self._held[msg.reply] = (renewed, msg)

    async def handled(self, event_ids: Sequence[str]) -> set[str]:
        return await self._backend._handled(self._durable, event_ids)

    async def restarted(self, delivery: Delivery) -> int:
        [msg] = self._msgs([delivery])
        _, sequence = _numbers(msg.reply)
        return await self._backend._count_restart(self._durable, sequence)

    async def stop_fetching(self) -> None:
        # JetStream cannot take a pull request back, and gives what is handed back (nak) to a
        # request still standing, even one whose inbox is gone: wait for it to end (it
        # expires within _STANDING_PULL), then give back what came that no fetch took.
        await self._wake_up()
        pull = self._pull
        if pull is not None and not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(pull.answer_by):
                    while not pull.done:
                        self._news.clear()
                        await self._news.wait()
        self._pull = None
        back = [msg for _, msg in self._buffer]
        self._buffer.clear()
        if back and not self._closed:
            await self._settle(back, b"-NAK", quiet=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pull = self._pull
        if pull is not None:
            pull.done = True
        self._news.set()  # a fetch in progress returns now
        await self._wake_up()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        backend = self._backend
        if backend._nc is None or backend.nc.is_closed:
            return
        if self._spec.ephemeral:
            try:
                await backend.delete_consumer(self._spec.name)
            except Exception:
                logger.warning(
                    "eventwire: could not delete the inbox consumer %s; NATS removes it after "
                    "%.0fs",
                    self._spec.name,
                    max(EPHEMERAL_KEPT, 2 * self._spec.ack_wait),
                    exc_info=True,
                )
            return
        # Give back at once what this process holds, rather than after ack_wait (what it held
        # too long may be another process's now).
        lost = self._lost_before()
        back = [msg for since, msg in [*self._held.values(), *self._buffer] if since > lost]
        self._held.clear()
        self._buffer.clear()
        confirm, self._unconfirmed_ack = self._unconfirmed_ack, None
        if not back and confirm is not None and self._spec.exclusive:
            # JetStream applies acks in the order they come, after answering whoever asked
            # before: the next process to take this slot reads the ack floor at once
            # (`take_over`), and every ack still on its way would count as not done, its
            # event delivered again. Sent again as a request, the last one is answered once
            # all are applied (what is given back is sent as requests anyway). Once, briefly:
            # a consumer deleted meanwhile, or a server gone, must not hold the close up.
            link = backend.nc
            if link.is_connected:
                answer = link.request(confirm.reply, b"+ACK", timeout=_REQUEST_TIMEOUT)
                try:
                    await backend._on_this_link(answer)
                except nats.errors.Error:
                    logger.debug("eventwire: confirming the last acks failed", exc_info=True)
        if back:
            try:
                await self._settle(back, b"-NAK")
            except Exception:
                logger.warning(
                    "eventwire: could not give back %d deliveries of %s; they return after "
                    "ack_wait",
                    len(back),
                    self._spec.name,
                    exc_info=True,
                )


def _answer(acked: asyncio.Future[Msg]) -> BaseException | None:
    """What went wrong with one publish of a window, or None once it is stored."""
    if acked.cancelled():
        # Not answered in time: maybe stored (a retry is dropped as a duplicate).
        return nats.errors.TimeoutError()
    error = acked.exception()
    return error if error is not None else _puback_error(acked.result())


def _puback_error(msg: Msg) -> BaseException | None:
    """What a JetStream publish's answer says went wrong, or None for a PubAck."""
    data = msg.data
    if not msg.headers and data.startswith(b'{"stream":') and b'"error"' not in data:
        return None  # a PubAck (the usual answer: no JSON decoding for it)
    headers = msg.headers or {}
    if headers.get("Status") == "503":
        return nats.js.errors.NoStreamResponseError()  # no stream (yet): JetStream restarting
    try:
        answer = json.loads(msg.data)
    except ValueError:
        return nats.js.errors.APIError(description=f"unreadable PubAck {msg.data[:100]!r}")
    if isinstance(answer, dict) and "error" in answer:
        try:
            nats.js.errors.APIError.from_error(answer["error"])  # raises the error's class
        except nats.js.errors.APIError as error:
            return error
    return None


def _discard(call: Awaitable[Any]) -> None:
    """Drop an awaitable that will not be awaited, without a "never awaited" warning."""
    if isinstance(call, Coroutine):
        call.close()
    elif isinstance(call, asyncio.Future):
        call.cancel()


async def _gather_all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await all concurrently; raise the first error only after every call has finished, so
    a retry never overlaps calls still in flight."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def _described(info: NatsConsumerInfo) -> dict[str, Any]:
    try:
        described = json.loads(info.config.description or "")
    except ValueError:
        return {}
    return described if isinstance(described, dict) else {}


def _pattern_of(info: NatsConsumerInfo, prefix: str) -> str:
    """The subscription pattern of a consumer (from its filter if another tool made it)."""
    pattern = _described(info).get("pattern")
    if isinstance(pattern, str):
        return pattern
    subject = info.config.filter_subject or f"{prefix}>"
    return subject.removeprefix(prefix)


def _headers_of(message: Message, stream: str) -> dict[str, str]:
    """A message's NATS headers: its id (the server drops a retried copy), the stream it must
    go to, and what it says to other readers (content type, trace context)."""
    headers = {"Nats-Msg-Id": message.id, "Nats-Expected-Stream": stream}
    if message.headers:
        headers.update(message.headers)
    return headers


def _numbers(reply: str) -> tuple[int, int]:
    """The delivery count and stream sequence in a JetStream message's ack subject:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``,
    or with ``<domain>.<account hash>`` after ``ACK``; ``(1, 0)`` when it is not one (read
    directly: nats-py's `Msg.metadata` builds dataclasses and a datetime per message)."""
    tokens = reply.split(".")
    count = len(tokens)
    index = 4 if count == 9 else 6 if count >= 11 else 0
    if not index or tokens[0] != "$JS" or tokens[1] != "ACK":
        return 1, 0
    try:
        return max(1, int(tokens[index])), max(0, int(tokens[index + 1]))
    except ValueError:
        return 1, 0


def _id_key(event_id: str) -> str:
    """A KV key token for an event id: itself when safe, else ``b64.<base64url>``."""
    if _DIRECT_ID.fullmatch(event_id):
        return event_id
    return "b64." + base64.urlsafe_b64encode(event_id.encode()).decode()
