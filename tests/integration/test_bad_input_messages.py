"""Hostile deliveries through a real worker: each one becomes a dead letter with its body, nothing crashes,
and the good events around them are applied exactly once."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aio_pika
import msgpack
import pytest

from eventfleet.examples.orders.events import OrderPaid, OrderPlaced
from eventfleet.examples.orders.projections import CustomerStats
from store import NO_STREAM, EventStore, codec, db
from tests.conftest import AMQP_URL, DATABASE_URL
from workers import broker, projector
from workers.config import Settings

NOW = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)


def _body(**changes: Any) -> bytes:
    event_type, data = codec.REGISTRY.encode(OrderPaid("o", "c", Decimal(1), NOW))
    fields = {"event_id": str(uuid.uuid4()), "stream_id": "order-x", "version": 0, "global_position": 1,
              "transaction_id": 1, "event_type": event_type, "data": data, "metadata": {},
              "recorded_at": msgpack.Timestamp.from_datetime(NOW)} | changes
    return msgpack.packb(fields, default=codec._default, use_bin_type=True, datetime=False)


BAD_BODIES = [
    b"",
    b"\xff\xfe garbage",
    b"\xdf\xff\xff\xff\xff",  # a map header claiming 4 billion entries
    msgpack.packb([1, 2, 3]),
    _body(version=2**63),  # beyond bigint: used to fail only at the checkpoint
    _body(version=-1),
    _body(global_position="1"),
    _body(stream_id="a\x00b"),
    _body(stream_id="x" * 10_000),
    _body(event_id="'; DROP TABLE events; --"),
    _body(event_type="Unknown.v1"),
    _body(event_type="OrderPaid.v7"),
    _body(event_type=["OrderPaid.v1"]),
    # An old version its upcaster cannot read: used to raise KeyError and crash the worker.
    _body(event_type="OrderPlaced.v1", data=codec.packb({"order_id": "o", "customer_id": "c", "placed_at": NOW})),
    _body(data=codec.packb({"order_id": 1, "customer_id": "c", "amount": "NaN", "paid_at": NOW})),
    _body(data=b"\xc1"),
    _body(metadata="not a map"),
    _body(recorded_at="yesterday"),
]


@pytest.fixture
async def channel(prefix: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    names = broker.Names(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        try:
            yield await connection.channel()
        finally:
            cleanup = await connection.channel()
            await cleanup.queue_delete(names.queue("customer_stats"))
            await cleanup.queue_delete(names.dead_letter_queue("customer_stats"))
            await cleanup.exchange_delete(names.exchange)
            await cleanup.exchange_delete(names.dead_letter_exchange)


async def test_every_bad_delivery_is_dead_lettered_and_the_good_ones_applied(
        pool: db.Pool, event_store: EventStore, channel: aio_pika.abc.AbstractChannel, schema: str,
        prefix: str) -> None:
    names = broker.Names(prefix)
    exchange = await broker.declare_topology(channel, names, ["customer_stats"])
    hostile = ['c"1', "c'1", "c-日本-🎉"]
    for i, customer in enumerate(hostile):
        await event_store.append(f"order-'{i}\"", [
            OrderPlaced(str(i), customer, (), Decimal(2), Decimal(0), Decimal(2), NOW),
            OrderPaid(str(i), customer, Decimal(2), NOW)], NO_STREAM)
    good = [e for i in range(len(hostile)) for e in await event_store.load(f"order-'{i}\"")]
    for event in good[:3]:
        await exchange.publish(broker.to_message(event), routing_key=event.event_type)
    for body in BAD_BODIES:  # to the queue directly, as any other publisher could
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=names.queue("customer_stats"))
    for event in good[3:] + good[:2]:  # and two redeliveries
        await exchange.publish(broker.to_message(event), routing_key=event.event_type)

    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix,
                        http_port=0, prefetch=50, batch_size=20)
    stats = await projector.consume_until_idle(pool, channel, CustomerStats(), settings)

    assert (stats.applied, stats.undecodable, stats.duplicates) == (len(good), len(BAD_BODIES), 2)
    rows = await pool.fetch("SELECT body, status, error FROM dead_letters WHERE projection = 'customer_stats'")
    assert sorted(r["body"] for r in rows) == sorted(BAD_BODIES)
    assert all(r["status"] == "parked" and r["error"] for r in rows)
    stats_rows = await pool.fetch("SELECT customer_id, orders_placed, total_spent FROM customer_stats")
    assert sorted((r["customer_id"], r["orders_placed"], r["total_spent"]) for r in stats_rows) == sorted(
        (c, 1, Decimal(2)) for c in hostile)
