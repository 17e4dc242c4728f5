"""A worker group's read models' batches in one transaction (workers/projector/combiner.py,
``checkpoints.apply_batches``) against real Postgres: all commit together with each read model's checkpoints, a
failure commits none of them and each batch then goes its own way (a poison event parked per its read model's
policy, the other read models applied), and a reactor never combines."""

from __future__ import annotations

import asyncio

import pytest
import tenacity

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from projections.reactor import Reactor
from store import NO_STREAM, EventStore, RecordedEvent, db
from tests.integration.test_dead_letters import Probe
from tests.unit.test_projection_fold import cancelled, fold, paid, placed, read_models
from workers.errors import HandlerFailed
from workers.projector import checkpoints, parking
from workers.projector.combiner import Combiner, combines


async def orders(event_store: EventStore, count: int) -> list[RecordedEvent]:
    for i in range(count):
        await event_store.append(f"order-{i}", [placed(str(i), f"c{i % 3}"), paid(str(i), f"c{i % 3}", "2.00")],
                                 NO_STREAM)
    return [e for i in range(count) for e in await event_store.load(f"order-{i}")]


async def transactions_of(pool: db.Pool) -> set[int]:
    """The transactions that last wrote the checkpoint rows (their xmin)."""
    return {int(r["xmin"]) for r in await pool.fetch("SELECT xmin::text::bigint AS xmin FROM checkpoints")}


async def test_two_read_models_batches_commit_in_one_transaction_with_their_checkpoints(pool, event_store):
    events = await orders(event_store, 4)
    results = await checkpoints.apply_batches(event_store, [(CustomerStats(), events), (OrderSummary(), events)])
    assert [len(r.applied) for r in results] == [8, 8]
    assert len(await transactions_of(pool)) == 1
    assert await pool.fetchval("SELECT count(*) FROM checkpoints WHERE version = 1") == 8  # 4 streams x 2 models
    counted = await pool.fetch("SELECT projection, applied FROM projection_status WHERE applied > 0 ORDER BY 1")
    assert [(r["projection"], r["applied"]) for r in counted] == [("customer_stats", 8), ("order_summary", 8)]
    async with pool.acquire() as conn:
        models = await read_models(conn)
    expected = fold(e.event for e in events)
    assert (models.customer_stats, models.order_summary) == (expected.customer_stats, expected.order_summary)


async def test_a_failing_read_model_rolls_the_combined_transaction_back_for_all(pool, event_store):
    await pool.execute(Probe.ddl)
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "boom")], NO_STREAM)
    events = await event_store.load("order-a")
    with pytest.raises(HandlerFailed):
        await checkpoints.apply_batches(event_store, [(CustomerStats(), events), (Probe(), events)])
    assert await pool.fetchval("SELECT count(*) FROM checkpoints") == 0
    assert await pool.fetchval("SELECT count(*) FROM customer_stats") == 0


async def test_the_combiner_applies_batches_handed_in_together_in_one_transaction(pool, event_store):
    events = await orders(event_store, 3)
    combiner = Combiner(event_store)
    results = await asyncio.gather(combiner.apply(CustomerStats(), events), combiner.apply(OrderSummary(), events))
    assert [None if r is None else len(r.applied) for r in results] == [6, 6]
    assert (combiner.rounds, combiner.fallbacks) == (1, 0)
    assert len(await transactions_of(pool)) == 1


async def test_a_batch_alone_in_its_round_is_left_to_its_own_transaction(pool, event_store):
    events = await orders(event_store, 1)
    combiner = Combiner(event_store)
    assert await combiner.apply(CustomerStats(), events) is None
    assert (combiner.rounds, await pool.fetchval("SELECT count(*) FROM checkpoints")) == (0, 0)


async def test_after_a_failed_round_each_batch_goes_its_own_way_and_only_the_poison_is_parked(pool, event_store):
    await pool.execute(Probe.ddl)
    await event_store.append("order-a", [placed("a", "c"), cancelled("a", "c", "boom")], NO_STREAM)
    events = await event_store.load("order-a")
    combiner = Combiner(event_store)
    models = [CustomerStats(), Probe()]
    combined = await asyncio.gather(*(combiner.apply(m, events) for m in models))
    assert (combined, combiner.fallbacks) == ([None, None], 1)
    own = [await parking.apply_or_park(event_store, m, events, wait=tenacity.wait_none()) for m in models]
    assert [len(r.applied) for r in own] == [2, 1]  # the probe applied version 0, parked version 1 (halt)
    assert [p.event.version for p in own[1].parked] == [1]


class Reacts(Reactor):
    """A reactor, not registered (importing the example's would register payment_timeout for every later test)."""

    name = "combiner_reactor"


def test_only_plain_read_models_combine():
    assert (combines(CustomerStats()), combines(Reacts())) == (True, False)
