"""The ``sqlite:///path/to/bus.db`` backend: durable, embedded, nothing to install.

Events live in that SQLite file and the subscriptions' state (cursors, deliveries, handled ids)
in ``<file>-consumers`` beside it, both in WAL mode (`sqlite_log.SqliteLog`), so that publishing
and consuming never wait for each other's write lock; a publish returns once its transaction
has committed. Several processes on one machine may share the files: processes running the same
subscription lease its deliveries, and a delivery whose lease runs out (its process died) goes
to another. Consumers in this process are woken at once by a publish from this process;
other processes' publishes are seen within `poll` seconds (``?poll=0.05`` or ``?poll=50ms`` in
the URL).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from time import time_ns
from typing import Literal
from urllib.parse import unquote

from eventwire.backends.base import (
    BackendCapabilityError,
    BackendConnectionError,
    BrokerFullError,
    Capabilities,
    Consumer,
    ConsumerInfo,
    ConsumerSpec,
    Delivery,
    Message,
    SubscriptionConflictError,
)
from eventwire.backends.broker import BrokerBackend
from eventwire.backends.sqlite_log import Leased, PatternConflictError, SqliteLog
from eventwire.backends.url import BusURL, URLOptions

_DEFAULT_POLL = 0.05
# How long an acknowledgement waits before it is written, so that those of one-at-a-time
# events share a commit rather than each waiting for the disk (their redelivery after a crash
# in between is what at least once allows).
_ACK_LINGER = 0.002
# The ``?option=`` settings a sqlite:// URL takes (besides ``namespace``).
OPTIONS = ("poll",)


class SqliteBackend(BrokerBackend):
    """Events in one SQLite file; see the module docstring."""

    scheme = "sqlite"
    tracks_presence = True
    capabilities = Capabilities(
        durable=True,
        replay=True,
        key_order_across_processes=True,
        idempotent=True,
        cross_process_drain=True,
    )

    def __init__(self, url: BusURL) -> None:
        super().__init__(url)
        if not url.path or url.path == "/":
            raise ValueError(
                f"sqlite URL {url.redacted!r} names no file: use sqlite:///relative/bus.db "
                "or sqlite:////absolute/bus.db"
            )
        # sqlite:///bus.db is relative to the working directory, sqlite:////tmp/bus.db absolute;
        # %xx is decoded as in any URL (sqlite:///my%20bus.db is "my bus.db").
        self.path = Path(unquote(url.path[1:]))
        self.poll = URLOptions(url, OPTIONS).duration("poll", _DEFAULT_POLL, above=True)
        self._log: SqliteLog | None = None
        # Set by every publish of this process, so that its own consumers need not poll.
        self._published = asyncio.Event()

    @property
    def log(self) -> SqliteLog:
        if self._log is None:
            raise RuntimeError("the sqlite backend is not connected; start the bus first")
        return self._log

    async def connect(self) -> None:
        if self._log is not None:
            return
        try:
            if self.path.parent != Path():
                os.makedirs(self.path.parent, exist_ok=True)
            self._log = await asyncio.to_thread(SqliteLog, self.path)
        except Exception as error:
            raise BackendConnectionError(
                f"cannot open the SQLite bus {self.url.redacted!r}: {type(error).__name__}: {error}"
            ) from error

    async def close(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            await asyncio.to_thread(log.close)

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        rows = [(m.id, m.topic, m.key, time_ns(), m.body) for m in messages]
        try:
            await asyncio.to_thread(self.log.append, rows)
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            raise BrokerFullError(
                f"cannot store {len(rows)} event(s) in {self.url.redacted}: the disk holding "
                f"{self.path} is full. Nothing of this publish was stored and what was stored "
                "before is intact: free some space, then publish again"
            ) from error
        self._wake()

    def _wake(self) -> None:
        self._published.set()
        self._published = asyncio.Event()

    async def consumer(self, spec: ConsumerSpec) -> Consumer:
        start: Literal["latest", "earliest"] | int
        if isinstance(spec.start, datetime):
            if spec.start.tzinfo is None:
                raise ValueError("start= datetime must be timezone-aware (e.g. UTC)")
            start = int(spec.start.timestamp() * 1_000_000_000)
        else:
            start = spec.start
        try:
            await asyncio.to_thread(
                partial(self.log.ensure_consumer, group=spec.group),
                spec.name,
                spec.pattern,
                start,
            )
        except PatternConflictError as conflict:
            raise SubscriptionConflictError(
                spec.name,
                conflict.existing,
                spec.pattern,
                self.url,
                existing_group=conflict.existing_group,
            ) from None
        return _SqliteConsumer(self, spec)

    async def consumers(self) -> list[ConsumerInfo]:
        rows = await asyncio.to_thread(self.log.consumers)
        return [ConsumerInfo(name, pattern, owed) for name, pattern, owed in rows]

    async def delete_consumer(self, name: str) -> None:
        await asyncio.to_thread(self.log.delete_consumer, name)

    async def beat(self, process: str, consumers: Sequence[str]) -> None:
        await asyncio.to_thread(self.log.mark_presence, process, consumers, time.time())

    async def leave(self, process: str, consumers: Sequence[str]) -> None:
        await asyncio.to_thread(self.log.mark_presence, process, consumers, -time.time())

    async def presences(self) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for name, seen in await asyncio.to_thread(self.log.presences):
            found.setdefault(name, []).append(seen)
        return found

    async def destroy(self) -> None:
        await asyncio.to_thread(self.log.destroy)


class _SqliteConsumer(Consumer):
    # An acknowledgement lingers, then waits for a disk sync: a fetch does not wait for it.
    acks_with_fetch = False

    def __init__(self, backend: SqliteBackend, spec: ConsumerSpec) -> None:
        self._backend = backend
        self._spec = spec
        self._holder = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._closed = False
        # The wake event that was current when a lease found nothing more to take: until it
        # is set, fetching again would find nothing either.
        self._emptied: asyncio.Event | None = None
        # Whether a lease first reads if there is anything (cheap when there is not).
        self._look_first = True
        # Acknowledgements on their way (each call's future, done once it has landed).
        self._acking: set[asyncio.Future[None]] = set()

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        backend = self._backend
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self._closed:
            published = backend._published
            # After a fetch that left nothing, only a wake (or a poll) can bring more; a
            # fetch that may not wait looks all the same.
            if self._emptied is not published or loop.time() >= deadline:
                leased = await self._lease(limit, published)
                if leased:
                    return [Delivery(item.topic, item.body, item.attempts, item) for item in leased]
            left = deadline - loop.time()
            if left <= 0:
                return []
            try:
                async with asyncio.timeout(min(left, backend.poll)):
                    await published.wait()
                self._look_first = False  # a publish or give-back of this process: work
            except TimeoutError:
                # Polling for other processes' work: mostly nothing, which a read tells.
                self._emptied = None
                self._look_first = True
        return []

    async def _lease(self, limit: int, published: asyncio.Event) -> list[Leased]:
        """One lease; notes whether it emptied what there was (as of `published`)."""
        backend, spec = self._backend, self._spec
        try:
            leased, emptied = await asyncio.to_thread(
                backend.log.lease,
                spec.name,
                self._holder,
                limit=limit,
                lease_seconds=spec.ack_wait,
                look_first=self._look_first,
            )
        except LookupError:
            if self._closed:
                return []  # an inbox, removed by its close meanwhile
            raise
        self._emptied = published if emptied else None
        # Something left: the next fetch leases it without looking first.
        self._look_first = emptied
        if leased and self._closed:
            # Closed while this fetch ran: what it took goes back at once.
            await self._give_back()
            return []
        return leased

    async def ack(self, deliveries: Sequence[Delivery], *, handled_ids: Sequence[str] = ()) -> None:
        landed = asyncio.get_running_loop().create_future()
        self._acking.add(landed)
        try:
            await self._ack([_leased(d) for d in deliveries], handled_ids)
        finally:
            self._acking.discard(landed)
            landed.set_result(None)

    async def _ack(self, leased: list[Leased], handled_ids: Sequence[str]) -> None:
        if leased:
            # Events handled meanwhile are acknowledged in the next call (the session sends
            # what came while one is on its way): they share a transaction and its fsync.
            await asyncio.sleep(_ACK_LINGER)
        unblocked = await asyncio.to_thread(
            self._backend.log.ack,
            self._spec.name,
            [item.seq for item in leased],
            self._holder,
            handled_ids=handled_ids,
            keys=[item.key for item in leased],
        )
        if unblocked:
            # A later event of an acknowledged key may be leased now.
            self._backend._wake()

    async def nak(self, delivery: Delivery, delay: float = 0.0) -> None:
        await asyncio.to_thread(
            self._backend.log.nak, self._spec.name, _leased(delivery).seq, self._holder, delay=delay
        )
        if delay <= 0:
            self._backend._wake()

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        seqs = [_leased(d).seq for d in deliveries]
        await asyncio.to_thread(
            self._backend.log.extend, self._spec.name, seqs, self._holder, self._spec.ack_wait
        )

    async def handled(self, event_ids: Sequence[str]) -> set[str]:
        return await asyncio.to_thread(self._backend.log.handled_among, self._spec.name, event_ids)

    async def close(self) -> None:
        self._closed = True
        if self._acking:
            # Acknowledgements on their way land first: what they finish is not given back.
            await asyncio.wait(set(self._acking))
        if self._spec.ephemeral:
            await self._backend.delete_consumer(self._spec.name)
        else:
            await self._give_back()
        self._backend._wake()  # a fetch of this consumer in progress ends now

    async def _give_back(self) -> None:
        if self._backend._log is not None:
            await asyncio.to_thread(self._backend.log.release, self._spec.name, self._holder)
            self._backend._wake()


def _leased(delivery: Delivery) -> Leased:
    handle = delivery.handle
    if not isinstance(handle, Leased):
        raise BackendCapabilityError("this delivery did not come from the sqlite backend")
    return handle
