"""Where a topic travels on each broker, as an AsyncAPI document says it: the channel's address
and bindings, the headers a message carries beside its body, and the send operation's
bindings (`eventwire.asyncapi`).

- NATS: the subject ``<ns>.<topic>``, stored by the stream ``eventwire_<ns>``.
- RabbitMQ: the routing key ``<topic>`` on the topic exchange ``<ns>`` (``<ns>.reserved`` for
  reserved ``_`` topics), persistent messages.
- Redis: the stream ``{<ns>}:events``, one for every topic; the topic is the entry's ``topic``
  field.
- In-process and SQLite: the topic itself, no bindings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

if TYPE_CHECKING:
    from eventwire.bus import EventBus

AMQP_BINDING_VERSION = "0.3.0"

_TRACE_HEADERS: dict[str, Any] = {
    "traceparent": {"type": "string", "description": "W3C trace context, when traced."},
    "tracestate": {"type": "string", "description": "W3C trace state, when traced."},
}


class Wire:
    """How the document's broker carries topics; the first broker bus of the app decides."""

    def __init__(self, buses: list[EventBus]) -> None:
        self.scheme = "memory"
        self.namespace = "eventwire"
        self.vhost = "/"
        for bus in buses:
            backend = bus.backend
            if backend.url.scheme in ("nats", "amqp", "redis"):
                self.scheme, self.namespace = backend.url.scheme, backend.namespace
                self.vhost = unquote(backend.url.path.lstrip("/")) or "/"
                break

    def address(self, topic_address: str) -> str:
        """The channel address of a topic address (``research.{p1}``) on this broker."""
        if self.scheme == "nats":
            return f"{self.namespace}.{topic_address}"
        if self.scheme == "redis":
            return "{" + self.namespace + "}:events"
        return topic_address

    @property
    def keeps_parameters(self) -> bool:
        """Whether the address holds the topic (and so its wildcard parameters)."""
        return self.scheme != "redis"

    def channel_bindings(self, pattern: str) -> dict[str, Any] | None:
        if self.scheme == "amqp":
            exchange = self.namespace + (".reserved" if pattern.startswith("_") else "")
            return {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": exchange,
                        "type": "topic",
                        "durable": True,
                        "autoDelete": False,
                        "vhost": self.vhost,
                    },
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            }
        return None

    def channel_extension(self, pattern: str) -> dict[str, Any] | None:
        """What the bindings cannot say: the stream that stores a NATS subject, the Redis
        field that holds the topic."""
        if self.scheme == "nats":
            return {
                "stream": f"eventwire_{self.namespace}",
                "subject": f"{self.namespace}.{pattern}",
            }
        if self.scheme == "redis":
            return {"stream": "{" + self.namespace + "}:events", "topicField": pattern}
        return None

    def send_bindings(self) -> dict[str, Any] | None:
        if self.scheme == "amqp":
            return {"amqp": {"deliveryMode": 2, "bindingVersion": AMQP_BINDING_VERSION}}
        return None

    def headers(self) -> dict[str, Any]:
        """The schema of what travels beside the body: headers, or a Redis entry's fields."""
        properties: dict[str, Any]
        if self.scheme == "nats":
            properties = {
                "Nats-Msg-Id": {"type": "string", "description": "The event id (deduplication)."},
                "content-type": {"type": "string", "const": "application/json"},
                **_TRACE_HEADERS,
            }
        elif self.scheme == "amqp":
            # message_id and content_type travel as AMQP properties, not headers.
            properties = dict(_TRACE_HEADERS)
        elif self.scheme == "redis":
            properties = {
                "id": {"type": "string", "description": "The event id."},
                "topic": {"type": "string", "description": "The topic."},
                "key": {"type": "string", "description": "The ordering key, for keyed events."},
                **_TRACE_HEADERS,
            }
        else:
            return {"type": "object", "description": "In-process: no headers."}
        return {"type": "object", "properties": properties}

    def headers_description(self) -> str:
        return {
            "nats": "NATS headers.",
            "amqp": "AMQP headers; the event id is the message_id property and the content "
            "type the content_type property (application/json); messages are persistent.",
            "redis": "The stream entry's other fields; the body is its `body` field.",
        }.get(self.scheme, "None: the event travels in-process.")
