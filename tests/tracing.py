"""An SDK tracer provider for the tests, set once per process, that samples only while a test holds ``spans``.

OpenTelemetry lets a process set its global tracer provider once, so the tests share one; sampling nothing
outside the tracing tests keeps the relays and workers of every other test as they are without it (one
non-recording span per batch, no links).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult


class Switch(Sampler):
    """Samples every span while ``on``, none otherwise; keeps the parent's trace state, as the SDK's own do."""

    def __init__(self) -> None:
        self.on = False

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Sequence[Any] | None = None,
                      trace_state: Any = None) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.RECORD_AND_SAMPLE if self.on else Decision.DROP, attributes,
                              parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return "tests.tracing.Switch"


SWITCH = Switch()
EXPORTER = InMemorySpanExporter()
_provider: TracerProvider | None = None


def recording() -> Iterator[InMemorySpanExporter]:
    """Sample and keep every span until the generator is closed; the spans are in the exporter."""
    global _provider
    if _provider is None:
        _provider = TracerProvider(sampler=SWITCH)
        _provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(_provider)
    EXPORTER.clear()
    SWITCH.on = True
    try:
        yield EXPORTER
    finally:
        SWITCH.on = False
        EXPORTER.clear()


def tracer() -> trace.Tracer:
    """The tests' own tracer, for the spans a test makes around appends."""
    return trace.get_tracer("tests")
