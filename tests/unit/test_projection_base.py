"""Projection: handlers found by @handles (inherited too), and the default apply_batch is apply one by one."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, ClassVar

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced
from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from projections.base import Projection, handles
from store import RecordedEvent
from store.event_store import Position
from tests.unit.test_projection_fold import cancelled, paid, placed


def recorded(payload: Any, version: int = 0) -> RecordedEvent:
    return RecordedEvent(uuid.uuid4(), f"order-{payload.order_id}", version, version + 1, Position(1, version + 1),
                         f"{type(payload).__name__}.v1", payload, b"", {}, dt.datetime.now(dt.UTC))


class Recorder(Projection):
    name = "recorder"
    tables = ()
    ddl: ClassVar[Any] = ""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    @handles(OrderPlaced, OrderPaid)
    async def money(self, conn: Any, event: RecordedEvent) -> None:
        self.seen.append(("money", event.version))


class CancellingRecorder(Recorder):
    @handles(OrderCancelled)
    async def cancel(self, conn: Any, event: RecordedEvent) -> None:
        self.seen.append(("cancel", event.version))


async def test_default_apply_batch_applies_in_order_and_skips_events_without_handler():
    events = [recorded(placed("1", "c"), 0), recorded(cancelled("1", "c"), 1), recorded(paid("1", "c"), 2)]
    base, child = Recorder(), CancellingRecorder()
    await base.apply_batch(None, events)  # type: ignore[arg-type]
    await child.apply_batch(None, events)  # type: ignore[arg-type]
    assert base.seen == [("money", 0), ("money", 2)]
    assert child.seen == [("money", 0), ("cancel", 1), ("money", 2)]
    assert [child.handles_event(e) for e in events] == [True, True, True]
    assert not base.handles_event(events[1])


def test_the_orders_projections_have_a_set_based_fast_path_and_halt_by_default():
    for cls in (CustomerStats, OrderSummary):
        assert cls.apply_batch is not Projection.apply_batch
        assert cls.policy == "halt"
    assert Recorder.apply_batch is Projection.apply_batch
