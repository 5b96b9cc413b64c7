"""Durable waits and timers, kept in a backend's run journal (`eventwire.backends.journal`):
what lets a durable run park with nothing held in memory and be resumed by an event or a
clock, in whichever process is running then.

A run that waits records the wait in its own journal (`WaitSpec`), and files it in an index
kept in the journal too, under pseudo-runs whose ids start with ``~``:

- ``~waiting/<subscription>/<pattern>/<digest>``: the waits for events whose payload fields
  have the values the wait matches on (`digest` of those values), one record per wait;
- ``~shapes/<subscription>/<pattern>``: which sets of payload fields waits match on, so an
  arriving event is looked up by each, one read each, never by scanning every wait;
- ``~arrivals/<subscription>/<pattern>/<minute>``: every event that arrived on a waited
  pattern, kept `ARRIVALS_KEPT_MINUTES`: a wait registered after its event came (the approver
  answered before the run parked) still finds it;
- ``~timers/<slot>/<shard>`` and ``~timers``: timers by `SLOT_SECONDS` slot (in
  `TIMER_SHARDS` parts), and the slots in use.

Buckets are small on purpose (a minute of arrivals, a second of timers): a journal may keep a
pseudo-run's key list in one value (NATS), rewritten as keys come and go.

An event is filed (arrival) before the index is read, and a wait is filed before the
arrivals are read: whichever comes second sees the other, so no event slips between them.
A wait is resolved by writing its outcome into the run's journal, first write wins (an event
and a timeout racing: one outcome stands). Whoever wrote it asks for the run to be resumed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from eventwire.backends.journal import Journal
from eventwire.envelope import decode, encode, encode_payload
from eventwire.event import Event

INTERNAL_PREFIX = "~"
"""Journal ids starting with this hold the index of waits and timers, not runs."""

SLOT_SECONDS = 1
"""Timers are filed by slots of this many seconds."""

TIMER_SHARDS = 8
"""Each slot's timers are filed in this many parts."""

ARRIVALS_KEPT_MINUTES = 24 * 60
"""How long (minutes) an event on a waited pattern is kept for waits registered after it
came."""

RESOLVED = "resolved:"
"""Prefix of the record holding a wait's outcome in its run's journal."""

GOT = "got:"
"""Prefix of the records of events a collect has received so far."""

_DIRECTORY = "~timers"
_PRUNE_STEP = 60
_PRUNED = "~pruned"


class WaitSpec(msgspec.Struct, omit_defaults=True):
    """What a run waits for: events on `pattern` whose payload has the `match` values
    (`count` of them), until `deadline` (epoch seconds); events created before `since`
    (epoch nanoseconds, the run's event) do not count. A sleep has no pattern."""

    pattern: str | None = None
    match: dict[str, Any] = {}
    deadline: float | None = None
    since: int = 0
    count: int = 1


class Outcome(msgspec.Struct, omit_defaults=True):
    """How a wait ended: the events that came (as envelopes), and whether time ran out."""

    events: list[msgspec.Raw] = []
    timed_out: bool = False

    def decoded(self) -> list[Event[Any]]:
        return [decode(bytes(raw)) for raw in self.events]


class _Filed(msgspec.Struct):
    """A wait in the index: enough to decide on an arriving event without its run."""

    since: int
    count: int = 1


class WaitTimer(msgspec.Struct, tag="wait"):
    """The deadline of a run's wait (or the end of its sleep)."""

    due: float
    subscription: str
    run: str
    wait: str

    @property
    def entry(self) -> str:
        return f"wait\n{self.run}\n{self.wait}"


class EventTimer(msgspec.Struct, tag="event"):
    """An event published when due (`EventBus.schedule`)."""

    due: float
    envelope: msgspec.Raw
    id: str

    @property
    def entry(self) -> str:
        return f"event\n{self.id}"


class ExpiryTimer(msgspec.Struct, tag="expiry"):
    """The end of the time a finished stream's chunks are kept (`eventwire.streams`)."""

    due: float
    stream: str
    chunks: int

    @property
    def entry(self) -> str:
        return f"expiry\n{self.stream}"


Timer = WaitTimer | EventTimer | ExpiryTimer

_outcome_decoder = msgspec.json.Decoder(Outcome)
_spec_decoder = msgspec.json.Decoder(WaitSpec)
_filed_decoder = msgspec.json.Decoder(_Filed)
_timer_decoder = msgspec.json.Decoder(Timer)


def decode_outcome(data: bytes) -> Outcome:
    return _outcome_decoder.decode(data)


def decode_spec(data: bytes) -> WaitSpec:
    return _spec_decoder.decode(data)


def json_form(value: Any) -> Any:
    """`value` as the JSON values an envelope would carry (models become dicts)."""
    return msgspec.json.decode(encode_payload(value))


def _field(payload: Any, path: str) -> tuple[bool, Any]:
    """The value at a dotted `path` of a JSON-form payload, and whether it is there."""
    value = payload
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _digest(fields: Iterable[str], values: Iterable[Any]) -> str:
    canonical = msgspec.json.encode([list(fields), list(values)], order="sorted")
    return hashlib.sha256(canonical).hexdigest()[:32]


def matches(match: Mapping[str, Any], event: Event[Any]) -> bool:
    """Whether `event`'s payload has every value of `match` (JSON forms compared)."""
    payload = json_form(event.payload)
    for path, wanted in match.items():
        present, value = _field(payload, path)
        if not present or value != wanted:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Resumption:
    """A run whose wait an arrival or a timer resolved: resume it (`subscription`'s run)."""

    subscription: str
    run: str


class Waits:
    """The index of waits and timers in one journal (one per bus)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        # Timer slots known to hold timers (a cache of the ``~timers`` directory).
        self._slots: set[int] = set()
        self._slots_read_at = float("-inf")
        # Waited (subscription, pattern) -> the oldest minute of arrivals not dropped yet.
        self._pruned: dict[tuple[str, str], int | None] = {}

    # -- waits ---------------------------------------------------------------------------

    async def register(
        self, subscription: str, run: str, wait: str, spec: WaitSpec
    ) -> Outcome | None:
        """File a wait of `run` (already recorded in its journal): its index entry, its
        timer, and the events that came for it before it was filed. Its outcome if it is
        resolved already, else None (the run parks)."""
        journal = self.journal
        now = time.time()
        if spec.deadline is not None and spec.deadline <= now:
            outcome, _ = await self.time_out(run, wait)
            return outcome
        if spec.pattern is not None:
            fields = sorted(spec.match)
            digest = _digest(fields, (spec.match[field] for field in fields))
            await journal.write(_shapes(subscription, spec.pattern), _shape_key(fields), b"1")
            bucket = _waiting(subscription, spec.pattern, digest)
            filed = msgspec.json.encode(_Filed(spec.since, spec.count))
            await journal.write(bucket, _entry(run, wait), filed)
            early = await self._arrived_before(subscription, spec)
            if early:
                collected, _ = await self._collected(run, wait, spec.count, early)
                if collected is not None:
                    await journal.forget(bucket, [_entry(run, wait)])
                    return collected
        if spec.deadline is not None:
            await self.add_timer(WaitTimer(spec.deadline, subscription, run, wait))
        return None

    async def _arrived_before(self, subscription: str, spec: WaitSpec) -> list[Event[Any]]:
        """Events filed on the wait's pattern, since its run began, that it matches."""
        assert spec.pattern is not None
        now = _minute(time.time())
        first = max(spec.since // 60_000_000_000, now - ARRIVALS_KEPT_MINUTES)
        found = []
        for minute in range(first, now + 1):
            bucket = _arrivals(subscription, spec.pattern, minute)
            for data in (await self.journal.read(bucket)).values():
                event = decode(data)
                if event.created_ns >= spec.since and matches(spec.match, event):
                    found.append(event)
        found.sort(key=lambda event: (event.created_ns, event.id))
        return found

    async def arrived(
        self,
        subscription: str,
        pattern: str,
        event: Event[Any],
        resume: Callable[[list[Resumption]], Awaitable[None]],
    ) -> None:
        """An event came on a waited `pattern`: file it, resolve the waits it matches, and
        `resume` the runs it resolved, before their index entries go: a process that dies
        in between leaves the entries, and the event, delivered again, resumes them."""
        journal = self.journal
        envelope = encode(event, max_bytes=None)
        minute = _minute(event.created_ns / 1e9)
        await journal.write(_arrivals(subscription, pattern, minute), event.id, envelope)
        payload = json_form(event.payload)
        for shape in await journal.read(_shapes(subscription, pattern)):
            fields = msgspec.json.decode(shape)
            values = []
            for field in fields:
                present, value = _field(payload, field)
                if not present:
                    break
                values.append(value)
            else:
                bucket = _waiting(subscription, pattern, _digest(fields, values))
                done = []
                resumed = []
                for entry, data in (await journal.read(bucket)).items():
                    filed = _filed_decoder.decode(data)
                    if event.created_ns < filed.since:
                        continue
                    run, wait = _parse_entry(entry)
                    outcome, won = await self._collected(run, wait, filed.count, [event])
                    if outcome is None:
                        continue  # a collect that wants more
                    done.append(entry)
                    # This event's outcome stands (written now, or before this process
                    # died): whoever delivers it asks for the resume.
                    if won or any(e.id == event.id for e in outcome.decoded()):
                        resumed.append(Resumption(subscription, run))
                await resume(resumed)
                await journal.forget(bucket, done)

    async def _collected(
        self, run: str, wait: str, count: int, events: list[Event[Any]]
    ) -> tuple[Outcome | None, bool]:
        """Add `events` to what `wait` has received: its outcome once it has `count` (None
        before), and whether this call resolved it."""
        if count == 1:
            return await self.settle(run, wait, _encoded_outcome(events[:1]))
        for event in events:
            await self.journal.write(run, f"{GOT}{wait}/{event.id}", encode(event, max_bytes=None))
        got = await self.received(run, wait)
        if len(got) < count:
            return None, False
        return await self.settle(run, wait, _encoded_outcome(got[:count]))

    async def received(self, run: str, wait: str) -> list[Event[Any]]:
        """The events a collect of `run` has received so far, oldest first."""
        prefix = f"{GOT}{wait}/"
        records = await self.journal.read(run)
        got = [decode(data) for key, data in records.items() if key.startswith(prefix)]
        got.sort(key=lambda event: (event.created_ns, event.id))
        return got

    async def settle(self, run: str, wait: str, outcome: bytes) -> tuple[Outcome, bool]:
        """Resolve `wait` of `run` with `outcome` unless it is resolved (first write wins):
        the outcome that stands, and whether it is this one."""
        stood = await self.journal.write(run, RESOLVED + wait, outcome)
        return decode_outcome(stood), stood == outcome

    async def time_out(self, run: str, wait: str) -> tuple[Outcome, bool]:
        """`wait`'s deadline passed: resolve it as timed out (a collect with what it has
        received): the outcome that stands, and whether this call resolved it."""
        got = await self.received(run, wait)
        outcome = msgspec.json.encode(
            Outcome([msgspec.Raw(encode(e, max_bytes=None)) for e in got], timed_out=True)
        )
        return await self.settle(run, wait, outcome)

    def keep_arrivals(self, subscription: str, pattern: str) -> None:
        """`subscription` waits on `pattern` in this process: `prune` its old arrivals."""
        self._pruned.setdefault((subscription, pattern), None)

    async def prune(self, now: float) -> None:
        """Drop the minutes of arrivals that fell out of `ARRIVALS_KEPT_MINUTES` since the
        last look (the bus's timer task does, in the background): a process's first look
        goes a day back, for minutes left while no process ran."""
        kept_from = _minute(now) - ARRIVALS_KEPT_MINUTES
        for (subscription, pattern), first in list(self._pruned.items()):
            # `first`: the oldest minute not dropped yet, as the journal remembers it across
            # processes (a day back the first time ever). An hour at a time, so that a sweep
            # after a long pause does not hold up the timers.
            key = f"{subscription}\n{pattern}"
            if first is None:
                remembered = (await self.journal.read(_PRUNED)).get(key)
                first = int(remembered) if remembered else kept_from - ARRIVALS_KEPT_MINUTES
            if first >= kept_from:
                self._pruned[(subscription, pattern)] = first
                continue
            end = min(first + _PRUNE_STEP, kept_from)
            await self.journal.delete(
                [_arrivals(subscription, pattern, minute) for minute in range(first, end)]
            )
            await self.journal.write(_PRUNED, key, str(end).encode(), replace=True)
            self._pruned[(subscription, pattern)] = end

    # -- timers --------------------------------------------------------------------------

    async def add_timer(self, timer: Timer) -> None:
        slot = int(timer.due // SLOT_SECONDS)
        entry = timer.entry
        await self.journal.write(_slot(slot, entry), entry, msgspec.json.encode(timer))
        if slot not in self._slots:
            await self.journal.write(_DIRECTORY, str(slot), b"1")
            self._slots.add(slot)

    async def due_timers(self, now: float, *, refresh: float = 5.0) -> list[tuple[int, str, Timer]]:
        """Timers due by `now`: (slot, entry, timer). Other processes' slots are learnt
        every `refresh` seconds; the current and previous slot are always read."""
        journal = self.journal
        if now - self._slots_read_at >= refresh:
            self._slots |= {int(slot) for slot in await journal.read(_DIRECTORY)}
            self._slots_read_at = now
        current = int(now // SLOT_SECONDS)
        due = []
        for slot in sorted({*self._slots, current - 1, current}):
            if slot > current:
                break
            shards = await asyncio.gather(
                *(journal.read(f"~timers/{slot}/{shard}") for shard in range(TIMER_SHARDS))
            )
            records = {entry: data for shard in shards for entry, data in shard.items()}
            for entry, data in records.items():
                timer = _timer_decoder.decode(data)
                if timer.due <= now:
                    due.append((slot, entry, timer))
            if not records and slot < current - 1 and slot in self._slots:
                # Empty and past: no timer is filed into a slot this old any more.
                await journal.forget(_DIRECTORY, [str(slot)])
                self._slots.discard(slot)
        return due

    async def fired(self, slot: int, entries: list[str]) -> None:
        """These timers did what they were for: remove them."""
        for entry in entries:
            await self.journal.forget(_slot(slot, entry), [entry])


def _encoded_outcome(events: list[Event[Any]]) -> bytes:
    return msgspec.json.encode(Outcome([msgspec.Raw(encode(e, max_bytes=None)) for e in events]))


def _minute(seconds: float) -> int:
    return int(seconds // 60)


def _shapes(subscription: str, pattern: str) -> str:
    return f"~shapes/{subscription}/{pattern}"


def _shape_key(fields: list[str]) -> str:
    return msgspec.json.encode(fields).decode()


def _waiting(subscription: str, pattern: str, digest: str) -> str:
    return f"~waiting/{subscription}/{pattern}/{digest}"


def _arrivals(subscription: str, pattern: str, minute: int) -> str:
    return f"~arrivals/{subscription}/{pattern}/{minute}"


def _slot(slot: int, entry: str) -> str:
    """Where a timer is filed: its slot, and a shard of it (timers due in the same second
    are filed apart, so that writers do not all update one record list)."""
    return f"~timers/{slot}/{zlib.crc32(entry.encode()) % TIMER_SHARDS}"


def _entry(run: str, wait: str) -> str:
    return f"{run}\n{wait}"


def _parse_entry(entry: str) -> tuple[str, str]:
    run, _, wait = entry.rpartition("\n")
    return run, wait
