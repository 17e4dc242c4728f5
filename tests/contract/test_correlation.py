"""What every store adds to its events' metadata: correlation and causation ids, and the trace context."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from store import (
    NO_STREAM,
    Correlation,
    DuplicateEventId,
    InvalidInput,
    NewEvent,
    Repository,
    Store,
    caused_by,
    correlation,
)
from tests.contract.counters import Counter, increment
from tests.contract.test_appends import paid
from tests.tracing import tracer


async def metadata_of(store: Store, stream_id: str = "s") -> list[Mapping[str, Any]]:
    return [e.metadata for e in await store.load(stream_id)]


def traceparent(span: trace.Span) -> str:
    """The W3C traceparent of a span: version 00, its ids and its flags (sampled, and the SDK's random ids)."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


async def test_every_event_of_an_append_in_a_correlation_scope_stores_its_ids(event_store):
    with correlation(correlation_id="request-1", causation_id="command-1"):
        await event_store.append("s", [paid(1), paid(2)], NO_STREAM)
        await event_store.append_batch([("t", [paid(3)], NO_STREAM), ("u", [paid(4)], NO_STREAM)])
    ids = {"correlation_id": "request-1", "causation_id": "command-1"}
    assert [*await metadata_of(event_store, "s"), *await metadata_of(event_store, "t"),
            *await metadata_of(event_store, "u")] == [ids, ids, ids, ids]


async def test_an_append_outside_any_scope_stores_no_ids(event_store):
    await event_store.append("s", [paid(1)], NO_STREAM)
    assert await metadata_of(event_store) == [{}]


async def test_an_inner_scope_overrides_the_ids_it_names_and_keeps_the_outer_ones_until_it_ends(event_store):
    with correlation(correlation_id="request-1", causation_id="command-1"):
        with correlation(causation_id="command-2"):
            await event_store.append("s", [paid(1)], NO_STREAM)
        await event_store.append("s", [paid(2)], 0)
    await event_store.append("s", [paid(3)], 1)
    assert await metadata_of(event_store) == [
        {"correlation_id": "request-1", "causation_id": "command-2"},
        {"correlation_id": "request-1", "causation_id": "command-1"},
        {}]


async def test_the_ids_given_to_append_win_over_the_scopes(event_store):
    with correlation(correlation_id="request-1", causation_id="command-1"):
        await event_store.append("s", [paid(1)], NO_STREAM, correlation_id="request-2")
        await event_store.append_batch([("t", [paid(2)], NO_STREAM)], causation_id="command-2")
    assert await metadata_of(event_store, "s") == [{"correlation_id": "request-2", "causation_id": "command-1"}]
    assert await metadata_of(event_store, "t") == [{"correlation_id": "request-1", "causation_id": "command-2"}]


async def test_the_keys_of_a_new_events_own_metadata_win_over_the_arguments_and_the_scope(event_store):
    own = NewEvent(paid(1), metadata={"correlation_id": "own", "tenant": "t1"})
    with correlation(correlation_id="request-1", causation_id="command-1"):
        await event_store.append("s", [own, paid(2)], NO_STREAM, correlation_id="request-2")
    assert await metadata_of(event_store) == [
        {"correlation_id": "own", "causation_id": "command-1", "tenant": "t1"},
        {"correlation_id": "request-2", "causation_id": "command-1"}]


async def test_execute_stores_its_ids_with_the_commands_events(counters):
    repository = Repository(counters, Counter)
    await repository.execute("c", increment(1), correlation_id="request-1", causation_id="command-1")
    with correlation(correlation_id="request-2"):
        await repository.execute("c", increment(2))
    assert await metadata_of(counters, "c") == [{"correlation_id": "request-1", "causation_id": "command-1"},
                                                {"correlation_id": "request-2"}]


async def test_follow_ups_appended_in_caused_by_carry_the_correlation_on_and_name_their_cause(event_store):
    await event_store.append("s", [paid(1)], NO_STREAM, correlation_id="request-1")
    (cause,) = await event_store.load("s")
    with caused_by(cause) as scope:
        await event_store.append("t", [paid(2)], NO_STREAM)
    assert scope == Correlation("request-1", str(cause.event_id))
    assert await metadata_of(event_store, "t") == [{"correlation_id": "request-1", "causation_id": str(cause.event_id)}]


@pytest.mark.parametrize("metadata", [None, {"correlation_id": 7}, {"correlation_id": "x" * 256}])
async def test_an_event_without_a_usable_correlation_starts_one_with_its_own_id(event_store, metadata):
    await event_store.append("s", [NewEvent(paid(1), metadata=metadata)], NO_STREAM)
    (cause,) = await event_store.load("s")
    assert Correlation.caused_by(cause) == Correlation(str(cause.event_id), str(cause.event_id))


@pytest.mark.parametrize("bad", ["", "x" * 256, "é" * 128, 7])
async def test_an_id_that_is_not_a_short_non_empty_str_is_refused_before_anything_is_written(
        event_store, written, bad):
    with pytest.raises(InvalidInput):
        await event_store.append("s", [paid(1)], NO_STREAM, correlation_id=bad)
    with pytest.raises(InvalidInput):
        await event_store.append_batch([("s", [paid(1)], NO_STREAM)], causation_id=bad)
    with pytest.raises(InvalidInput), correlation(correlation_id=bad):
        pass
    assert await written() == 0


async def test_an_append_inside_a_span_stores_its_trace_context_with_every_event(event_store, spans):
    with tracer().start_as_current_span("request") as span:
        await event_store.append("s", [paid(1), NewEvent(paid(2), metadata={"tenant": "t1"})], NO_STREAM)
    assert await metadata_of(event_store) == [{"traceparent": traceparent(span)},
                                              {"traceparent": traceparent(span), "tenant": "t1"}]


async def test_the_trace_state_is_stored_beside_the_trace_parent(event_store, spans):
    remote = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED),
                         trace_state=TraceState([("vendor", "v1")]))
    with tracer().start_as_current_span("request", context=trace.set_span_in_context(NonRecordingSpan(remote))) as span:
        await event_store.append("s", [paid(1)], NO_STREAM)
    assert await metadata_of(event_store) == [{"traceparent": traceparent(span), "tracestate": "vendor=v1"}]


async def test_an_append_outside_any_span_stores_no_trace_context(event_store, spans):
    await event_store.append("s", [paid(1)], NO_STREAM)
    assert await metadata_of(event_store) == [{}]


async def test_the_same_events_appended_again_in_another_trace_are_a_retry(event_store, written, spans):
    events = [NewEvent(paid(1), uuid.uuid4(), {"tenant": "t1"}), NewEvent(paid(2), uuid.uuid4())]
    with tracer().start_as_current_span("request") as first:
        original = await event_store.append("s", events, NO_STREAM, correlation_id="request-1")
    with tracer().start_as_current_span("the request retried"):
        again = await event_store.append("s", events, NO_STREAM, correlation_id="request-1")
    assert again == original
    assert await written() == 2
    assert [m["traceparent"] for m in await metadata_of(event_store)] == [traceparent(first)] * 2


async def test_the_same_events_appended_again_with_another_correlation_are_refused(event_store, written):
    events = [NewEvent(paid(1), uuid.uuid4())]
    await event_store.append("s", events, NO_STREAM, correlation_id="request-1")
    with pytest.raises(DuplicateEventId):
        await event_store.append("s", events, NO_STREAM, correlation_id="request-2")
    assert await written() == 1
