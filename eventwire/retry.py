"""Retry policy for failing handlers."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Retry:
    """How often a failing handler is tried, and how long to wait between tries.

    `attempts` counts every try, the first included: ``Retry(attempts=3)`` calls the handler
    up to three times. The wait before try *n+1* is ``backoff * multiplier**(n-1)``, capped at
    `max_backoff`, then spread by up to ``±jitter`` of itself. Only exceptions that are
    instances of `retry_on` are retried; any other goes straight to the dead-letter queue.
    While a subscription waits to retry an event, its later events wait too, so per-subscription
    order holds; other subscriptions are not affected.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(
                f"Retry(attempts={self.attempts!r}): attempts counts every try including the "
                "first, so it must be an int >= 1"
            )
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(
                f"Retry(backoff={self.backoff!r}, max_backoff={self.max_backoff!r}): "
                "waits must be >= 0 seconds"
            )
        if self.multiplier < 1:
            raise ValueError(f"Retry(multiplier={self.multiplier!r}) must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"Retry(jitter={self.jitter!r}) must be between 0 and 1")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after try number `failed_attempt` (1-based) failed."""
        wait = min(self.backoff * self.multiplier ** (failed_attempt - 1), self.max_backoff)
        if self.jitter:
            wait *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(wait, 0.0)

    def should_retry(self, error: BaseException, failed_attempt: int) -> bool:
        return failed_attempt < self.attempts and isinstance(error, self.retry_on)


NO_RETRY = Retry(attempts=1, backoff=0.0)
