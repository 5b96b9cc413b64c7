"""An AsyncAPI 3.0.0 document of an eventwire app, built from its buses.

- **channels**: one per topic the app publishes or subscribes to exactly, and one per wildcard
  subscription pattern, at the address the broker of the app's buses uses
  (`eventwire.asyncapi_wire`): the NATS subject ``<ns>.<topic>``, the AMQP routing key on the
  namespace's topic exchange (an ``amqp`` channel binding), the Redis stream ``{<ns>}:events``
  (the topic is the entry's ``topic`` field: ``x-eventwire-redis``), else the topic. A
  wildcard's address names its tokens as parameters: ``research.*`` is ``research.{p1}``,
  ``audit.>`` is ``audit.{rest}`` (``rest`` stands for one or more dot-separated tokens). Dead
  letters are one ``_dlq.>`` channel.
- **operations**: ``receive`` for each subscription (``x-eventwire-subscription`` holds its
  name, pattern, group and agent), ``send`` for each topic a subscription or agent publishes,
  declared (``publishes=[...]``) or learnt at run time (``x-eventwire-learnt``); on RabbitMQ a
  send binding says messages are persistent.
- **components.messages**: one per payload type of a typed handler (``Event[Model]``), with its
  JSON Schema (pydantic) in ``components.schemas``; ``AnyEvent`` (payload ``{}``) where no
  handler says. A message's payload schema is the whole body, the JSON envelope, whose
  ``payload`` field holds the event's payload; the ``eventwireHeaders`` trait says what travels
  beside it (NATS or AMQP headers, a Redis entry's other fields).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from eventwire.asyncapi_wire import Wire
from eventwire.topology import DEAD_LETTERS, Node, Topology

if TYPE_CHECKING:
    from eventwire.bus import EventBus
    from eventwire.event import Event
    from eventwire.subscription import Subscription

ASYNCAPI_VERSION = "3.0.0"
ANY_MESSAGE = "AnyEvent"
ENVELOPE_TRAIT = "eventwireHeaders"

_NULLABLE_STRING: dict[str, Any] = {"type": ["string", "null"]}
# The envelope (docs/wire-format.md): every message's body; a message's schema adds its
# `payload` field.
ENVELOPE: dict[str, Any] = {
    "type": "object",
    "required": ["v", "id", "topic", "time"],
    "properties": {
        "v": {"type": "integer", "const": 1, "description": "Envelope version."},
        "id": {"type": "string", "description": "Unique, time-sortable event id (UUIDv7)."},
        "topic": {"type": "string", "description": "The topic the event was published on."},
        "time": {"type": "string", "format": "date-time", "description": "Creation time, UTC."},
        "metadata": {"type": "object", "description": "Key/value annotations."},
        "correlation_id": {
            **_NULLABLE_STRING,
            "description": "Shared by every event of one chain: the chain's first event id.",
        },
        "causation_id": {
            **_NULLABLE_STRING,
            "description": "Id of the event whose handler published this one.",
        },
        "key": {**_NULLABLE_STRING, "description": "Ordering key."},
        "source": {
            **_NULLABLE_STRING,
            "description": "The agent or subscription that published the event.",
        },
        "reply_to": {**_NULLABLE_STRING, "description": "Where replies to a request go."},
        "payload_kind": {
            **_NULLABLE_STRING,
            "description": "'event' when the payload is itself an envelope (a dead letter).",
        },
        "trace": {"type": "object", "description": "W3C trace context (traceparent)."},
        "target": {**_NULLABLE_STRING, "description": "The one subscription meant to handle it."},
    },
}


def _identifier(text: str) -> str:
    """A component or operation id: letters, digits, ``.``, ``-``, ``_`` only."""
    return re.sub(r"[^\w.\-]", "_", text)


def _channel_id(pattern: str) -> str:
    tokens = ["_one" if t == "*" else "_rest" if t == ">" else t for t in pattern.split(".")]
    return _identifier(".".join(tokens))


def _address(pattern: str) -> tuple[str, dict[str, Any]]:
    """The channel address of a topic or pattern, with a parameter per wildcard token."""
    tokens: list[str] = []
    parameters: dict[str, Any] = {}
    for token in pattern.split("."):
        if token == "*":
            name = f"p{len(parameters) + 1}"
            parameters[name] = {"description": "Any one topic token (the * wildcard)."}
            tokens.append("{" + name + "}")
        elif token == ">":
            parameters["rest"] = {
                "description": "One or more topic tokens joined by '.' (the > wildcard)."
            }
            tokens.append("{rest}")
        else:
            tokens.append(token)
    return ".".join(tokens), parameters


class _Builder:
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.channels: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self._message_of_type: dict[int, str] = {}
        self._types: list[Any] = []  # keeps the types alive while their id() is a key

    def channel(self, pattern: str, description: str | None = None) -> str:
        channel_id = _channel_id(pattern)
        while channel_id in self.channels and self.channels[channel_id]["x-eventwire-topic"] != (
            pattern
        ):
            channel_id += "_"
        if channel_id not in self.channels:
            address, parameters = _address(pattern)
            wire = self.wire
            channel: dict[str, Any] = {"address": wire.address(address), "messages": {}}
            if parameters and wire.keeps_parameters:
                channel["parameters"] = parameters
            if description:
                channel["description"] = description
            bindings = wire.channel_bindings(pattern)
            if bindings:
                channel["bindings"] = bindings
            channel["x-eventwire-topic"] = pattern
            extension = wire.channel_extension(pattern)
            if extension:
                channel[f"x-eventwire-{wire.scheme}"] = extension
            self.channels[channel_id] = channel
        return channel_id

    def message_for(self, payload_type: Any | None) -> str:
        if payload_type is None:
            if ANY_MESSAGE not in self.messages:
                self.messages[ANY_MESSAGE] = self._message(
                    ANY_MESSAGE, {}, "An event whose payload no handler declares a type for."
                )
            return ANY_MESSAGE
        known = self._message_of_type.get(id(payload_type))
        if known is not None:
            return known
        base = _identifier(getattr(payload_type, "__name__", None) or repr(payload_type))
        name, number = base, 2
        while name in self.messages:
            name, number = f"{base}_{number}", number + 1
        self._types.append(payload_type)
        self._message_of_type[id(payload_type)] = name
        self.messages[name] = self._message(name, self._schema(name, payload_type), None)
        return name

    def _message(self, name: str, payload: dict[str, Any], summary: str | None) -> dict[str, Any]:
        message: dict[str, Any] = {
            "name": name,
            "contentType": "application/json",
            # The body is the envelope; the event's payload is its `payload` field.
            "payload": {
                **ENVELOPE,
                "properties": {**ENVELOPE["properties"], "payload": payload},
            },
            "traits": [{"$ref": f"#/components/messageTraits/{ENVELOPE_TRAIT}"}],
        }
        if summary:
            message["summary"] = summary
        return message

    def _schema(self, name: str, payload_type: Any) -> dict[str, Any]:
        from pydantic import PydanticSchemaGenerationError, TypeAdapter

        try:
            schema: dict[str, Any] = TypeAdapter(payload_type).json_schema(
                ref_template="#/components/schemas/{model}"
            )
        except (PydanticSchemaGenerationError, TypeError, ValueError):
            return {"description": f"A {payload_type!r} (no JSON Schema for it)."}
        for definition, body in schema.pop("$defs", {}).items():
            self.schemas.setdefault(_identifier(definition), body)
        self.schemas[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}

    def attach(self, channel_id: str, message: str) -> dict[str, str]:
        """Add `message` to the channel; the reference an operation uses."""
        self.channels[channel_id]["messages"][message] = {
            "$ref": f"#/components/messages/{message}"
        }
        return {"$ref": f"#/channels/{_pointer(channel_id)}/messages/{_pointer(message)}"}

    def operation(self, base: str, operation: dict[str, Any]) -> None:
        """Add `operation` under an id made from `base`, numbered if `base` is taken."""
        name, number = _identifier(base), 2
        while name in self.operations:
            name, number = f"{_identifier(base)}_{number}", number + 1
        self.operations[name] = operation

    def references(self, channel_id: str) -> list[dict[str, str]]:
        """References to every message of a channel, for an operation."""
        return [
            {"$ref": f"#/channels/{_pointer(channel_id)}/messages/{_pointer(name)}"}
            for name in self.channels[channel_id]["messages"]
        ]


def _pointer(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _summary(subscription: Subscription) -> str | None:
    doc = getattr(subscription.handler, "__doc__", None)
    if not doc:
        return None
    first = doc.strip().splitlines()[0].strip()
    return first or None


def _payload_type(subscription: Subscription) -> Any | None:
    from eventwire.payloads import payload_type_of

    try:
        return payload_type_of(subscription.handler)
    except TypeError:
        return None


def build_document(
    buses: Sequence[EventBus],
    *,
    title: str = "eventwire app",
    version: str = "1.0.0",
    description: str | None = None,
    events: Iterable[Event[Any]] = (),
) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document (a dict ready for JSON) of the app made of `buses`.

    `events` (e.g. from `eventwire.topology.read_history`) add the topics their sources were
    seen publishing, as learnt send operations."""
    model = Topology.from_bus(*buses)
    model.learn(events)
    shown = model.view()
    subscriptions: dict[str, Subscription] = {}
    for bus in buses:
        subscriptions.update(bus.subscriptions)
    builder = _Builder(Wire(list(buses)))
    _add_topic_channels(builder, shown, subscriptions)
    _add_receive_operations(builder, shown, subscriptions)
    _add_send_operations(builder, shown)
    return _document(builder, _servers(buses), title, version, description)


def _add_topic_channels(
    builder: _Builder, shown: Topology, subscriptions: dict[str, Subscription]
) -> None:
    """A channel per topic, with the messages of the typed handlers that receive it."""
    for node in shown.of_kind("topic"):
        channel_id = builder.channel(
            node.name, "Dead letters of every topic." if node.name == DEAD_LETTERS else None
        )
        types = [
            _payload_type(subscriptions[shown.nodes[edge.target].name])
            for edge in shown.outgoing(node.id)
            if shown.nodes[edge.target].name in subscriptions
        ]
        for payload_type in [t for t in types if t is not None] or [None]:
            builder.attach(channel_id, builder.message_for(payload_type))


def _add_receive_operations(
    builder: _Builder, shown: Topology, subscriptions: dict[str, Subscription]
) -> None:
    """A receive operation per subscription of these buses, on its pattern's channel."""
    for node in shown.of_kind("subscription"):
        subscription = subscriptions.get(node.name)
        if subscription is None or node.pattern is None:
            continue
        pattern = DEAD_LETTERS if node.pattern.startswith("_dlq.") else node.pattern
        channel_id = builder.channel(pattern)
        payload_type = _payload_type(subscription)
        if payload_type is None and builder.channels[channel_id]["messages"]:
            # An untyped handler takes whatever the channel carries.
            references = builder.references(channel_id)
        else:
            references = [builder.attach(channel_id, builder.message_for(payload_type))]
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{_pointer(channel_id)}"},
            "messages": references,
        }
        summary = _summary(subscription)
        if summary:
            operation["summary"] = summary
        operation["x-eventwire-subscription"] = _subscription_extension(node, subscription)
        builder.operation(node.name, operation)


def _subscription_extension(node: Node, subscription: Subscription) -> dict[str, Any]:
    """What `x-eventwire-subscription` says: name, pattern, and the options that are set."""
    details: dict[str, Any] = {"name": node.name, "pattern": node.pattern}
    if node.group:
        details["group"] = node.group
    if node.agent:
        details["agent"] = node.agent
    details["concurrency"] = subscription.concurrency
    if subscription.idempotent:
        details["idempotent"] = True
    return details


def _add_send_operations(builder: _Builder, shown: Topology) -> None:
    """A send operation per topic a subscription or agent publishes, declared or learnt."""
    for edge in shown.edges:
        if edge.kind != "publishes":
            continue
        publisher = shown.nodes[edge.source]
        topic = shown.nodes[edge.target].name
        channel_id = builder.channel(topic)
        if not builder.channels[channel_id]["messages"]:
            builder.attach(channel_id, builder.message_for(None))
        who = {"subscription": publisher.name} if publisher.kind == "subscription" else {}
        agent = publisher.name if publisher.kind == "agent" else publisher.agent
        if agent:
            who["agent"] = agent
        operation: dict[str, Any] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{_pointer(channel_id)}"},
            "messages": builder.references(channel_id),
        }
        bindings = builder.wire.send_bindings()
        if bindings:
            operation["bindings"] = bindings
        operation.update(
            {
                "x-eventwire-publisher": who,
                "x-eventwire-declared": edge.declared,
                "x-eventwire-learnt": edge.learnt,
            }
        )
        builder.operation(f"{publisher.name}.publishes.{channel_id}", operation)


def _document(
    builder: _Builder,
    servers: dict[str, Any],
    title: str,
    version: str,
    description: str | None,
) -> dict[str, Any]:
    """The whole document around what `builder` collected."""
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": description
            or "Generated by `eventwire asyncapi` from the app's subscriptions, agents and "
            "declared publishes.",
        },
    }
    if servers:
        document["servers"] = servers
    document.update(
        defaultContentType="application/json",
        channels=builder.channels,
        operations=builder.operations,
        components={
            "schemas": builder.schemas,
            "messages": builder.messages,
            "messageTraits": {
                ENVELOPE_TRAIT: {
                    "headers": builder.wire.headers(),
                    "description": "Beside the body: " + builder.wire.headers_description(),
                    "correlationId": {
                        "description": "Every event a chain sets off shares it.",
                        "location": "$message.payload#/correlation_id",
                    },
                }
            },
        },
    )
    document["x-eventwire-envelope"] = {
        "version": 1,
        "payloadField": "payload",
        "description": "Each message body is one JSON envelope (the message payload schema): "
        "the event's payload is its `payload` field (docs/wire-format.md).",
    }
    return document


def _servers(buses: Sequence[EventBus]) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    for bus in buses:
        backend = bus.backend
        if not backend.capabilities.durable:
            continue  # in process: no server to name
        url = backend.url
        host = url.host or "localhost"
        if url.port is not None:
            host = f"{host}:{url.port}"
        if url.scheme == "sqlite":
            host = "localhost"
        server: dict[str, Any] = {"host": host, "protocol": url.scheme}
        if url.path and url.path != "/":
            server["pathname"] = url.path
        server["description"] = f"eventwire bus {url.redacted}"
        servers.setdefault(_identifier(f"{url.scheme}-{len(servers) + 1}"), server)
    return servers


def dump(document: dict[str, Any], fmt: str = "json") -> str:
    """The document as JSON, or YAML (needs PyYAML; raises ImportError without it)."""
    if fmt == "yaml":
        import importlib

        yaml = importlib.import_module("yaml")  # optional, and its stubs too
        return str(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
