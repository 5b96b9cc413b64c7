"""The one interface every broker backend implements.

A backend only moves bytes: it stores published envelopes durably and hands each durable
consumer's messages to one of the processes running it, with acknowledgement and redelivery.
Everything else (topic rules, inboxes, workers, retry with backoff, dead letters, typed
payloads, causation ids) stays in the bus, written once, so that every backend keeps the same
contract. The in-process ``memory://`` bus needs no backend at all: its publish appends straight
to the subscribers' inboxes.
"""

from __future__ import annotations

import abc
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal

from eventwire.backends import BusURL
from eventwire.errors import EventwireError

Start = Literal["latest", "earliest"] | datetime

DEFAULT_NAMESPACE = "eventwire"
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class BackendConnectionError(EventwireError, ConnectionError):
    """The broker could not be reached, or refused the connection. The message names the URL
    (never its password)."""


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


# The in-process bus: nothing outlives the process, and there is only one process.
MEMORY_CAPABILITIES = Capabilities(
    durable=False,
    replay=False,
    key_order_across_processes=False,
    idempotent=True,  # trivially: nothing is ever delivered twice
    cross_process_drain=False,
)


@dataclass(frozen=True, slots=True)
class Message:
    """One envelope to store. `body` is the encoded envelope (`eventwire.envelope.encode`);
    `id`, `topic`, `key` repeat envelope fields so the broker can route, deduplicate and put
    them in headers without decoding the body."""

    id: str
    topic: str
    key: str | None
    body: bytes


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


@dataclass(slots=True)
class Delivery:
    """One message handed to a consumer. `body` may be anything another producer wrote (the
    bus dead-letters what does not decode); `attempt` is 1 on the first delivery and grows
    with every redelivery; `handle` is the backend's own (stream id, message, tag, ...)."""

    topic: str
    body: bytes
    attempt: int
    handle: Any = field(default=None, repr=False)


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


class Consumer(abc.ABC):
    """A durable consumer opened by one process."""

    @abc.abstractmethod
    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        """Up to `limit` deliveries, oldest first; waits up to `wait` seconds for the first
        one and returns ``[]`` if none came. Retries through lost connections."""

    @abc.abstractmethod
    async def ack(self, deliveries: Sequence[Delivery], *, handled_ids: Sequence[str] = ()) -> None:
        """Finish deliveries (handled, dead-lettered or skipped): they are never delivered
        again. `handled_ids` are recorded for idempotent subscriptions (see `handled`)."""

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

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop fetching. Deliveries not acknowledged go back to the broker."""


class Backend(abc.ABC):
    """Stores envelopes and delivers them to durable consumers; one subclass per broker."""

    scheme: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, url: BusURL) -> None:
        self.url = url
        self.namespace = namespace_of(url)

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect, creating what the namespace needs; raise `BackendConnectionError`
        naming ``self.url.redacted`` when the broker cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect. Idempotent."""

    @abc.abstractmethod
    async def publish(self, messages: Sequence[Message]) -> None:
        """Return once every message is stored by the broker (commit, XADD reply, PubAck,
        publisher confirm). Retries through lost connections until cancelled (the bus bounds
        it with its `publish_timeout`)."""

    @abc.abstractmethod
    async def consumer(self, spec: ConsumerSpec) -> Consumer:
        """Open (creating if new) the durable consumer `spec.name`. Raise `ValueError` if
        it exists with another pattern; raise `BackendCapabilityError` for a `start` the
        broker cannot replay from."""

    @abc.abstractmethod
    async def consumers(self) -> list[ConsumerInfo]:
        """Every durable consumer of the namespace, with its outstanding count."""

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
        """Remove everything this namespace stored on the broker (tests, `eventwire` admin)."""


def namespace_of(url: BusURL) -> str:
    """The ``?namespace=`` of a bus URL: apps with different namespaces share a broker
    without seeing each other's events."""
    namespace = url.query.get("namespace", DEFAULT_NAMESPACE)
    if not _NAMESPACE.fullmatch(namespace):
        raise ValueError(
            f"namespace {namespace!r} in {url.redacted!r} must be 1 to 64 of A-Z a-z 0-9 _ -"
        )
    return namespace


def safe_name(name: str, *, allowed: str = r"A-Za-z0-9_-", limit: int = 200) -> str:
    """A broker-safe identifier for a subscription name (which may hold dots, ``#``, ``<>``):
    disallowed characters become ``_``, and a crc32 of the original keeps distinct names
    distinct."""
    cleaned = re.sub(f"[^{allowed}]", "_", name)[: limit - 9]
    return f"{cleaned}_{zlib.crc32(name.encode()):08x}"
