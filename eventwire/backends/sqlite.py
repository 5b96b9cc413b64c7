"""The ``sqlite:///path/to/bus.db`` backend: durable, embedded, nothing to install.

Events live in that SQLite file and the subscriptions' state (cursors, deliveries, handled ids)
in ``<file>-consumers`` beside it, both in WAL mode (`sqlite_log.SqliteLog`), so that publishing
and consuming never wait for each other's write lock; a publish returns once its transaction
has committed. Several processes on one machine may share the files: processes running the same
subscription lease its deliveries, and a delivery whose lease runs out (its process died) goes
to another.

Consumers do not poll: one `_Watch` per backend looks for all of this process's consumers at
once, every `poll` seconds (``?poll=0.05`` or ``?poll=50ms`` in the URL), at what other
processes appended and at deliveries that became visible (a nak's delay or a lease ran out,
given back, unblocked), and wakes only the consumers that may have something to lease: one
indexed read per look, however many consumers there are. A publish, give-back or nak of this
process wakes the consumers concerned at once.
"""

from __future__ import annotations

import asyncio
import logging
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
from eventwire.backends.journal import Journal
from eventwire.backends.sqlite_journal import SqliteJournal
from eventwire.backends.sqlite_log import Leased, PatternConflictError, SqliteLog
from eventwire.backends.url import BusURL, URLOptions
from eventwire.topics import TopicTrie

logger = logging.getLogger("eventwire")

_DEFAULT_POLL = 0.05
# How long an acknowledgement waits before it is written, so that those of one-at-a-time
# events share a commit rather than each waiting for the disk (their redelivery after a crash
# in between is what at least once allows).
_ACK_LINGER = 0.002
# The ``?option=`` settings a sqlite:// URL takes (besides ``namespace``).
OPTIONS = ("poll",)
# New events whose topics one look of the watch reads at most; past that it wakes every
# consumer (each reads its own share anyway).
_WATCH_TOPICS = 10_000
# A look asks which deliveries became visible since the last look, and this much before: a
# transaction stores the time before its commit, which the last look may not have seen yet.
_WATCH_OVERLAP = 2.0
# Every this many seconds a look asks for every delivery visible now, whenever it became so:
# what the spans missed (a clock set back, a commit later than the overlap, the 0 that an
# earlier eventwire stored) is leased after this long at most.
_WATCH_SWEEP = 10.0


class SqliteBackend(BrokerBackend):
    """Events in one SQLite file; see the module docstring."""

    scheme = "sqlite"
    tracks_presence = True
    orders_keys_itself = True
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
        self._journal: SqliteJournal | None = None
        self.watch = _Watch(self)
        # The process and consumers of the last beat: the next with the same renews them.
        self._last_beat: tuple[str, frozenset[str]] | None = None

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
            log = await asyncio.to_thread(SqliteLog, self.path)
            # Before any consumer's first lease: what that does not see, the watch does.
            self.watch.start_from(await asyncio.to_thread(log.last_seq), time.time())
            self._log = log
        except Exception as error:
            raise BackendConnectionError(
                f"cannot open the SQLite bus {self.url.redacted!r}: {type(error).__name__}: {error}"
            ) from error

    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = SqliteJournal(Path(f"{self.path}-runs"))
        return self._journal

    async def close(self) -> None:
        log, self._log = self._log, None
        journal, self._journal = self._journal, None
        if journal is not None:
            await journal.close()
        await self.watch.stop()
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
        self.watch.published({m.topic for m in messages})

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
        consumer = _SqliteConsumer(self, spec)
        self.watch.add(consumer)
        return consumer

    async def consumers(self) -> list[ConsumerInfo]:
        rows = await asyncio.to_thread(self.log.consumers)
        return [ConsumerInfo(name, pattern, owed) for name, pattern, owed in rows]

    async def delete_consumer(self, name: str) -> None:
        await asyncio.to_thread(self.log.delete_consumer, name)

    async def record_handled(self, consumer: str, event_ids: Sequence[str]) -> None:
        await asyncio.to_thread(self.log.ack, consumer, [], handled_ids=list(event_ids))

    async def seen_handled(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        return await asyncio.to_thread(self.log.handled_among, consumer, list(event_ids))

    async def forget_handled(self, consumer: str) -> None:
        await asyncio.to_thread(self.log.forget_handled, consumer)

    async def beat(self, process: str, consumers: Sequence[str]) -> None:
        now, log, last = time.time(), self.log, self._last_beat
        names = frozenset(consumers)
        # Most beats name the consumers of the last one, or those and a few more (one
        # subscribed meanwhile): those are renewed together, the new ones added.
        if (
            last is None
            or last[0] != process
            or not last[1] <= names
            or not await asyncio.to_thread(
                log.renew_presence, process, len(last[1]), sorted(names - last[1]), now
            )
        ):
            await asyncio.to_thread(log.mark_presence, process, consumers, now)
        self._last_beat = (process, names)

    async def leave(self, process: str, consumers: Sequence[str]) -> None:
        self._last_beat = None
        await asyncio.to_thread(self.log.mark_presence, process, consumers, -time.time())

    async def presences(self) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for name, seen in await asyncio.to_thread(self.log.presences):
            found.setdefault(name, []).append(seen)
        return found

    async def destroy(self) -> None:
        await asyncio.to_thread(self.log.destroy)


class _Watch:
    """Wakes the consumers of one backend in this process when they may have something to
    lease, so that none polls on its own (see the module docstring).

    A consumer is woken (`_SqliteConsumer.wake`) by a publish of this process to a topic its
    pattern matches, by a give-back, nak or unblocking acknowledgement of this process on its
    name, and by the looks of a task that runs while consumers are open: every `poll`
    seconds one read tells the topics other processes appended to and the consumers with
    deliveries that became visible, and only those consumers are woken."""

    def __init__(self, backend: SqliteBackend) -> None:
        self._backend = backend
        self._patterns: TopicTrie[_SqliteConsumer] = TopicTrie()
        self._named: dict[str, set[_SqliteConsumer]] = {}
        self._seq = 0  # events up to this seq were looked at
        self._since = 0.0  # deliveries visible by this time were looked at
        self._swept = 0.0  # when a look last asked for every visible delivery
        self._task: asyncio.Task[None] | None = None

    def start_from(self, seq: int, now: float) -> None:
        """Look at what comes after event `seq` and becomes visible after `now`."""
        self._seq, self._since, self._swept = seq, now, now

    def add(self, consumer: _SqliteConsumer) -> None:
        self._patterns.add(consumer.spec.pattern, consumer)
        self._named.setdefault(consumer.spec.name, set()).add(consumer)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"eventwire:{self._backend.scheme}:watch"
            )

    def remove(self, consumer: _SqliteConsumer) -> None:
        named = self._named.get(consumer.spec.name)
        if named is None or consumer not in named:
            return
        named.discard(consumer)
        if not named:
            del self._named[consumer.spec.name]
        self._patterns.remove(consumer.spec.pattern, consumer)

    def published(self, topics: set[str]) -> None:
        """Events on `topics` were appended by this process: wake who they are for."""
        for topic in topics:
            for consumer in self._patterns.match(topic):
                consumer.wake(look_first=False)

    def wake(self, name: str, *, look_first: bool = True) -> None:
        """Wake the consumers named `name` in this process."""
        for consumer in self._named.get(name, ()):
            consumer.wake(look_first=look_first)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def _run(self) -> None:
        backend = self._backend
        try:
            while self._named:
                await asyncio.sleep(backend.poll)
                log = backend._log
                if log is None:
                    break
                try:
                    await self._look(log)
                except Exception:
                    # The file is busy or gone: the next look tries again.
                    logger.debug("eventwire: watching %s failed", backend.url, exc_info=True)
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    async def _look(self, log: SqliteLog) -> None:
        now = time.time()
        since = self._since - _WATCH_OVERLAP
        if now - self._swept >= _WATCH_SWEEP:
            since, self._swept = float("-inf"), now
        last, topics, due = await asyncio.to_thread(
            log.changes, self._seq, since, now, _WATCH_TOPICS
        )
        self._seq, self._since = last, now
        if topics is None:
            for named in list(self._named.values()):
                for consumer in named:
                    consumer.wake()
        else:
            # Events matching a consumer's pattern: it looks first, as they may be this
            # process's own publishes, taken already, or taken by another of its processes.
            for topic in topics:
                for consumer in self._patterns.match(topic):
                    consumer.wake()
        for name in due:
            self.wake(name)


class _SqliteConsumer(Consumer):
    # An acknowledgement lingers, then waits for a disk sync: a fetch does not wait for it.
    acks_with_fetch = False

    def __init__(self, backend: SqliteBackend, spec: ConsumerSpec) -> None:
        self._backend = backend
        self.spec = spec
        self._holder = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._closed = False
        # Whether a lease may find something: true until one finds less than it could take,
        # then again once the watch (or this process) says something may have come.
        self._due = True
        self._woken = asyncio.Event()
        # Whether a lease first reads if there is anything (cheap when there is not); false
        # when it is known that there is (a matching publish, more than the last lease took).
        self._look_first = True
        # Acknowledgements on their way (each call's future, done once it has landed).
        self._acking: set[asyncio.Future[None]] = set()

    def wake(self, *, look_first: bool = True) -> None:
        """Something may have come for this consumer: the next fetch leases."""
        self._due = True
        self._look_first = self._look_first and look_first
        self._woken.set()

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        # A fetch that may not wait looks all the same.
        due = self._due or wait <= 0
        while not self._closed:
            if due:
                leased = await self._lease(limit)
                if leased:
                    return [Delivery(item.topic, item.body, item.attempts, item) for item in leased]
            left = deadline - loop.time()
            if left <= 0:
                return []
            if not self._due:
                self._woken.clear()
                try:
                    async with asyncio.timeout(left):
                        await self._woken.wait()
                except TimeoutError:
                    return []
            due = self._due
        return []

    async def _lease(self, limit: int) -> list[Leased]:
        """One lease; notes whether it emptied what there was (`_due`)."""
        backend, spec = self._backend, self.spec
        look_first = self._look_first
        # A wake while the lease runs sets these again: the next fetch leases once more.
        self._due, self._look_first = False, True
        try:
            leased, emptied = await asyncio.to_thread(
                backend.log.lease,
                spec.name,
                self._holder,
                limit=limit,
                lease_seconds=spec.ack_wait,
                look_first=look_first,
            )
        except BaseException as error:
            self._due = True  # the next fetch tries again
            if isinstance(error, LookupError) and self._closed:
                return []  # an inbox, removed by its close meanwhile
            raise
        if not emptied:
            # Something left: the next fetch leases it without looking first.
            self.wake(look_first=False)
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
            self.spec.name,
            [item.seq for item in leased],
            self._holder,
            handled_ids=handled_ids,
            keys=[item.key for item in leased],
            returned=[item.seq for item in leased if item.attempts > 1],
        )
        if unblocked:
            # A later event of an acknowledged key may be leased now.
            self._backend.watch.wake(self.spec.name, look_first=False)

    async def nak(self, delivery: Delivery, delay: float = 0.0) -> None:
        await asyncio.to_thread(
            self._backend.log.nak, self.spec.name, _leased(delivery).seq, self._holder, delay=delay
        )
        if delay <= 0:
            self._backend.watch.wake(self.spec.name, look_first=False)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        seqs = [_leased(d).seq for d in deliveries]
        await asyncio.to_thread(
            self._backend.log.extend, self.spec.name, seqs, self._holder, self.spec.ack_wait
        )

    async def handled(self, event_ids: Sequence[str]) -> set[str]:
        return await asyncio.to_thread(self._backend.log.handled_among, self.spec.name, event_ids)

    async def restarted(self, delivery: Delivery) -> int:
        seq = _leased(delivery).seq
        return await asyncio.to_thread(self._backend.log.count_restart, self.spec.name, seq)

    async def close(self) -> None:
        self._closed = True
        self._woken.set()  # a fetch of this consumer in progress ends now
        try:
            if self._acking:
                # Acknowledgements on their way land first: what they finish is not given back.
                await asyncio.wait(set(self._acking))
            if self.spec.ephemeral:
                await self._backend.delete_consumer(self.spec.name)
            else:
                await self._give_back()
        finally:
            self._backend.watch.remove(self)

    async def _give_back(self) -> None:
        if self._backend._log is not None:
            await asyncio.to_thread(self._backend.log.release, self.spec.name, self._holder)
            self._backend.watch.wake(self.spec.name, look_first=False)


def _leased(delivery: Delivery) -> Leased:
    handle = delivery.handle
    if not isinstance(handle, Leased):
        raise BackendCapabilityError("this delivery did not come from the sqlite backend")
    return handle
