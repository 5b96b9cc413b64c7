"""Dead letters kept on a broker: list them, look at one, send them back, or throw them away.

On a broker backend every dead letter stays in the namespace's dead-letter consumer
(``eventwire.bus.DLQ_CONSUMER``, pattern ``_dlq.>``), which no subscription reads: it is
acknowledged only here. A dead letter is an event on ``_dlq.<original topic>`` whose payload is
the original event and whose metadata says which subscription gave up on it, why, and after
how many attempts; a message that was not an eventwire envelope at all is kept as a dict with
its raw body instead.

Reading the queue leases its letters through that consumer (keeping the leases alive while it
works) and hands back whatever it did not finish when it is done, so reading changes nothing.
A retry stores the original event on its original topic, marked for the one subscription (or
group) that gave up on it, and acknowledges the letter only once the broker has stored the
event: a crash in between leaves the letter in place (a second retry may then deliver the
event twice, never zero times).

The retried event keeps its id, so handlers and lineage see the very event that failed. The
broker-level message id of the republish is the letter's id plus ``.retry``, not the event id:
SQLite stores an id once for ever and NATS JetStream drops a repeated ``Nats-Msg-Id`` within
its duplicate window (two minutes), so republishing under the event's own id would be silently
discarded there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from eventwire.backends.base import ConsumerSpec, Delivery, Message
from eventwire.backends.broker import BrokerBackend
from eventwire.backends.session import ConsumerSession
from eventwire.bus import DLQ_CONSUMER, DLQ_PATTERN
from eventwire.envelope import EnvelopeError, decode, encode
from eventwire.errors import BusNotRunningError, EventwireError, PublishTimeoutError
from eventwire.event import Event
from eventwire.topics import is_topic, pattern_matches, validate_pattern

if TYPE_CHECKING:
    from eventwire.bus import EventBus

__all__ = [
    "DeadLetter",
    "DeadLetterError",
    "DeadLetterNotFoundError",
    "DeadLetterQueue",
    "RetryResult",
]

DLQ_PREFIX = "_dlq."
# Shortest tail of a letter id accepted as a reference to it (the table shows 12 characters).
MIN_REFERENCE = 6
SHORT_ID = 12
# Letters leased per fetch.
PAGE_SIZE = 256
# How long a fetch waits for deliveries still on their way before the queue counts as read to
# its end: while fewer letters were read than the broker counted at the start, and always on
# a broker whose counts miss what is in transit (amqp://, which pushes deliveries and
# requeues returned ones asynchronously).
_SETTLE_WAIT = 0.5
# Suffix of the broker message id of a retry (see the module docstring).
RETRY_SUFFIX = ".retry"
# Longest a count of the letters asks the broker again while it gives only an upper bound.
COUNT_PATIENCE = 30.0

MEMORY_EXPLANATION = (
    "the in-process bus (memory://) keeps no dead letters outside the process: they are "
    "events on '_dlq.<topic>' inside it. Subscribe a handler to '_dlq.>' (or use the bus's "
    "recorder) to see them, or give --url / EVENTWIRE_URL of a broker (sqlite, redis, nats, "
    "amqp) whose dead letters to manage"
)

# (delivery, its letter) pairs; named here because DeadLetterQueue.list shadows `list`.
_Leased = list[tuple[Delivery, "DeadLetter"]]

Progress = Callable[[int, int, int], None]
"""Called as work goes on with (letters read, letters in the queue when it began, letters
retried or purged so far)."""


class DeadLetterError(EventwireError, ValueError):
    """The dead-letter queue cannot do what was asked (no broker, nothing selected, a letter
    that cannot be retried); the message says why and what to do instead."""


class DeadLetterNotFoundError(EventwireError, LookupError):
    """No dead letter (or more than one) answers to a given id."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter: the event a subscription gave up on, and why.

    `id` is the letter's own id (unique per dead-lettering: the same event dead-lettered by
    two subscriptions makes two letters); `short_id` is its last 12 characters, which every
    `DeadLetterQueue` method accepts too, as it accepts the original event's id when only one
    letter holds that event. `event` is None for a message that was not an eventwire envelope;
    its raw content is then in `body` (text) or `body_base64`.
    """

    id: str
    topic: str
    event: Event[Any] | None
    subscription: str | None
    group: str | None
    error: str
    error_type: str
    attempts: int
    dead_lettered_at: datetime
    body: str | None = None
    body_base64: str | None = None
    headers: Mapping[str, str] | None = None
    """A foreign message's headers (a Redis entry's other fields), as text."""

    @property
    def short_id(self) -> str:
        """The end of `id`: enough to tell letters apart in a table."""
        return self.id[-SHORT_ID:]

    @property
    def event_id(self) -> str | None:
        """The original event's id (None for a message that was not an envelope)."""
        return None if self.event is None else self.event.id

    @property
    def target(self) -> str | None:
        """Where a retry goes: the group of the subscription that gave up, else its name."""
        return self.group or self.subscription

    @property
    def retryable(self) -> bool:
        """Whether `DeadLetterQueue.retry` can send it back: an eventwire event whose
        subscription is known (a malformed message would only fail again)."""
        return self.event is not None and self.target is not None

    def matches(self, reference: str) -> bool:
        """Whether `reference` names this letter: its id, its tail (6 characters or more),
        or the original event's id."""
        return (
            reference == self.id
            or reference == self.event_id
            or (len(reference) >= MIN_REFERENCE and self.id.endswith(reference))
        )

    def to_dict(self, *, event: bool = True) -> dict[str, Any]:
        """JSON-ready fields; the original event (or raw body) too unless ``event=False``."""
        data: dict[str, Any] = {
            "id": self.id,
            "event_id": self.event_id,
            "topic": self.topic,
            "subscription": self.subscription,
            "group": self.group,
            "error": self.error,
            "error_type": self.error_type,
            "attempts": self.attempts,
            "dead_lettered_at": _iso(self.dead_lettered_at),
            "retryable": self.retryable,
        }
        if event:
            data["event"] = None if self.event is None else _event_dict(self.event)
            if self.event is None:
                data["body"] = self.body
                data["body_base64"] = self.body_base64
                if self.headers:
                    data["headers"] = dict(self.headers)
        return data


@dataclass(frozen=True, slots=True)
class RetryResult:
    """What `DeadLetterQueue.retry` did: how many letters it sent back, and those it left in
    the queue (letter id -> reason)."""

    retried: int
    skipped: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Selection:
    """Which letters an operation is about: given references, or those matching filters."""

    references: tuple[str, ...] = ()
    subscription: str | None = None
    topic: str | None = None
    error_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def filtered(self) -> bool:
        return any(
            value is not None
            for value in (self.subscription, self.topic, self.error_type, self.since, self.until)
        )

    def admits(self, letter: DeadLetter) -> bool:
        if self.subscription is not None and self.subscription not in (
            letter.subscription,
            letter.group,
        ):
            return False
        if self.topic is not None and not (
            is_topic(letter.topic) and pattern_matches(self.topic, letter.topic)
        ):
            return False
        if self.error_type is not None and self.error_type.lower() != letter.error_type.lower():
            return False
        if self.since is not None and letter.dead_lettered_at < self.since:
            return False
        return self.until is None or letter.dead_lettered_at <= self.until


def _selection(
    ids: Iterable[str],
    subscription: str | None,
    topic: str | None,
    error_type: str | None,
    since: datetime | None,
    until: datetime | None,
) -> _Selection:
    if isinstance(ids, str):
        raise TypeError(f"ids must be a list of letter ids, not the str {ids!r}")
    if topic is not None:
        validate_pattern(topic)
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and (moment.tzinfo is None or moment.utcoffset() is None):
            raise ValueError(f"{name}= must be a timezone-aware datetime, got {moment!r}")
    return _Selection(tuple(ids), subscription, topic, error_type, since, until)


async def count_dead_letters(
    backend: BrokerBackend, *, patience: float = COUNT_PATIENCE
) -> int | None:
    """How many dead letters `backend` keeps, leased ones included; None if it has no
    dead-letter consumer yet. While the broker's count is only an upper bound (Redis counts
    a long backlog a chunk per call), asks again, for up to `patience` seconds."""
    counted = await dead_letter_count(backend, patience=patience)
    return None if counted is None else counted[0]


async def dead_letter_count(
    backend: BrokerBackend, *, patience: float = COUNT_PATIENCE
) -> tuple[int, bool] | None:
    """`count_dead_letters`, and whether the count is exact (False: an upper bound, the
    broker had not counted everything within `patience` seconds)."""
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        info = next((i for i in await backend.consumers() if i.name == DLQ_CONSUMER), None)
        if info is None:
            return None
        if info.exact or asyncio.get_running_loop().time() >= deadline:
            return info.outstanding, info.exact


class DeadLetterQueue:
    """The dead letters of a running bus on a broker backend (sqlite, redis, nats, amqp).

    ``DeadLetterQueue(bus)`` needs a started bus (``async with EventBus(url) as bus:``). Every
    method reads the queue from the broker, so it sees letters from every process of the
    namespace. Filters (keyword arguments) combine: `subscription` (a subscription's name or
    group), `topic` (a pattern on the original topic, e.g. ``orders.>``), `error_type` (the
    exception class name, any case), `since` / `until` (timezone-aware datetimes of when the
    letter was written).
    """

    def __init__(self, bus: EventBus, *, page_size: int = PAGE_SIZE) -> None:
        if not isinstance(bus.backend, BrokerBackend):
            raise DeadLetterError(MEMORY_EXPLANATION)
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size!r}")
        self.bus = bus
        self.page_size = page_size

    def _backend(self) -> BrokerBackend:
        backend = self.bus.backend
        assert isinstance(backend, BrokerBackend)
        if not self.bus.running:
            raise BusNotRunningError(
                "DeadLetterQueue needs a running bus: use it inside `async with bus:`"
            )
        return backend

    async def size(self) -> int:
        """How many letters the queue holds (leased ones included), as the broker counts.
        On amqp:// letters leased by another process are not counted."""
        return await count_dead_letters(self._backend()) or 0

    async def list(
        self,
        ids: Iterable[str] = (),
        *,
        subscription: str | None = None,
        topic: str | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        on_progress: Progress | None = None,
    ) -> list[DeadLetter]:
        """The letters matching the filters (or named by `ids`), oldest first; at most
        `limit` of them. Raises `DeadLetterNotFoundError` if one of `ids` names no letter or
        several."""
        selection = _selection(ids, subscription, topic, error_type, since, until)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit!r}")
        if selection.references:
            async with self._named(selection, on_progress) as (_, found):
                return [letter for _, letter in found][:limit]
        letters: list[DeadLetter] = []
        if limit == 0:
            return letters
        async with self._reading(on_progress) as reader:
            while page := await reader.next_page():
                for _, letter in page:
                    if selection.admits(letter):
                        letters.append(letter)
                        if limit is not None and len(letters) >= limit:
                            return letters
        return letters

    async def show(self, id: str) -> DeadLetter:
        """The letter named by `id` (its id, short id, or original event id). Raises
        `DeadLetterNotFoundError` if there is none, or several."""
        [letter] = await self.list([id])
        return letter

    async def retry(
        self,
        ids: Iterable[str] = (),
        *,
        all: bool = False,
        subscription: str | None = None,
        topic: str | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        missing_ok: bool = False,
        on_progress: Progress | None = None,
    ) -> RetryResult:
        """Send letters back to the subscription that gave up on them: the ones named by
        `ids`, those matching the filters, or ``all=True``. Each original event is stored on
        its original topic for that subscription (or group) only, other subscriptions of the
        topic ignore it, then its letter is removed.

        Named letters are all checked first: an unknown id raises `DeadLetterNotFoundError`
        (unless `missing_ok`: letters removed meanwhile are then left out) and one that
        cannot be retried (a malformed message, or its subscription no longer exists on the
        broker) raises `DeadLetterError`, with nothing retried. Selected by filters, such
        letters stay in the queue and are listed in `RetryResult.skipped`. Letters written
        while the retry runs (its own events failing again) are left for the next one.
        """
        selection = self._check_operation(
            "retry", ids, all, subscription, topic, error_type, since, until
        )
        backend = self._backend()
        subscriptions = {info.name: info.pattern for info in await backend.consumers()}

        def refusal(letter: DeadLetter) -> str | None:
            if letter.event is None:
                return "not an eventwire event (a malformed message would fail again); purge it"
            target = letter.target
            if target is None:
                return "it does not say which subscription gave up on it; purge it"
            pattern = subscriptions.get(target)
            if pattern is None or not pattern_matches(pattern, letter.event.topic):
                return (
                    f"subscription {target!r} no longer exists on {backend.url.redacted} "
                    f"(or no longer matches {letter.event.topic!r}), so nobody would handle it"
                )
            return None

        retried = 0
        skipped: dict[str, str] = {}
        # (event id, subscription) sent back by this call: if one fails again at once, its new
        # letter is left for the next retry rather than retried again by this same call.
        sent: set[tuple[str | None, str | None]] = set()

        async def send(reader: _Reader, chosen: _Leased) -> None:
            nonlocal retried
            todo = []
            for delivery, letter in chosen:
                reason = refusal(letter)
                if reason is not None:
                    skipped[letter.id] = reason
                elif (letter.event_id, letter.target) not in sent:
                    todo.append((delivery, letter))
            if todo:
                await self._republish([letter for _, letter in todo])
                sent.update((letter.event_id, letter.target) for _, letter in todo)
                await reader.ack([delivery for delivery, _ in todo])
                retried += len(todo)

        def check(found: _Leased) -> None:
            problems = [f"{letter.id}: {why}" for _, letter in found if (why := refusal(letter))]
            if problems:
                raise DeadLetterError("cannot retry " + "; ".join(problems))

        await self._each(selection, send, check, missing_ok, on_progress)
        return RetryResult(retried, skipped)

    async def purge(
        self,
        ids: Iterable[str] = (),
        *,
        all: bool = False,
        subscription: str | None = None,
        topic: str | None = None,
        error_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        missing_ok: bool = False,
        on_progress: Progress | None = None,
    ) -> int:
        """Remove letters for good without retrying them: the ones named by `ids`, those
        matching the filters, or ``all=True``. Returns how many were removed. An unknown id
        raises `DeadLetterNotFoundError` before anything is removed (unless `missing_ok`)."""
        selection = self._check_operation(
            "purge", ids, all, subscription, topic, error_type, since, until
        )
        purged = 0

        async def remove(reader: _Reader, chosen: _Leased) -> None:
            nonlocal purged
            await reader.ack([delivery for delivery, _ in chosen])
            purged += len(chosen)

        await self._each(selection, remove, None, missing_ok, on_progress)
        return purged

    # -- internals ------------------------------------------------------------------------

    async def _each(
        self,
        selection: _Selection,
        act: Callable[[_Reader, _Leased], Awaitable[None]],
        check: Callable[[_Leased], None] | None,
        missing_ok: bool,
        on_progress: Progress | None,
    ) -> None:
        """Call `act` on the selected letters, a page at a time, while they are leased. Named
        letters are all found (and passed to `check`) before `act` sees any."""
        if selection.references:
            async with self._named(selection, on_progress, missing_ok=missing_ok) as named:
                reader, found = named
                if check is not None:
                    check(found)
                for start in range(0, len(found), self.page_size):
                    await act(reader, found[start : start + self.page_size])
            return
        async with self._reading(on_progress) as reader:
            while page := await reader.next_page():
                chosen = [(d, letter) for d, letter in page if selection.admits(letter)]
                if chosen:
                    await act(reader, chosen)

    def _check_operation(
        self,
        operation: str,
        ids: Iterable[str],
        everything: bool,
        subscription: str | None,
        topic: str | None,
        error_type: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> _Selection:
        selection = _selection(ids, subscription, topic, error_type, since, until)
        if selection.references and (everything or selection.filtered):
            raise DeadLetterError(f"{operation}: give letter ids, or filters / all=True, not both")
        if not selection.references and not everything and not selection.filtered:
            raise DeadLetterError(
                f"{operation}: say which letters: ids, filters (subscription=, topic=, "
                "error_type=, since=, until=) or all=True"
            )
        return selection

    async def _republish(self, letters: Sequence[DeadLetter]) -> None:
        """Store each letter's event on its topic, for its subscription only; return once the
        broker has stored them all (bounded by the bus's `publish_timeout`)."""
        messages = []
        for letter in letters:
            event = letter.event
            assert event is not None
            meant: Event[Any] = msgspec.structs.replace(
                event, target=letter.target, drain_epoch=None
            )
            # No size limit: the event was stored at this size before.
            body = encode(meant, max_bytes=None)
            messages.append(Message(letter.id + RETRY_SUFFIX, event.topic, event.key, body))
        try:
            async with asyncio.timeout(self.bus.publish_timeout):
                await self._backend().publish(messages)
        except TimeoutError:
            raise PublishTimeoutError(
                f"retrying {len(messages)} dead letter(s): {self.bus.safe_url} did not confirm "
                f"them stored within {self.bus.publish_timeout}s; their letters stay in the "
                "queue (retry again: at worst an event is delivered twice)"
            ) from None

    def _spec(self) -> ConsumerSpec:
        # The same consumer the bus creates at start (see EventBus._keep_dead_letters).
        backend = self._backend()
        return ConsumerSpec(
            name=DLQ_CONSUMER,
            pattern=DLQ_PATTERN,
            start="earliest" if backend.capabilities.replay else "latest",
            ack_wait=self.bus.redeliver_after,
        )

    @contextlib.asynccontextmanager
    async def _reading(self, on_progress: Progress | None) -> AsyncIterator[_Reader]:
        """Lease the queue's letters page by page; whatever is still held at the end goes
        back to the broker at once."""
        backend = self._backend()
        expected = await self.size()
        spec = self._spec()
        # No retries: a failing broker is reported to whoever reads the queue.
        # What a read held goes back with the consumer's close, in the queue's order: a
        # listing always shows the letters oldest first.
        session = ConsumerSession(
            await backend.consumer(spec), spec, retry=False, give_back_on_close=False
        )
        reader = _Reader(session, self.page_size, expected, on_progress)
        # Counts that are exact across processes (what drain() relies on) are exact enough to
        # stop reading without waiting once they are reached.
        reader.exact = backend.capabilities.cross_process_drain
        try:
            yield reader
        finally:
            await session.close()

    @contextlib.asynccontextmanager
    async def _named(
        self, selection: _Selection, on_progress: Progress | None, *, missing_ok: bool = False
    ) -> AsyncIterator[tuple[_Reader, _Leased]]:
        """The letters the references name, oldest first, leased until the block ends.
        Raises `DeadLetterNotFoundError` if a reference names none (unless `missing_ok`) or
        several."""
        references = selection.references
        found: dict[str, list[tuple[Delivery, DeadLetter]]] = {ref: [] for ref in references}
        # Only exact letter ids let reading stop early: anything else may name several.
        exact = set(references)
        async with self._reading(on_progress) as reader:
            while page := await reader.next_page():
                for delivery, letter in page:
                    for ref in references:
                        if letter.matches(ref):
                            found[ref].append((delivery, letter))
                            exact.discard(letter.id)
                if not exact and all(found.values()):
                    break
            problems = []
            for ref, letters in found.items():
                if len(letters) > 1:
                    ids = ", ".join(letter.id for _, letter in letters)
                    problems.append(
                        f"{ref!r} names {len(letters)} dead letters ({ids}); give a full letter id"
                    )
                elif not letters and not missing_ok:
                    problems.append(f"no dead letter has id {ref!r}")
            if problems:
                raise DeadLetterNotFoundError(
                    "; ".join(problems) + f" on {self.bus.safe_url} (see `eventwire dlq list`; "
                    "letters that another dlq command is working on are hidden meanwhile)"
                )
            unique = {letter.id: (d, letter) for items in found.values() for d, letter in items}
            yield reader, sorted(unique.values(), key=lambda item: _age_order(item[1]))


class _Reader:
    """Reads the dead-letter consumer to its end, one page of leased letters at a time; its
    session keeps the leases of everything not finished with."""

    def __init__(
        self,
        session: ConsumerSession,
        page_size: int,
        expected: int,
        on_progress: Progress | None,
    ) -> None:
        self.session = session
        self.page_size = page_size
        self.expected = expected
        self.on_progress = on_progress
        self.exact = True
        self.read = 0
        self.acted = 0
        self._seen: set[str] = set()

    async def next_page(self) -> list[tuple[Delivery, DeadLetter]]:
        """The next letters not read before; ``[]`` once the queue is read to its end."""
        while True:
            # Past the count taken at the start, only what is there right now; before it,
            # wait a little for deliveries still on their way.
            wait = 0.0 if self.exact and self.read >= self.expected else _SETTLE_WAIT
            deliveries = await self.session.fetch(self.page_size, wait)
            if not deliveries:
                return []
            page = []
            elsewhere = []
            for delivery in deliveries:
                self.session.hold(delivery, delivery)
                if not delivery.topic.startswith(DLQ_PREFIX):
                    # Not a letter: a Redis entry without a topic reaches every consumer of
                    # the stream, this one too (the subscriptions dead-letter it).
                    elsewhere.append(delivery)
                    continue
                letter = parse(delivery)
                if letter.id in self._seen:
                    continue  # delivered to us again (a lease lapsed): already read
                self._seen.add(letter.id)
                page.append((delivery, letter))
            if elsewhere:
                await self.session.ack(elsewhere)
            if page:
                self.read += len(page)
                self._report()
                return page

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove these letters from the queue for good."""
        await self.session.ack(deliveries)
        self.acted += len(deliveries)
        self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.read, max(self.expected, self.read), self.acted)


def parse(delivery: Delivery) -> DeadLetter:
    """The dead letter a delivery of the dead-letter consumer holds."""
    try:
        letter = decode(delivery.body)
    except EnvelopeError as error:
        # Not even the letter is an envelope: something else wrote on a `_dlq.` topic.
        digest = hashlib.sha256(delivery.topic.encode() + b"\0" + delivery.body).hexdigest()
        text, raw = _raw(delivery.body)
        return DeadLetter(
            id=f"raw-{digest[:32]}",
            topic=delivery.topic.removeprefix(DLQ_PREFIX),
            event=None,
            subscription=None,
            group=None,
            error=f"EnvelopeError: {error}",
            error_type="EnvelopeError",
            attempts=0,
            dead_lettered_at=datetime.now(UTC),
            body=text,
            body_base64=raw,
        )
    metadata = letter.metadata
    payload = letter.payload
    event = payload if isinstance(payload, Event) else None
    body = body_base64 = None
    headers: dict[str, str] | None = None
    topic = letter.topic.removeprefix(DLQ_PREFIX)
    if event is not None:
        topic = event.topic
    elif isinstance(payload, dict):
        # A message that was not an envelope (see eventwire.deadletter.foreign_letter).
        topic = str(payload.get("topic") or topic)
        body, body_base64 = (
            _text_or_none(payload.get("body")),
            _text_or_none(payload.get("body_base64")),
        )
        kept = payload.get("headers")
        if isinstance(kept, dict):
            headers = {str(name): str(value) for name, value in kept.items()}
    return DeadLetter(
        id=letter.id,
        topic=topic,
        event=event,
        subscription=_text_or_none(metadata.get("subscription")),
        group=_text_or_none(metadata.get("group")),
        error=str(metadata.get("error", "")),
        error_type=str(metadata.get("error_type", "")),
        attempts=_int(metadata.get("attempts")),
        dead_lettered_at=letter.timestamp,
        body=body,
        body_base64=body_base64,
        headers=headers,
    )


def _raw(body: bytes) -> tuple[str | None, str | None]:
    try:
        return body.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, base64.b64encode(body).decode()


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _age_order(letter: DeadLetter) -> tuple[datetime, str]:
    return (letter.dead_lettered_at, letter.id)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _event_dict(event: Event[Any]) -> dict[str, Any]:
    data = event.to_dict()
    data["timestamp"] = _iso(event.timestamp)
    if event.target is not None:
        data["target"] = event.target
    if event.trace_context:
        data["trace"] = dict(event.trace_context)
    return data
