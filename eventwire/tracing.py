"""OpenTelemetry tracing: a span for every publish and every handling attempt.

Turn it on with ``EventBus(tracing=True)``, ``bus.observe(Tracing())`` or `instrument`. Needs
the OpenTelemetry API (``pip install 'eventwire[otel]'``) and, to export anything, an SDK
tracer provider. See docs/tracing.md.

The W3C trace context of each publish travels with the event (`Event.trace_context`, the
``trace`` field of the envelope), so a chain of agents shows as one trace even when the
agents run in different processes.
"""

from __future__ import annotations

import importlib.metadata
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as missing:
    raise ImportError(
        "eventwire.tracing needs the OpenTelemetry API, which is not installed: "
        "pip install 'eventwire[otel]'"
    ) from missing

from eventwire.context import current_event
from eventwire.observe import (
    HandlingRecord,
    Observable,
    Observer,
    SubscriptionInfo,
    Transport,
    set_trace_context,
)

if TYPE_CHECKING:
    from eventwire.event import Event

__all__ = ["SYSTEM", "Tracing", "instrument"]

SYSTEM = "eventwire"
"""The ``messaging.system`` attribute of spans of an in-process bus (a broker's bus says the
broker: ``redis``, ``nats``, ``rabbitmq``)."""

_PRODUCER = trace.SpanKind.PRODUCER
_CONSUMER = trace.SpanKind.CONSUMER
# Providers that record nothing: the API alone, with no SDK installed.
_SILENT_PROVIDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)

# The span context of the attempt that last finished in this worker task, and the id of its
# event. What a worker publishes after the attempt (the dead letter, a reply to a request)
# continues the trace from that attempt, though its span is no longer current.
_last_attempt: ContextVar[tuple[str, trace.SpanContext] | None] = ContextVar(
    "eventwire_tracing_last_attempt", default=None
)


class Tracing(Observer):
    """An observer that records OpenTelemetry spans for a bus.

    - ``publish <topic>`` (kind PRODUCER) for every publish, a child of the current span: of
      the handling span when a handler publishes. Its W3C trace context is attached to the
      event, to travel with it.
    - ``handle <topic>`` (kind CONSUMER) for every handling attempt, a child of the publish
      span the event carries. It is the current span while the handler runs, so the
      handler's own spans and publishes are its children. Each retry is a span of its own.
    - A zero-length ``handle <topic>`` span when an event is skipped or dropped.

    `tracer_provider` defaults to the global one (``opentelemetry.trace``), looked up when a
    span starts, so a provider set after the bus was built still gets the spans.
    `propagator` writes and reads the trace context; W3C ``traceparent``/``tracestate`` by
    default.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self.tracer_provider = tracer_provider
        self._tracer = trace.get_tracer("eventwire", _version(), tracer_provider=tracer_provider)
        self._propagator = propagator or TraceContextTextMapPropagator()
        # The attributes naming where events travel (`attached`): the same on every span.
        self._where: dict[str, Any] = {"messaging.system": SYSTEM}
        self._transport: Transport | None = None

    def attached(self, transport: Transport) -> None:
        if self._transport is not None and self._transport != transport:
            # Observing buses on different brokers: no one address is right for every span
            # (nor one broker, unless they are all of one kind).
            same = self._transport.system == transport.system
            transport = Transport(transport.system if same else "eventwire")
        self._transport = transport
        where: dict[str, Any] = {"messaging.system": transport.system}
        if transport.address is not None:
            where["server.address"] = transport.address
        if transport.port is not None:
            where["server.port"] = transport.port
        self._where = where

    def __repr__(self) -> str:
        return f"Tracing(tracer_provider={self.tracer_provider!r})"

    def _silent(self) -> bool:
        """No SDK: spans would record nothing, so only the trace context is passed on (as
        the API's non-recording spans would), at a fraction of the cost."""
        provider = self.tracer_provider
        if provider is None:
            provider = trace.get_tracer_provider()  # an SDK may be set after the bus is built
        return isinstance(provider, _SILENT_PROVIDERS)

    # -- publishing ---------------------------------------------------------------------

    def publish_started(self, event: Event[Any]) -> trace.Span | None:
        if self._silent():
            self._pass_context_on(event)
            return None
        attributes = self._event_attributes(event)
        attributes["messaging.operation.name"] = "publish"
        attributes["messaging.operation.type"] = "send"
        links = None
        if event.trace_context:
            # Published again as it is (e.g. an event received): link to its first publish.
            previous = trace.get_current_span(self._propagator.extract(event.trace_context))
            if previous.get_span_context().is_valid:
                links = [trace.Link(previous.get_span_context())]
        span = self._tracer.start_span(
            f"publish {event.topic}",
            context=_publish_parent(self._propagator),
            kind=_PRODUCER,
            attributes=attributes,
            links=links,
        )
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        set_trace_context(event, carrier)
        return span

    def _pass_context_on(self, event: Event[Any]) -> None:
        """Without an SDK: the event carries the context it would be published in (the
        current span's, else that of the event being handled), so a trace that came in from
        a traced process goes on to the next one."""
        if event.trace_context:
            return  # published again as it is: it keeps its own
        if trace.get_current_span().get_span_context().is_valid:
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier)
            set_trace_context(event, carrier)
            return
        handling = current_event.get()
        if handling is not None and handling.trace_context:
            set_trace_context(event, dict(handling.trace_context))

    def publish_finished(
        self, token: trace.Span | None, event: Event[Any], error: BaseException | None
    ) -> None:
        if token is None:
            return
        if error is not None:
            _record_error(token, error)
        token.end()

    # -- handling -----------------------------------------------------------------------

    def attempt_started(
        self, subscription: SubscriptionInfo, event: Event[Any], attempt: int
    ) -> tuple[trace.Span | None, Token[otel_context.Context]] | None:
        if self._silent():
            if not event.trace_context:
                return None
            # The incoming context is current for the handler, e.g. for its outgoing calls.
            return None, otel_context.attach(self._parent_of(event))
        parent = self._parent_of(event)
        attributes = self._handling_attributes(subscription, event)
        attributes["eventwire.attempt"] = attempt
        # The producer's context is the parent (one message per handling) and a link, as the
        # messaging conventions ask: tools that follow links find the producer either way.
        producer = trace.get_current_span(parent).get_span_context()
        span = self._tracer.start_span(
            f"handle {event.topic}",
            context=parent,
            kind=_CONSUMER,
            attributes=attributes,
            links=[trace.Link(producer)] if producer.is_valid else None,
        )
        # Current for the handler (the same task; a thread handler gets a copy of it).
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    def attempt_finished(
        self,
        token: tuple[trace.Span | None, Token[otel_context.Context]] | None,
        subscription: SubscriptionInfo,
        event: Event[Any],
        record: HandlingRecord,
        error: BaseException | None,
    ) -> None:
        if token is None:
            return
        span, attached = token
        otel_context.detach(attached)
        if span is None:
            return
        span.set_attribute("eventwire.outcome", record.outcome)
        # As the record says: 0 when the handler never ran (the payload failed validation).
        span.set_attribute("eventwire.attempt", record.attempt)
        if error is not None and record.outcome != "cancelled":
            _record_error(span, error)
        _last_attempt.set((event.id, span.get_span_context()))
        span.end()

    def skipped(
        self, subscription: SubscriptionInfo, event: Event[Any], record: HandlingRecord
    ) -> None:
        self._mark(subscription, event, "skipped", None)

    def dropped(self, subscription: SubscriptionInfo, event: Event[Any]) -> None:
        self._mark(subscription, event, "dropped", "dropped from a full inbox (drop_oldest)")

    def _mark(
        self, subscription: SubscriptionInfo, event: Event[Any], outcome: str, error: str | None
    ) -> None:
        """A zero-length handling span: the event reached `subscription`, its handler did
        not run."""
        if self._silent():
            return
        attributes = self._handling_attributes(subscription, event)
        attributes["eventwire.attempt"] = 0
        attributes["eventwire.outcome"] = outcome
        span = self._tracer.start_span(
            f"handle {event.topic}",
            context=self._parent_of(event),
            kind=_CONSUMER,
            attributes=attributes,
        )
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end()

    def _event_attributes(self, event: Event[Any]) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            **self._where,
            "messaging.destination.name": event.topic,
            "messaging.message.id": event.id,
            "messaging.message.conversation_id": event.correlation_id,
            "eventwire.correlation_id": event.correlation_id,
        }
        if self._where["messaging.system"] == "rabbitmq":
            attributes["messaging.rabbitmq.destination.routing_key"] = event.topic
        if event.causation_id is not None:
            attributes["eventwire.causation_id"] = event.causation_id
        if event.key is not None:
            attributes["eventwire.key"] = event.key
        if event.source is not None:
            attributes["eventwire.source"] = event.source
        return attributes

    def _handling_attributes(
        self, subscription: SubscriptionInfo, event: Event[Any]
    ) -> dict[str, Any]:
        attributes = self._event_attributes(event)
        attributes["messaging.operation.name"] = "handle"
        attributes["messaging.operation.type"] = "process"
        attributes["messaging.destination.subscription.name"] = subscription.name
        attributes["eventwire.subscription"] = subscription.name
        attributes["eventwire.pattern"] = subscription.pattern
        if subscription.group is not None:
            attributes["messaging.consumer.group.name"] = subscription.group
        return attributes

    def _parent_of(self, event: Event[Any]) -> otel_context.Context:
        # Only what the event carries: an event published without tracing starts a trace of
        # its own, whatever happens to be current where it is handled.
        return self._propagator.extract(event.trace_context, context=otel_context.Context())


def _publish_parent(propagator: TextMapPropagator) -> otel_context.Context | None:
    """The parent of a publish span: the current span, if any; else, in a worker after an
    attempt ended (publishing its dead letter or reply), that attempt's span."""
    if trace.get_current_span().get_span_context().is_valid:
        return None
    handling = current_event.get()
    if handling is None:
        return None
    last = _last_attempt.get()
    if last is not None and last[0] == handling.id:
        return trace.set_span_in_context(trace.NonRecordingSpan(last[1]))
    if handling.trace_context:
        return propagator.extract(handling.trace_context)
    return None


def _record_error(span: trace.Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_attribute("error.type", type(error).__qualname__)
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def instrument(bus: Observable, tracer_provider: trace.TracerProvider | None = None) -> Tracing:
    """Trace `bus` (``bus.observe(Tracing(tracer_provider))``); returns the observer.

    A bus already traced by a `Tracing` observer is left as it is and that observer is
    returned, so tracing is never recorded twice; pass `tracer_provider` only to a bus that
    is not traced yet.
    """
    for observer in bus.observers:
        if isinstance(observer, Tracing):
            if tracer_provider is not None and tracer_provider is not observer.tracer_provider:
                raise ValueError(
                    "the bus is already traced with another tracer provider; "
                    "bus.unobserve() that Tracing observer first"
                )
            return observer
    return bus.observe(Tracing(tracer_provider))


def _version() -> str:
    """eventwire's version, as installed."""
    try:
        return importlib.metadata.version("eventwire")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
