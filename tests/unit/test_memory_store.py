"""What only the in-memory store has: its clock, its turn-taking with other tasks, its horizon.
(What it shares with EventStore is specified in tests/contract.)"""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal

from eventfleet.examples.orders.events import OrderPaid
from store import NO_STREAM, Horizon, InMemoryEventStore, Repository
from tests.contract.counters import REG, Counter, increment

T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
MICROSECOND = dt.timedelta(microseconds=1)


def paid(n: int) -> OrderPaid:
    return OrderPaid(f"o{n}", "c1", Decimal(n), T0)


async def test_events_are_recorded_at_the_time_of_the_clock_it_is_given() -> None:
    times = iter([T0, T0 + dt.timedelta(hours=1)])
    store = InMemoryEventStore(clock=lambda: next(times))
    await store.append("s", [paid(1)], NO_STREAM)
    await store.append("s", [paid(2)], 0)
    assert [e.recorded_at for e in await store.load("s")] == [T0, T0 + dt.timedelta(hours=1)]


async def test_no_two_events_are_recorded_at_the_same_instant_when_the_clock_stands_still() -> None:
    store = InMemoryEventStore(clock=lambda: T0)
    await store.append("s", [paid(1), paid(2)], NO_STREAM)
    await store.append("t", [paid(3)], NO_STREAM)
    recorded = [e.recorded_at for e in await store.read_all()]
    assert recorded == [T0, T0 + MICROSECOND, T0 + 2 * MICROSECOND]


async def test_commands_racing_on_one_stream_take_turns_as_against_a_database() -> None:
    """Each call yields to the event loop before it acts, so both commands load version NO_STREAM first."""
    repository = Repository(InMemoryEventStore(registry=REG), Counter)
    done = await asyncio.gather(*(repository.execute("c", increment(w)) for w in range(2)))
    assert [d.attempts for d in done] == [1, 2]
    assert repository.conflicts == 1


async def test_the_horizon_is_past_every_append_and_held_by_nothing() -> None:
    store = InMemoryEventStore()
    await store.append("s", [paid(1)], NO_STREAM)
    await store.append_batch([("t", [paid(2)], NO_STREAM), ("u", [paid(3)], NO_STREAM)])
    assert [e.position.transaction_id for e in await store.read_all()] == [1, 2, 2]
    assert await store.horizon() == Horizon(3, 0.0)
