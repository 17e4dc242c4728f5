"""The tracing modes the benchmarks compare, in one process: OpenTelemetry absent, off, and on.

- ``absent``: as without the ``eventfleet[otel]`` extra (``store.tracing`` sees no opentelemetry-api).
- ``off``: the API and an SDK tracer provider that samples nothing, and no span around the appends: what a
  deployment with the extra pays while it does not trace (one current-span look-up per append, one
  non-recording span per relay or apply batch).
- ``on``: the same provider sampling every span, exported through a ``BatchSpanProcessor`` (as in
  production) to an exporter that only counts, and the appends inside a current span (one around the
  whole run, as a batch job's): they store their trace context, the relay's and workers' spans are
  recorded with their links. What eventfleet adds to a traced application.
- ``span per append``: as ``on``, but each append inside a span of its own, as inside an application's
  request span: the application's own cost of tracing (about 40 us per span here) is counted too.

OpenTelemetry lets a process set its tracer provider once, so the provider is set once and its sampler
switched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

from store import tracing

MODES = ("absent", "off", "on", "span per append")
NOISE_IS = "the widest spread of one mode's repeated runs, absent or off, at least 2%"


def noise(*runs: Sequence[float]) -> float:
    """How far apart repeated runs of the same code landed in this run: (max - min) / mean of each mode's
    figures, the widest of them, and at least 2%."""
    return max([0.02, *((max(r) - min(r)) / (sum(r) / len(r)) for r in runs if len(r) > 1)])


class CountingExporter(SpanExporter):
    """Drops every span, counting them."""

    def __init__(self) -> None:
        self.spans = 0
        self.links = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        self.links += sum(len(s.links) for s in spans)
        return SpanExportResult.SUCCESS


class Switch(Sampler):
    """Samples every span while ``on`` (keeping the parent's trace state), none otherwise."""

    def __init__(self) -> None:
        self.on = False

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.RECORD_AND_SAMPLE if self.on else Decision.DROP, attributes,
                              parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return "bench.tracing.Switch"


class Tracing:
    """The process's tracer provider, and the mode the appends and spans run in."""

    def __init__(self) -> None:
        self.sampler, self.exporter = Switch(), CountingExporter()
        self.processor = BatchSpanProcessor(self.exporter)
        provider = TracerProvider(sampler=self.sampler)
        provider.add_span_processor(self.processor)
        trace.set_tracer_provider(provider)
        self.tracer = trace.get_tracer("bench")
        self.mode = "absent"

    @contextlib.contextmanager
    def running(self, mode: str) -> Iterator[None]:
        """Run the block in ``mode``."""
        assert mode in MODES, mode
        self.mode, self.sampler.on = mode, mode in ("on", "span per append")
        try:
            with contextlib.ExitStack() as stack:
                if mode == "absent":
                    stack.enter_context(mock.patch.object(tracing, "_OTEL", None))
                if mode == "on":  # tasks started in the block inherit it as their current span
                    stack.enter_context(self.tracer.start_as_current_span("run"))
                yield
        finally:
            self.mode, self.sampler.on = "absent", False

    def request(self) -> contextlib.AbstractContextManager[Any]:
        """The span around one append in mode ``span per append``: the application's request span."""
        if self.mode == "span per append":
            return self.tracer.start_as_current_span("request")
        return contextlib.nullcontext()

    def exported(self) -> tuple[int, int]:
        """Spans and links exported so far (after flushing the processor's queue)."""
        self.processor.force_flush()
        return self.exporter.spans, self.exporter.links
