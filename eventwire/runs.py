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
import contextlib
import contextvars
import hashlib
import inspect
import typing
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from eventwire.backends.journal import Journal
from eventwire.envelope import UnencodablePayloadError, encode_payload
from eventwire.errors import EventwireError
from eventwire.event import Event

T = TypeVar("T")

INLINE_BYTES = 2048
"""Results whose JSON form is longer than this are stored as blobs, by content."""

STATUS_KEY = "status"
"""The record holding a run's state (running, finished, failed) and counts."""

# Steps started inside `Run.gather`: new ones may start before recorded ones of the same
# gather were asked for, which is no sign of changed code.
_gathering: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "eventwire_gathering", default=False
)


class JournalMismatchError(EventwireError, RuntimeError):
    """A run's journal holds steps the handler's code no longer asks for: it was recorded by
    another version of the code, and replaying it would mix two versions' results."""


class UnencodableResultError(EventwireError, TypeError):
    """A step returned something that cannot be stored in its JSON form."""


class _Record(msgspec.Struct, omit_defaults=True):
    seq: int
    value: msgspec.Raw = msgspec.Raw(b"null")
    blob: str | None = None


class _Failure(msgspec.Struct):
    type: str
    message: str


class _Status(msgspec.Struct, omit_defaults=True):
    state: str
    tries: int
    error: str | None = None


_record_decoder = msgspec.json.Decoder(_Record)
_status_decoder = msgspec.json.Decoder(_Status)


class Run:
    """What a durable handler journals through: steps, effects and their joins.

    Made by the bus for each delivery of an event to a ``durable=True`` subscription; the
    handler gets it as its second argument.
    """

    def __init__(self, run_id: str, event: Event[Any], journal: Journal) -> None:
        self.id = run_id
        self.event = event
        self._journal = journal
        self._records: dict[str, bytes] = {}
        # Recorded steps and effects this execution has not asked for yet.
        self._unasked: set[str] = set()
        self._names: Counter[str] = Counter()
        self._effects: set[str] = set()
        self._next_seq = 0
        self.calls = 0
        """Steps and effects whose function this execution called."""
        self.replays = 0
        """Steps and effects this execution took from the journal."""

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
    def tries(self) -> int:
        """How many times the handler began this run, this one included once it began."""
        status = self._records.get(STATUS_KEY)
        return 0 if status is None else _status_decoder.decode(status).tries

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` (awaited if it is a coroutine), once per run: its result
        is recorded, and returned from the journal when the run runs again. A name used
        again in one run is numbered (``name#2``, ...), so steps in a loop need no names
        of their own. A step that raised is recorded as failed and runs again next time."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a step needs a non-empty str name, got {name!r}")
        self._names[name] += 1
        count = self._names[name]
        key = f"step:{name}" if count == 1 else f"step:{name}#{count}"
        return await self._journaled(key, fn, args, kwargs)

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
        token = _gathering.set(True)
        try:
            tasks = [asyncio.ensure_future(step) for step in steps]
        finally:
            _gathering.reset(token)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return typing.cast(list[T], results)

    # -- the journal -------------------------------------------------------------------

    async def _journaled(
        self, key: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        returns = _return_type(fn)
        record = self._records.get(key)
        if record is not None:
            self._unasked.discard(key)
            self.replays += 1
            return await self._value(record, returns, key)
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
        return await self._value(stored, returns, key)

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
            return msgspec.json.encode(_Record(seq, msgspec.Raw(value)))
        digest = hashlib.sha256(value).hexdigest()
        await self._journal.put_blob(digest, value)
        return msgspec.json.encode(_Record(seq, blob=digest))

    async def _value(self, record: bytes, returns: Any, key: str) -> Any:
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

    async def mark(self, state: str, error: BaseException | None = None) -> None:
        """Record the run's state (the bus does): running (one more try), finished, failed."""
        message = None if error is None else f"{type(error).__qualname__}: {error}"
        tries = self.tries + (state == "running")
        encoded = msgspec.json.encode(_Status(state, tries, message))
        self._records[STATUS_KEY] = encoded
        await self._journal.write(self.id, STATUS_KEY, encoded, replace=True)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run as `list_runs` (and ``eventwire runs``) shows it."""

    id: str
    state: str
    """running (or parked, or its process died: it resumes when its event comes again),
    finished, failed (its last try raised), or unknown (no status recorded)."""
    tries: int
    steps: list[str]
    """Recorded steps and effects (``step:plan``, ``effect:email``), oldest first."""
    failed: list[str]
    """Steps whose last call raised, with nothing recorded since."""
    error: str | None

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
        records = await journal.read(listed.run)
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
        found.append(
            RunInfo(
                id=listed.run,
                state="unknown" if decoded is None else decoded.state,
                tries=0 if decoded is None else decoded.tries,
                steps=steps,
                failed=failed,
                error=None if decoded is None else decoded.error,
            )
        )
    return found


def run_id(subscription: str, event: Event[Any]) -> str:
    """The id of the run of `event` by `subscription`."""
    return f"{subscription}/{event.id}"


def _is_step(key: str) -> bool:
    return key.startswith(("step:", "effect:"))


def _what(key: str) -> str:
    kind, _, name = key.partition(":")
    return f"{kind} {name!r}"


def _return_type(fn: Callable[..., Any]) -> Any | None:
    """What `fn` says it returns (awaited, for a coroutine function), or None."""
    target: Any = fn
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    target = getattr(target, "__func__", target)  # a bound method: its function
    try:
        return _return_types[target]
    except (KeyError, TypeError):  # TypeError: not hashable
        pass
    returns = _read_return_type(target)
    with contextlib.suppress(TypeError):
        if len(_return_types) >= _RETURN_TYPES_KEPT:
            _return_types.clear()
        _return_types[target] = returns
    return returns


# function -> its return type (the annotation is read once per function).
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
