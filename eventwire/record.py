"""Record what a bus publishes and handles, and assert on it: the core of the testing toolkit.

::

    async with bus.record("research.>") as seen:
        await bus.publish("user.query", "revenue?")
        [done] = await seen.wait_for("research.complete")
        seen.assert_no_dead_letters()

A `Recorder` is an `Observer` (`eventwire.observe`): it sees what this process publishes and
handles. On a broker backend, events published by other processes reach it only through this
process's subscriptions (it records them when a handler here starts on them).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from eventwire.event import Event
from eventwire.observe import HandlingRecord, Observable, Observer, Outcome, SubscriptionInfo
from eventwire.subscription import Subscription
from eventwire.topics import pattern_matches, validate_pattern

if TYPE_CHECKING:
    from eventwire.lineage import LineageNode

_DLQ_PREFIX = "_dlq."
_FAILED = ("retrying", "dead_lettered", "cancelled")
# How much of the recording a failure message shows.
_LAST_EVENTS = 8
_LAST_FAILURES = 10
_PAYLOAD_CHARS = 80


class RecordedBus(Observable, Protocol):
    """What a `Recorder` records (an `EventBus`)."""

    @property
    def subscriptions(self) -> Mapping[str, Subscription]: ...


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


class DroppedEvent(NamedTuple):
    """An event that a full inbox dropped (``overflow="drop_oldest"``)."""

    subscription: str
    event: Event[Any]


class Recorder(Observer):
    """Records, in order, the events on topics matching `pattern` that the bus publishes or
    handles, every handling attempt on those topics (`handlings`), their dead letters
    (``_dlq.`` events) and dropped events (`drops`). Made by `EventBus.record`; records between
    ``async with`` entry and exit.

    ``wait_for``/``wait_handled`` wait (on the recording, no polling) for what a test expects;
    the ``assert_*`` methods check what was recorded. Each failure message lists what was
    seen instead.
    """

    def __init__(self, bus: RecordedBus, pattern: str = ">") -> None:
        validate_pattern(pattern)
        self.bus = bus
        self.pattern = pattern
        self.events: list[Event[Any]] = []
        """Events on matching topics, in the order they were published (or first handled)."""
        self.handlings: list[HandlingRecord] = []
        """Every handling attempt (any subscription) of an event on a matching topic."""
        self.dead_letters: list[Event[Any]] = []
        """``_dlq.<topic>`` events of matching topics (payload: the event given up on)."""
        self.drops: list[DroppedEvent] = []
        """Events on matching topics that a full inbox dropped."""
        self._recording = False
        # (topic, causation_id) of every event seen, matching or not: causation chains may
        # pass through topics outside the pattern.
        self._chain: dict[str, tuple[str, str | None]] = {}
        self._waiters: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        state = "recording" if self._recording else "stopped"
        return (
            f"<Recorder {self.pattern!r} {state}: {len(self.events)} events, "
            f"{len(self.handlings)} handlings>"
        )

    # -- recording ------------------------------------------------------------------------

    async def __aenter__(self) -> Recorder:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start recording (``async with`` does this)."""
        self._recording = True
        self.bus.observe(self)

    def stop(self) -> None:
        """Stop recording; what was recorded stays (``async with`` exit does this)."""
        self._recording = False
        self.bus.unobserve(self)

    def publish_finished(self, token: Any, event: Event[Any], error: BaseException | None) -> None:
        if error is None:
            self._note(event)

    def attempt_started(
        self, subscription: SubscriptionInfo, event: Event[Any], attempt: int
    ) -> Any:
        self._note(event)
        return None

    def attempt_finished(
        self,
        token: Any,
        subscription: SubscriptionInfo,
        event: Event[Any],
        record: HandlingRecord,
        error: BaseException | None,
    ) -> None:
        self._note_handling(record)

    def skipped(
        self, subscription: SubscriptionInfo, event: Event[Any], record: HandlingRecord
    ) -> None:
        self._note(event)
        self._note_handling(record)

    def dropped(self, subscription: SubscriptionInfo, event: Event[Any]) -> None:
        if self._recording and pattern_matches(self.pattern, event.topic):
            self.drops.append(DroppedEvent(subscription.name, event))
            self._wake()

    def _note(self, event: Event[Any]) -> None:
        if not self._recording:
            return
        event_id = event.id
        if event_id in self._chain:
            return  # seen when published, now handled (or delivered to a second handler)
        topic = event.topic
        self._chain[event_id] = (topic, event.causation_id)
        changed = False
        if pattern_matches(self.pattern, topic):
            self.events.append(event)
            changed = True
        if topic.startswith(_DLQ_PREFIX) and (
            changed or pattern_matches(self.pattern, topic[len(_DLQ_PREFIX) :])
        ):
            self.dead_letters.append(event)
            changed = True
        if changed:
            self._wake()

    def _note_handling(self, record: HandlingRecord) -> None:
        if self._recording and pattern_matches(self.pattern, record.topic):
            self.handlings.append(record)
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for waiter in waiters:
            loop = waiter.get_loop()
            if loop is running:
                _release(waiter)
            else:  # the bus runs in another thread than the waiting test
                loop.call_soon_threadsafe(_release, waiter)

    async def _until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until `condition` holds, re-checking it whenever something is recorded."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._waiters.append(waiter)
                    await waiter
        except TimeoutError:
            return condition()
        return True

    # -- queries --------------------------------------------------------------------------

    @property
    def topics(self) -> list[str]:
        """The topics of `events`, in order (repeats included)."""
        return [event.topic for event in self.events]

    def of(self, topic_pattern: str) -> list[Event[Any]]:
        """The recorded events whose topic matches `topic_pattern`, in order."""
        validate_pattern(topic_pattern)
        return [event for event in self.events if pattern_matches(topic_pattern, event.topic)]

    def handled_by(
        self, subscription: str | Subscription, outcome: Outcome = "handled"
    ) -> list[HandlingRecord]:
        """The handling records of one subscription (a name or a `Subscription`) that ended
        with `outcome` (by default: the handler returned), in order."""
        name = _name(subscription)
        return [r for r in self.handlings if r.subscription == name and r.outcome == outcome]

    def lineage(self, correlation_id: str | Event[Any]) -> list[LineageNode]:
        """The causation tree of one chain (an event's chain, or a correlation id): the
        `eventwire.lineage.LineageNode` roots that `eventwire.lineage.build_lineage` builds
        from this recording; print them with `eventwire.lineage.render_lineage`."""
        from eventwire.lineage import build_lineage

        if isinstance(correlation_id, Event):
            correlation_id = correlation_id.correlation_id
        # Dead letters are kept apart from `events` (">" does not match `_dlq.` topics), but
        # they are part of the chain.
        return build_lineage([*self.events, *self.dead_letters], self.handlings, correlation_id)

    # -- waiting --------------------------------------------------------------------------

    async def wait_for(
        self,
        topic_pattern: str,
        count: int = 1,
        timeout: float = 5.0,
        where: Callable[[Event[Any]], bool] | None = None,
    ) -> list[Event[Any]]:
        """Wait until `count` events on topics matching `topic_pattern` (and passing `where`,
        if given) are recorded, counting those recorded before the call; return the first
        `count` of them. After `timeout` seconds raise `AssertionError` listing what was
        seen."""
        __tracebackhide__ = True  # pytest shows the test's line, not ours
        validate_pattern(topic_pattern)

        def matching() -> list[Event[Any]]:
            return [
                event
                for event in self.events
                if pattern_matches(topic_pattern, event.topic) and (where is None or where(event))
            ]

        if await self._until(lambda: len(matching()) >= count, timeout):
            return matching()[:count]
        found = matching()
        wanted = f"{count} event(s) on {topic_pattern!r}" + (
            f" passing where={_describe(where)}" if where is not None else ""
        )
        summary = f"wait_for: waited {timeout}s for {wanted}; saw {len(found)}"
        if where is not None:
            summary += f" (on the topic, before where=: {len(self.of(topic_pattern))})"
        raise AssertionError(self._report(summary + "."))

    async def wait_handled(
        self,
        subscription: str | Subscription,
        count: int = 1,
        timeout: float = 5.0,
        outcome: Outcome = "handled",
    ) -> list[HandlingRecord]:
        """Wait until `subscription` (a name or a `Subscription`) has handled `count` events
        during the recording (or, with e.g. ``outcome="dead_lettered"``, given up on them);
        return their records. After `timeout` seconds raise `AssertionError` listing what was
        seen."""
        __tracebackhide__ = True  # pytest shows the test's line, not ours
        name = _name(subscription)
        if await self._until(lambda: len(self.handled_by(name, outcome)) >= count, timeout):
            return self.handled_by(name, outcome)[:count]
        done = len(self.handled_by(name, outcome))
        summary = f"wait_handled: waited {timeout}s for {_expectation(name, count, outcome)}"
        raise AssertionError(
            self._report(f"{summary}; {_tally(done, outcome)}." + self._unknown_subscription(name))
        )

    # -- assertions -----------------------------------------------------------------------

    def assert_published(
        self, topic_pattern: str, count: int | None = None, payload: Any = _UNSET
    ) -> list[Event[Any]]:
        """Assert that events on `topic_pattern` (with exactly this `payload`, if given) were
        recorded: `count` of them exactly, or at least one. Returns them."""
        __tracebackhide__ = True  # pytest shows the test's line, not ours
        on_topic = self.of(topic_pattern)
        found = [e for e in on_topic if payload is _UNSET or e.payload == payload]
        if (len(found) >= 1) if count is None else (len(found) == count):
            return found
        wanted = "at least 1 event" if count is None else f"exactly {count} event(s)"
        wanted += f" on {topic_pattern!r}"
        if payload is not _UNSET:
            wanted += f" with payload {_short(payload)}"
        lines = [f"assert_published: expected {wanted}; saw {len(found)}."]
        if payload is not _UNSET and len(on_topic) > len(found):
            lines.append(f"Events on {topic_pattern!r} with other payloads:")
            lines += [f"  {_line(e)}" for e in on_topic if e not in found][-_LAST_EVENTS:]
        raise AssertionError(self._report("\n".join(lines)))

    def assert_handled(
        self, subscription: str | Subscription, count: int, outcome: Outcome = "handled"
    ) -> None:
        """Assert that `subscription` handled exactly `count` events during the recording
        (or ended that many attempts with another `outcome`, e.g. ``"dead_lettered"``)."""
        __tracebackhide__ = True  # pytest shows the test's line, not ours
        name = _name(subscription)
        handled = self.handled_by(name, outcome)
        if len(handled) == count:
            return
        lines = [
            f"assert_handled: expected {_expectation(name, count, outcome, exactly=True)} "
            f"during the recording; {_tally(len(handled), outcome)}" + (":" if handled else ".")
        ]
        lines += [f"  {r.topic} {r.event_id}" for r in handled[-_LAST_EVENTS:]]
        raise AssertionError(self._report("\n".join(lines) + self._unknown_subscription(name)))

    def assert_no_dead_letters(self) -> None:
        """Assert that no handler gave up on a recorded event: no ``dead_lettered`` handling
        and no ``_dlq.`` event. The message names each subscription and its error."""
        __tracebackhide__ = True  # pytest shows the test's line, not ours
        letters = self._dead_letter_lines()
        if not letters:
            return
        lines = [f"assert_no_dead_letters: {len(letters)} dead letter(s):"]
        lines += [f"  {line}" for line in letters]
        raise AssertionError(self._report("\n".join(lines), failures=False))

    def assert_caused(
        self, cause: Event[Any] | str, effect: Event[Any] | str, *, direct: bool = False
    ) -> Event[Any]:
        """Assert that `effect` (an event, or a topic pattern naming recorded events) was
        caused by `cause` (an event or its id), following causation ids: through any number
        of events in between, or, with ``direct=True``, published by `cause`'s own handler.
        Returns the (first) effect event."""
        __tracebackhide__ = True  # pytest shows the test's line, not ours
        cause_id = cause.id if isinstance(cause, Event) else cause
        if isinstance(effect, Event):
            candidates, effect_text = [effect], f"{effect.topic} {effect.id}"
        else:
            candidates, effect_text = self.of(effect), f"event on {effect!r}"
        chains = [(candidate, self._ancestors(candidate)) for candidate in candidates]
        for candidate, ancestors in chains:
            ids = [event_id for event_id, _ in ancestors]
            if cause_id in (ids[:1] if direct else ids):
                return candidate
        how = "directly" if direct else "directly or through other events"
        lines = [f"assert_caused: no {effect_text} was caused by {self._label(cause_id)} ({how})."]
        if chains:
            lines.append("Causation chains of the candidates (effect <- cause <- ...):")
            lines += [f"  {self._render_chain(c, a)}" for c, a in chains[-_LAST_EVENTS:]]
        else:
            lines.append(f"No {effect_text} was recorded.")
        descendants = self._descendants(cause_id)
        if descendants:
            lines.append(f"Events that {self._label(cause_id)} did cause:")
            lines += [f"  {'  ' * (depth - 1)}{_line(e)}" for e, depth in descendants]
        else:
            lines.append(f"No recorded event was caused by {self._label(cause_id)}.")
        raise AssertionError(self._report("\n".join(lines)))

    # -- helpers of the assertions ----------------------------------------------------------

    def _ancestors(self, event: Event[Any]) -> list[tuple[str, str]]:
        """(id, topic) of each cause of `event`, nearest first, as far as the recording
        (or the first id it does not know) goes."""
        chain: list[tuple[str, str]] = []
        parent = event.causation_id
        while parent is not None and all(parent != seen for seen, _ in chain):
            topic, grandparent = self._chain.get(parent, ("?", None))
            chain.append((parent, topic))
            parent = grandparent
        return chain

    def _descendants(self, cause_id: str) -> list[tuple[Event[Any], int]]:
        found: list[tuple[Event[Any], int]] = []
        for event in self.events:
            ids = [event_id for event_id, _ in self._ancestors(event)]
            if cause_id in ids:
                found.append((event, ids.index(cause_id) + 1))
        return found

    def _label(self, event_id: str) -> str:
        topic = self._chain.get(event_id, (None, None))[0]
        return f"{topic} {event_id}" if topic is not None else f"event {event_id}"

    def _render_chain(self, event: Event[Any], ancestors: list[tuple[str, str]]) -> str:
        links = [f"{event.topic} {event.id}", *(f"{topic} {eid}" for eid, topic in ancestors)]
        if not ancestors:
            links.append("(root: no cause)")
        return " <- ".join(links)

    def _dead_letter_lines(self) -> list[str]:
        """One line per dead letter: from the handling records, then from ``_dlq.`` events
        that no record here covers (given up on in another process)."""
        lines = [
            f"{r.subscription!r} gave up on {r.topic} {r.event_id} after {r.attempt} "
            f"attempt(s): {r.error}"
            for r in self.handlings
            if r.outcome == "dead_lettered"
        ]
        return lines + self._letters_without_record()

    def _letters_without_record(self) -> list[str]:
        given_up = {
            (r.subscription, r.event_id) for r in self.handlings if r.outcome == "dead_lettered"
        }
        lines: list[str] = []
        for letter in self.dead_letters:
            original = letter.payload
            event_id = original.id if isinstance(original, Event) else "?"
            subscription = str(letter.metadata.get("subscription", "?"))
            if (subscription, event_id) not in given_up:
                lines.append(
                    f"{subscription!r} gave up on {letter.topic[len(_DLQ_PREFIX) :]} {event_id} "
                    f"after {letter.metadata.get('attempts', '?')} attempt(s): "
                    f"{letter.metadata.get('error', '?')} (dead letter {letter.id})"
                )
        return lines

    def _unknown_subscription(self, name: str) -> str:
        if name in self.bus.subscriptions:
            return ""
        names = ", ".join(repr(n) for n in self.bus.subscriptions) or "none"
        return f"\nNo subscription named {name!r} on this bus (it has: {names})."

    def _report(self, summary: str, *, failures: bool = True) -> str:
        """`summary`, then what the recording holds: the message of every failed check."""
        lines = [summary]
        counts = Counter(self.topics)
        lines.append(
            f"Recorded on {self.pattern!r}: {len(self.events)} event(s)"
            + (": " + ", ".join(f"{t} x{n}" for t, n in counts.items()) if counts else ".")
        )
        if self.events:
            shown = self.events[-_LAST_EVENTS:]
            lines.append(f"Last {len(shown)}:" if len(shown) < len(self.events) else "Events:")
            lines += [f"  {_line(event)}" for event in shown]
        if self.handlings:
            outcomes = Counter((r.subscription, r.outcome) for r in self.handlings)
            lines.append(
                "Handlings: " + ", ".join(f"{s} {o} x{n}" for (s, o), n in outcomes.items())
            )
        failed = [r for r in self.handlings if r.outcome in _FAILED]
        if failures and failed:
            lines.append("Failed attempts:")
            lines += [
                f"  {r.subscription} on {r.topic} {r.event_id} attempt {r.attempt}: "
                f"{r.outcome}: {r.error}"
                for r in failed[-_LAST_FAILURES:]
            ]
        letters = self._letters_without_record() if failures else []
        if letters:
            lines.append("Dead letters:")
            lines += [f"  {line}" for line in letters]
        if self.drops:
            drops = Counter((d.subscription, d.event.topic) for d in self.drops)
            lines.append(
                "Dropped (inbox full): "
                + ", ".join(f"{s} <- {t} x{n}" for (s, t), n in drops.items())
            )
        return "\n".join(lines)


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _expectation(name: str, count: int, outcome: Outcome, *, exactly: bool = False) -> str:
    how_many = f"exactly {count}" if exactly else str(count)
    if outcome == "handled":
        return f"subscription {name!r} to handle {how_many} event(s)"
    return f"{how_many} attempt(s) of subscription {name!r} to end {outcome!r}"


def _tally(done: int, outcome: Outcome) -> str:
    return f"it handled {done}" if outcome == "handled" else f"{done} did"


def _name(subscription: str | Subscription) -> str:
    return subscription.name if isinstance(subscription, Subscription) else subscription


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _PAYLOAD_CHARS else text[: _PAYLOAD_CHARS - 3] + "..."


def _line(event: Event[Any]) -> str:
    """One event on one line: time, topic, payload, id, cause."""
    cause = f" caused by {event.causation_id}" if event.causation_id else ""
    source = f" from {event.source}" if event.source else ""
    return (
        f"{event.timestamp:%H:%M:%S.%f}"[:-3]
        + f" {event.topic} {_short(event.payload)} id={event.id}{source}{cause}"
    )


def _describe(where: Callable[..., Any]) -> str:
    return getattr(where, "__qualname__", None) or repr(where)
