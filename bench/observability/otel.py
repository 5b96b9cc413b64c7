"""The OpenTelemetry setups every traced measurement uses, and the span bookkeeping.

`Tracing` says which setup a measurement runs with:

- ``off``: no tracing at all (the library's tracing is not turned on, or turned off);
- ``api``: the library's tracing is on, but no SDK tracer provider is installed: the
  OpenTelemetry API hands out non-recording spans (what a library pays when tracing is wired
  in but nobody collects);
- ``sdk``: an SDK `TracerProvider` with a `BatchSpanProcessor` feeding an exporter that
  counts the spans and drops them: every span is created, recorded, queued and handed to an
  exporter, and only the export itself costs nothing. The processor's defaults, except a
  queue of `QUEUE_SIZE` spans instead of 2,048: with the default, a publisher that enqueues
  a burst without yielding (autogen-core's `publish_message` never waits) fills the queue
  and the processor silently drops about half of the spans, which would make that library
  look cheaper for doing less.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

Tracing = Literal["off", "api", "sdk"]

QUEUE_SIZE = 1_000_000


class DropExporter(SpanExporter):
    """Counts the spans it is given and keeps none."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


class KeepExporter(SpanExporter):
    """Keeps (name, trace id) of every span: for the verification pass only."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, int]] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend((span.name, span.context.trace_id) for span in spans)
        return SpanExportResult.SUCCESS


class Setup:
    """The tracer provider of one measurement, or None for ``off`` and ``api``.

    `verify` swaps the drop exporter for a `KeepExporter` behind a synchronous processor, so
    that no span can be lost to a full queue while they are counted.
    """

    def __init__(self, tracing: Tracing, *, verify: bool = False) -> None:
        self.tracing = tracing
        self.dropper = DropExporter()
        self.keeper = KeepExporter()
        self.provider: TracerProvider | None = None
        if tracing == "sdk":
            self.provider = TracerProvider()
            if verify:
                self.provider.add_span_processor(SimpleSpanProcessor(self.keeper))
            else:
                self.provider.add_span_processor(
                    BatchSpanProcessor(self.dropper, max_queue_size=QUEUE_SIZE)
                )

    def install_globally(self) -> None:
        """Make the provider the global one (for libraries that look it up there)."""
        if self.provider is not None:
            trace.set_tracer_provider(self.provider)

    def flush(self) -> None:
        """Wait until every span ended so far was exported: part of the timed work."""
        if self.provider is not None:
            self.provider.force_flush()

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()

    def span_metrics(self, roots: int) -> dict[str, float]:
        """Spans exported per root event in the timed pass (the batch processor drops spans
        when its queue is full: this shows it), or what the verification pass saw."""
        if self.provider is None:
            return {}
        if self.keeper.spans:
            traces = {trace_id for _, trace_id in self.keeper.spans}
            return {
                "spans_per_root": len(self.keeper.spans) / roots,
                "traces_per_root": len(traces) / roots,
            }
        return {"exported_per_root": self.dropper.exported / roots}

    def span_names(self) -> list[str]:
        """Distinct span names seen by the verification pass, sorted."""
        return sorted({name for name, _ in self.keeper.spans})
