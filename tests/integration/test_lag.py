"""Lag is exact: committed events not yet applied, against a watermark that never passes a late commit."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from eventfleet.examples.orders.projections import CustomerStats
from store import NO_STREAM, EventStore, Horizon, Position, RecordedEvent, db
from store.partitions import partition_of
from tests.conftest import PARTITIONS
from tests.unit.test_projection_fold import paid, placed
from workers.projector import checkpoints, lag
from workers.runtime import metrics


async def append(event_store: EventStore, stream_id: str, payloads: list[Any]) -> list[RecordedEvent]:
    await event_store.append(stream_id, payloads, NO_STREAM)
    return await event_store.load(stream_id)


async def watermark(pool: db.Pool) -> Position | None:
    row = await pool.fetchrow("SELECT watermark_txid, watermark_position FROM projection_status "
                              "WHERE projection = 'customer_stats'")
    return None if row is None else Position(int(row[0]), row[1])


async def assert_watermark(pool: db.Pool, horizon: Horizon, expected: Position) -> None:
    """The watermark reached ``expected``, unless the cluster-wide horizon (taken before the measure) held
    it back, as another session's open transaction (a parallel test) may: then it is at least not past it."""
    mark = await watermark(pool)
    if horizon.xmin > expected.transaction_id:
        assert mark == expected
    else:
        assert mark is None or mark <= expected


async def test_lag_counts_exactly_the_unapplied_events_and_their_age(pool, event_store):
    a = await append(event_store, "order-a", [placed("a", "c"), paid("a", "c"), paid("a", "c")])
    b = await append(event_store, "order-b", [placed("b", "c"), paid("b", "c")])
    first = await lag.measure(pool, "customer_stats")
    assert first.lag_events == 5
    assert first.lag_seconds > 0
    assert first.horizon_age_seconds >= 0

    await checkpoints.apply_batch(event_store, CustomerStats(), a[:2])
    horizon = await event_store.horizon()
    assert (await lag.measure(pool, "customer_stats")).lag_events == 3
    # The watermark stops before the first unapplied event (a's third), whatever is applied after it.
    await assert_watermark(pool, horizon, a[1].position)

    await checkpoints.apply_batch(event_store, CustomerStats(), [a[2], *b])
    horizon = await event_store.horizon()
    caught_up = await lag.measure(pool, "customer_stats")
    assert (caught_up.lag_events, caught_up.lag_seconds) == (0, 0)
    await assert_watermark(pool, horizon, b[-1].position)


async def test_watermark_waits_below_a_transaction_that_commits_late(pool, event_store, database_url, schema):
    late = await db.connect(database_url, schema)
    try:
        tx = late.transaction()
        await tx.start()
        # An event with a smaller transaction id than everything appended after it, committed last.
        e = event_store._encode(placed("late", "c"))
        await late.execute("INSERT INTO events (event_id, stream_id, version, event_type, data, metadata) "
                           "VALUES ($1, 'order-late', 0, $2, $3, $4)", uuid.uuid4(), e.event_type, e.data, e.metadata)
        early = await append(event_store, "order-early", [placed("early", "c"), paid("early", "c")])
        await checkpoints.apply_batch(event_store, CustomerStats(), early)
        held = await lag.measure(pool, "customer_stats")
        assert held.lag_events == 0
        assert held.horizon_age_seconds > 0, "the open transaction holds the frontier back"
        mark = await watermark(pool)
        assert mark is None or mark.transaction_id < early[0].position.transaction_id
        await tx.commit()
    finally:
        await late.close()
    assert (await lag.measure(pool, "customer_stats")).lag_events == 1
    late_events = await event_store.load("order-late")
    await checkpoints.apply_batch(event_store, CustomerStats(), late_events)
    horizon = await event_store.horizon()
    assert (await lag.measure(pool, "customer_stats")).lag_events == 0
    await assert_watermark(pool, horizon, max(late_events[0].position, early[-1].position))


async def test_export_sets_the_contract_gauges(pool, event_store):
    await append(event_store, "order-g", [placed("g", "c")])
    lag.export("customer_stats", await lag.measure(pool, "customer_stats"))
    assert metrics.registry.get_sample_value("eventfleet_projection_lag_events",
                                             {"projection": "customer_stats"}) == 1
    assert metrics.registry.get_sample_value("eventfleet_projection_lag_seconds",
                                             {"projection": "customer_stats"}) == pytest.approx(
        metrics.LAG_SECONDS.labels("customer_stats")._value.get())
    assert metrics.registry.get_sample_value("eventfleet_store_horizon_age_seconds") is not None


async def test_lag_is_counted_per_partition_and_exported_for_every_partition(pool, event_store):
    assert [partition_of(s, PARTITIONS) for s in ("order-a", "order-1", "order-x")] == [3, 1, 1]
    await append(event_store, "order-a", [placed("a", "c"), paid("a", "c"), paid("a", "c")])
    await append(event_store, "order-1", [placed("1", "c"), paid("1", "c")])
    x = await append(event_store, "order-x", [placed("x", "c")])
    await checkpoints.apply_batch(event_store, CustomerStats(), x)

    measured = await lag.measure(pool, "customer_stats")
    lag.export("customer_stats", measured, PARTITIONS)

    assert (measured.lag_events, measured.partitions) == (5, {3: 3, 1: 2})  # partitions with none are absent
    gauges = [metrics.registry.get_sample_value("eventfleet_projection_partition_lag_events",
                                                {"projection": "customer_stats", "partition": str(p)})
              for p in range(PARTITIONS)]
    assert gauges == [0, 2, 0, 3]
