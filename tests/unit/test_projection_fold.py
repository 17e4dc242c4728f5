"""The specification of the orders read models as a pure fold, and event factories the worker tests share.

Worker tests compare what the worker wrote with ``fold`` of the store's events: the fold is the oracle.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from eventfleet.examples.orders.events import LineItem, OrderCancelled, OrderPaid, OrderPlaced, OrderShipped

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def placed(order_id: str, customer_id: str, quantity: int = 1, total: str = "10.00", minute: int = 0) -> OrderPlaced:
    item = LineItem("p1", "Widget", "W-1", quantity, Decimal(total))
    return OrderPlaced(order_id, customer_id, (item,), Decimal(total), Decimal(0), Decimal(total),
                       T0 + dt.timedelta(minutes=minute))


def paid(order_id: str, customer_id: str, amount: str = "10.00", minute: int = 1) -> OrderPaid:
    return OrderPaid(order_id, customer_id, Decimal(amount), T0 + dt.timedelta(minutes=minute))


def shipped(order_id: str, customer_id: str, minute: int = 2) -> OrderShipped:
    return OrderShipped(order_id, customer_id, "ups", T0 + dt.timedelta(minutes=minute))


def cancelled(order_id: str, customer_id: str, reason: str = "changed mind", minute: int = 2) -> OrderCancelled:
    return OrderCancelled(order_id, customer_id, reason, T0 + dt.timedelta(minutes=minute))


def order_life(order_id: str, customer_id: str, length: int, rng: random.Random) -> list[Any]:
    """An order stream of ``length`` events: placed, then payments, shipments and cancellations."""
    events: list[Any] = [placed(order_id, customer_id, rng.randint(1, 5), f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}")]
    for minute in range(1, length):
        kind = rng.choice(("paid", "paid", "shipped", "cancelled"))
        if kind == "paid":
            events.append(paid(order_id, customer_id, f"{rng.randint(0, 500)}.{rng.randint(0, 99):02d}", minute))
        elif kind == "shipped":
            events.append(shipped(order_id, customer_id, minute))
        else:
            events.append(cancelled(order_id, customer_id, minute=minute))
    return events


@dataclasses.dataclass
class Models:
    customer_stats: dict[str, tuple[int, int, Decimal]] = dataclasses.field(default_factory=dict)
    order_summary: dict[str, tuple[str, str, int, Decimal, dt.datetime, dt.datetime]] = dataclasses.field(
        default_factory=dict)


def fold(payloads: Iterable[Any]) -> Models:
    """The read models after applying payloads in order (each stream's events in version order)."""
    m = Models()
    for e in payloads:
        stats = m.customer_stats.get(e.customer_id)
        if isinstance(e, OrderPlaced):
            p, c, s = stats or (0, 0, Decimal(0))
            m.customer_stats[e.customer_id] = (p + 1, c, s)
            items = sum(i.quantity for i in e.items)
            row = m.order_summary.get(e.order_id)
            if row is None:
                m.order_summary[e.order_id] = (e.customer_id, "placed", items, e.total, e.placed_at, e.placed_at)
            else:
                m.order_summary[e.order_id] = (e.customer_id, row[1], items, e.total, e.placed_at, row[5])
        elif isinstance(e, (OrderPaid, OrderShipped, OrderCancelled)):
            if isinstance(e, OrderCancelled):
                p, c, s = stats or (0, 0, Decimal(0))
                m.customer_stats[e.customer_id] = (p, c + 1, s)
            elif isinstance(e, OrderPaid):
                p, c, s = stats or (0, 0, Decimal(0))
                m.customer_stats[e.customer_id] = (p, c, s + e.amount)
            row = m.order_summary.get(e.order_id)
            if row is not None:
                status, at = {OrderPaid: ("paid", "paid_at"), OrderShipped: ("shipped", "shipped_at"),
                              OrderCancelled: ("cancelled", "cancelled_at")}[type(e)]
                m.order_summary[e.order_id] = (*row[:1], status, *row[2:5], getattr(e, at))
    return m


async def read_models(conn: Any, like: str = "%") -> Models:
    """What the worker wrote, in the fold's shape (rows whose customer id matches ``like``)."""
    m = Models()
    for r in await conn.fetch("SELECT * FROM customer_stats WHERE customer_id LIKE $1", like):
        m.customer_stats[r["customer_id"]] = (r["orders_placed"], r["orders_cancelled"], r["total_spent"])
    for r in await conn.fetch("SELECT * FROM order_summary WHERE customer_id LIKE $1", like):
        m.order_summary[r["order_id"]] = (r["customer_id"], r["status"], r["item_count"], r["total"],
                                          r["placed_at"], r["updated_at"])
    return m


def test_fold_counts_each_event_once_and_keeps_the_last_status():
    m = fold([placed("1", "c", 2, "5.00"), paid("1", "c", "5.00"), shipped("1", "c"),
              placed("2", "c"), cancelled("2", "c")])
    assert m.customer_stats == {"c": (2, 1, Decimal("5.00"))}
    assert m.order_summary["1"][1:4] == ("shipped", 2, Decimal("5.00"))
    assert m.order_summary["2"][1] == "cancelled"


def test_fold_ignores_status_of_unknown_orders_in_the_summary_but_counts_the_money():
    m = fold([paid("9", "c", "3.00")])
    assert m.order_summary == {}
    assert m.customer_stats == {"c": (0, 0, Decimal("3.00"))}
