"""Reading what a broker holds: past events (`read_history`, `HistoryReader`) and events as
they pass (`follow`), through the backend interface, without touching the app's consumers.

Each read opens its own ephemeral consumers, named ``_eventwire.<purpose>.<hex>``: `drain()`
and `request()` in the app's processes pay no attention to consumers named ``_eventwire.``,
and the broker removes them when the read ends. A history read takes and acknowledges what
they hold until the broker reports nothing outstanding for them (an exact end, not a quiet
moment), so it returns every event from `since` on that was stored before it finished.

Patterns follow the topic rules: ``>`` does not reach the bus's own ``_`` topics; name them
with a pattern of their own (``_dlq.>`` dead letters, ``_bus.handled`` handling records).
Only brokers that keep history can be read back: sqlite, redis and nats always, RabbitMQ when
its processes run with ``amqp://...?history=7d`` (see `eventwire.backends.amqp_history`); any
broker can be followed live.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from eventwire.backends import open_backend, resolve_url
from eventwire.backends.base import Backend, ConsumerSpec, Delivery, Start
from eventwire.backends.broker import BrokerBackend
from eventwire.backends.session import ConsumerSession
from eventwire.envelope import EnvelopeError, decode
from eventwire.errors import EventwireError
from eventwire.event import Event
from eventwire.topics import validate_pattern

logger = logging.getLogger("eventwire")

__all__ = [
    "HISTORY_PATTERNS",
    "Follower",
    "History",
    "HistoryReader",
    "HistoryTimeoutError",
    "HistoryUnavailableError",
    "follow",
    "id_time",
    "parse_since",
    "parse_time",
    "read_history",
]

HISTORY_PATTERNS: tuple[str, ...] = (">", "_dlq.>")
"""What `read_history` reads by default: every application topic and the dead letters."""

# Consumers of tools are named with the bus's tooling prefix (eventwire.bus.TOOLING_PREFIX).
_TOOL_PREFIX = "_eventwire."
# Brokers stamp their own time on what they store, producers stamp the event's; a read starts
# this much before `since` on the broker's clock so that no event stamped in range is missed
# (events before `since` by their own time are then left out).
CLOCK_MARGIN = timedelta(seconds=2)
_PAGE = 500
# How long one fetch waits for more before the read asks the broker whether anything is left.
_POLL = 0.05
_CLOSE_TIMEOUT = 5.0


class HistoryUnavailableError(EventwireError, ValueError):
    """The bus keeps no history to read (``memory://``, ``amqp://`` without ``?history=``)."""


class HistoryTimeoutError(EventwireError, TimeoutError):
    """Reading took longer than allowed; `events` holds what was read until then."""

    def __init__(self, message: str, events: History) -> None:
        super().__init__(message)
        self.events = events


class History(list[Event[Any]]):
    """The events a read returned, oldest first, and how many stored messages were `skipped`
    because they were not eventwire envelopes."""

    skipped: int = 0


# -- times ----------------------------------------------------------------------------------

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, option: str = "--since", now: datetime | None = None) -> datetime:
    """A moment from an age (``90s``, ``15m``, ``2h``, ``1d``, ``1w``: that long ago), ``now``,
    or an ISO 8601 date or time (local time when it has no offset, as a person typing it
    means). Raises `ValueError` naming `option`, with examples, otherwise."""
    now = now or datetime.now(UTC)
    match = _DURATION.fullmatch(text)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2) or "s"])
    if text.strip().lower() == "now":
        return now
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{option} {text!r} is neither a duration (e.g. 30m, 1h, 2d) nor an ISO 8601 time "
            "(e.g. 2026-01-31T09:00:00Z)"
        ) from None
    return moment if moment.tzinfo is not None else moment.astimezone()


parse_since = parse_time
"""`parse_time` for ``--since`` (the name `eventwire topology` knows it by)."""

_UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def id_time(event_id: str) -> datetime | None:
    """When an event with this id was created, read from the id (a UUIDv7 starts with its Unix
    time in milliseconds); None for an id of another form."""
    text = event_id.strip().lower()
    if not _UUID7.fullmatch(text):
        return None
    milliseconds = int(text[:8] + text[9:13], 16)
    return datetime.fromtimestamp(milliseconds / 1000, UTC)


# -- opening --------------------------------------------------------------------------------


def _backend_for(source: str | Backend) -> BrokerBackend:
    """The backend behind `source`; `HistoryUnavailableError` for the in-process bus."""
    backend = source if isinstance(source, Backend) else open_backend(resolve_url(source))
    if not isinstance(backend, BrokerBackend):
        raise HistoryUnavailableError(
            "memory:// keeps no history outside the process: its events exist only in the "
            "process that publishes them; give the URL of a broker (sqlite, redis, nats, or "
            "amqp with ?history=)"
        )
    return backend


async def _check_history(backend: BrokerBackend) -> None:
    if await backend.keeps_history():
        return
    if backend.url.scheme == "amqp":
        raise HistoryUnavailableError(
            f"amqp:// keeps no history unless asked to: {backend.url.redacted} has no "
            "history stream. Run the app's processes with ?history=7d (how long to keep "
            "events) in their URL; what is published from then on can be read back"
        )
    raise HistoryUnavailableError(
        f"{backend.url.scheme}:// keeps no history: {backend.url.redacted} delivers each "
        "event to the consumers that exist when it is published and keeps nothing to read "
        "back; a sqlite://, redis:// or nats:// bus does"
    )


class _Tap:
    """Ephemeral consumers on a backend, opened on entry and removed on exit (also when the
    task is cancelled); the backend is connected and closed here when given as a URL."""

    def __init__(
        self,
        source: str | Backend,
        patterns: Sequence[str],
        start: Start,
        purpose: str,
        need_history: bool,
    ) -> None:
        self._owned = not isinstance(source, Backend)
        for pattern in patterns:
            validate_pattern(pattern)
        self.backend = _backend_for(source)
        self._need_history = need_history
        token = secrets.token_hex(4)
        self.specs = [
            ConsumerSpec(
                f"{_TOOL_PREFIX}{purpose}.{token}.{index}", pattern, start, 30.0, ephemeral=True
            )
            for index, pattern in enumerate(dict.fromkeys(patterns))
        ]
        self.sessions: list[ConsumerSession] = []
        self.skipped = 0

    @property
    def where(self) -> str:
        """The broker's URL, safe to print."""
        return self.backend.url.redacted

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._close()

    async def _open(self) -> None:
        try:
            if self._owned:
                await self.backend.connect()
            if self._need_history:
                await _check_history(self.backend)
            for spec in self.specs:
                # No retries: a read reports a failing broker rather than wait for it.
                consumer = await self.backend.consumer(spec)
                self.sessions.append(ConsumerSession(consumer, spec, retry=False))
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        sessions, self.sessions = self.sessions, []
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                for session in sessions:
                    await session.close()
        except (TimeoutError, OSError, EventwireError) as error:
            # The broker is gone: nats and amqp expire ephemeral consumers by themselves.
            logger.warning("eventwire: could not remove a reader from %s: %s", self.where, error)
        finally:
            if self._owned:
                await self.backend.close()

    def _decode(self, delivery: Delivery) -> Event[Any] | None:
        try:
            return decode(delivery.body)
        except EnvelopeError:
            self.skipped += 1
            return None


class HistoryReader(_Tap):
    """The events a broker holds on `patterns` from `since` (None: from the oldest it keeps)
    to `until` (None: until the end), by each event's own time; at most `limit`.

    ::

        async with HistoryReader(url, ["orders.>"], since=start) as reader:
            async for event in reader:
                ...

    Events come in the broker's order, pattern after pattern interleaved; `read` counts them
    and `skipped` counts stored messages that were not eventwire envelopes. `progress` is
    called with `read` as pages arrive. Reading ends once the broker reports nothing left for
    the reader (what is published meanwhile may still be read), or once a pattern's events are
    past `until` (by default, the moment reading began: so a read ends on a busy bus too) by
    more than producers' clocks can disagree. Raises
    `HistoryUnavailableError` for a bus that keeps no history (memory://, and amqp:// without
    ``?history=``).
    """

    def __init__(
        self,
        source: str | Backend,
        patterns: Sequence[str] = HISTORY_PATTERNS,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        progress: Callable[[int], None] | None = None,
        purpose: str = "history",
    ) -> None:
        for moment in (since, until):
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"since/until must be timezone-aware, got {moment!r}")
        start: Start = "earliest" if since is None else since - CLOCK_MARGIN
        super().__init__(source, patterns, start, purpose, need_history=True)
        self.since = since
        self.until = until
        # Without `until`, the read still ends on a busy bus: at what it finds published well
        # after it began (set when reading starts).
        self._horizon = until
        self.limit = limit
        self.progress = progress
        self.read = 0

    def _admits(self, event: Event[Any]) -> bool:
        moment = event.timestamp
        if self.since is not None and moment < self.since:
            return False
        return self.until is None or moment <= self.until

    def _beyond(self, event: Event[Any]) -> bool:
        """Past `until` (or the read's start) by more than clocks can disagree: nothing in
        range comes after it."""
        return self._horizon is not None and event.timestamp > self._horizon + CLOCK_MARGIN

    async def __aiter__(self) -> AsyncIterator[Event[Any]]:
        if not self.sessions and self.specs:
            raise RuntimeError("use `async with HistoryReader(...) as reader:` before reading")
        if self._horizon is None:
            self._horizon = datetime.now(UTC)
        active = list(self.sessions)
        while active:
            fetched = False
            for session in list(active):
                if self.limit is not None and self.read >= self.limit:
                    return
                want = _PAGE if self.limit is None else min(_PAGE, self.limit - self.read)
                deliveries = await session.fetch(want, _POLL)
                if not deliveries:
                    continue
                fetched = True
                await session.ack(deliveries)
                for delivery in deliveries:
                    event = self._decode(delivery)
                    if event is None:
                        continue
                    if self._beyond(event) and session in active:
                        active.remove(session)
                    if not self._admits(event):
                        continue
                    self.read += 1
                    yield event
                    if self.limit is not None and self.read >= self.limit:
                        return
                if self.progress is not None:
                    self.progress(self.read)
            if fetched:
                continue
            names = {session.name for session in active}
            infos = await self.backend.consumers()
            if not any(info.outstanding for info in infos if info.name in names):
                return


async def read_history(
    source: str | Backend,
    *,
    patterns: Sequence[str] = HISTORY_PATTERNS,
    since: datetime | None,
    until: datetime | None = None,
    timeout: float | None = 10.0,
    limit: int | None = 100_000,
    progress: Callable[[int], None] | None = None,
    purpose: str = "history",
) -> History:
    """Every event the broker at `source` (a bus URL, or a connected `Backend`) holds on
    `patterns` from `since` to `until`, oldest first (see `HistoryReader`).

    Raises `HistoryUnavailableError` (a `ValueError`) for a bus that keeps no history, and
    `HistoryTimeoutError` (a `TimeoutError`, with what was read in its `events`) if reading
    takes more than `timeout` seconds.
    """
    events = History()
    reader = HistoryReader(
        source,
        patterns,
        since=since,
        until=until,
        limit=limit,
        progress=progress,
        purpose=purpose,
    )
    try:
        async with asyncio.timeout(timeout), reader:
            async for event in reader:
                events.append(event)
    except TimeoutError:
        events.skipped = reader.skipped
        events.sort(key=lambda event: event.timestamp)
        raise HistoryTimeoutError(
            f"reading the history of {reader.where} took more than {timeout:g}s "
            f"({len(events)} events read)",
            events,
        ) from None
    events.skipped = reader.skipped
    # Stable: same-time events keep the broker's order.
    events.sort(key=lambda event: event.timestamp)
    return events


class Follower(_Tap):
    """Events published on `pattern` from the moment it is entered, as they come (see
    `follow`)."""

    def __init__(self, source: str | Backend, pattern: str, *, purpose: str = "tail") -> None:
        super().__init__(source, [pattern], "latest", purpose, need_history=False)
        self.pattern = pattern

    def stop(self) -> None:
        """End the iteration at its next turn (within a second), also when a cancellation of
        the task reading it was swallowed by the broker's client library."""
        for session in self.sessions:
            session.stop()

    async def __aiter__(self) -> AsyncIterator[Event[Any]]:
        if not self.sessions:
            raise RuntimeError("use `async with follow(...) as events:` before reading")
        session = self.sessions[0]
        async for deliveries in session.batches(_PAGE, 1.0):
            await session.ack(deliveries)
            for delivery in deliveries:
                event = self._decode(delivery)
                if event is not None:
                    yield event


def follow(source: str | Backend, pattern: str, *, purpose: str = "tail") -> Follower:
    """Follow `pattern` live on the broker at `source` (any broker, amqp included)::

        async with follow(url, "orders.>") as events:
            async for event in events:
                print(event.topic, event.payload)

    Events published after entering come in as the broker delivers them; the app's own
    consumers are not touched. The reader's consumer is removed on exit, also when the task is
    cancelled (Ctrl-C). Messages that are not eventwire envelopes are counted in `skipped`.
    """
    return Follower(source, pattern, purpose=purpose)
