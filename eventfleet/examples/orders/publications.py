"""The orders example's publication: ``orders_out`` tells other services about orders, in a contract of its own.

Each order event becomes an integration event with a public type (``orders.placed.v1``, ``orders.paid.v1``,
``orders.shipped.v1``, ``orders.cancelled.v1``) and a JSON body of its own design: money as decimal strings,
times in ISO 8601, no internal class names. Evolving ``OrderPlaced`` (v1 -> v2) changed nothing here.

Loaded with ``EVENTFLEET_PROJECTION_MODULES=eventfleet.examples.orders.publications``; its messages go to the
topic exchange ``<prefix>.integration`` with the public type as routing key (docs/reference.md, "Integration
events").
"""

from __future__ import annotations

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from projections.base import handles
from projections.publication import Public, Publication
from projections.registry import register
from store.records import RecordedEvent


@register
class OrdersOut(Publication):
    """Order events for other services: placed, paid, shipped, cancelled."""

    name = "orders_out"

    @handles(OrderPlaced)
    def placed(self, event: RecordedEvent) -> Public:
        e: OrderPlaced = event.event
        return Public("orders.placed", 1, {
            "order_id": e.order_id, "customer_id": e.customer_id, "total": str(e.total),
            "lines": [{"sku": i.sku, "quantity": i.quantity, "unit_price": str(i.unit_price)} for i in e.items],
            "placed_at": e.placed_at.isoformat()})

    @handles(OrderPaid)
    def paid(self, event: RecordedEvent) -> Public:
        e: OrderPaid = event.event
        return Public("orders.paid", 1, {"order_id": e.order_id, "customer_id": e.customer_id,
                                         "amount": str(e.amount), "paid_at": e.paid_at.isoformat()})

    @handles(OrderShipped)
    def shipped(self, event: RecordedEvent) -> Public:
        e: OrderShipped = event.event
        return Public("orders.shipped", 1, {"order_id": e.order_id, "carrier": e.carrier,
                                            "shipped_at": e.shipped_at.isoformat()})

    @handles(OrderCancelled)
    def cancelled(self, event: RecordedEvent) -> Public:
        e: OrderCancelled = event.event
        return Public("orders.cancelled", 1, {"order_id": e.order_id, "reason": e.reason,
                                              "cancelled_at": e.cancelled_at.isoformat()})
