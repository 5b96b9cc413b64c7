"""OpenTelemetry tracing: spans for publishes and handling attempts, one trace per chain of
events, in one process and across processes on a real broker."""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eventwire import Event, EventBus, InboxFullError, Retry
from eventwire.observe import set_trace_context
from eventwire.tracing import Tracing, instrument
from tests.conftest import wait_until
from tests.services import require_service, unique_namespace, with_namespace
from tests.tracing_worker import span_record

ROOT = Path(__file__).resolve().parents[1]


class Spans:
    """A tracer provider of the test's own, exporting to memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.finished if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} spans named {name!r} in {self.names()}"
        return found[0]

    def names(self) -> list[str]:
        return [span.name for span in self.finished]


@pytest.fixture
def spans() -> Iterator[Spans]:
    recorded = Spans()
    yield recorded
    recorded.provider.shutdown()


@pytest.fixture
async def traced(spans: Spans) -> AsyncIterator[EventBus]:
    """A running in-process bus traced into `spans`."""
    bus = EventBus(close_grace=2.0)
    instrument(bus, spans.provider)
    async with bus:
        yield bus


def span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def trace_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.trace_id


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_chain_of_agents_is_one_trace(traced: EventBus, spans: Spans) -> None:
    tracer = spans.provider.get_tracer("test")
    seen: dict[str, Event[Any]] = {}

    @traced.subscribe("user.query", name="researcher")
    async def research(event: Event[str]) -> None:
        seen["query"] = event
        with tracer.start_as_current_span("llm call"):
            await traced.publish("research.complete", "notes")

    @traced.subscribe("research.complete", name="writer", group="writers")
    async def write(event: Event[str]) -> None:
        seen["research"] = event
        await traced.publish("email", "draft", key="user-1")

    @traced.subscribe("email", name="mailer")
    async def mail(event: Event[str]) -> None:
        seen["email"] = event

    with tracer.start_as_current_span("request") as request:
        query = await traced.publish("user.query", "why?")
    await traced.drain(timeout=5)

    publish_query = spans.one("publish user.query")
    handle_query = spans.one("handle user.query")
    llm_call = spans.one("llm call")
    publish_research = spans.one("publish research.complete")
    handle_research = spans.one("handle research.complete")
    publish_email = spans.one("publish email")
    handle_email = spans.one("handle email")
    chain = [
        publish_query,
        handle_query,
        llm_call,
        publish_research,
        handle_research,
        publish_email,
        handle_email,
    ]
    assert len(spans.finished) == len(chain) + 1  # and "request"
    assert {trace_id(span) for span in chain} == {request.get_span_context().trace_id}

    assert parent_id(publish_query) == request.get_span_context().span_id
    assert parent_id(handle_query) == span_id(publish_query)
    assert parent_id(llm_call) == span_id(handle_query)
    assert parent_id(publish_research) == span_id(llm_call)
    assert parent_id(handle_research) == span_id(publish_research)
    assert parent_id(publish_email) == span_id(handle_research)
    assert parent_id(handle_email) == span_id(publish_email)

    assert publish_query.kind is trace.SpanKind.PRODUCER
    assert handle_query.kind is trace.SpanKind.CONSUMER
    # The trace context travels on the event: it names the publish span.
    version, trace_hex, span_hex, _flags = seen["query"].trace_context["traceparent"].split("-")
    assert (version, trace_hex, span_hex) == (
        "00",
        f"{trace_id(publish_query):032x}",
        f"{span_id(publish_query):016x}",
    )

    assert attributes(publish_query) == {
        "messaging.system": "eventwire",
        "messaging.operation.name": "publish",
        "messaging.operation.type": "send",
        "messaging.destination.name": "user.query",
        "messaging.message.id": query.id,
        "messaging.message.conversation_id": query.id,
        "eventwire.correlation_id": query.id,
    }
    research_event = seen["research"]
    assert attributes(handle_research) == {
        "messaging.system": "eventwire",
        "messaging.operation.name": "handle",
        "messaging.operation.type": "process",
        "messaging.destination.name": "research.complete",
        "messaging.destination.subscription.name": "writer",
        "messaging.consumer.group.name": "writers",
        "messaging.message.id": research_event.id,
        "messaging.message.conversation_id": query.id,
        "eventwire.correlation_id": query.id,
        "eventwire.causation_id": query.id,
        "eventwire.source": "researcher",
        "eventwire.subscription": "writer",
        "eventwire.pattern": "research.complete",
        "eventwire.attempt": 1,
        "eventwire.outcome": "handled",
    }
    email = attributes(publish_email)
    assert email["eventwire.key"] == "user-1"
    assert email["eventwire.causation_id"] == research_event.id
    assert email["messaging.message.id"] == seen["email"].id
    assert all(span.status.is_ok for span in chain)


async def test_each_retry_is_a_span_and_the_dead_letter_stays_in_the_trace(
    traced: EventBus, spans: Spans
) -> None:
    calls = 0

    @traced.subscribe("job.run", name="flaky", retry=Retry(attempts=2, backoff=0.0))
    async def flaky(event: Event[Any]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError(f"boom {calls}")

    await traced.publish("job.run", 1)
    await traced.drain(timeout=5)

    publish = spans.one("publish job.run")
    first, second = spans.named("handle job.run")
    assert [attributes(first)["eventwire.attempt"], attributes(second)["eventwire.attempt"]] == [
        1,
        2,
    ]
    assert attributes(first)["eventwire.outcome"] == "retrying"
    assert attributes(second)["eventwire.outcome"] == "dead_lettered"
    for attempt, span in enumerate((first, second), start=1):
        assert parent_id(span) == span_id(publish)
        assert span.status.status_code is trace.StatusCode.ERROR
        assert span.status.description == f"RuntimeError: boom {attempt}"
        assert attributes(span)["error.type"] == "RuntimeError"
        (exception,) = [e for e in span.events if e.name == "exception"]
        assert dict(exception.attributes or {})["exception.message"] == f"boom {attempt}"

    # Published by the worker after the last attempt: still that attempt's child.
    dead_letter = spans.one("publish _dlq.job.run")
    notice = spans.one("publish _bus.error")
    assert {trace_id(dead_letter), trace_id(notice)} == {trace_id(publish)}
    assert parent_id(dead_letter) == span_id(second)
    assert parent_id(notice) == span_id(second)


async def test_a_plain_function_handler_runs_inside_its_attempt_span(
    traced: EventBus, spans: Spans
) -> None:
    tracer = spans.provider.get_tracer("test")

    def summarise(event: Event[str]) -> None:  # runs in a thread
        with tracer.start_as_current_span("in thread"):
            traced.publish_threadsafe("summary.ready", event.payload.upper(), timeout=5)

    traced.subscribe("doc.added", summarise, name="summariser")
    traced.subscribe("summary.ready", lambda event: None, name="indexer")
    await traced.publish("doc.added", "text")
    await traced.drain(timeout=5)

    handle = spans.one("handle doc.added")
    in_thread = spans.one("in thread")
    publish_summary = spans.one("publish summary.ready")
    handle_summary = spans.one("handle summary.ready")
    assert attributes(handle)["eventwire.subscription"] == "summariser"
    assert attributes(handle)["eventwire.outcome"] == "handled"
    assert parent_id(handle) == span_id(spans.one("publish doc.added"))
    assert parent_id(in_thread) == span_id(handle)
    assert parent_id(publish_summary) == span_id(in_thread)
    assert parent_id(handle_summary) == span_id(publish_summary)
    assert len({trace_id(span) for span in spans.finished}) == 1


async def test_failed_publish_and_dropped_event_are_marked(traced: EventBus, spans: Spans) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(event: Event[int]) -> None:
        started.set()
        await release.wait()

    traced.subscribe("full.error", slow, name="strict", max_pending=1, overflow="error")
    traced.subscribe("full.drop", slow, name="lossy", max_pending=1, overflow="drop_oldest")

    await traced.publish("full.error", 1)
    await asyncio.wait_for(started.wait(), 5)
    await traced.publish("full.error", 2)  # queued
    with pytest.raises(InboxFullError):
        await traced.publish("full.error", 3)
    refused = spans.named("publish full.error")[-1]
    assert refused.status.status_code is trace.StatusCode.ERROR
    assert attributes(refused)["error.type"] == "InboxFullError"

    started.clear()
    first = await traced.publish("full.drop", 1)
    await asyncio.wait_for(started.wait(), 5)
    second = await traced.publish("full.drop", 2)
    await traced.publish("full.drop", 3)  # pushes 2 out
    (dropped,) = [
        span
        for span in spans.named("handle full.drop")
        if attributes(span)["eventwire.outcome"] == "dropped"
    ]
    assert attributes(dropped)["messaging.message.id"] == second.id
    assert attributes(dropped)["eventwire.attempt"] == 0
    assert dropped.status.status_code is trace.StatusCode.ERROR
    publish_second = [
        span
        for span in spans.named("publish full.drop")
        if attributes(span)["messaging.message.id"] == second.id
    ]
    assert [parent_id(dropped)] == [span_id(span) for span in publish_second]
    release.set()
    await traced.drain(timeout=5)
    handled = [
        attributes(span)["messaging.message.id"]
        for span in spans.named("handle full.drop")
        if attributes(span)["eventwire.outcome"] == "handled"
    ]
    assert first.id in handled
    assert second.id not in handled


async def test_without_an_observer_nothing_is_traced(spans: Spans) -> None:
    received: list[Event[Any]] = []
    tracer = spans.provider.get_tracer("test")
    async with EventBus() as bus:
        bus.subscribe("plain", received.append, name="plain")
        with tracer.start_as_current_span("outside"):
            await bus.publish("plain", 1)
        await bus.drain(timeout=5)

        tracing = instrument(bus, spans.provider)
        assert instrument(bus) is tracing  # never traced twice
        await bus.publish("plain", 2)
        await bus.drain(timeout=5)
        bus.unobserve(tracing)
        await bus.publish("plain", 3)
        await bus.drain(timeout=5)

    assert [event.payload for event in received] == [1, 2, 3]
    assert received[0].trace_context == {}
    assert "traceparent" in received[1].trace_context
    assert received[2].trace_context == {}
    assert spans.names() == ["outside", "publish plain", "handle plain"]


def test_instrument_refuses_a_second_tracer_provider(spans: Spans) -> None:
    bus = EventBus()
    bus.observe(Tracing())
    with pytest.raises(ValueError, match="another tracer provider"):
        instrument(bus, spans.provider)
    assert len(bus.observers) == 1


def test_importing_without_the_api_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "eventwire.tracing")
    for name in [name for name in sys.modules if name.split(".")[0] == "opentelemetry"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"pip install 'eventwire\[otel\]'"):
        importlib.import_module("eventwire.tracing")


async def test_one_trace_across_two_processes_on_redis(spans: Spans, tmp_path: Path) -> None:
    url = with_namespace(require_service("redis"), unique_namespace())
    output = tmp_path / "spans.jsonl"
    done = asyncio.Event()
    bus = EventBus(url, close_grace=2.0)
    instrument(bus, spans.provider)

    @bus.subscribe("research.complete", name="writer")
    async def write(event: Event[str]) -> None:
        done.set()

    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.tracing_worker",
        url,
        str(output),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with bus:
            assert worker.stdout is not None
            assert worker.stderr is not None
            line = await asyncio.wait_for(worker.stdout.readline(), 30)
            assert line.strip() == b"ready", await worker.stderr.read()
            await bus.publish("user.query", "why?")
            await asyncio.wait_for(done.wait(), 20)
            await wait_until(lambda: bool(spans.named("handle research.complete")), 5)
            code = await asyncio.wait_for(worker.wait(), 20)
            assert code == 0, await worker.stderr.read()
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()

    remote = {record["name"]: record for record in map(json.loads, output.read_text().splitlines())}
    local = {span.name: span_record(span) for span in spans.finished}
    assert set(remote) == {"handle user.query", "publish research.complete"}
    assert set(local) == {"publish user.query", "handle research.complete"}
    assert len({record["trace_id"] for record in [*remote.values(), *local.values()]}) == 1
    # The remote handling span's parent is this process's publish span, and back.
    assert remote["handle user.query"]["parent_span_id"] == local["publish user.query"]["span_id"]
    assert (
        remote["publish research.complete"]["parent_span_id"]
        == remote["handle user.query"]["span_id"]
    )
    assert (
        local["handle research.complete"]["parent_span_id"]
        == remote["publish research.complete"]["span_id"]
    )
    assert remote["handle user.query"]["attributes"]["eventwire.subscription"] == "researcher"
    assert remote["handle user.query"]["kind"] == "CONSUMER"


async def test_an_event_published_again_links_to_its_first_publish(
    traced: EventBus, spans: Spans
) -> None:
    received: list[Event[Any]] = []
    traced.subscribe("again", received.append, name="collector")
    await traced.publish("again", 1)
    await traced.drain(timeout=5)
    await traced.publish(received[0])
    await traced.drain(timeout=5)

    first, second = spans.named("publish again")
    assert trace_id(first) != trace_id(second)
    assert [link.context.span_id for link in second.links] == [span_id(first)]
    assert received[1].id == received[0].id
    assert received[1].trace_context != received[0].trace_context


def docs_example() -> str:
    text = (ROOT / "docs" / "tracing.md").read_text(encoding="utf-8")
    section = text.split("## Example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "docs/tracing.md has no python block under 'Example'"
    return match.group(1)


def test_the_docs_example_runs_as_shown(tmp_path: Path) -> None:
    code = docs_example()
    assert "EventBus(tracing=True)" in code
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "sent: Dear user, here are your notes on revenue" in lines
    span_lines = [line.split() for line in lines if not line.startswith("sent:")]
    names = [" ".join(words[4:6]) for words in span_lines]
    assert sorted(names) == sorted(
        [
            "publish user.query",
            "handle user.query",
            "publish research.complete",
            "handle research.complete",
            "publish email",
            "handle email",
        ]
    )
    assert len({words[0] for words in span_lines}) == 1  # one trace
    assert [words[6] for words in span_lines if words[4] == "handle"] == ["handled"] * 3


async def test_without_an_sdk_the_trace_context_still_passes_through(spans: Spans) -> None:
    """A process with tracing on but no SDK (the API's no-op provider) records nothing, yet a
    trace that comes in from a traced process goes on to the next one, as the API's
    non-recording spans would carry it."""
    upstream = spans.provider.get_tracer("upstream")
    with upstream.start_as_current_span("upstream publish") as span:
        incoming: dict[str, str] = {}
        inject(incoming)
    traceparent = incoming["traceparent"]
    assert format(span.get_span_context().trace_id, "032x") in traceparent

    seen_in_handler: list[str] = []
    forwarded: list[Event[Any]] = []
    bus = EventBus()
    tracing = bus.observe(Tracing(trace.NoOpTracerProvider()))

    async def research(event: Event[Any]) -> None:
        carrier: dict[str, str] = {}
        inject(carrier)  # what an instrumented HTTP client would send on
        seen_in_handler.append(carrier.get("traceparent", ""))
        await bus.publish("research.complete", event.payload)

    bus.subscribe("user.query", research, name="research")
    bus.subscribe("research.complete", forwarded.append, name="email")
    async with bus:
        received = Event("user.query", "q")  # as decoded from a traced process's envelope
        set_trace_context(received, incoming)
        await bus.publish(received)
        await bus.publish("user.query", "untraced")
        await bus.drain(timeout=5)

    assert tracing._silent()
    assert seen_in_handler == [traceparent, ""]
    assert [e.trace_context.get("traceparent") for e in forwarded] == [traceparent, None]
    assert spans.names() == ["upstream publish"]  # nothing recorded in this process
