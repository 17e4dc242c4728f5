"""The write model on every store: retries on conflicts, snapshots, the orders domain."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any

import pytest

from eventfleet.examples.orders import orders
from store import (
    NO_STREAM,
    AppendResult,
    Repository,
    TransientError,
    VersionConflict,
)
from tests.contract.counters import Counter, CounterState, Incremented, increment


async def test_32_concurrent_writers_on_one_stream_yield_exactly_32_events(counters):
    repository = Repository(counters, Counter, max_attempts=100)
    done = await asyncio.gather(*(repository.execute("counter-1", increment(w)) for w in range(32)))
    events = await counters.load("counter-1")
    assert [e.version for e in events] == list(range(32))
    assert [e.event.count for e in events] == list(range(1, 33))
    assert sorted(e.event.writer for e in events) == list(range(32))
    assert sorted(d.result.last_version for d in done if d.result) == list(range(32))
    assert repository.conflicts > 0  # they really collided, and the retries resolved it
    assert repository.conflicts == sum(d.attempts - 1 for d in done)


async def test_conflicts_beyond_the_attempt_bound_are_raised(counters):
    repository = Repository(counters, Counter, max_attempts=1)
    results = await asyncio.gather(*(repository.execute("c", increment(w)) for w in range(4)),
                                   return_exceptions=True)
    assert any(isinstance(r, VersionConflict) for r in results)
    assert await counters.stream_version("c") == sum(not isinstance(r, BaseException) for r in results) - 1


async def test_a_command_that_emits_nothing_appends_nothing(counters):
    repository = Repository(counters, Counter)
    done = await repository.execute("c", lambda counter: [])
    assert done.result is None
    assert done.aggregate.version == NO_STREAM
    assert await counters.load("c") == []


async def test_an_older_snapshot_never_replaces_a_newer_one(counters):
    assert await counters.save_snapshot("c", 5, CounterState(6))
    assert not await counters.save_snapshot("c", 2, CounterState(3))
    assert await counters.save_snapshot("c", 8, CounterState(9))
    snapshot = await counters.load_snapshot("c")
    assert (snapshot.version, snapshot.state) == (8, CounterState(9))
    assert await counters.load_snapshot("none") is None


async def test_an_order_lives_through_the_repository_and_refuses_invalid_transitions(event_store):
    repository = Repository(event_store, orders.Order, snapshot_every=2)
    stream = orders.stream_id("42")
    items = [orders.LineItem("p1", "Pen", "SKU-1", 2, Decimal("1.25")),
             orders.LineItem("p2", "Ink", "SKU-2", 1, Decimal("10.00"))]
    placed = await repository.execute(stream, orders.place("42", "c7", items))
    assert (placed.aggregate.status, placed.aggregate.total, placed.aggregate.item_count) == (
        "placed", Decimal("15.00"), 3)
    await repository.execute(stream, orders.cancel("changed my mind"))
    with pytest.raises(orders.InvalidTransition, match="cannot ship order 42: it is cancelled"):
        await repository.execute(stream, orders.ship("dhl"))
    with pytest.raises(orders.InvalidTransition):
        await repository.execute(stream, orders.place("42", "c7", items))
    events = [e.event for e in await event_store.load(stream)]
    assert [type(e) for e in events] == [orders.OrderPlaced, orders.OrderCancelled]
    placed_event = events[0]
    assert (placed_event.subtotal, placed_event.tax, placed_event.total) == (
        Decimal("12.50"), Decimal("2.50"), Decimal("15.00"))
    assert (await repository.load(stream)).status == "cancelled"


async def test_an_order_placed_as_v1_is_upcast_and_can_be_paid(event_store):
    at = dt.datetime(2019, 6, 1, tzinfo=dt.UTC)
    stream = orders.stream_id("old")
    await event_store.append(stream, [orders.OrderPlacedV1("old", "c1", Decimal("20.00"), at)], NO_STREAM)
    (loaded,) = await event_store.load(stream)
    assert loaded.event_type == "OrderPlaced.v1"
    assert loaded.event == orders.OrderPlaced("old", "c1", (), Decimal("20.00"), Decimal(0), Decimal("20.00"), at)
    paid = await Repository(event_store, orders.Order).execute(stream, orders.pay())
    assert (await event_store.load(stream, 1))[0].event.amount == Decimal("20.00")
    assert paid.aggregate.status == "paid"


class LoseFirstAcknowledgement:
    """A store's append whose first call commits, then reports a lost connection (a lost commit ack)."""

    def __init__(self, append: Callable[..., Awaitable[AppendResult]]) -> None:
        self.append, self.lost = append, 0

    async def __call__(self, stream_id: str, events: Sequence[Any], expected_version: int,
                       **ids: str | None) -> AppendResult:
        result = await self.append(stream_id, events, expected_version, **ids)
        if not self.lost:
            self.lost += 1
            raise TransientError("connection lost before the commit was acknowledged")
        return result


async def test_an_append_retried_after_a_lost_acknowledgement_is_not_doubled(counters, monkeypatch):
    store = counters
    lossy = LoseFirstAcknowledgement(store.append)
    monkeypatch.setattr(store, "append", lossy)
    repository = Repository(store, Counter)
    done = await repository.execute("c", increment(1))
    assert lossy.lost == 1
    assert [e.event for e in await store.load("c")] == [Incremented(1, 1)]
    assert done.result is not None
    assert (done.result.first_version, done.aggregate.count, done.attempts) == (0, 1, 1)
