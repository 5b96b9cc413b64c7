"""eventwire: an asynchronous publish/subscribe event bus for AI agents.

Agents publish events on named topics; other agents react to them independently and
reliably. ``EventBus()`` runs in-process with nothing to install or start.
"""

from eventwire.agent import Agent, on
from eventwire.backends.base import (
    BackendCapabilityError,
    BackendConnectionError,
    BrokerFullError,
    Capabilities,
    ReplicationError,
)
from eventwire.bus import CloseReport, EventBus, UnhandledEvent
from eventwire.errors import (
    BusClosedError,
    BusNotRunningError,
    EventwireError,
    HandlerError,
    InboxFullError,
    InvalidTopicError,
    NoReplyError,
    PayloadValidationError,
    PoisonEventError,
    PublishTimeoutError,
    RemoteHandlerError,
)
from eventwire.event import Event
from eventwire.retry import Retry
from eventwire.runs import BudgetExceededError, JournalMismatchError, Run, UnencodableResultError
from eventwire.subscription import Subscription, SubscriptionStats

__version__ = "0.1.0"  # the only place the version is written: pyproject.toml reads it

__all__ = [
    "Agent",
    "BackendCapabilityError",
    "BackendConnectionError",
    "BrokerFullError",
    "BudgetExceededError",
    "BusClosedError",
    "BusNotRunningError",
    "Capabilities",
    "CloseReport",
    "Event",
    "EventBus",
    "EventwireError",
    "HandlerError",
    "InboxFullError",
    "InvalidTopicError",
    "JournalMismatchError",
    "NoReplyError",
    "PayloadValidationError",
    "PoisonEventError",
    "PublishTimeoutError",
    "RemoteHandlerError",
    "ReplicationError",
    "Retry",
    "Run",
    "Subscription",
    "SubscriptionStats",
    "UnencodableResultError",
    "UnhandledEvent",
    "__version__",
    "on",
]
