"""The orders write model without I/O: folding events, commands and the transitions they refuse."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest

from eventfleet.examples.orders import orders
from store import Position, RecordedEvent, errors

AT = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
ITEMS = [orders.LineItem("p1", "Mug", "SKU-1", 3, Decimal("4.99"))]


def recorded(events: list[object]) -> list[RecordedEvent]:
    return [RecordedEvent(uuid.uuid4(), "order-1", v, v + 1, Position(1, v + 1), type(e).__name__, e, b"", {}, AT)
            for v, e in enumerate(events)]


def run(order: orders.Order, command: orders.OrderCommand) -> orders.Order:
    """Decide and apply, as the repository does."""
    for event in command(order):
        order.apply(event)
        order.version += 1
    return order


def test_place_computes_subtotal_tax_and_total_in_cents() -> None:
    (placed,) = orders.place("1", "c1", ITEMS, at=AT)(orders.Order())
    assert placed == orders.OrderPlaced("1", "c1", tuple(ITEMS), Decimal("14.97"), Decimal("2.99"),
                                        Decimal("17.96"), AT)


def test_an_order_folds_from_its_events() -> None:
    order = orders.Order.from_events(recorded([
        orders.OrderPlaced("1", "c1", tuple(ITEMS), Decimal(10), Decimal(2), Decimal(12), AT),
        orders.OrderPaid("1", "c1", Decimal(12), AT),
    ]))
    assert (order.version, order.status, order.total, order.item_count) == (1, "paid", Decimal(12), 3)
    assert orders.Order.from_snapshot(order.to_snapshot(), order.version).__dict__ == order.__dict__


def test_from_events_refuses_a_gap() -> None:
    events = recorded([orders.OrderPaid("1", "c1", Decimal(1), AT)] * 3)
    with pytest.raises(errors.StoreError, match="version 2 follows 0"):
        orders.Order.from_events([events[0], events[2]])


@pytest.mark.parametrize(("history", "command", "allowed"), [
    ([], orders.pay(), False),
    ([], orders.ship("dhl"), False),
    ([], orders.cancel("x"), False),
    (["place"], orders.place("1", "c1", ITEMS), False),
    (["place"], orders.ship("dhl"), False),
    (["place"], orders.cancel("x"), True),
    (["place", "pay"], orders.pay(), False),
    (["place", "pay"], orders.cancel("x"), True),
    (["place", "pay"], orders.ship("dhl"), True),
    (["place", "pay", "ship"], orders.cancel("x"), False),
    (["place", "cancel"], orders.ship("dhl"), False),
    (["place", "cancel"], orders.pay(), False),
])
def test_commands_refuse_invalid_transitions(history: list[str], command: orders.OrderCommand,
                                             allowed: bool) -> None:
    steps = {"place": orders.place("1", "c1", ITEMS), "pay": orders.pay(), "ship": orders.ship("ups"),
             "cancel": orders.cancel("r")}
    order = orders.Order()
    for step in history:
        run(order, steps[step])
    if allowed:
        assert len(command(order)) == 1
    else:
        with pytest.raises(orders.InvalidTransition):
            command(order)


def test_paying_pays_the_placed_total() -> None:
    order = run(orders.Order(), orders.place("1", "c1", ITEMS))
    (paid,) = orders.pay(at=AT)(order)
    assert paid == orders.OrderPaid("1", "c1", Decimal("17.96"), AT)


def test_an_order_needs_items() -> None:
    with pytest.raises(errors.DomainError):
        orders.place("1", "c1", [])
    with pytest.raises(errors.DomainError):
        orders.place("1", "c1", [orders.LineItem("p", "n", "s", 0, Decimal(1))])
