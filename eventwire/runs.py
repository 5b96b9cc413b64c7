"""Durable runs: a handler subscribed with ``durable=True`` is called as
``handler(event, run)``, and what it does through `run` survives a crash.

A run is one event's handling by one subscription (its id: ``<subscription>/<event id>``).
Each `Run.step` records what its function returned in the backend's journal
(`eventwire.backends.journal`) before it returns; when the event comes again (the process
died, the lease ran out), the handler runs again from the top, and every step already
recorded returns its recorded result without calling its function. A step that was in flight
runs again: steps are at least once, finished steps exactly once. `Run.effect` is a step for
what must not happen twice (an email, a payment): the one window is between its function
returning and the record being written (docs/durable.md).

Results are stored in their JSON wire form (never pickled) and come back as the type the
function's return annotation names (pydantic validates), else as JSON values; the first call
returns the same decoded form, so a run behaves alike whether a step ran or was replayed.
Results over `INLINE_BYTES` go to content-addressed blobs, stored once per content.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import inspect
import time
import typing
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import msgspec

from eventwire.backends.journal import Journal
from eventwire.envelope import UnencodablePayloadError, encode, encode_payload
from eventwire.errors import EventwireError
from eventwire.event import Event
from eventwire.models import Chunk, Completion, Model, Prompt, Usage
from eventwire.streams import (
    CHUNKS_KEPT,
    FINAL_KEY,
    StreamChunk,
    chunks_id,
    encode_chunk,
    seq_key,
)
from eventwire.topics import validate_topic
from eventwire.waits import (
    INTERNAL_PREFIX,
    RESOLVED,
    ExpiryTimer,
    Outcome,
    Waits,
    WaitSpec,
    decode_outcome,
    decode_spec,
    json_form,
)

T = TypeVar("T")

INLINE_BYTES = 2048
"""Results whose JSON form is longer than this are stored as blobs, by content."""

STATUS_KEY = "status"
"""The record holding a run's state (running, waiting, finished, failed) and counts."""

EVENT_KEY = "event"
"""The record holding a parked run's event (its envelope), to resume it with."""

CANCELLED_KEY = "cancelled"
"""The record of a run's cancellation (`cancel_run`): why, and when."""

# Steps started inside `Run.gather`: new ones may start before recorded ones of the same
# gather were asked for, which is no sign of changed code.
_gathering: contextvars.ContextVar[int] = contextvars.ContextVar("eventwire_gathering", default=0)


class JournalMismatchError(EventwireError, RuntimeError):
    """A run's journal holds steps the handler's code no longer asks for: it was recorded by
    another version of the code, and replaying it would mix two versions' results."""


class UnencodableResultError(EventwireError, TypeError):
    """A step returned something that cannot be stored in its JSON form."""


class _Record(msgspec.Struct, omit_defaults=True):
    seq: int
    value: msgspec.Raw = msgspec.Raw(b"null")
    blob: str | None = None
    # The `Run.gather` the step ran in (its number in the run's execution; 0: none).
    group: int = 0


class _Failure(msgspec.Struct):
    type: str
    message: str


class _Status(msgspec.Struct, omit_defaults=True):
    state: str
    tries: int
    error: str | None = None
    # How many times the run parked; the delivery (event or resume) that runs it now; the
    # waits it is parked on.
    parks: int = 0
    driver: str | None = None
    waiting: list[str] = []


class RunParked(BaseException):
    """Raised out of a durable handler by a wait that must park the run: the bus records
    the run as waiting and lets go of it. A BaseException, so that ``except Exception`` in
    the handler does not swallow it."""


@dataclass(frozen=True, slots=True)
class Parking:
    """What a run of a bus's durable subscription uses beyond its journal: the bus's
    `Waits`, the subscription's name, the patterns it declared with ``waits=``, and the
    bus's publish (for streams)."""

    waits: Waits
    subscription: str
    patterns: frozenset[str]
    publish: Callable[..., Awaitable[Any]]


class BudgetExceededError(EventwireError, RuntimeError):
    """A run's model calls reached its budget (`Run.budget`): the next call is refused."""


_record_decoder = msgspec.json.Decoder(_Record)
_status_decoder = msgspec.json.Decoder(_Status)
_NO_STATUS = _Status("new", 0)
_completion_decoder = msgspec.json.Decoder(Completion)


class Run:
    """What a durable handler journals through: steps, effects and their joins.

    Made by the bus for each delivery of an event to a ``durable=True`` subscription; the
    handler gets it as its second argument.
    """

    def __init__(
        self,
        run_id: str,
        event: Event[Any],
        journal: Journal,
        parking: Parking | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.id = run_id
        self.event = event
        self._journal = journal
        self._parking = parking
        self._clock = clock
        self.parked: set[str] = set()
        """The waits this execution parked on (the bus records them)."""
        self._budget: tuple[float | None, int | None] = (None, None)
        self._gathers = 0
        self._records: dict[str, bytes] = {}
        # Recorded steps and effects this execution has not asked for yet.
        self._unasked: set[str] = set()
        self._names: Counter[str] = Counter()
        self._effects: set[str] = set()
        self._next_seq = 0
        self.calls = 0
        """Steps and effects whose function this execution called."""
        self.replays = 0
        """Steps, effects and waits this execution took from the journal."""
        self.waits = 0
        """Waits (and sleeps, collects) this execution filed."""

    async def load(self) -> None:
        """Read the run's journal (the bus does, before calling the handler)."""
        self._records = await self._journal.read(self.id)
        self._unasked = {key for key in self._records if _is_step(key)}
        recorded = [_record_decoder.decode(self._records[key]).seq for key in self._unasked]
        self._next_seq = max(recorded, default=-1) + 1

    @property
    def state(self) -> str | None:
        """What the journal says of the run: running, finished, failed (None: new)."""
        status = self._records.get(STATUS_KEY)
        return None if status is None else _status_decoder.decode(status).state

    @property
    def cancelled(self) -> bool:
        """Whether the run was cancelled (`cancel_run`): it does not run again."""
        return CANCELLED_KEY in self._records

    @property
    def tries(self) -> int:
        """How many times the handler began this run, this one included once it began."""
        return self._status().tries

    @property
    def parks(self) -> int:
        """How many times the run parked on a wait."""
        return self._status().parks

    @property
    def driver(self) -> str | None:
        """What delivery ran the run last (``event:<id>``, ``resume:<id>``)."""
        return self._status().driver

    def _status(self) -> _Status:
        status = self._records.get(STATUS_KEY)
        return _NO_STATUS if status is None else _status_decoder.decode(status)

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` (awaited if it is a coroutine), once per run: its result
        is recorded, and returned from the journal when the run runs again. A name used
        again in one run is numbered (``name#2``, ...), so steps in a loop need no names
        of their own. A step that raised is recorded as failed and runs again next time."""
        return await self._journaled(self._numbered("step", name), fn, args, kwargs)

    async def effect(self, key: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """A step for a side effect that must happen once per run (send an email, charge
        a card): recorded before the event is acknowledged, never called again once
        recorded. `key` names the effect within the run and may be used only once in it;
        `idempotency_key(key)` gives the outside system a key to deduplicate the one case
        left: a crash after `fn` returned and before its record was written."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"an effect needs a non-empty str key, got {key!r}")
        if key in self._effects:
            raise ValueError(
                f"effect key {key!r} is used twice in run {self.id!r}: give each effect its "
                "own key (e.g. f'email:{recipient}')"
            )
        self._effects.add(key)
        return await self._journaled(f"effect:{key}", fn, args, kwargs)

    def idempotency_key(self, key: str) -> str:
        """A key for effect `key` of this run that stays the same when the run runs again:
        hand it to an outside system that deduplicates (an email or payment API)."""
        return f"{self.id}/{key}"

    async def gather(self, *steps: Awaitable[T]) -> list[T]:
        """Run steps (or anything awaitable) concurrently and wait for all: fan-out and
        join. The results come in the order given; the first error is raised once all
        have ended, and the steps that finished stay recorded."""
        self._gathers += 1
        token = _gathering.set(self._gathers)  # its steps are recorded as one group
        try:
            tasks = [asyncio.ensure_future(step) for step in steps]
        finally:
            _gathering.reset(token)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        parked = None
        for result in results:
            if isinstance(result, RunParked):
                parked = result  # every wait of the gather is filed: park once all are
            elif isinstance(result, BaseException):
                raise result
        if parked is not None:
            raise parked
        return typing.cast(list[T], results)

    # -- models --------------------------------------------------------------------------

    def budget(self, *, cost: float | None = None, tokens: int | None = None) -> None:
        """Limit what this run's model calls may spend, over every try: once the recorded
        calls reach `cost` (in the models' `Price` units) or `tokens`, the next new call
        raises `BudgetExceededError` instead of being made (calls replayed from the
        journal cost nothing). Call it at the top of the handler."""
        for label, limit in (("cost", cost), ("tokens", tokens)):
            if limit is not None and (isinstance(limit, bool) or not limit > 0):
                raise ValueError(f"budget {label}= must be > 0 or None, got {limit!r}")
        self._budget = (cost, tokens)

    @property
    def spent(self) -> Usage:
        """What the run's recorded model calls and streams consumed, over every try."""
        total = Usage()
        for key, record in self._records.items():
            if key.startswith(("model:", "stream:")):
                value = _record_decoder.decode(record).value
                total = total + _completion_decoder.decode(value).usage
        return total

    def _check_budget(self, key: str) -> None:
        cost, tokens = self._budget
        if cost is None and tokens is None:
            return
        spent = self.spent
        if (cost is not None and spent.cost >= cost) or (
            tokens is not None and spent.tokens >= tokens
        ):
            raise BudgetExceededError(
                f"run {self.id!r} has spent {spent.cost:.6g} (cost) and {spent.tokens} tokens "
                f"of its budget (cost={cost}, tokens={tokens}): {_what(key)} is not called. "
                "Raise the budget with run.budget(...), or end the run sooner"
            )

    async def complete(self, name: str, model: Model, prompt: Prompt, **options: Any) -> Completion:
        """``model.complete(prompt, **options)`` as a journaled step named `name`: made once
        per run, its answer, tokens and cost recorded (and counted against the budget)."""
        key = self._numbered("model", name)
        if key not in self._records:
            self._check_budget(key)
        result: Completion = await self._journaled(
            key, model.complete, (prompt,), options, decode=_completion_decoder.decode
        )
        return result

    def stream(
        self, topic: str, chunks: AsyncIterator[Chunk], *, name: str | None = None
    ) -> RunStream:
        """Publish `chunks` (e.g. ``model.stream(prompt)``) as events on `topic`, numbered
        per stream, then one event on ``<topic>.final`` with the whole text and the usage
        (`eventwire.streams`). Iterate the result for the chunks as they go out, or await
        it for the `Completion`. Journaled: when the run runs again, the recorded answer
        comes back at once (as one chunk), and the model is not called."""
        validate_topic(topic)
        key = self._numbered("stream", name or topic)
        return RunStream(self._streamed(key, topic, chunks))

    async def _streamed(
        self, key: str, topic: str, chunks: AsyncIterator[Chunk]
    ) -> AsyncIterator[Chunk | Completion]:
        record = self._records.get(key)
        if record is not None:
            self._unasked.discard(key)
            self.replays += 1
            await _close(chunks)
            completion = _completion_decoder.decode(_record_decoder.decode(record).value)
            yield Chunk(completion.text, completion.usage)
            yield completion
            return
        if self._unasked and not _gathering.get():
            await _close(chunks)
            self._refuse_mismatch(key)
        self._check_budget(key)
        parking = self._services("stream")
        seq = self._next_seq
        self._next_seq += 1
        stream = f"{self.id}/{key.removeprefix('stream:')}"
        kept = chunks_id(stream)
        number = sum(1 for k in await self._journal.read(kept) if k != FINAL_KEY)
        if number:  # an earlier try died mid-stream: readers drop what it sent
            restart = StreamChunk(stream, number, restart=True)
            await self._journal.write(kept, seq_key(number), encode_chunk(restart))
            await parking.publish(topic, msgspec.to_builtins(restart), key=stream)
            number += 1
        parts: list[str] = []
        usage = Usage()
        async for chunk in chunks:
            piece = StreamChunk(stream, number, chunk.text)
            await self._journal.write(kept, seq_key(number), encode_chunk(piece))
            await parking.publish(topic, msgspec.to_builtins(piece), key=stream)
            number += 1
            parts.append(chunk.text)
            if chunk.usage is not None:
                usage = chunk.usage
            yield chunk
        completion = Completion("".join(parts), topic, usage)
        self.calls += 1
        final = StreamChunk(stream, number, completion.text, final=True, usage=usage)
        await self._journal.write(kept, FINAL_KEY, encode_chunk(final))
        value = msgspec.Raw(msgspec.json.encode(completion))
        self._records[key] = await self._journal.write(
            self.id, key, msgspec.json.encode(_Record(seq, value, group=_gathering.get()))
        )
        await parking.publish(f"{topic}.final", msgspec.to_builtins(final), key=stream)
        await parking.waits.add_timer(ExpiryTimer(self._clock() + CHUNKS_KEPT, stream, number))
        yield completion

    def _services(self, what: str) -> Parking:
        if self._parking is None:
            raise RuntimeError(
                f"run {self.id!r} cannot {what}: it was not made by a bus for a durable "
                "subscription"
            )
        return self._parking

    # -- waits -------------------------------------------------------------------------

    async def wait_for(
        self,
        pattern: str,
        *,
        match: Mapping[str, Any] | None = None,
        timeout: timedelta | float | None = None,
        name: str | None = None,
        payload_type: Any = None,
    ) -> Event[Any] | None:
        """The first event on `pattern` whose payload has the `match` values (dotted paths
        reach into nested fields), published since the run's event; None if `timeout`
        (seconds or a timedelta; None: no limit) passes first. The run parks meanwhile:
        the handler returns, nothing stays in memory, and the run starts again (replaying
        its journal) when the event comes or the time is up, in any process.

        `pattern` must be one the subscription declared with ``waits=[...]`` (so that its
        events are kept from the start). `payload_type` validates the payload into a model.
        """
        outcome = await self._wait("wait", name or pattern, pattern, match, timeout, 1)
        if not outcome.events:
            return None
        return _typed(outcome.decoded()[0], payload_type)

    async def collect(
        self,
        pattern: str,
        *,
        count: int,
        match: Mapping[str, Any] | None = None,
        timeout: timedelta | float | None = None,
        name: str | None = None,
        payload_type: Any = None,
    ) -> list[Event[Any]]:
        """A join of events: the first `count` events on `pattern` matching `match`, oldest
        first; fewer if `timeout` passes first. Parks like `wait_for`."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"collect() needs count= an int >= 1, got {count!r}")
        outcome = await self._wait("collect", name or pattern, pattern, match, timeout, count)
        return [_typed(event, payload_type) for event in outcome.decoded()]

    async def sleep(self, duration: timedelta | float, *, name: str | None = None) -> None:
        """Wait `duration` (seconds or a timedelta), parked: a durable timer, which fires
        even if every process was down when it fell due (within a second of the next
        start)."""
        if duration is None:
            raise ValueError("sleep() needs a duration: seconds or a timedelta")
        await self._wait("sleep", name or "sleep", None, None, duration, 1)

    async def _wait(
        self,
        kind: str,
        name: str,
        pattern: str | None,
        match: Mapping[str, Any] | None,
        timeout: timedelta | float | None,
        count: int,
    ) -> Outcome:
        parking = self._services("wait")
        if pattern is not None and pattern not in parking.patterns:
            declared = ", ".join(map(repr, sorted(parking.patterns))) or "none"
            raise ValueError(
                f"run {self.id!r} waits for {pattern!r}, which subscription "
                f"{parking.subscription!r} did not declare (declared: {declared}): add "
                f"waits=[{pattern!r}] to its subscribe() or @on(...), so that events on it "
                "are kept from the start, even those that come before the run waits"
            )
        if match is not None and not isinstance(match, Mapping):
            raise TypeError(f"match= takes a mapping of payload fields to values, got {match!r}")
        wanted = json_form(dict(match or {}))
        seconds = None if timeout is None else _seconds(timeout)
        key = self._numbered(kind, name)
        record = self._records.get(key)
        if record is None:
            if self._unasked and not _gathering.get():
                self._refuse_mismatch(key)
            seq = self._next_seq
            self._next_seq += 1
            deadline = None if seconds is None else self._clock() + seconds
            spec = WaitSpec(pattern, wanted, deadline, self.event.created_ns, count)
            value = msgspec.Raw(msgspec.json.encode(spec))
            encoded = msgspec.json.encode(_Record(seq, value, group=_gathering.get()))
            record = await self._journal.write(self.id, key, encoded)
            self._records[key] = record
            self.waits += 1
        else:
            self._unasked.discard(key)
            resolved = self._records.get(RESOLVED + key)
            if resolved is not None:
                self._check_same_wait(key, record, pattern, wanted, count)
                self.replays += 1
                return decode_outcome(resolved)
        spec = self._check_same_wait(key, record, pattern, wanted, count)
        # Filed again on every execution that finds it unresolved: filing is idempotent,
        # and an execution that died between recording the wait and filing it is mended.
        outcome = await parking.waits.register(parking.subscription, self.id, key, spec)
        if outcome is None:
            self.parked.add(key)
            raise RunParked(key)
        return outcome

    def _check_same_wait(
        self, key: str, record: bytes, pattern: str | None, wanted: Any, count: int
    ) -> WaitSpec:
        spec = decode_spec(bytes(_record_decoder.decode(record).value))
        if (spec.pattern, spec.match, spec.count) != (pattern, wanted, count):
            raise JournalMismatchError(
                f"run {self.id!r} recorded {_what(key)} for {spec.pattern!r} matching "
                f"{spec.match} (count {spec.count}), and the code now asks for {pattern!r} "
                f"matching {wanted} (count {count}): the handler changed since the run "
                "began. Keep the old wait until old runs are finished, or give the new one "
                "another name="
            )
        return spec

    def _numbered(self, kind: str, name: str) -> str:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {kind} needs a non-empty str name, got {name!r}")
        self._names[f"{kind}:{name}"] += 1
        count = self._names[f"{kind}:{name}"]
        return f"{kind}:{name}" if count == 1 else f"{kind}:{name}#{count}"

    async def claim(self, driver: str) -> bool:
        """Take the parked run for `driver` (the bus does): one delivery per park resumes
        it, however many resolved waits asked for it."""
        mine = driver.encode()
        return await self._journal.write(self.id, f"claim:{self.parks}", mine) == mine

    async def keep_event(self) -> None:
        """Record the run's event, for resuming it where the event is gone (the bus does,
        when the run first parks)."""
        if EVENT_KEY not in self._records:
            self._records[EVENT_KEY] = await self._journal.write(
                self.id, EVENT_KEY, encode(self.event, max_bytes=None)
            )

    # -- the journal -------------------------------------------------------------------

    async def _journaled(
        self,
        key: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        decode: Callable[[bytes], Any] | None = None,
    ) -> Any:
        returns = _return_type(fn) if decode is None else None
        record = self._records.get(key)
        if record is not None:
            self._unasked.discard(key)
            self.replays += 1
            return await self._value(record, returns, key, decode)
        if self._unasked and not _gathering.get():
            self._refuse_mismatch(key)
        seq = self._next_seq
        self._next_seq += 1
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            failure = _Failure(type(exc).__qualname__, str(exc))
            await self._journal.write(
                self.id, "error:" + key, msgspec.json.encode(failure), replace=True
            )
            raise
        self.calls += 1
        stored = await self._journal.write(self.id, key, await self._encode(key, seq, result))
        self._records[key] = stored
        return await self._value(stored, returns, key, decode)

    async def _encode(self, key: str, seq: int, result: Any) -> bytes:
        try:
            value = encode_payload(result)
        except (UnencodablePayloadError, TypeError, ValueError, OverflowError) as exc:
            raise UnencodableResultError(
                f"{_what(key)} of run {self.id!r} returned a {type(result).__qualname__} "
                f"that cannot be stored: {exc}. Return JSON values, pydantic models, "
                "dataclasses or msgspec structs"
            ) from exc
        if len(value) <= INLINE_BYTES:
            return msgspec.json.encode(_Record(seq, msgspec.Raw(value), group=_gathering.get()))
        digest = hashlib.sha256(value).hexdigest()
        await self._journal.put_blob(digest, value)
        return msgspec.json.encode(_Record(seq, blob=digest, group=_gathering.get()))

    async def _value(
        self, record: bytes, returns: Any, key: str, decode: Callable[[bytes], Any] | None = None
    ) -> Any:
        decoded = _record_decoder.decode(record)
        raw = bytes(decoded.value)
        if decoded.blob is not None:
            blob = await self._journal.get_blob(decoded.blob)
            if blob is None:
                raise JournalMismatchError(
                    f"the journal of run {self.id!r} lost the blob of {_what(key)} "
                    f"({decoded.blob}): its store was cleared while the run was open"
                )
            raw = blob
        if decode is not None:
            return decode(raw)
        if returns is None:
            return msgspec.json.decode(raw)
        return _adapter(returns).validate_json(raw)

    def _refuse_mismatch(self, key: str) -> None:
        """A new step is about to run while recorded ones were never asked for."""
        left = sorted(self._unasked)
        raise JournalMismatchError(
            f"run {self.id!r} is about to run new {_what(key)} while its journal holds "
            f"{', '.join(map(_what, left))}, which this code never asked for: the "
            "handler's steps changed since the run began. Keep the old step names until "
            "old runs are finished"
        )

    # -- status --------------------------------------------------------------------------

    async def mark(
        self, state: str, error: BaseException | None = None, *, driver: str | None = None
    ) -> None:
        """Record the run's state (the bus does): running (one more try, by `driver`),
        waiting (parked once more, on `parked`), finished, failed."""
        message = None if error is None else f"{type(error).__qualname__}: {error}"
        now = self._status()
        encoded = msgspec.json.encode(
            _Status(
                state,
                now.tries + (state == "running"),
                message,
                now.parks + (state == "waiting"),
                driver or now.driver,
                sorted(self.parked) if state == "waiting" else [],
            )
        )
        self._records[STATUS_KEY] = encoded
        await self._journal.write(self.id, STATUS_KEY, encoded, replace=True)


class RunStream:
    """A stream a run publishes (`Run.stream`): iterate it for the chunks, or await it for
    the `Completion` (whole text and usage), which `completion` holds once it ended."""

    def __init__(self, items: AsyncIterator[Chunk | Completion]) -> None:
        self._items = items
        self.completion: Completion | None = None

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        async for item in self._items:
            if isinstance(item, Completion):
                self.completion = item
            else:
                yield item

    def __await__(self) -> Generator[Any, None, Completion]:
        return self._drain().__await__()

    async def _drain(self) -> Completion:
        async for _ in self:
            pass
        assert self.completion is not None
        return self.completion


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run as `list_runs` (and ``eventwire runs``) shows it."""

    id: str
    state: str
    """running (or its process died: it resumes when its event comes again), waiting
    (parked on `waiting`), finished, failed (its last try raised), cancelled, or unknown
    (no status recorded)."""
    tries: int
    steps: list[str]
    """Recorded steps, effects and waits (``step:plan``, ``effect:email``,
    ``wait:approval.given``), oldest first."""
    failed: list[str]
    """Steps whose last call raised, with nothing recorded since."""
    error: str | None
    waiting: list[str] = field(default_factory=list)
    """The waits a waiting run is parked on."""

    @property
    def subscription(self) -> str:
        return self.id.rpartition("/")[0]

    @property
    def event_id(self) -> str:
        return self.id.rpartition("/")[2]


async def list_runs(journal: Journal) -> list[RunInfo]:
    """Every run `journal` holds, with its state and steps."""
    found = []
    for listed in await journal.runs(status_key=STATUS_KEY):
        if listed.run.startswith(INTERNAL_PREFIX):
            continue  # the index of waits and timers
        info = _info(listed.run, await journal.read(listed.run))
        if info is not None:
            found.append(info)
    return found


@dataclass(frozen=True, slots=True)
class StepInfo:
    """One recorded step, effect, model call, stream or wait of a run, in run order."""

    key: str
    """``step:plan``, ``effect:email``, ``wait:approval.given``..."""
    group: int
    """The `Run.gather` it ran in (steps sharing one ran concurrently); 0: none."""
    resolved: bool
    """Waits: whether the wait has its outcome (always True for the rest)."""

    @property
    def kind(self) -> str:
        return self.key.partition(":")[0]

    @property
    def name(self) -> str:
        return self.key.partition(":")[2]


async def run_steps(journal: Journal, run: str) -> list[StepInfo]:
    """What `run` recorded, in the order it ran (for drawing it)."""
    records = await journal.read(run)
    steps = sorted(
        ((key, _record_decoder.decode(records[key])) for key in records if _is_step(key)),
        key=lambda item: item[1].seq,
    )
    return [
        StepInfo(
            key,
            record.group,
            not key.startswith(("wait:", "collect:", "sleep:")) or RESOLVED + key in records,
        )
        for key, record in steps
    ]


async def run_info(journal: Journal, run: str) -> RunInfo | None:
    """What `journal` holds of `run` (None: nothing)."""
    return _info(run, await journal.read(run))


def _info(run: str, records: dict[str, bytes]) -> RunInfo | None:
    if not records:
        return None
    steps = sorted(
        (key for key in records if _is_step(key)),
        key=lambda key: _record_decoder.decode(records[key]).seq,
    )
    failed = sorted(
        key.removeprefix("error:")
        for key in records
        if key.startswith("error:") and key.removeprefix("error:") not in records
    )
    status = records.get(STATUS_KEY)
    decoded = None if status is None else _status_decoder.decode(status)
    state = "unknown" if decoded is None else decoded.state
    if CANCELLED_KEY in records and state != "finished":
        state = "cancelled"
    return RunInfo(
        id=run,
        state=state,
        tries=0 if decoded is None else decoded.tries,
        steps=steps,
        failed=failed,
        error=None if decoded is None else decoded.error,
        waiting=[] if decoded is None else list(decoded.waiting),
    )


async def cancel_run(journal: Journal, run: str, reason: str = "cancelled") -> bool:
    """Cancel `run`: it does not run again (a parked run is not resumed; a run in the middle
    of an execution ends that execution, then stops). False if the journal has no such
    run, or it finished already."""
    records = await journal.read(run)
    status = records.get(STATUS_KEY)
    if status is None or _status_decoder.decode(status).state == "finished":
        return False
    record = msgspec.json.encode({"reason": reason, "at": time.time()})
    await journal.write(run, CANCELLED_KEY, record)
    if _status_decoder.decode(status).state != "running":
        ended = msgspec.structs.replace(_status_decoder.decode(status), state="cancelled")
        await journal.write(run, STATUS_KEY, msgspec.json.encode(ended), replace=True)
    return True


async def pending_waits(journal: Journal, run: str) -> dict[str, WaitSpec]:
    """The waits `run` is parked on, by key (``wait:approval.given``), with what each
    waits for."""
    records = await journal.read(run)
    status = records.get(STATUS_KEY)
    if status is None or CANCELLED_KEY in records:
        return {}
    return {
        key: decode_spec(bytes(_record_decoder.decode(records[key]).value))
        for key in _status_decoder.decode(status).waiting
        if key in records and RESOLVED + key not in records
    }


def run_id(subscription: str, event: Event[Any]) -> str:
    """The id of the run of `event` by `subscription`."""
    return f"{subscription}/{event.id}"


def _is_step(key: str) -> bool:
    return key.startswith(("step:", "effect:", "model:", "stream:", "wait:", "collect:", "sleep:"))


async def _close(chunks: AsyncIterator[Any]) -> None:
    """Let go of an async generator that will not be iterated (a replayed stream)."""
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


def _seconds(duration: timedelta | float) -> float:
    if isinstance(duration, timedelta):
        return duration.total_seconds()
    if isinstance(duration, int | float) and not isinstance(duration, bool):
        return float(duration)
    raise TypeError(f"a duration is seconds or a timedelta, got {duration!r}")


def _typed(event: Event[Any], payload_type: Any) -> Event[Any]:
    if payload_type is None:
        return event
    return event.with_payload(_adapter(payload_type).validate_python(event.payload))


def _what(key: str) -> str:
    kind, _, name = key.partition(":")
    return f"{kind} {name!r}"


def _return_type(fn: Callable[..., Any]) -> Any | None:
    """What `fn` says it returns (awaited, for a coroutine function), or None."""
    target: Any = fn
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    target = getattr(target, "__func__", target)  # a bound method: its function
    # Keyed by code, not by function: a lambda made per run is a new function each time,
    # and holding it would hold what it closes over (the run's event) for every run.
    code = getattr(target, "__code__", None)
    if code is None:
        return _read_return_type(target)
    try:
        return _return_types[code]
    except KeyError:
        pass
    returns = _read_return_type(target)
    if len(_return_types) >= _RETURN_TYPES_KEPT:
        _return_types.clear()
    _return_types[code] = returns
    return returns


# a function's code -> its return type (the annotation is read once per function).
_return_types: dict[Any, Any] = {}
_RETURN_TYPES_KEPT = 4096


def _read_return_type(target: Any) -> Any | None:
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        return None
    returns = hints.get("return")
    if returns is None or returns is Any or returns is type(None):
        return None
    if typing.get_origin(returns) in (Coroutine, Awaitable):
        args = typing.get_args(returns)
        returns = args[-1] if args else None
    return returns


_adapters: dict[Any, Any] = {}


def _adapter(returns: Any) -> Any:
    from pydantic import TypeAdapter

    adapter = _adapters.get(returns)
    if adapter is None:
        adapter = _adapters[returns] = TypeAdapter(returns)
    return adapter
