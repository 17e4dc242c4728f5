"""Checkpoints decide: duplicates are skipped, gaps are filled from the store, concurrency never doubles."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import NO_STREAM, EventStore, RecordedEvent, db
from tests.unit.test_projection_fold import cancelled, fold, paid, placed, read_models, shipped
from workers import locks
from workers.projector import checkpoints


async def append(event_store: EventStore, stream_id: str, payloads: list[Any]) -> list[RecordedEvent]:
    await event_store.append(stream_id, payloads, NO_STREAM)
    return await event_store.load(stream_id)


async def checkpoint(pool: db.Pool, projection: str, stream_id: str) -> int | None:
    value: int | None = await pool.fetchval(
        "SELECT version FROM checkpoints WHERE projection = $1 AND stream_id = $2", projection, stream_id)
    return value


async def test_in_order_applies_redelivery_is_a_duplicate_and_a_gap_is_filled_from_the_store(pool, event_store):
    e = await append(event_store, "order-1", [placed("1", "c"), paid("1", "c", "2.50"), shipped("1", "c"),
                                              paid("1", "c", "1.00")])
    stats = CustomerStats()
    first = await checkpoints.apply_batch(event_store, stats, [e[0]])
    assert ([x.version for x in first.applied], first.duplicates, first.gaps_filled) == ([0], 0, 0)
    again = await checkpoints.apply_batch(event_store, stats, [e[0], e[0]])
    assert (again.applied, again.duplicates) == ([], 2)
    # Version 3 arrives before 1 and 2: 1 is read from the store and applied first; 2 (OrderShipped) is not
    # customer_stats's: its checkpoint moves over it.
    gap = await checkpoints.apply_batch(event_store, stats, [e[3]])
    assert ([x.version for x in gap.applied], gap.gaps_filled) == ([1, 3], 1)
    late = await checkpoints.apply_batch(event_store, stats, [e[1], e[2]])
    assert (late.applied, late.duplicates, late.unhandled) == ([], 1, 1)
    assert await checkpoint(pool, "customer_stats", "order-1") == 3
    row = await pool.fetchrow("SELECT * FROM customer_stats WHERE customer_id = 'c'")
    assert (row["orders_placed"], str(row["total_spent"])) == (1, "3.50")
    assert await pool.fetchval("SELECT applied FROM projection_status WHERE projection = 'customer_stats'") == 3


async def test_four_concurrent_redeliveries_apply_once(pool, event_store):
    (event,) = await append(event_store, "order-x", [placed("x", "cx")])
    results = await asyncio.gather(*(checkpoints.apply_batch(event_store, CustomerStats(), [event])
                                     for _ in range(4)))
    assert sorted((len(r.applied), r.duplicates) for r in results) == [(0, 1), (0, 1), (0, 1), (1, 0)]
    assert await pool.fetchval("SELECT orders_placed FROM customer_stats WHERE customer_id = 'cx'") == 1


async def test_concurrent_batches_over_shared_customers_in_opposite_orders_do_not_deadlock(pool, event_store):
    streams = [await append(event_store, f"order-d{i}", [placed(f"d{i}", f"c{i % 3}")]) for i in range(40)]
    events = [s[0] for s in streams]
    batches = [events[i::4] for i in range(4)] + [list(reversed(events[i::4])) for i in range(4)]
    await asyncio.gather(*(checkpoints.apply_batch(event_store, CustomerStats(), b) for b in batches))
    rows = await pool.fetch("SELECT customer_id, orders_placed FROM customer_stats ORDER BY 1")
    assert [(r[0], r[1]) for r in rows] == [("c0", 14), ("c1", 13), ("c2", 13)]


async def test_a_batch_waits_while_a_rebuild_holds_the_projection_lock(pool, event_store, schema):
    (event,) = await append(event_store, "order-r", [placed("r", "cr")])
    key = locks.projection(schema, "customer_stats")
    async with pool.acquire() as rebuild, rebuild.transaction():
        await rebuild.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)
        batch = asyncio.create_task(checkpoints.apply_batch(event_store, CustomerStats(), [event]))
        done, _ = await asyncio.wait({batch}, timeout=0.3)
        assert not done, "applied while the rebuild held the lock"
    assert len((await batch).applied) == 1


KINDS = st.sampled_from(["paid", "paid", "shipped", "cancelled", "placed"])
HISTORY = st.lists(st.tuples(st.integers(0, 2), st.lists(KINDS, max_size=5)), min_size=1, max_size=4)


def payloads_of(order_id: str, customer_id: str, kinds: list[str]) -> list[Any]:
    out: list[Any] = []
    for i, kind in enumerate(kinds):
        if kind == "placed":
            out.append(placed(order_id, customer_id, i + 1, f"{i + 3}.25", i))
        elif kind == "paid":
            out.append(paid(order_id, customer_id, f"{i}.10", i))
        elif kind == "shipped":
            out.append(shipped(order_id, customer_id, i))
        else:
            out.append(cancelled(order_id, customer_id, minute=i))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=HISTORY, copies=st.lists(st.integers(0, 3), min_size=24, max_size=24), seed=st.integers(0, 2**32),
       set_based=st.booleans())
async def test_any_delivery_yields_the_fold_of_the_store(pool, event_store, history, copies, seed, set_based):
    """Random histories, deliveries shuffled, duplicated and dropped, in random batches: the models are the fold."""
    ex = uuid.uuid4().hex[:8]
    streams: list[list[RecordedEvent]] = []
    for i, (customer, kinds) in enumerate(history):
        order_id = f"{ex}-{i}"
        streams.append(await append(event_store, f"order-{order_id}",
                                     payloads_of(order_id, f"{ex}c{customer}", ["placed", *kinds])))
    events = [e for s in streams for e in s]
    counts = copies[:len(events)]  # 0: every copy of that event is lost
    deliveries = [e for e, n in zip(events, counts, strict=True) for _ in range(n)]
    rng = random.Random(seed)
    rng.shuffle(deliveries)
    while deliveries:
        size = rng.randint(1, 6)
        batch, deliveries = deliveries[:size], deliveries[size:]
        for projection in (CustomerStats(), OrderSummary()):
            await checkpoints.apply_batch(event_store, projection, batch, set_based=set_based)
    # A lost event is filled from the store once a later one of its stream arrives; a lost tail is not. "Later
    # one" is of the read model's types: customer_stats never sees an OrderShipped (issue 25).
    def folded(projection: CustomerStats | OrderSummary) -> Any:
        delivered: dict[str, int] = {}
        for e, n in zip(events, counts, strict=True):
            if n and projection.handles_type(e.event_type):
                delivered[e.stream_id] = max(e.version, delivered.get(e.stream_id, -1))
        return fold(e.event for s in streams for e in s if e.version <= delivered.get(e.stream_id, -1))

    async with pool.acquire() as conn:
        models = await read_models(conn, f"{ex}c%")
    assert (models.customer_stats, models.order_summary) == (
        folded(CustomerStats()).customer_stats, folded(OrderSummary()).order_summary)


@pytest.mark.parametrize("set_based", [True, False])
async def test_set_based_and_one_by_one_agree_on_a_mixed_batch(pool, event_store, set_based):
    tag = f"s{int(set_based)}"
    a = await append(event_store, f"order-{tag}a", [placed(f"{tag}a", tag, 3, "9.00"), paid(f"{tag}a", tag, "9.00"),
                                                    shipped(f"{tag}a", tag)])
    b = await append(event_store, f"order-{tag}b", [placed(f"{tag}b", tag, 1, "4.00"), cancelled(f"{tag}b", tag)])
    for projection in (CustomerStats(), OrderSummary()):
        await checkpoints.apply_batch(event_store, projection, [*b, *a], set_based=set_based)
    async with pool.acquire() as conn:
        assert await read_models(conn, tag) == fold(e.event for e in [*a, *b])


async def test_the_claims_plan_made_on_a_young_store_reads_events_by_index_once_the_store_has_grown(
        pool: db.Pool, event_store: EventStore) -> None:
    # Postgres keeps the claim's plan for the session: one made while the store held a few events must not scan
    # the events table on every batch once it has grown.
    young = [e for i in range(3) for e in await append(event_store, f"young-{i}", [placed(str(i), "c")])]
    async with pool.acquire() as conn:
        for _ in range(8):  # past Postgres's five custom plans of a statement
            async with conn.transaction():
                await conn.fetch(checkpoints.SQL["claim_checkpoints"], [], ["probe"] * 3, [e.stream_id for e in young],
                                 [e.version for e in young], [e.event_id for e in young], [], [])
        await event_store.append_batch([(f"grown-{i}", [placed(str(i), "c")], NO_STREAM) for i in range(3000)])
        grown = await event_store.load("grown-2999")
        async with conn.transaction():
            claimed = await conn.fetch(checkpoints.SQL["claim_checkpoints"], [], ["probe"], ["grown-2999"], [0],
                                       [grown[0].event_id], ["probe"], ["OrderPlaced"])
            read = await conn.fetchval("SELECT pg_stat_get_xact_tuples_returned('events'::regclass)")

    assert [(r["stream_id"], r["previous_version"], r["version"], r["handled"]) for r in claimed] == [
        ("grown-2999", -1, 0, [0])]
    assert read < 10  # index lookups of one stream, not 3,003 events read



async def test_one_claim_for_two_read_models_moves_each_ones_checkpoints_and_returns_each_its_handled_versions(
        pool: db.Pool, event_store: EventStore) -> None:
    e = await append(event_store, "order-1", [placed("1", "c"), paid("1", "c", "2.50"), shipped("1", "c")])
    await pool.execute("INSERT INTO checkpoints (projection, stream_id, version) VALUES ('every', 'order-1', 0)")
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(checkpoints.SQL["claim_checkpoints"], [], ["every", "shipping", "shipping"],
                                ["order-1"] * 3, [2, 0, 2], [e[2].event_id, e[0].event_id, e[2].event_id],
                                ["shipping", "shipping"], ["OrderPlaced", "OrderShipped"])

    assert sorted((r["projection"], r["previous_version"], r["version"], r["handled"]) for r in rows) == [
        ("every", 0, 2, None), ("shipping", -1, 2, [0, 2])]
    assert await checkpoint(pool, "every", "order-1") == 2
    assert await checkpoint(pool, "shipping", "order-1") == 2
