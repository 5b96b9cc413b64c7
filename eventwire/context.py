"""What the current task is handling: lets `publish` fill causation ids without being told."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eventwire.event import Event

# The event whose handler is running in this task or thread (None outside handlers).
current_event: ContextVar[Event[Any] | None] = ContextVar("eventwire_event", default=None)
