"""Dead-lettering: what happens to an event its subscription gave up on.

The event is published again on ``_dlq.<topic>`` with the reason in its metadata (error,
error type, subscription, group, attempts), and a ``_bus.error`` notice is published for
monitors. A message on a broker that is not an eventwire envelope at all is dead-lettered
the same way, its raw body kept in the payload.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from eventwire.event import Event
from eventwire.observe import SubscriptionInfo
from eventwire.topics import is_reserved, is_topic

logger = logging.getLogger("eventwire")

DLQ_PREFIX = "_dlq."
# Where every dead letter of a namespace is kept on a broker (`eventwire dlq`).
DLQ_PATTERN = "_dlq.>"

Publish = Callable[..., Awaitable[Any]]


class DeadLetters:
    """Publishes dead letters through `publish` (the bus's own publish)."""

    def __init__(self, publish: Publish) -> None:
        self._publish = publish

    async def dead_letter(
        self, subscription: SubscriptionInfo, event: Event[Any], error: BaseException, attempts: int
    ) -> bool:
        """Publish the dead letter of `event` and a `_bus.error` notice; False if they could
        not be stored (the event must then be tried again later, not acknowledged)."""
        description = f"{type(error).__name__}: {error}"
        logger.error(
            "eventwire: %s gave up on %s %s after %d attempt(s): %s",
            subscription.name,
            event.topic,
            event.id,
            attempts,
            description,
            exc_info=None if attempts == 0 else (type(error), error, error.__traceback__),
        )
        details: dict[str, Any] = {
            "error": description,
            "error_type": type(error).__name__,
            "subscription": subscription.name,
            "attempts": attempts,
        }
        if subscription.group is not None:
            details["group"] = subscription.group
        topic = event.topic
        letter = None if topic.startswith(DLQ_PREFIX) else (f"{DLQ_PREFIX}{topic}", event)
        return await self._store(subscription, event.id, topic, letter, details)

    async def foreign(
        self, subscription: SubscriptionInfo, topic: str, body: bytes, why: str
    ) -> bool:
        """A message on `topic` that is not a valid envelope: to the DLQ with the reason."""
        dlq_topic, payload = foreign_letter(topic, body, why)
        logger.error(
            "eventwire: %s received a message on %r that is not an eventwire envelope (%s); "
            "sending it to %s",
            subscription.name,
            topic,
            why,
            dlq_topic,
        )
        details = {
            "error": f"EnvelopeError: {why}",
            "error_type": "EnvelopeError",
            "subscription": subscription.name,
            "attempts": 0,
        }
        return await self._store(subscription, None, topic, (dlq_topic, payload), details)

    async def _store(
        self,
        subscription: SubscriptionInfo,
        event_id: str | None,
        topic: str,
        letter: tuple[str, Any] | None,
        details: Mapping[str, Any],
    ) -> bool:
        try:
            if letter is not None:
                await self._publish(letter[0], letter[1], metadata=details)
            if not topic.startswith("_bus."):
                await self._publish(
                    "_bus.error",
                    {**details, "topic": topic, "event_id": event_id},
                    metadata={"subscription": subscription.name},
                )
        except Exception:
            logger.exception(
                "eventwire: could not publish the dead letter of %s for %s",
                event_id or f"a malformed message on {topic!r}",
                subscription.name,
            )
            return False
        return True


def foreign_letter(topic: str, body: bytes, why: str) -> tuple[str, dict[str, Any]]:
    """The DLQ topic and payload for a message that is not a valid envelope."""
    valid = is_topic(topic) and not is_reserved(topic)
    dlq_topic = f"{DLQ_PREFIX}{topic}" if valid else f"{DLQ_PREFIX}_malformed"
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    payload: dict[str, Any] = {
        "topic": topic,
        "body": text,
        "body_base64": None if text is not None else base64.b64encode(body).decode(),
        "error": why,
    }
    return dlq_topic, payload
