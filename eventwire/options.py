"""A subscription's options, validated once: `EventBus.subscribe` and ``@on`` both build a
`SubscriptionOptions`, and everything below them reads it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypedDict, Unpack

from eventwire.errors import InvalidTopicError
from eventwire.foreign import DecoderOption, decoder_of
from eventwire.inbox import OVERFLOW_POLICIES, Overflow
from eventwire.retry import NO_RETRY, Retry
from eventwire.topics import validate_pattern

DEFAULT_MAX_PENDING = 10_000
# Times a durable subscription starts handling an event again after it came back unfinished
# (its process died or lost the lease) before dead-lettering it as a poison event.
DEFAULT_MAX_RESTARTS = 5
# Most partitions a subscription's keyed events can be spread over (`partitions=`).
MAX_PARTITIONS = 1024

Start = Literal["latest", "earliest"] | datetime
"""Where a new durable subscription begins: new events only, everything the broker holds,
or events from a (timezone-aware) time on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionOptions:
    """How a subscription behaves; see `EventBus.subscribe` for each option.

    `name` None means the handler's ``module.qualname``, made unique on the bus.
    """

    name: str | None = None
    group: str | None = None
    concurrency: int = 1
    retry: Retry = NO_RETRY
    timeout: float | None = None
    max_pending: int = DEFAULT_MAX_PENDING
    overflow: Overflow = "block"
    start: Start = "latest"
    idempotent: bool = False
    max_restarts: int | None = DEFAULT_MAX_RESTARTS
    publishes: tuple[str, ...] = ()
    durable: bool = False
    waits: tuple[str, ...] = ()
    partitions: int | None = None
    decoder: DecoderOption | None = None

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        if self.group is not None and (not isinstance(self.group, str) or not self.group):
            raise ValueError(f"group must be a non-empty str or None, got {self.group!r}")
        if not _is_int(self.concurrency) or self.concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {self.concurrency!r}")
        if not _is_int(self.max_pending) or self.max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {self.max_pending!r}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(
                f"overflow must be one of {', '.join(map(repr, OVERFLOW_POLICIES))}, "
                f"got {self.overflow!r}"
            )
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {self.timeout!r}")
        if not isinstance(self.retry, Retry):
            raise TypeError(f"retry must be a Retry(...), got {type(self.retry).__name__}")
        if isinstance(self.start, datetime):
            if self.start.tzinfo is None:
                raise ValueError(
                    "start= datetime must be timezone-aware, e.g. datetime.now(timezone.utc)"
                )
        elif self.start not in ("latest", "earliest"):
            raise ValueError(
                f"start must be 'latest', 'earliest' or a datetime, got {self.start!r}"
            )
        if self.max_restarts is not None and (
            not _is_int(self.max_restarts) or self.max_restarts < 1
        ):
            raise ValueError(
                f"max_restarts must be an int >= 1 or None (no limit), got {self.max_restarts!r}"
            )
        if not isinstance(self.durable, bool):
            raise TypeError(f"durable must be True or False, got {self.durable!r}")
        object.__setattr__(self, "idempotent", bool(self.idempotent))
        object.__setattr__(self, "publishes", _check_patterns(self.publishes, "publishes"))
        object.__setattr__(self, "waits", _check_patterns(self.waits, "waits"))
        decoder_of(self.decoder)  # a bad decoder= is refused here, naming the forms
        if self.partitions is not None and (
            not _is_int(self.partitions) or not 1 <= self.partitions <= MAX_PARTITIONS
        ):
            raise ValueError(
                f"partitions must be an int from 1 to {MAX_PARTITIONS} (how many processes "
                f"can work on keyed events at once) or None, got {self.partitions!r}"
            )
        if self.waits and not self.durable:
            raise ValueError(
                "waits= declares what a durable run waits for: it needs durable=True too"
            )

    @classmethod
    def of(cls, **options: Unpack[SubscriptionKeywords]) -> SubscriptionOptions:
        """Options from the keyword arguments of `subscribe` and ``@on`` (``retry=None``
        meaning no retry)."""
        given: dict[str, Any] = dict(options)
        if given.get("retry") is None:
            given["retry"] = NO_RETRY
        return cls(**given)


class SubscriptionKeywords(TypedDict, total=False):
    """The keyword arguments of `EventBus.subscribe` and ``@on`` (see `subscribe`)."""

    name: str | None
    group: str | None
    concurrency: int
    retry: Retry | None
    timeout: float | None
    max_pending: int
    overflow: Overflow
    start: Start
    idempotent: bool
    max_restarts: int | None
    publishes: Sequence[str]
    durable: bool
    waits: Sequence[str]
    partitions: int | None
    decoder: DecoderOption | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_patterns(patterns: Any, option: str) -> tuple[str, ...]:
    example = "['research.complete']" if option == "publishes" else "['approval.given']"
    if isinstance(patterns, str) or not isinstance(patterns, Sequence | set | frozenset):
        raise TypeError(
            f"{option}= takes a list of topics, e.g. {option}={example}, got {patterns!r}"
        )
    for topic in patterns:
        if not isinstance(topic, str):
            raise TypeError(f"{option}= holds {topic!r}, which is not a topic str")
        try:
            validate_pattern(topic)
        except InvalidTopicError as error:
            raise InvalidTopicError(f"{option}= {error}") from None
    return tuple(dict.fromkeys(patterns))
