"""The orders read models: order_summary (one row per order) and customer_stats (counters per customer).

customer_stats only increments, so applying any event twice shows: it is the proof of exactly-once.
"""

from __future__ import annotations

from domain.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from projections.base import Projection, handles
from projections.registry import register
from store import db, queries
from store.event_store import RecordedEvent

SQL = queries.load("projections", "orders.sql")


@register
class OrderSummary(Projection):
    """One row per order: status, item count, total and timestamps."""

    name = "order_summary"
    tables = ("order_summary",)
    ddl = SQL["order_summary_ddl"]

    @handles(OrderPlaced)
    async def placed(self, conn: db.Conn, event: RecordedEvent) -> None:
        e: OrderPlaced = event.event
        await conn.execute(SQL["summary_placed"], e.order_id, e.customer_id,
                           sum(item.quantity for item in e.items), e.total, e.placed_at)

    @handles(OrderPaid)
    async def paid(self, conn: db.Conn, event: RecordedEvent) -> None:
        e: OrderPaid = event.event
        await conn.execute(SQL["summary_status"], e.order_id, "paid", e.paid_at)

    @handles(OrderShipped)
    async def shipped(self, conn: db.Conn, event: RecordedEvent) -> None:
        e: OrderShipped = event.event
        await conn.execute(SQL["summary_status"], e.order_id, "shipped", e.shipped_at)

    @handles(OrderCancelled)
    async def cancelled(self, conn: db.Conn, event: RecordedEvent) -> None:
        e: OrderCancelled = event.event
        await conn.execute(SQL["summary_status"], e.order_id, "cancelled", e.cancelled_at)


@register
class CustomerStats(Projection):
    """Per customer: orders placed, orders cancelled, total spent."""

    name = "customer_stats"
    tables = ("customer_stats",)
    ddl = SQL["customer_stats_ddl"]

    @handles(OrderPlaced)
    async def placed(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute(SQL["stats_placed"], event.event.customer_id)

    @handles(OrderCancelled)
    async def cancelled(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute(SQL["stats_cancelled"], event.event.customer_id)

    @handles(OrderPaid)
    async def paid(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute(SQL["stats_paid"], event.event.customer_id, event.event.amount)
