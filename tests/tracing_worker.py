"""A second process for the tracing test: a traced bus on URL whose "researcher" handles one
`user.query` and publishes `research.complete`, then writes the spans it finished to SPANS
(one JSON object a line) and exits.

    python -m tests.tracing_worker URL SPANS
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eventwire import Event, EventBus
from eventwire.tracing import instrument


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """What the test compares: names, ids (hex) and attributes of one finished span."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": None if span.parent is None else f"{span.parent.span_id:016x}",
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
    }


async def main(url: str) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = EventBus(url, close_grace=2.0)
    instrument(bus, provider)

    @bus.subscribe("user.query", name="researcher")
    async def research(event: Event[str]) -> None:
        await bus.publish("research.complete", f"notes on {event.payload}")

    def handled() -> bool:
        return any(span.name == "handle user.query" for span in exporter.get_finished_spans())

    async with bus:
        print("ready", flush=True)
        async with asyncio.timeout(30):
            while not handled():  # noqa: ASYNC110 - spans are exported, nothing to await
                await asyncio.sleep(0.01)
    finished = list(exporter.get_finished_spans())
    provider.shutdown()
    return finished


if __name__ == "__main__":
    finished = asyncio.run(main(sys.argv[1]))
    with open(sys.argv[2], "w") as file:
        for span in finished:
            file.write(json.dumps(span_record(span)) + "\n")
