"""projections.testing: OrderSummary's handlers on events from an InMemoryEventStore, in a throwaway schema."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import asyncpg

from eventfleet.examples.orders import orders
from eventfleet.examples.orders.projections import OrderSummary
from projections.testing import read_model
from store import InMemoryEventStore, RecordedEvent, Repository
from tests.conftest import DATABASE_URL

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ITEMS = [orders.LineItem("p1", "Pen", "SKU-1", 2, Decimal("1.25")),
         orders.LineItem("p2", "Ink", "SKU-2", 1, Decimal("10.00"))]


async def order_lives() -> list[RecordedEvent]:
    """Order 42 placed, paid and shipped; order 43 placed and cancelled: their events, in commit order."""
    store = InMemoryEventStore()
    repository = Repository(store, orders.Order)
    await repository.execute("order-42", orders.place("42", "c7", ITEMS, at=T0))
    await repository.execute("order-43", orders.place("43", "c7", ITEMS[:1], at=T0))
    await repository.execute("order-42", orders.pay(at=T0 + dt.timedelta(minutes=1)))
    await repository.execute("order-43", orders.cancel("changed my mind", at=T0 + dt.timedelta(minutes=2)))
    await repository.execute("order-42", orders.ship("dhl", at=T0 + dt.timedelta(minutes=3)))
    return await store.read_all()


async def summaries(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await conn.fetch("SELECT order_id, customer_id, status, item_count, total, placed_at, updated_at"
                            " FROM order_summary ORDER BY order_id")
    return [tuple(r) for r in rows]


EXPECTED = [
    ("42", "c7", "shipped", 3, Decimal("15.00"), T0, T0 + dt.timedelta(minutes=3)),
    ("43", "c7", "cancelled", 2, Decimal("3.00"), T0, T0 + dt.timedelta(minutes=2)),
]


async def test_order_summary_of_events_from_an_in_memory_store():
    events = await order_lives()
    async with read_model(DATABASE_URL, OrderSummary) as model:
        await model.apply(OrderSummary(), events)
        assert await summaries(model.conn) == EXPECTED


async def test_order_summary_s_batch_path_leaves_the_rows_of_its_handlers():
    events = await order_lives()
    async with read_model(DATABASE_URL, OrderSummary) as model:
        await model.apply(OrderSummary(), events, batch=True)
        assert await summaries(model.conn) == EXPECTED


async def test_a_read_model_s_schema_is_dropped_on_exit():
    async with read_model(DATABASE_URL, OrderSummary) as model:
        schema = model.schema
        assert await model.conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'order_summary'", schema) == 1
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema) == 0
    finally:
        await conn.close()
