"""The orders write model (docs/reference.md): the events, the Order aggregate and its commands.

An order is placed, then paid, then shipped; it can be cancelled until it ships. Commands are functions
``Order -> [events]`` for ``store.aggregate.Repository.execute``; an impossible transition raises
``InvalidTransition``. Stream id: ``order-{order_id}``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, Literal, Self

import store
from eventfleet.examples.orders.events import (
    LineItem,
    OrderCancelled,
    OrderEvent,
    OrderPaid,
    OrderPlaced,
    OrderPlacedV1,
    OrderShipped,
    stream_id,
)
from store import errors
from store.aggregate import Aggregate

__all__ = [
    "InvalidTransition",
    "LineItem",
    "Order",
    "OrderCancelled",
    "OrderEvent",
    "OrderPaid",
    "OrderPlaced",
    "OrderPlacedV1",
    "OrderShipped",
    "OrderSnapshot",
    "cancel",
    "cancel_unpaid",
    "pay",
    "place",
    "ship",
    "stream_id",
]

Status = Literal["new", "placed", "paid", "shipped", "cancelled"]
CENT = Decimal("0.01")


class InvalidTransition(errors.DomainError):
    """The order is not in a state that allows this command."""


@store.event("OrderSnapshot", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class OrderSnapshot:
    """An Order's state for snapshots."""

    order_id: str
    customer_id: str
    status: str
    total: Decimal
    item_count: int


class Order(Aggregate):
    """One order's state, as far as commands need it."""

    def __init__(self) -> None:
        super().__init__()
        self.order_id = ""
        self.customer_id = ""
        self.status: Status = "new"
        self.total = Decimal(0)
        self.item_count = 0

    def apply(self, event: Any) -> None:
        match event:
            case OrderPlaced():
                self.order_id, self.customer_id, self.status = event.order_id, event.customer_id, "placed"
                self.total, self.item_count = event.total, sum(i.quantity for i in event.items)
            case OrderPaid():
                self.status = "paid"
            case OrderShipped():
                self.status = "shipped"
            case OrderCancelled():
                self.status = "cancelled"
            case _:
                raise errors.DomainError(f"Order cannot apply {type(event).__name__}")

    def to_snapshot(self) -> OrderSnapshot:
        return OrderSnapshot(self.order_id, self.customer_id, self.status, self.total, self.item_count)

    @classmethod
    def from_snapshot(cls, state: Any, version: int) -> Self:
        order = cls()
        order.order_id, order.customer_id, order.status = state.order_id, state.customer_id, state.status
        order.total, order.item_count, order.version = state.total, state.item_count, version
        return order

    def require(self, action: str, *allowed: Status) -> None:
        """Raise InvalidTransition unless the order is in one of ``allowed``."""
        if self.status not in allowed:
            raise InvalidTransition(f"cannot {action} order {self.order_id or '(new)'}: it is {self.status}")


OrderCommand = Callable[[Order], Sequence[OrderEvent]]


def _now(at: dt.datetime | None) -> dt.datetime:
    return at if at is not None else dt.datetime.now(dt.UTC)


def place(order_id: str, customer_id: str, items: Sequence[LineItem], *, tax_rate: Decimal = Decimal("0.20"),
          at: dt.datetime | None = None) -> OrderCommand:
    """Place a new order; subtotal, tax (rounded to cents) and total are computed from the items."""
    if not items or any(i.quantity < 1 or i.unit_price < 0 for i in items):
        raise errors.DomainError(f"order {order_id}: needs items with positive quantities and prices")

    def decide(order: Order) -> list[OrderEvent]:
        order.require("place", "new")
        subtotal = sum((i.unit_price * i.quantity for i in items), Decimal(0))
        tax = (subtotal * tax_rate).quantize(CENT)
        return [OrderPlaced(order_id, customer_id, tuple(items), subtotal, tax, subtotal + tax, _now(at))]

    return decide


def pay(*, at: dt.datetime | None = None) -> OrderCommand:
    """Pay a placed order in full."""

    def decide(order: Order) -> list[OrderEvent]:
        order.require("pay", "placed")
        return [OrderPaid(order.order_id, order.customer_id, order.total, _now(at))]

    return decide


def ship(carrier: str, *, at: dt.datetime | None = None) -> OrderCommand:
    """Ship a paid order."""

    def decide(order: Order) -> list[OrderEvent]:
        order.require("ship", "paid")
        return [OrderShipped(order.order_id, order.customer_id, carrier, _now(at))]

    return decide


def cancel(reason: str, *, at: dt.datetime | None = None) -> OrderCommand:
    """Cancel an order that has not shipped."""

    def decide(order: Order) -> list[OrderEvent]:
        order.require("cancel", "placed", "paid")
        return [OrderCancelled(order.order_id, order.customer_id, reason, _now(at))]

    return decide


def cancel_unpaid(reason: str, *, at: dt.datetime | None = None) -> OrderCommand:
    """Cancel an order that is still unpaid (a payment timeout: one paid meanwhile is refused, not cancelled)."""

    def decide(order: Order) -> list[OrderEvent]:
        order.require("cancel unpaid", "placed")
        return [OrderCancelled(order.order_id, order.customer_id, reason, _now(at))]

    return decide
