"""The orders domain's events (docs/reference.md): registered, versioned, with the v1 -> v2 upcaster."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from typing import Any

import store


@dataclasses.dataclass(frozen=True, slots=True)
class LineItem:
    """One line of an order."""

    product_id: str
    product_name: str
    sku: str
    quantity: int
    unit_price: Decimal


@store.event("OrderPlaced", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class OrderPlacedV1:
    """The first, thin shape of OrderPlaced, kept to decode old events."""

    order_id: str
    customer_id: str
    total: Decimal
    placed_at: dt.datetime


@store.event("OrderPlaced", version=2)
@dataclasses.dataclass(frozen=True, slots=True)
class OrderPlaced:
    """A customer placed an order (fat event: everything a read model needs)."""

    order_id: str
    customer_id: str
    items: tuple[LineItem, ...]
    subtotal: Decimal
    tax: Decimal
    total: Decimal
    placed_at: dt.datetime


@store.upcaster("OrderPlaced", from_version=1)
def _order_placed_v1_to_v2(fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "items": [], "subtotal": fields["total"], "tax": Decimal(0)}


@store.event("OrderPaid", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class OrderPaid:
    """The customer paid for the order."""

    order_id: str
    customer_id: str
    amount: Decimal
    paid_at: dt.datetime


@store.event("OrderShipped", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class OrderShipped:
    """The order left the warehouse."""

    order_id: str
    customer_id: str
    carrier: str
    shipped_at: dt.datetime


@store.event("OrderCancelled", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class OrderCancelled:
    """The order was cancelled before shipping."""

    order_id: str
    customer_id: str
    reason: str
    cancelled_at: dt.datetime


OrderEvent = OrderPlaced | OrderPaid | OrderShipped | OrderCancelled


def stream_id(order_id: str) -> str:
    """The stream of an order."""
    return f"order-{order_id}"
