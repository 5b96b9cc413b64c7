"""Per-key order across the processes of a subscription, on brokers that hand a consumer's
messages to whichever process asks first (Redis, NATS, RabbitMQ): ``partitions=N``.

A partitioned durable consumer ``G`` is made of:

- ``G`` itself, consumed by one process at a time, the *router*: it reads what the pattern
  matches, in order, and copies each event (the same envelope, a new broker message) to the
  partition of its key, ``_p.<tag>.<n>`` with ``n = partition_of(key, N)``, or, without a key,
  to ``_p.<tag>.free``; then it acknowledges the originals. What is not an envelope
  (another producer's message) stays with the router's process, which dead-letters it.
- ``N`` partition consumers ``G#p<n>of<N>``, each consumed by one process at a time, which
  handles its events in order (per key, as the bus does in one process).
- ``G#free``, consumed by every process: events without a key spread freely.

Who consumes what: every process of ``G`` joins the group's table on the broker
(`BrokerBackend.sync_group`) every `TICK` seconds, which says who is alive and renews the
leases it holds. The router and partitions are dealt out over the live members sorted
(`assign`), so each gets its share. A process that is dealt a slot takes its lease once it is
free; one that is no longer dealt a slot stops fetching from it, waits until what it handed
to its handlers is finished, gives back what it fetched but did not hand over, and lets the
lease go. A process that dies stops renewing: its leases run out after `LEASE_TTL` and the
slots move. Whoever takes a slot first takes over what the broker still holds for another
process of it (`Consumer.take_over`), oldest first, so no event of a key overtakes an
earlier one. Brokers that enforce one active consumer themselves (RabbitMQ's single active
consumer) hold every slot asked for at once and keep the others waiting.

With ``idempotent=True`` each partition keeps the ids it handled: a key always maps to the
same partition, so an event copied twice (a router that died between copying and
acknowledging) or delivered again after a takeover is handled once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import msgspec

from eventwire.backends.base import (
    Consumer,
    ConsumerInfo,
    ConsumerSpec,
    Delivery,
    Message,
    retry_backoff,
)
from eventwire.backends.url import BusURL
from eventwire.foreign import ForeignMessage

logger = logging.getLogger("eventwire")

PARTITION_PREFIX = "_p."
"""Topics of partition copies (``_p.<tag>.<n>``): the bus's own, never an application's."""
# Seconds between two looks at the group's table, and how long a lease (and a member) lasts
# without one: a dead process's slots move after about this long.
TICK = 0.5
LEASE_TTL = 5.0
# While slots are dealt to this process that another still holds, looks come every
# `_QUICK_TICK` seconds, for at most `_QUICK_FOR` seconds since the group last changed: a
# slot is taken a few hundredths of a second after it is let go rather than up to a tick
# later, unconsumed meanwhile; a slot whose handlers run long makes no more looks than that.
# Only then: on RabbitMQ, where the broker hands slots over (every slot wanted is held), a
# look is a beat every member hears, and beats 20 times a second made the members' channels
# slow to close.
_QUICK_TICK = 0.05
_QUICK_FOR = 1.0
# Deliveries one slot fetches ahead of the handlers.
_AHEAD = 64
# Events the router copies in one batch.
_ROUTE_BATCH = 500
ROUTER = "router"


def partition_of(key: str, count: int) -> int:
    """The partition of `key` among `count`: the same in every process (not hash(), whose
    seed differs), and independent of which member of a group in one process takes it."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def tag_of(name: str) -> str:
    """The short token that names a consumer's partitions in their topics."""
    return f"{zlib.crc32(name.encode()):08x}"


def partition_names(name: str, count: int) -> list[str]:
    """The consumers a partitioned consumer `name` is made of besides itself."""
    return [f"{name}#p{n}of{count}" for n in range(count)] + [f"{name}#free"]


@dataclass(frozen=True, slots=True)
class GroupView:
    """What one look at a partitioned group's table on the broker found."""

    members: tuple[str, ...]
    """The live processes of the group, sorted (this one included)."""
    held: frozenset[str]
    """The slots whose lease this process holds now."""


class PartitionHost(Protocol):
    """What a partitioned consumer uses of its broker backend (`BrokerBackend`)."""

    url: BusURL
    process: str

    async def publish(self, messages: Sequence[Message]) -> None: ...

    async def consumer(self, spec: ConsumerSpec) -> Consumer: ...

    async def create_consumer(self, spec: ConsumerSpec) -> None: ...

    async def consumers(self) -> list[ConsumerInfo]: ...

    async def sync_group(
        self, group: str, process: str, want: Collection[str], ttl: float
    ) -> GroupView: ...

    async def leave_group(self, group: str, process: str) -> None: ...

    async def record_handled(self, consumer: str, event_ids: Sequence[str]) -> None: ...

    async def seen_handled(self, consumer: str, event_ids: Sequence[str]) -> set[str]: ...


async def _all(steps: Sequence[Awaitable[None]]) -> None:
    """Run `steps` together to their end, then raise the first error any of them raised."""
    outcomes = await asyncio.gather(*steps, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def assign(slots: Sequence[str], members: Sequence[str]) -> dict[str, str]:
    """Slot -> the member that should consume it: dealt out in turn over the sorted members,
    so every member gets its share (one more for some)."""
    ordered = sorted(members)
    return {slot: ordered[index % len(ordered)] for index, slot in enumerate(slots)}


class _Route(msgspec.Struct, forbid_unknown_fields=False):
    id: str
    topic: str
    key: str | None = None


_route_decoder = msgspec.json.Decoder(_Route)


def route_of(body: bytes) -> _Route | None:
    """The id, topic and key of an envelope, reading nothing else; None if `body` is none."""
    try:
        return _route_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


_IDLE, _ACTIVE, _DRAINING = "idle", "active", "draining"


class _Slot:
    """The router, a partition or the free consumer, as this process consumes it."""

    __slots__ = ("consumer", "fetching", "inflight", "name", "pump", "ready", "spec", "state")

    def __init__(self, name: str, spec: ConsumerSpec) -> None:
        self.name = name
        self.spec = spec
        self.state = _IDLE
        self.consumer: Consumer | None = None
        self.pump: asyncio.Task[None] | None = None
        # Fetched from the broker, not yet handed over (in `PartitionedConsumer._ready`).
        self.ready = 0
        # Handed over, not yet acknowledged or given back.
        self.inflight = 0
        # Whether its pump waits in a fetch, which letting it go may cut short.
        self.fetching = False


@dataclass(slots=True)
class _Handle:
    slot: _Slot
    # The consumer that fetched it: the slot may have another by the time it is finished.
    consumer: Consumer
    inner: Delivery
    event_id: str | None


class PartitionedConsumer(Consumer):
    """A durable consumer whose keyed events are handled in order across processes (see the
    module docstring): one `Consumer` to the bus, made of the router, the partitions and the
    free consumer this process holds now."""

    acks_with_fetch = False

    def __init__(self, backend: PartitionHost, spec: ConsumerSpec, window: int) -> None:
        assert spec.partitions
        self.backend = backend
        self.spec = spec
        self.count = spec.partitions
        self.process = backend.process
        tag = tag_of(spec.name)
        names = partition_names(spec.name, self.count)
        sub = replace(spec, partitions=0, start="latest", exclusive=True, group=True)
        router = _Slot(ROUTER, replace(spec, partitions=0, exclusive=True))
        self._slots: dict[str, _Slot] = {ROUTER: router}
        self._order = [ROUTER]
        for n in range(self.count):
            slot = str(n)
            part = replace(sub, name=names[n], pattern=f"{PARTITION_PREFIX}{tag}.{n}")
            self._slots[slot] = _Slot(slot, part)
            self._order.append(slot)
        free = replace(
            sub, name=names[-1], pattern=f"{PARTITION_PREFIX}{tag}.free", exclusive=False
        )
        self._free = _Slot("free", free)
        self._tag = tag
        # Fetched ahead per slot: never more than the subscriptions take at once here, and
        # less from the free consumer, whose events other processes could be handling.
        self._ahead = max(1, min(_AHEAD, window))
        self._free_ahead = max(1, min(_AHEAD // 4, window))
        self._ready: deque[tuple[Delivery, float]] = deque()
        self._arrived = asyncio.Event()
        # Event id -> the delivery of it this process holds (fetched ahead or handed over).
        self._ids: dict[str, _Handle] = {}
        self._view: GroupView | None = None
        self._synced_at = 0.0
        # When the group last changed as this process saw it (`_QUICK_FOR`).
        self._changed_at = 0.0
        self._driver: asyncio.Task[None] | None = None
        self._leaser: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._fetching = True
        self._closed = False

    async def open(self) -> None:
        """Create the partitions on the broker (so that nothing copied to them before their
        first process comes is lost), refuse another partition count than the broker's, and
        start taking part in the group."""
        await self._check_count()
        for slot in [*self._slots.values(), self._free]:
            if slot.name != ROUTER:
                await self.backend.create_consumer(slot.spec)
        # The router's consumer exists before any process routes: what is published from now
        # on is kept.
        await self.backend.create_consumer(self._slots[ROUTER].spec)
        await self._activate(self._free)
        # Join now, and take this process's share of what is free: the group works at full
        # strength from the moment the subscription is ready, not a tick later.
        await self._sync()
        await self._sync()
        loop = asyncio.get_running_loop()
        self._driver = loop.create_task(
            self._drive(), name=f"eventwire:{self.spec.name}:partitions"
        )
        self._leaser = loop.create_task(
            self._keep_leases(), name=f"eventwire:{self.spec.name}:ahead-leases"
        )

    async def _check_count(self) -> None:
        prefix = f"{self.spec.name}#p"
        for info in await self.backend.consumers():
            if info.name.startswith(prefix) and not info.name.endswith(f"of{self.count}"):
                other = info.name.rpartition("of")[2]
                raise ValueError(
                    f"{self.spec.name!r} is split into {other} partitions on "
                    f"{self.backend.url.redacted}, not {self.count}: run every process with "
                    f"partitions={other}, or delete the subscription and its backlog with "
                    f"`eventwire subscriptions delete {self.spec.name}` first"
                )

    # -- taking part in the group ---------------------------------------------------------

    async def _drive(self) -> None:
        while not self._closed:
            # Cleared before the look, not after: what the look itself lets go wakes the
            # next one at once, which gives the lease up for the next owner.
            self._wake.clear()
            try:
                await self._sync()
            except Exception:
                logger.warning(
                    "eventwire: looking at the group of %s failed", self.spec.name, exc_info=True
                )
                if time.monotonic() - self._synced_at > LEASE_TTL * 0.8:
                    # Our leases may have run out: others may be taking the slots over.
                    for slot in self._slots.values():
                        if slot.state != _IDLE:
                            await self._deactivate(slot)
            quick = self._awaiting() and time.monotonic() - self._changed_at < _QUICK_FOR
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_QUICK_TICK if quick else TICK):
                    await self._wake.wait()

    def _awaiting(self) -> bool:
        """Whether slots are dealt to this process that another still holds."""
        if self._view is None or not self._fetching:
            return False
        dealt = assign(self._order, self._view.members)
        return any(
            owner == self.process and self._slots[name].state == _IDLE
            for name, owner in dealt.items()
        )

    def _wanted(self) -> set[str]:
        held = {name for name, slot in self._slots.items() if slot.state != _IDLE}
        if self._view is None or not self._fetching:
            return held
        dealt = assign(self._order, self._view.members)
        return held | {name for name, owner in dealt.items() if owner == self.process}

    async def _sync(self) -> None:
        view = await self.backend.sync_group(
            self.spec.name, self.process, self._wanted(), LEASE_TTL
        )
        self._synced_at = time.monotonic()
        if self.process not in view.members:
            view = replace(view, members=tuple(sorted({*view.members, self.process})))
        before, self._view = self._view, view
        first = before is None
        if before is None or view.members != before.members:
            self._changed_at = self._synced_at
        dealt = assign(self._order, view.members)
        ending: list[_Slot] = []
        taking: list[_Slot] = []
        for name, slot in self._slots.items():
            mine = dealt[name] == self.process and self._fetching
            if slot.state != _IDLE and name not in view.held:
                # Lost (this process could not renew in time): another may have it already.
                ending.append(slot)
            elif slot.state == _IDLE and mine and name in view.held:
                taking.append(slot)
            elif slot.state == _ACTIVE and not mine:
                self._start_draining(slot)
            if slot.state == _DRAINING and slot.inflight == 0:
                ending.append(slot)
        # All at once: each waits for the broker (a consumer to open or close, a fetch to
        # end), and one after the other they would hold up the next look, and the leases.
        if ending or taking:
            self._changed_at = self._synced_at
        await _all(
            [self._deactivate(slot) for slot in ending] + [self._activate(slot) for slot in taking]
        )
        if first:
            self._wake.set()  # the leases of this process's share are asked for at once

    async def _activate(self, slot: _Slot) -> None:
        consumer = await self.backend.consumer(slot.spec)
        try:
            await consumer.take_over()
        except BaseException:
            await consumer.close()
            raise
        slot.consumer = consumer
        slot.state = _ACTIVE
        logger.debug("eventwire: %s took %s", self.process, slot.spec.name)
        run = self._route if slot.name == ROUTER else self._pump
        slot.pump = asyncio.get_running_loop().create_task(
            run(slot), name=f"eventwire:{slot.spec.name}:fetch"
        )

    def _start_draining(self, slot: _Slot) -> None:
        """Fetch no more from `slot`; it goes once its handed-over events are finished. Its
        loop ends by itself after the fetch (or the router's copy) in progress: a router
        stopped between copying and acknowledging would have its batch copied twice."""
        slot.state = _DRAINING
        logger.debug("eventwire: %s lets %s go", self.process, slot.spec.name)
        # What it fetched ahead stays queued here, its leases kept, but is handed out no
        # more: it goes back with the consumer's close, in one step with the hand-over (given
        # back one by one as leases ran out, it could come after newer events).

    def _drop_ready(self, slot: _Slot) -> None:
        """Forget what `slot` fetched ahead (its consumer's close gives it back)."""
        if slot.ready:
            kept: deque[tuple[Delivery, float]] = deque()
            for item in self._ready:
                handle: _Handle = item[0].handle
                if handle.slot is not slot:
                    kept.append(item)
                elif handle.event_id is not None and self._ids.get(handle.event_id) is handle:
                    del self._ids[handle.event_id]
            self._ready = kept
            slot.ready = 0

    async def _deactivate(self, slot: _Slot) -> None:
        """Stop consuming `slot`: what was fetched and not handed over goes back with the
        consumer's close (the broker keeps its order), and the lease goes at the next look."""
        logger.debug(
            "eventwire: %s gives %s up (%s, %d in flight)",
            self.process,
            slot.spec.name,
            slot.state,
            slot.inflight,
        )
        slot.state = _IDLE
        pump, slot.pump = slot.pump, None
        if pump is not None and slot.fetching:
            # It waits in a fetch (for up to a second): cut short, what it took meanwhile
            # stays with the consumer, whose close gives it back. The router is never
            # interrupted once it copies: between copying and acknowledging, its batch would
            # be copied twice.
            pump.cancel()
        if pump is not None:
            # What its last fetch brought after draining began stays with the consumer,
            # whose close gives it back.
            done, _ = await asyncio.wait([pump], timeout=2 * TICK + 1.0)
            if not done:
                pump.cancel()
                await asyncio.wait([pump])
        self._drop_ready(slot)
        consumer, slot.consumer = slot.consumer, None
        slot.inflight = 0
        if consumer is not None:
            try:
                await consumer.close()
            except Exception:
                logger.warning("eventwire: closing %s failed", slot.spec.name, exc_info=True)
        self._wake.set()

    async def _keep_leases(self) -> None:
        """Extend the leases of what was fetched ahead and waits here to be handed over
        (the bus keeps the leases of what it took)."""
        every = min(TICK, self.spec.ack_wait / 3)
        while not self._closed:
            await asyncio.sleep(every)
            now = time.monotonic()
            stale: dict[int, tuple[_Slot, list[Delivery]]] = {}
            extended: set[int] = set()
            for delivery, since in self._ready:
                if now - since >= every:
                    handle: _Handle = delivery.handle
                    stale.setdefault(id(handle.slot), (handle.slot, []))[1].append(delivery)
            for slot, deliveries in stale.values():
                if slot.consumer is None:
                    continue
                try:
                    await slot.consumer.extend(
                        [d.handle.inner for d in deliveries if self._current(d.handle)]
                    )
                except Exception:
                    logger.warning("eventwire: extending %s failed", slot.spec.name, exc_info=True)
                    continue
                for delivery in deliveries:
                    delivery.age = 0.0
                    extended.add(id(delivery))
            renewed = time.monotonic()
            self._ready = deque(
                (delivery, renewed if id(delivery) in extended else since)
                for delivery, since in self._ready
            )

    # -- fetching ------------------------------------------------------------------------

    async def _pump(self, slot: _Slot) -> None:
        consumer = slot.consumer
        assert consumer is not None
        backoff = retry_backoff()
        ahead = self._free_ahead if slot is self._free else self._ahead
        while slot.state == _ACTIVE and self._fetching:
            room = ahead - slot.ready
            if room <= 0:
                await asyncio.sleep(0.01)
                continue
            slot.fetching = True
            try:
                deliveries = await consumer.fetch(room, 1.0)
            except Exception:
                logger.warning("eventwire: fetching %s failed", slot.spec.name, exc_info=True)
                await backoff.wait()
                continue
            finally:
                slot.fetching = False
            backoff.reset()
            if deliveries and slot.consumer is consumer:
                # Also after letting go began: queued, withheld and kept leased until the
                # consumer's close gives them back in order.
                copies = self._take_in(slot, deliveries)
                if copies:
                    await consumer.ack(copies)

    def _take_in(self, slot: _Slot, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Queue `deliveries` to be handed over; return those that are second copies of an
        event the slot's consumer holds already (a router that stopped between copying and
        acknowledging copied it again): they are acknowledged, not handled."""
        now = time.monotonic()
        copies: list[Delivery] = []
        for delivery in deliveries:
            route = route_of(delivery.body)
            topic = delivery.topic if route is None else route.topic
            event_id = None if route is None else route.id
            assert slot.consumer is not None
            handle = _Handle(slot, slot.consumer, delivery, event_id)
            if event_id is not None:
                held = self._ids.get(event_id)
                if held is not None and held.consumer is slot.consumer:
                    copies.append(delivery)  # this consumer holds that event already
                    continue
                self._ids[event_id] = handle
            outer = Delivery(topic, delivery.body, delivery.attempt, handle, delivery.age)
            self._ready.append((outer, now))
            slot.ready += 1
        self._arrived.set()
        return copies

    async def _route(self, slot: _Slot) -> None:
        """The router: copy what `G` holds to the partitions, in order, then acknowledge."""
        consumer = slot.consumer
        assert consumer is not None
        backoff = retry_backoff()
        while slot.state == _ACTIVE and self._fetching:
            try:
                slot.fetching = True
                try:
                    deliveries = await consumer.fetch(_ROUTE_BATCH, 1.0)
                finally:
                    slot.fetching = False
                if deliveries:
                    await self._copy(slot, consumer, deliveries)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("eventwire: routing %s failed", self.spec.name, exc_info=True)
                await backoff.wait()
                continue
            backoff.reset()

    async def _copy(self, slot: _Slot, consumer: Consumer, deliveries: list[Delivery]) -> None:
        copies: list[Message] = []
        routed: list[Delivery] = []
        foreign: list[Delivery] = []
        for delivery in deliveries:
            route = route_of(delivery.body)
            if route is None:
                foreign.append(delivery)
                continue
            where = "free" if route.key is None else str(partition_of(route.key, self.count))
            topic = f"{PARTITION_PREFIX}{self._tag}.{where}"
            # Another message id than the original's: a broker that deduplicates by id
            # (NATS) would otherwise drop the copy as the original published again.
            copies.append(Message(f"{route.id}@{where}", topic, route.key, delivery.body))
            routed.append(delivery)
        if copies:
            began = time.monotonic()
            await self.backend.publish(copies)
            published = time.monotonic()
            await consumer.ack(routed)
            logger.debug(
                "eventwire: %s routed %d: copied in %.3fs, acknowledged in %.3fs",
                self.spec.name,
                len(copies),
                published - began,
                time.monotonic() - published,
            )
        if foreign:
            self._take_in(slot, foreign)  # no event ids: never taken for copies

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        self._arrived.clear()  # before looking: what arrives after the look sets it
        out = self._hand_over(limit)
        if out or wait <= 0 or not self._fetching:
            return out
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._arrived.wait()
        return self._hand_over(limit)

    def _hand_over(self, limit: int) -> list[Delivery]:
        """Up to `limit` of what was fetched ahead, oldest first, from slots still held."""
        out: list[Delivery] = []
        withheld: list[tuple[Delivery, float]] = []
        now = time.monotonic()
        while self._ready and len(out) < limit:
            item = self._ready.popleft()
            delivery, since = item
            handle: _Handle = delivery.handle
            if handle.slot.state != _ACTIVE:
                withheld.append(item)  # a slot being let go of
                continue
            handle.slot.ready -= 1
            handle.slot.inflight += 1
            delivery.age += now - since
            out.append(delivery)
        self._ready.extendleft(reversed(withheld))
        return out

    # -- finishing -------------------------------------------------------------------------

    @staticmethod
    def _current(handle: _Handle) -> bool:
        """Whether the consumer that fetched it still consumes its slot here (if not, the
        slot was lost or given up meanwhile: the broker hands the delivery out again)."""
        return handle.slot.consumer is handle.consumer

    def _settle(self, handle: _Handle) -> None:
        slot = handle.slot
        if handle.event_id is not None and self._ids.get(handle.event_id) is handle:
            del self._ids[handle.event_id]
        if not self._current(handle):
            return
        slot.inflight -= 1
        if slot.state == _DRAINING and slot.inflight <= 0:
            self._wake.set()

    def _by_consumer(
        self, deliveries: Sequence[Delivery]
    ) -> dict[int, tuple[Consumer, list[Delivery]]]:
        groups: dict[int, tuple[Consumer, list[Delivery]]] = {}
        for delivery in deliveries:
            handle: _Handle = delivery.handle
            if self._current(handle):
                entry = groups.setdefault(id(handle.consumer), (handle.consumer, []))
                entry[1].append(handle.inner)
        return groups

    async def ack(self, deliveries: Sequence[Delivery], *, handled_ids: Sequence[str] = ()) -> None:
        if handled_ids:
            await self._record_handled(handled_ids)
        for consumer, inner in self._by_consumer(deliveries).values():
            await consumer.ack(inner)
        for delivery in deliveries:
            self._settle(delivery.handle)

    def _ids_by_slot(self, event_ids: Sequence[str]) -> list[tuple[_Slot, list[str]]]:
        """`event_ids` by the slot they came from: a key's ids are kept by its partition."""
        by_slot: dict[int, tuple[_Slot, list[str]]] = {}
        for event_id in event_ids:
            held = self._ids.get(event_id)
            slot = self._free if held is None else held.slot
            by_slot.setdefault(id(slot), (slot, []))[1].append(event_id)
        return list(by_slot.values())

    async def _record_handled(self, event_ids: Sequence[str]) -> None:
        for slot, ids in self._ids_by_slot(event_ids):
            await self.backend.record_handled(slot.spec.name, ids)

    async def handled(self, event_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for slot, ids in self._ids_by_slot(event_ids):
            found |= await self.backend.seen_handled(slot.spec.name, ids)
        return found

    def foreign(self, delivery: Delivery) -> ForeignMessage:
        # Another producer's message has no key: the router hands it over as it came, and
        # the consumer that fetched it knows its headers.
        handle: _Handle = delivery.handle
        return handle.consumer.foreign(handle.inner)

    async def nak(self, delivery: Delivery, delay: float = 0.0) -> None:
        handle: _Handle = delivery.handle
        try:
            if self._current(handle):
                await handle.consumer.nak(handle.inner, delay)
        finally:
            self._settle(handle)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        for consumer, inner in self._by_consumer(deliveries).values():
            await consumer.extend(inner)

    async def restarted(self, delivery: Delivery) -> int:
        handle: _Handle = delivery.handle
        return await handle.consumer.restarted(handle.inner)

    async def stop_fetching(self) -> None:
        # The loops end after their fetch in progress (the router after its batch), which
        # the consumers' own stop_fetching cuts short where the broker has a standing pull.
        self._fetching = False
        self._arrived.set()
        for slot in [*self._slots.values(), self._free]:
            if slot.consumer is not None:
                with contextlib.suppress(Exception):
                    await slot.consumer.stop_fetching()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fetching = False
        for task in (self._driver, self._leaser):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        self._driver = self._leaser = None
        slots = [*self._slots.values(), self._free]
        for slot in slots:
            if slot.pump is not None and slot.name != ROUTER:
                # What a fetch cut short took stays with its consumer, whose close gives it
                # back; the router alone finishes its batch (or it would be copied twice).
                slot.pump.cancel()
            if slot.consumer is not None:
                with contextlib.suppress(Exception):
                    await slot.consumer.stop_fetching()
        await asyncio.gather(*(self._deactivate(slot) for slot in slots))
        with contextlib.suppress(Exception):
            await self.backend.leave_group(self.spec.name, self.process)
