"""One event followed through the pipeline: its append's trace context, the relay's publish span and
headers, the worker's apply span; and the pipeline without OpenTelemetry installed."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eventfleet.examples.orders.projections import OrderSummary
from store import NO_STREAM, NewEvent, correlation, db
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.tracing import tracer
from workers import broker, projector, relay
from workers.config import Settings

from .test_relay_helpers import order_events

ROOT = Path(__file__).resolve().parents[2]
PROJECTION = OrderSummary.name


@pytest.fixture
async def exchange(amqp, prefix) -> AsyncIterator[broker.Targets]:
    """The relay's targets: order_summary's partition queues, on a confirming channel as the relay has; deleted
    after the test."""
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    yield await broker.declare_topology(channel, broker.Names(prefix), [PROJECTION], PARTITIONS)
    await broker.delete_topology(await amqp.channel(), broker.Names(prefix), [PROJECTION], PARTITIONS)


@pytest.fixture
async def tapped(amqp, prefix, exchange) -> AsyncIterator[tuple[broker.Targets, AbstractQueue]]:
    """The targets with the per-event topic exchange too, and a queue of this test's bound to it for every event
    (exclusive: gone with the connection)."""
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    targets = await broker.declare_topology(channel, broker.Names(prefix), [PROJECTION], PARTITIONS,
                                            events_exchange=True)
    assert targets.events_exchange is not None
    tap = await (await amqp.channel()).declare_queue(exclusive=True)
    await tap.bind(broker.Names(prefix).exchange, routing_key="#")
    yield targets, tap
    await (await amqp.channel()).exchange_delete(broker.Names(prefix).exchange)


@pytest.fixture
def settings(schema: str, prefix: str) -> Settings:
    return Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)


def ids(span: trace.Span | ReadableSpan) -> tuple[int, int]:
    context = span.get_span_context()
    assert context is not None
    return context.trace_id, context.span_id


def one(spans: InMemorySpanExporter, kind: trace.SpanKind) -> ReadableSpan:
    (span,) = [s for s in spans.get_finished_spans() if s.kind == kind]
    return span


def links(span: ReadableSpan) -> list[tuple[int, int]]:
    return [(link.context.trace_id, link.context.span_id) for link in span.links]


async def apply_queue(pool: db.Pool, settings: Settings) -> int:
    """Apply everything in order_summary's partition queues; return how many events were applied."""
    async with await aio_pika.connect(AMQP_URL) as connection:
        stats = await projector.consume_until_idle(pool, await connection.channel(), OrderSummary(), settings)
    return stats.applied


async def test_one_event_is_followed_from_its_append_to_the_relays_publish_and_the_workers_apply(
        pool, event_store, exchange, settings, prefix, spans):
    with tracer().start_as_current_span("place order") as placing:
        await event_store.append("order-1", order_events("1")[:1], NO_STREAM)
    assert await relay.relay_until_idle(pool, exchange) == 1
    assert await apply_queue(pool, settings) == 1

    publish, process = one(spans, trace.SpanKind.PRODUCER), one(spans, trace.SpanKind.CONSUMER)
    assert (publish.name, dict(publish.attributes or {}), links(publish)) == (
        f"{prefix}.partitions publish",
        {"messaging.system": "rabbitmq", "messaging.operation": "publish",
         "messaging.destination.name": f"{prefix}.partitions", "messaging.batch.message_count": 1},
        [ids(placing)])
    queue = broker.Names(prefix).partition_queue(PROJECTION, partition_of("order-1", PARTITIONS))
    assert (process.name, dict(process.attributes or {}), links(process)) == (
        f"{queue} process",
        {"messaging.system": "rabbitmq", "messaging.operation": "process",
         "messaging.destination.name": queue, "messaging.batch.message_count": 1,
         "eventfleet.projection": "order_summary"},
        [ids(placing)])


async def test_a_batch_links_each_distinct_trace_context_of_its_events_once(pool, event_store, exchange,
                                                                             settings, spans):
    with tracer().start_as_current_span("first request") as first:
        await event_store.append("order-1", order_events("1")[:2], NO_STREAM)
    with tracer().start_as_current_span("second request") as second:
        await event_store.append("order-2", order_events("2")[:1], NO_STREAM)
    await event_store.append("order-3", order_events("3")[:1], NO_STREAM)  # no trace: no link
    assert await relay.relay_until_idle(pool, exchange) == 4
    publish = one(spans, trace.SpanKind.PRODUCER)
    # The count is of events (the relay's batch, in 2 partition messages here), as the worker's spans count.
    assert (links(publish), publish.attributes and publish.attributes["messaging.batch.message_count"]) == (
        [ids(first), ids(second)], 4)

    # The catch-up's apply of events read from the store is one batch by construction (a consumer's
    # deliveries are split into batches as they happen to arrive).
    events = [e for s in ("order-1", "order-2", "order-3") for e in await event_store.load(s)]
    async with await aio_pika.connect(AMQP_URL) as connection:
        consumer = projector.Consumer(event_store, await connection.channel(), OrderSummary(), 1, settings)
        result = await consumer.batcher.apply_read(events, 1, consumer.gone)
    process = one(spans, trace.SpanKind.CONSUMER)
    assert len(result.applied) == 4
    assert (links(process), process.attributes and process.attributes["messaging.batch.message_count"]) == (
        [ids(first), ids(second)], 4)


async def test_a_batch_message_carries_each_events_correlation_and_trace_context_in_its_metadata(
        pool, event_store, exchange, prefix, amqp):
    with correlation(correlation_id="request-1", causation_id="command-1"), \
            tracer().start_as_current_span("place order") as placing:
        await event_store.append("order-1", order_events("1")[:1], NO_STREAM)
    await relay.relay_until_idle(pool, exchange)
    (event,) = await event_store.load("order-1")
    message = await _next_batch(amqp, prefix, partition_of("order-1", PARTITIONS))
    context = placing.get_span_context()
    assert broker.from_batch_body(message.body).events[0].metadata == {
        "correlation_id": "request-1", "causation_id": "command-1",
        "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"}
    assert (message.correlation_id, headers(message)) == (None, {
        "partition": 1, "count": 1, "first_position": event.global_position, "last_position": event.global_position})


async def test_the_relay_repeats_an_events_correlation_and_trace_context_in_its_per_event_message(
        pool, event_store, tapped, spans):
    targets, tap = tapped
    with correlation(correlation_id="request-1", causation_id="command-1"), \
            tracer().start_as_current_span("place order") as placing:
        await event_store.append("order-1", order_events("1")[:1], NO_STREAM)
    await relay.relay_until_idle(pool, targets)
    message = await tap.get(timeout=5, no_ack=True)
    context = placing.get_span_context()
    assert message.correlation_id == "request-1"
    assert headers(message) == {
        "event_type": "OrderPlaced.v2", "stream_id": "order-1", "version": 0, "correlation_id": "request-1",
        "causation_id": "command-1",
        "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"}


async def test_a_message_of_an_event_without_ids_or_trace_context_carries_neither(pool, event_store, tapped):
    targets, tap = tapped
    await event_store.append("order-1", order_events("1")[:1], NO_STREAM)
    await relay.relay_until_idle(pool, targets)
    message = await tap.get(timeout=5, no_ack=True)
    assert message.correlation_id is None
    assert headers(message) == {"event_type": "OrderPlaced.v2", "stream_id": "order-1", "version": 0}


async def test_a_correlation_id_too_long_for_the_amqp_property_travels_in_the_headers_only(
        pool, event_store, tapped):
    targets, tap = tapped
    long_id = "x" * 300  # a NewEvent's own metadata is stored as given; an AMQP shortstr holds 255 bytes
    await event_store.append("order-1", [NewEvent(order_events("1")[0], metadata={"correlation_id": long_id})],
                             NO_STREAM)
    assert await relay.relay_until_idle(pool, targets) == 1
    message = await tap.get(timeout=5, no_ack=True)
    assert (message.correlation_id, headers(message)["correlation_id"]) == (None, long_id)


def headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The headers the relay set (a quorum queue adds its x-delivery-count)."""
    return {k: v for k, v in message.headers.items() if k != "x-delivery-count"}


async def _next_batch(amqp: AbstractConnection, prefix: str, partition: int) -> AbstractIncomingMessage:
    """The first message of one of order_summary's partition queues (single active consumer queues refuse
    basic.get: consume it)."""
    channel = await amqp.channel()
    queue = await channel.declare_queue(broker.Names(prefix).partition_queue(PROJECTION, partition), passive=True)
    async with queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            break
    await channel.close()
    return message


#: Run with OpenTelemetry hidden: an append (in a correlation scope), the relay and the worker's apply.
WITHOUT_OPENTELEMETRY = """
import sys
sys.modules["opentelemetry"] = None  # what `import opentelemetry` meets when the extra is not installed
import asyncio, datetime as dt, json
from decimal import Decimal
import aio_pika
import eventfleet as ef
from eventfleet.examples.orders.events import LineItem, OrderPlaced
from eventfleet.examples.orders.projections import OrderSummary
from workers import broker

def order_events(order_id):  # tests.integration.test_relay_helpers' (its package imports the SDK)
    item = LineItem("p1", "Widget", "W-1", 2, Decimal("4.50"))
    now = dt.datetime.now(dt.UTC)
    return [OrderPlaced(order_id, "c1", (item,), Decimal("9.00"), Decimal("0.90"), Decimal("9.90"), now)]

async def main(database_url, amqp_url, schema, prefix):
    settings = ef.Settings(database_url=database_url, amqp_url=amqp_url, schema=schema, prefix=prefix, http_port=0)
    async with ef.create_pool(database_url, schema) as pool:
        store = ef.EventStore(pool, schema=schema)
        with ef.correlation(correlation_id="request-1"):
            await store.append("order-1", order_events("1")[:1], ef.NO_STREAM)
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            targets = await broker.declare_topology(channel, broker.Names(prefix), ["order_summary"],
                                                    await store.partitions())
            relayed = await ef.relay_until_idle(pool, targets)
            stats = await ef.consume_until_idle(pool, await connection.channel(), OrderSummary(), settings)
        (event,) = await store.load("order-1")
        rows = await pool.fetchval("SELECT count(*) FROM order_summary")
    loaded = sorted(m for m, module in sys.modules.items() if m.startswith("opentelemetry") and module is not None)
    print(json.dumps({"metadata": dict(event.metadata), "relayed": relayed, "applied": stats.applied,
                      "rows": rows, "opentelemetry_modules": loaded}))

asyncio.run(main(*sys.argv[1:]))
"""


async def test_without_opentelemetry_installed_append_relay_and_apply_work_and_store_no_trace_context(
        exchange, schema, prefix):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WITHOUT_OPENTELEMETRY, DATABASE_URL, AMQP_URL, schema, prefix,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    assert json.loads(out) == {"metadata": {"correlation_id": "request-1"}, "relayed": 1, "applied": 1, "rows": 1,
                               "opentelemetry_modules": []}
