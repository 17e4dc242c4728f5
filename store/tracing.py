"""OpenTelemetry, with the ``eventfleet[otel]`` extra: each event keeps the trace context of its append, and the
relay's publish and a worker's apply are spans linked to the contexts of the events they carry.

Without ``opentelemetry-api`` nothing here does anything: each function checks one module global first.

The context travels in each event's **metadata** (W3C ``traceparent``, and ``tracestate`` when there is one),
so every message format carries it, and any reader of the store finds it. It is written with the W3C
propagator itself, not the process's configured one: the store keeps events for good and is read by other
processes (relays, workers, other services) configured on their own, and a composite propagator would also
write the context's baggage, application data, into every event for ever. The relay and the workers link
their spans to the stored contexts instead of parenting them: one batch holds the events of many traces.
Links are added once the span has started (``Span.add_link``), so a sampler never sees them, and only to a
recording span, so an unsampled or unconfigured tracer costs one span per batch and no per-event work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the eventfleet[otel] extra is not installed
    _installed = False
else:
    _installed = True

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: The metadata keys of the trace context (also copied to the message headers by the relay).
KEYS = (TRACEPARENT, TRACESTATE)

_NOTHING: contextlib.nullcontext[None] = contextlib.nullcontext()


class _OpenTelemetry:
    """What the functions below do when opentelemetry-api is importable."""

    def __init__(self) -> None:
        self.propagator = TraceContextTextMapPropagator()
        # A proxy until the application sets its tracer provider, whenever it does.
        self.tracer = trace.get_tracer("eventfleet")

    def inject(self, carrier: dict[str, Any]) -> None:
        if trace.get_current_span().get_span_context().is_valid:
            self.propagator.inject(carrier)

    @contextlib.contextmanager
    def span(self, name: str, kind: trace.SpanKind, attributes: dict[str, Any],
             carriers: Iterable[Mapping[str, Any]]) -> Iterator[None]:
        with self.tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
            if span.is_recording():
                for context in self.contexts(carriers):
                    span.add_link(context)
            yield

    def contexts(self, carriers: Iterable[Mapping[str, Any]]) -> Iterator[trace.SpanContext]:
        """The distinct valid span contexts stored in ``carriers`` (events of one request share theirs)."""
        seen: set[tuple[Any, Any]] = set()
        for carrier in carriers:
            key = (carrier.get(TRACEPARENT), carrier.get(TRACESTATE))
            if not isinstance(key[0], str) or key in seen:
                continue
            seen.add(key)
            context = trace.get_current_span(self.propagator.extract(carrier)).get_span_context()
            if context.is_valid:
                yield context


_OTEL = _OpenTelemetry() if _installed else None


def inject(carrier: dict[str, Any]) -> None:
    """Write the current span's context into ``carrier`` (an append's metadata), if there is a valid one."""
    if _OTEL is not None:
        _OTEL.inject(carrier)


def publish_span(exchange: str, count: int,
                 carriers: Iterable[Mapping[str, Any]]) -> contextlib.AbstractContextManager[None]:
    """The span of the relay's publish of ``count`` messages to ``exchange``, linked to the contexts found in
    ``carriers`` (the messages' headers or their events' metadata; read only when the span records)."""
    if _OTEL is None:
        return _NOTHING
    return _OTEL.span(f"{exchange} publish", trace.SpanKind.PRODUCER, {
        "messaging.system": "rabbitmq", "messaging.operation": "publish",
        "messaging.destination.name": exchange, "messaging.batch.message_count": count}, carriers)


def process_span(queue: str, projection: str, count: int,
                 carriers: Iterable[Mapping[str, Any]]) -> contextlib.AbstractContextManager[None]:
    """The span of a worker applying ``count`` events of ``queue`` to ``projection``, linked to the contexts
    found in ``carriers`` (the events' metadata; read only when the span records)."""
    if _OTEL is None:
        return _NOTHING
    return _OTEL.span(f"{queue} process", trace.SpanKind.CONSUMER, {
        "messaging.system": "rabbitmq", "messaging.operation": "process",
        "messaging.destination.name": queue, "messaging.batch.message_count": count,
        "eventfleet.projection": projection}, carriers)


def without_context(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata but for its trace context (what a retried append must repeat exactly)."""
    return {k: v for k, v in metadata.items() if k not in KEYS}
