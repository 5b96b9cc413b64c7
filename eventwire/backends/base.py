"""The one interface every backend implements, and what the broker backends share.

`Backend` is what the bus talks to, whichever backend it has: it takes published events and
fills subscriptions' inboxes with them. The in-process ``memory://`` backend does both at once
(a publish appends the event to the matching inboxes, by reference). Broker backends derive
from `eventwire.backends.broker.BrokerBackend`, which implements `Backend` once on top of a
small bytes-level interface each broker module provides: store encoded envelopes durably
(`publish`), and hand each durable consumer's messages to one of the processes running it,
with acknowledgement and redelivery (`Consumer`). Everything else (topic rules, inboxes,
workers, retry with backoff, dead letters, typed payloads, causation ids) stays above, written
once, so that every backend keeps the same contract.
"""

from __future__ import annotations

import abc
import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from eventwire.backends.journal import Journal
from eventwire.backends.url import BusURL
from eventwire.errors import EventwireError
from eventwire.foreign import ForeignMessage
from eventwire.observe import Transport
from eventwire.options import Start as Start  # re-exported: backends and tools use it
from eventwire.topics import safe_name as safe_name  # re-exported: backends use it

if TYPE_CHECKING:
    from eventwire.deadletter import DeadLetters
    from eventwire.drain import DrainTracker
    from eventwire.event import Event
    from eventwire.observe import Observer
    from eventwire.subscription import Subscription


DEFAULT_NAMESPACE = "eventwire"
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class BackendConnectionError(EventwireError, ConnectionError):
    """The broker could not be reached, or refused the connection. The message names the URL
    (never its password)."""


class BrokerFullError(EventwireError, OSError):
    """The broker could not store an event for want of space (a full disk). What the failed
    call tried to store was not stored; what was stored before stays, and once space is freed
    publishing works again."""


class ReplicationError(EventwireError):
    """The broker stored an event but fewer of its replicas than asked (``min_replicas=``)
    confirmed it in time: it may be lost if the primary fails before they have it. Publishing
    it again is safe with deduplication on."""


class SubscriptionConflictError(EventwireError, ValueError):
    """A durable consumer exists on the broker under this name as something else: with
    another pattern, or as a group where a subscription's own name is wanted (or the reverse;
    `existing_group` says which, None if not recorded)."""

    def __init__(
        self,
        name: str,
        existing: str,
        wanted: str,
        url: BusURL,
        *,
        existing_group: bool | None = None,
    ) -> None:
        delete = f"`eventwire subscriptions delete {name} --url '{url.redacted}'`"
        if existing != wanted or existing_group is None:
            message = (
                f"durable subscription {name!r} already exists on {url.redacted} with pattern "
                f"{existing!r}, not {wanted!r}: give this one another name, or delete the old "
                f"one and its backlog with {delete}"
            )
        elif existing_group:
            message = (
                f"{name!r} is a group on {url.redacted} (subscriptions with group={name!r} "
                f"consume it), so no subscription there can be named {name!r} without a "
                f"group: give it another name, or delete the group and its backlog with {delete}"
            )
        else:
            message = (
                f"{name!r} is the name of a subscription on {url.redacted}, so it cannot be a "
                f"group there too (they would share its events): give the group another name, "
                f"or delete the subscription and its backlog with {delete}"
            )
        super().__init__(message)
        self.name = name
        self.existing = existing
        self.wanted = wanted
        self.existing_group = existing_group


def check_consumer(spec: ConsumerSpec, url: BusURL, pattern: str, group: bool | None) -> None:
    """Raise `SubscriptionConflictError` unless the durable consumer a broker holds under
    `spec.name` (with `pattern`, made for a group or not; None: not recorded, as by
    eventwire 0.1) is the one `spec` asks for."""
    if pattern != spec.pattern or group not in (None, spec.group):
        raise SubscriptionConflictError(spec.name, pattern, spec.pattern, url, existing_group=group)


class BackendCapabilityError(EventwireError, NotImplementedError):
    """A subscription asked for something its backend's broker cannot do (see the capability
    table in the README)."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend guarantees beyond the common contract. The README's table is built
    from these, and the conformance suite checks each one against the real broker."""

    durable: bool
    """Published events survive a restart of the process (and of the broker)."""
    replay: bool
    """``start="earliest"`` or ``start=<datetime>`` replays history the broker still holds."""
    key_order_across_processes: bool
    """Same-key events stay in order, one at a time, across every process of a subscription
    (within one process, the bus guarantees it on every backend)."""
    idempotent: bool
    """``idempotent=True`` can record handled event ids in the broker."""
    cross_process_drain: bool
    """`drain()` also waits for work that other processes are doing."""


# Names of consumers opened by eventwire's tools (dead letters, stats, history readers).
TOOLING_PREFIX = "_eventwire."
# The durable consumer that keeps every dead letter of a namespace until `eventwire dlq`
# retries or purges it. Nothing in the bus fetches from it.
DLQ_CONSUMER = "_eventwire.dlq"
# Patterns of per-process consumers (replies, stats requests), which drain() does not wait for.
PROCESS_PATTERNS = ("_bus.reply.", "_bus.stats.")


# -- rules every broker backend keeps -----------------------------------------------------
# Each is written once here; the broker modules apply it with their broker's own means (a
# TTL, a trimmed sorted set, a DELETE, a queue argument).

HANDLED_KEPT = 7 * 86_400.0
"""Seconds an event id acknowledged as handled (``idempotent=True``) is kept at least: the
same event delivered or published again within that time is skipped. Brokers that expire
records (Redis, NATS) forget it afterwards."""

PRESENCE_KEPT = 7 * 86_400.0
"""Seconds the presence record of a process that stopped running a durable consumer is kept:
it is the "last active" of ``eventwire subscriptions`` until then."""

EPHEMERAL_KEPT = 60.0
"""Seconds after which the broker removes a request-reply inbox (an ephemeral consumer)
that nothing fetched from: one left behind by a dead process does not hold messages that
`drain()` in other processes would wait for."""

OPERATION_RETRY_DEADLINE = 10.0
"""Seconds that ack, nak, extend, handled and administration calls retry through lost
connections before raising `BackendConnectionError`: long enough to ride out a broker
restart, well within a delivery's default ``ack_wait`` (30 s), so a lease held meanwhile
is not lost. Publish and fetch retry until cancelled or their own deadline instead."""

RETRY_FIRST_PAUSE = 0.05
RETRY_LONGEST_PAUSE = 2.0
"""The `Backoff` of broker modules' retries: the first pause (seconds) after a failure, and
the longest it doubles to while failures go on."""


class Backoff:
    """Pauses between attempts at something that keeps failing: doubling from `first` up
    to `longest`, and back to `first` after a success. With `jitter`, each pause is drawn
    between half and all of its length, so that processes cut off together do not all
    retry at the same instant."""

    __slots__ = ("first", "jitter", "longest", "pause")

    def __init__(self, first: float = 0.1, longest: float = 5.0, *, jitter: bool = False) -> None:
        self.first = first
        self.longest = longest
        self.jitter = jitter
        self.pause = first

    async def wait(self, limit: float | None = None) -> None:
        """Sleep for the current pause (at most `limit` seconds, when given: a deadline's
        remaining time), and double it for next time."""
        pause = self.pause
        self.pause = min(pause * 2, self.longest)
        if self.jitter:
            pause *= random.uniform(0.5, 1.0)
        if limit is not None:
            pause = max(0.0, min(pause, limit))
        await asyncio.sleep(pause)

    def reset(self) -> None:
        """A success: the next failure pauses `first` again."""
        self.pause = self.first

    def after(self, failures: int) -> float:
        """The pause after `failures` failures in a row (for a client library's own
        reconnect hook, which asks for a delay rather than sleeping)."""
        pause = min(self.longest, self.first * 2.0 ** min(max(failures, 0), 32))
        return pause * random.uniform(0.5, 1.0) if self.jitter else pause


def retry_backoff() -> Backoff:
    """The backoff of a broker module retrying through lost connections: from
    `RETRY_FIRST_PAUSE` to `RETRY_LONGEST_PAUSE`, with jitter."""
    return Backoff(RETRY_FIRST_PAUSE, RETRY_LONGEST_PAUSE, jitter=True)


@dataclass(frozen=True, slots=True)
class Message:
    """One envelope to store. `body` is the encoded envelope (`eventwire.envelope.encode`);
    `id`, `topic`, `key` repeat envelope fields so the broker can route, deduplicate and put
    them in headers without decoding the body."""

    id: str
    topic: str
    key: str | None
    body: bytes
    headers: Mapping[str, str] | None = None
    """Written beside the body where the broker has headers, for other systems to read
    (`BrokerBackend.message_of`): the body's content type and the W3C trace context."""


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A durable consumer: what the bus asks a backend to deliver.

    `name` is the durable identity (the subscription's group, else its name). Every process
    that opens a consumer with the same name competes for its messages: each message goes to
    one of them. A consumer that exists already resumes where it stopped, whatever `start` says.
    """

    name: str
    pattern: str
    start: Start = "latest"
    # An unacknowledged delivery goes back to the consumer's other processes (or to this one
    # after a restart) once it has been held this long without `extend`.
    ack_wait: float = 30.0
    # Request-reply inboxes: removed with every message they hold when the consumer closes.
    ephemeral: bool = False
    # The consumer of a group (its members compete for its messages), not one subscription's
    # own: brokers record which, so that a name is never both across processes.
    group: bool = False
    # Keyed events go through this many partitions, each consumed by one process at a time
    # (`eventwire.backends.partitions`); 0: not partitioned.
    partitions: int = 0
    # One process at a time consumes it; whoever takes it over gets first what the previous
    # one did not acknowledge, oldest first (`Consumer.take_over`).
    exclusive: bool = False


@dataclass(slots=True)
class Delivery:
    """One message handed to a consumer. `body` may be anything another producer wrote (the
    bus dead-letters what does not decode); `attempt` is 1 on the first delivery and grows
    with every redelivery; `handle` is the backend's own (stream id, message, tag, ...)."""

    topic: str
    body: bytes
    attempt: int
    handle: Any = field(default=None, repr=False)
    age: float = 0.0
    """Seconds its lease had already run when the fetch returned it: a backend that takes
    deliveries ahead of fetches (a standing pull, a prefetch) and buffers them says how long
    one waited, so that the bus does not count its lease as fresher than it is."""


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """A durable consumer as the broker sees it (for drain and request across processes)."""

    name: str
    pattern: str
    outstanding: int
    """Messages matching it that are not acknowledged yet: waiting or being handled."""
    exact: bool = True
    """False when `outstanding` is only an upper bound (never 0 while messages wait): the
    broker could not count them all in one go; asking again counts further."""
    processes: int | None = None
    """Processes consuming it now (0: none, its backlog waits for one); None: not known."""
    last_active: float | None = None
    """When a process last showed it consumed it (Unix time), if known."""
    arriving: bool = False
    """The broker may be handing this process deliveries not counted anywhere yet (an ack
    just made room for them): drain() looks again rather than trusting `outstanding`."""

    @property
    def live(self) -> bool:
        """Some process consumes it now (or that is not known): drain() and request() wait
        for it. One nobody consumes keeps its backlog for the next process to run it."""
        return self.processes is None or self.processes > 0


class Consumer(abc.ABC):
    """A durable consumer opened by one process."""

    acks_with_fetch: ClassVar[bool] = True
    """Whether a fetch may carry pending acknowledgements (`ack_and_fetch`). False where an
    acknowledgement takes long enough (a disk sync) that a fetch must not wait for it."""

    @abc.abstractmethod
    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        """Up to `limit` deliveries, oldest first; waits up to `wait` seconds for the first
        one and returns ``[]`` if none came. Retries through lost connections."""

    @abc.abstractmethod
    async def ack(self, deliveries: Sequence[Delivery], *, handled_ids: Sequence[str] = ()) -> None:
        """Finish deliveries (handled, dead-lettered or skipped): they are never delivered
        again. `handled_ids` are recorded for idempotent subscriptions (see `handled`)."""

    async def ack_and_fetch(
        self, acks: Sequence[Delivery], limit: int, wait: float
    ) -> list[Delivery]:
        """`ack` then `fetch`, in one round trip where the broker allows it. If it raises,
        the acknowledgements may or may not have been made (making them again is harmless)."""
        if acks:
            await self.ack(acks)
        return await self.fetch(limit, wait)

    async def take_over(self) -> None:
        """An exclusive consumer (`ConsumerSpec.exclusive`) this process just took: make
        what the broker still holds for the process that had it before (unacknowledged,
        given back) come first, oldest first, before anything newer. Brokers that keep that
        order themselves need nothing here."""
        return

    async def stop_fetching(self) -> None:
        """No fetch follows until the next `fetch`: end what stands at the broker on this
        consumer's behalf (a waiting pull request) and give back what it brought that no
        fetch took, so that nothing more comes to this process. Most brokers hold nothing
        between fetches: nothing to do."""
        return

    def foreign(self, delivery: Delivery) -> ForeignMessage:
        """`delivery` as another producer sent it, for a body that is not an eventwire
        envelope: with its headers and the broker's id for the message, where the broker
        has them."""
        return ForeignMessage(delivery.topic, delivery.body)

    @abc.abstractmethod
    async def nak(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Give a delivery back, to be delivered again (to any process) after `delay`
        seconds."""

    @abc.abstractmethod
    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        """Still working on these: restart their `ack_wait` clock."""

    async def handled(self, event_ids: Sequence[str]) -> set[str]:
        """Which of `event_ids` were acknowledged with ``handled_ids`` before."""
        raise BackendCapabilityError("this backend cannot record handled event ids")

    async def restarted(self, delivery: Delivery) -> int:
        """Record, before its handler runs again, that handling of `delivery` (one that came
        back: ``attempt > 1``) starts again; return the restarts recorded for its message,
        this one included. Brokers keep the count beside the handled ids, per message, until
        the message is acknowledged: it outlives the processes a poison event kills."""
        raise BackendCapabilityError("this backend cannot count restarts")

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop fetching. Deliveries not acknowledged go back to the broker."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BusServices:
    """What a backend uses of the bus it serves, handed to it by `Backend.bind`."""

    tracker: DrainTracker
    """Where every event queued in this process is counted until handled (drain)."""
    dead_letters: DeadLetters
    observers: list[Observer]
    """The bus's observers (the live list)."""
    publish_timeout: float | None
    redeliver_after: float
    max_event_bytes: int | None
    """Largest encoded event a broker backend sends (None: no limit)."""
    track: Callable[[asyncio.Task[Any]], None]
    """Keeps a background task alive until done, and logs it if it fails."""


class Backend(abc.ABC):
    """Moves events from publishers to subscriptions' inboxes; one subclass per transport.

    The bus calls, in this order: `bind`, `attach` for each subscription made before start,
    `start`; then `send`/`send_many`, `attach`/`detach`/`give_back`/`release` as
    subscriptions come and go, `receivers` (requests), `flush` and `outstanding` (drain);
    and at close `stop_fetching`, then `stop`. Tools that only read or administer a broker
    call `connect`, `consumers`, `delete_consumer`, `destroy` and `close` alone.
    """

    scheme: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    messaging_system: ClassVar[str] = "eventwire"
    """The ``messaging.system`` of its telemetry: the broker's name, as OpenTelemetry's
    messaging conventions write it."""
    default_port: ClassVar[int | None] = None

    def __init__(self, url: BusURL) -> None:
        self.url = url
        self.namespace = namespace_of(url)
        self._services: BusServices | None = None

    @property
    def transport(self) -> Transport:
        """Where its events travel, for telemetry (`eventwire.observe.Observer.attached`)."""
        if self.default_port is None:
            return Transport(self.messaging_system)
        host = self.url.host or "127.0.0.1"
        return Transport(self.messaging_system, host, self.url.port or self.default_port)

    @property
    def services(self) -> BusServices:
        if self._services is None:
            raise RuntimeError(f"this {self.scheme}:// backend serves no bus (bind it first)")
        return self._services

    def bind(self, services: BusServices) -> None:
        """Serve the bus whose `services` these are. A backend serves one bus."""
        if self._services is not None and self._services is not services:
            raise ValueError(
                f"this {self.scheme}:// backend already serves another EventBus; "
                "give each bus a backend of its own"
            )
        self._services = services

    def journal(self) -> Journal:
        """Where durable handlers' runs keep their steps (`eventwire.runs`), in this
        backend's own store; the same object on every call."""
        raise BackendCapabilityError(
            f"{self.scheme}:// keeps no run journal: durable=True handlers run on "
            "memory://, sqlite://, redis://, nats:// and amqp://...?journal=<url>"
        )

    # -- connection ---------------------------------------------------------------------

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect, creating what the namespace needs; raise `BackendConnectionError`
        naming ``self.url.redacted`` when the broker cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect. Idempotent."""

    async def start(self) -> None:
        """The bus starts: connect, and begin feeding the subscriptions attached so far."""
        await self.connect()

    async def stop_fetching(self) -> None:  # noqa: B027 (a hook: nothing to do by default)
        """The bus is closing: take no new events for this process's subscriptions."""

    async def stop(self) -> None:
        """The bus closed: acknowledge what was handled, give back what was not, close."""
        await self.close()

    # -- events -------------------------------------------------------------------------

    @abc.abstractmethod
    def send(self, event: Event[Any], cause: Event[Any] | None) -> int | Awaitable[Any]:
        """Publish `event` (`cause` is the event being handled, if any). Returns the number
        of deliveries made at once, or an awaitable to wait for before the publish returns
        (room in a full inbox, the broker's confirmation). Raises at once for an event that
        can never be sent."""

    async def send_many(self, events: Sequence[Event[Any]], cause: Event[Any] | None) -> None:
        """Publish `events` in order."""
        for event in events:
            sent = self.send(event, cause)
            if type(sent) is not int:
                await sent  # type: ignore[misc]

    async def flush(self) -> None:  # noqa: B027 (a hook: nothing to do by default)
        """Return once what was sent so far has left this process."""

    # -- subscriptions ------------------------------------------------------------------

    @abc.abstractmethod
    def attach(self, subscription: Subscription) -> Awaitable[None] | None:
        """Deliver matching events to `subscription` from now on. Returns an awaitable when
        something must be created first on a running bus (a durable consumer): the bus waits
        for it before its next publish and before starting the subscription's workers."""

    @abc.abstractmethod
    async def detach(self, subscription: Subscription) -> None:
        """Deliver nothing more to `subscription` (unsubscribed); what it holds stays."""

    @abc.abstractmethod
    def give_back(self, subscription: Subscription, events: Sequence[Event[Any]]) -> None:
        """`subscription` was unsubscribed without draining: these queued events will not be
        handled here (dropped in process; left for redelivery by a broker)."""

    async def release(self, subscription: Subscription, *, forget: bool) -> None:  # noqa: B027 (a hook: nothing to do by default)
        """`subscription`'s workers ended: let go of what it held; `forget` also removes its
        durable state (and backlog) from the broker."""

    @abc.abstractmethod
    async def receivers(self, topic: str) -> list[str]:
        """The subscriptions (a group once, by its name) that an event on `topic` reaches
        now, in any process: who is expected to answer a request."""

    @abc.abstractmethod
    async def outstanding(self) -> list[str]:
        """What is still owed to subscriptions beyond what this process counts, as text for
        messages (``"name (12)"``): empty once every process's subscriptions are idle."""

    # -- administration -----------------------------------------------------------------

    @abc.abstractmethod
    async def consumers(self) -> list[ConsumerInfo]:
        """Every durable consumer of the namespace, with its outstanding count."""

    async def subscriptions(self) -> list[ConsumerInfo]:
        """Every subscription of the namespace, with its backlog, the processes running it
        and when one was last heard from (``eventwire subscriptions``)."""
        return await self.consumers()

    @abc.abstractmethod
    async def delete_consumer(self, name: str) -> None:
        """Remove a durable consumer and what it still holds. No error if there is none."""

    async def keeps_history(self) -> bool:
        """Whether tools can read back what was published (`eventwire.history`: trace,
        replay, topology); asked once connected. Brokers that replay always can; others may
        keep a log when configured to (``amqp://...?history=7d``)."""
        return self.capabilities.replay

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Remove everything this namespace stored (tests, `eventwire` admin)."""


def is_tooling(info: ConsumerInfo) -> bool:
    """A consumer of the bus's own machinery or tools (replies, stats, the dead-letter store,
    history readers), which no application handler stands behind: drain() and request()
    ignore it."""
    return info.name.startswith(TOOLING_PREFIX) or info.pattern.startswith(PROCESS_PATTERNS)


def namespace_of(url: BusURL) -> str:
    """The ``?namespace=`` of a bus URL: apps with different namespaces share a broker
    without seeing each other's events."""
    namespace = url.query.get("namespace", DEFAULT_NAMESPACE)
    if not _NAMESPACE.fullmatch(namespace):
        raise ValueError(
            f"namespace {namespace!r} in {url.redacted!r} must be 1 to 64 of A-Z a-z 0-9 _ -"
        )
    return namespace
