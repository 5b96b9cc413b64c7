"""Dead-lettering: what happens to an event its subscription gave up on.

The event is published again on ``_dlq.<topic>`` with the reason in its metadata (error,
error type, subscription, group, attempts), and a ``_bus.error`` notice is published for
monitors. A message on a broker that is not an eventwire envelope at all is dead-lettered
the same way, its raw body kept in the payload.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from eventwire.envelope import PayloadTooLargeError, UnencodablePayloadError, encode
from eventwire.errors import InvalidTopicError
from eventwire.event import Event
from eventwire.foreign import header_text
from eventwire.observe import SubscriptionInfo
from eventwire.topics import DEAD_LETTER_PREFIX, is_reserved, is_topic

logger = logging.getLogger("eventwire")

DLQ_PREFIX = DEAD_LETTER_PREFIX
# Where a letter goes whose own topic cannot carry the prefix (a foreign producer's topic).
MALFORMED_TOPIC = f"{DLQ_PREFIX}_malformed"
# Error texts kept in a letter's metadata are cut at this many characters.
ERROR_TEXT_LIMIT = 2000
# What a letter keeps of a payload too big to store: its first characters, size and hash.
PREVIEW_CHARACTERS = 1000
# A foreign message's body is kept whole up to this size; past it, its start, size and hash.
FOREIGN_BODY_LIMIT = 64 * 1024
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
        description = _cut(f"{type(error).__name__}: {error}")
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
        self,
        subscription: SubscriptionInfo,
        topic: str,
        body: bytes,
        why: str,
        headers: Mapping[str, Any] | None = None,
    ) -> bool:
        """A message on `topic` that is not a valid envelope: to the DLQ with the reason, its
        body and its headers."""
        dlq_topic, payload = foreign_letter(topic, body, why, headers)
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
        """Store the letter and the notice. True once the letter is stored, or could never
        be (logged: the event is not handled again for ever); False when the broker failed
        for now (the event goes back to it, to be tried again later)."""
        if letter is not None:
            try:
                await self._publish(letter[0], letter[1], metadata=details)
            except (UnencodablePayloadError, PayloadTooLargeError, InvalidTopicError) as refused:
                # It can never be stored as it is: store what can be, and say what was cut.
                letter, details = _reduced(letter, details, refused)
                try:
                    await self._publish(letter[0], letter[1], metadata=details)
                except Exception:
                    logger.exception(
                        "eventwire: the dead letter of %s for %s could not be stored even "
                        "without its payload; it is dropped",
                        event_id or f"a malformed message on {topic!r}",
                        subscription.name,
                    )
                    return True
                logger.error(
                    "eventwire: the dead letter of %s for %s was stored without its payload (%s)",
                    event_id or f"a malformed message on {topic!r}",
                    subscription.name,
                    refused,
                )
            except Exception:
                logger.exception(
                    "eventwire: could not store the dead letter of %s for %s; the event goes "
                    "back to be tried again",
                    event_id or f"a malformed message on {topic!r}",
                    subscription.name,
                )
                return False
        if not topic.startswith("_bus."):
            try:
                await self._publish(
                    "_bus.error",
                    {**details, "topic": topic, "event_id": event_id},
                    metadata={"subscription": subscription.name},
                )
            except Exception:
                # The letter is stored: a lost notice is logged, never a reason to retry.
                logger.warning("eventwire: could not publish the _bus.error notice", exc_info=True)
        return True


def _cut(text: str) -> str:
    return text if len(text) <= ERROR_TEXT_LIMIT else text[:ERROR_TEXT_LIMIT] + " [cut]"


def _reduced(
    letter: tuple[str, Any], details: Mapping[str, Any], refused: Exception
) -> tuple[tuple[str, Any], dict[str, Any]]:
    """A letter that can be stored in place of one that cannot: the event without its
    payload (its size, hash and first characters instead), on `_dlq._malformed` if its
    topic was the problem."""
    topic, content = letter
    if isinstance(refused, InvalidTopicError):
        topic = MALFORMED_TOPIC
    kept: dict[str, Any] = {**details, "payload_dropped": _cut(str(refused))}
    if isinstance(content, Event):
        try:
            raw = encode(content, max_bytes=None)
        except Exception:
            raw = repr(content.payload).encode()
        summary = {
            **_size_and_hash(raw),
            "preview": raw[:PREVIEW_CHARACTERS].decode("utf-8", "replace"),
        }
        content = content.replace(payload=summary, metadata={})
    else:
        content = {"dropped": True}
    return (topic, content), kept


def foreign_letter(
    topic: str, body: bytes, why: str, headers: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The DLQ topic and payload for a message that is not a valid envelope. Past
    `FOREIGN_BODY_LIMIT` bytes only the body's start is kept, with its size and SHA-256, so
    that the letter can always be stored (escaped, the kept part stays far under the event
    size limit). Its headers (a Redis entry's other fields) are kept as text, each cut at
    `FOREIGN_BODY_LIMIT` characters."""
    valid = is_topic(topic) and not is_reserved(topic)
    dlq_topic = f"{DLQ_PREFIX}{topic}" if valid else f"{DLQ_PREFIX}_malformed"
    kept = body[:FOREIGN_BODY_LIMIT]
    try:
        text: str | None = kept.decode("utf-8")
    except UnicodeDecodeError as cut:
        # A multi-byte character cut at the limit is dropped; other bytes mean binary.
        tail = len(kept) - cut.start
        whole = len(kept) < len(body) and tail < 4 and cut.reason == "unexpected end of data"
        text = kept[: cut.start].decode("utf-8") if whole else None
    payload: dict[str, Any] = {
        "topic": topic,
        "body": text,
        "body_base64": None if text is not None else base64.b64encode(kept).decode(),
        "error": why,
    }
    if len(kept) < len(body):
        payload.update(truncated=True, **_size_and_hash(body))
    if headers:
        payload["headers"] = {
            str(name): header_text(value)[:FOREIGN_BODY_LIMIT] for name, value in headers.items()
        }
    return dlq_topic, payload


def _size_and_hash(raw: bytes) -> dict[str, Any]:
    """What a letter keeps of content it cannot keep whole: its size and SHA-256."""
    return {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
