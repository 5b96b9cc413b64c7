"""Step 2 - an audit logger: keep a compliance record of everything users ask and do.

Run it with:  .venv/bin/python examples/02_audit_logger.py
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from eventwire import Event, EventBus


@dataclass(frozen=True)
class AuditRecord:
    # The event id is unique and sorts by creation time, so it doubles as the record's key;
    # the timestamp is when the event was created, not when the logger got round to it.
    event_id: str
    at: datetime
    topic: str
    user_id: str
    detail: Any


class AuditLog:
    """Appends one record per user event. A real one would write to durable storage."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    async def record(self, event: Event[Any]) -> None:
        entry = AuditRecord(
            event_id=event.id,
            at=event.timestamp,
            topic=event.topic,
            # Compliance wants every event on file, even one that arrives without a user id.
            user_id=event.metadata.get("user_id", "<unknown>"),
            detail=event.payload,
        )
        self.records.append(entry)
        print(f"[AUDIT] {entry.user_id} {entry.topic}: {entry.detail}")


async def main() -> None:
    bus = EventBus()
    audit = AuditLog()

    # `user.>` matches every topic under `user.` (one token or more). Teams can add new user
    # events later and they are audited without touching this line.
    bus.subscribe("user.>", audit.record, name="audit")

    async with bus:
        await bus.publish(
            "user.query",
            "What was our revenue in March?",
            metadata={"user_id": "user-123", "session_id": "sess-9"},
        )
        await bus.publish(
            "user.feedback",
            "thumbs-down: answer was out of date",
            metadata={"user_id": "user-123", "session_id": "sess-9"},
        )
        await bus.publish(
            "user.query",
            "Show me open invoices over 10k",
            metadata={"user_id": "user-456", "session_id": "sess-12"},
        )
        # Not a user event, so the audit logger never sees it.
        await bus.publish("system.heartbeat", {"healthy": True})
        await bus.drain()

    print(f"Audit trail: {len(audit.records)} records")
    for entry in audit.records:
        print(f"  {entry.at:%H:%M:%S.%f}  {entry.event_id}  {entry.topic:<13}  {entry.user_id}")


if __name__ == "__main__":
    asyncio.run(main())
