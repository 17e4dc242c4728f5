"""The orders read models: order_summary (one row per order) and customer_stats (counters per customer).

customer_stats only increments, so applying any event twice shows: it is the proof of exactly-once.
Each also has a set-based ``apply_batch`` (a statement or two per batch, not per event) with the same
effect as its handlers one by one; the worker uses it on its fast path.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from projections.base import Projection, handles
from projections.registry import register
from store import db, queries
from store.event_store import RecordedEvent

SQL = queries.load("eventfleet.examples.orders", "orders.sql")


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

    async def apply_batch(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        """Insert the batch's new orders, then set each order's last status: two statements.

        That equals the handlers in order as long as no order has a status change before its placement or
        two placements in the batch (never in the domain); such a batch goes the slow, exact way. An order's
        row is only written under its own stream's checkpoint lock, so these statements contend with nobody.
        """
        placed: dict[str, OrderPlaced] = {}
        status: dict[str, tuple[str, object]] = {}
        for event in events:
            e = event.event
            if isinstance(e, OrderPlaced):
                if e.order_id in placed or e.order_id in status:
                    await super().apply_batch(conn, events)
                    return
                placed[e.order_id] = e
            elif isinstance(e, OrderPaid):
                status[e.order_id] = ("paid", e.paid_at)
            elif isinstance(e, OrderShipped):
                status[e.order_id] = ("shipped", e.shipped_at)
            elif isinstance(e, OrderCancelled):
                status[e.order_id] = ("cancelled", e.cancelled_at)
        if placed:
            rows = list(placed.values())
            await conn.execute(SQL["summary_placed_batch"], [e.order_id for e in rows],
                               [e.customer_id for e in rows], [sum(i.quantity for i in e.items) for e in rows],
                               [e.total for e in rows], [e.placed_at for e in rows])
        if status:
            await conn.execute(SQL["summary_status_batch"], list(status), [s for s, _ in status.values()],
                               [at for _, at in status.values()])


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

    async def apply_batch(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        """Sum the batch's increments per customer and upsert them in one statement."""
        sums: dict[str, list[int | Decimal]] = {}
        for event in events:
            e = event.event
            if isinstance(e, (OrderPlaced, OrderCancelled, OrderPaid)):
                row = sums.setdefault(e.customer_id, [0, 0, Decimal(0)])
                if isinstance(e, OrderPlaced):
                    row[0] += 1
                elif isinstance(e, OrderCancelled):
                    row[1] += 1
                else:
                    row[2] += e.amount
        if sums:
            await conn.execute(SQL["stats_batch"], list(sums), [r[0] for r in sums.values()],
                               [r[1] for r in sums.values()], [r[2] for r in sums.values()])
