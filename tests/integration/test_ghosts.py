"""Ghosts: delivered events the store does not hold. An asynchronous failover loses the primary's last commits,
yet the relay may have published them: a worker that applied one moved its checkpoint, and the different event
stored later at that version was skipped as a duplicate for good. The checkpoint claim now checks every
delivered event against the store (stream, version, id) and takes nothing on a message's word.
"""

from __future__ import annotations

import dataclasses
import uuid

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import NO_STREAM, EventStore, RecordedEvent, db
from tests.unit.test_projection_fold import cancelled, fold, paid, placed, read_models, shipped
from workers.projector import checkpoints, lag


def ghost_of(event: RecordedEvent, version: int, payload: object) -> RecordedEvent:
    """An event as a lost commit would have been delivered: a stream's next version, an id the store never kept."""
    return dataclasses.replace(event, event_id=uuid.uuid4(), version=version, event=payload,
                               global_position=event.global_position + 1000)


async def models(pool: db.Pool):
    async with pool.acquire() as conn:
        return await read_models(conn)


async def test_a_ghost_is_not_applied_and_the_event_stored_later_at_its_version_is(pool, event_store: EventStore):
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    (first,) = await event_store.load("order-1")
    ghost = ghost_of(first, 1, cancelled("1", "c"))

    lost = await checkpoints.apply_batch(event_store, OrderSummary(), [first, ghost])
    await event_store.append("order-1", [paid("1", "c")], 0)  # the new primary's version 1
    stored = await event_store.load("order-1")
    later = await checkpoints.apply_batch(event_store, OrderSummary(), stored[1:])

    assert ([e.event_id for e in lost.applied], [g.event_id for g in lost.ghosts]) == ([first.event_id],
                                                                                      [ghost.event_id])
    assert [e.event_id for e in later.applied] == [stored[1].event_id]
    assert (await models(pool)).order_summary == fold(e.event for e in stored).order_summary


async def test_a_ghost_delivered_with_later_stored_events_is_replaced_by_the_store_s_event_at_its_version(
        pool, event_store: EventStore):
    await event_store.append("order-1", [placed("1", "c"), paid("1", "c"), shipped("1", "c")], NO_STREAM)
    stored = await event_store.load("order-1")
    await checkpoints.apply_batch(event_store, OrderSummary(), stored[:1])
    ghost = ghost_of(stored[0], 1, cancelled("1", "c"))

    result = await checkpoints.apply_batch(event_store, OrderSummary(), [ghost, stored[2]])

    assert [e.event_id for e in result.applied] == [stored[1].event_id, stored[2].event_id]
    assert (result.gaps_filled, [g.event_id for g in result.ghosts]) == (1, [ghost.event_id])
    assert (await models(pool)).order_summary == fold(e.event for e in stored).order_summary


async def test_a_ghost_beyond_the_stream_s_end_moves_no_checkpoint(pool, event_store: EventStore):
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    (first,) = await event_store.load("order-1")
    await checkpoints.apply_batch(event_store, CustomerStats(), [first])

    result = await checkpoints.apply_batch(event_store, CustomerStats(), [ghost_of(first, 1, cancelled("1", "c"))])

    assert (result.applied, len(result.ghosts)) == ([], 1)
    assert await pool.fetchval("SELECT version FROM checkpoints WHERE stream_id = 'order-1'") == 0
    assert (await models(pool)).customer_stats == fold([first.event]).customer_stats
    assert (await lag.measure(pool, "customer_stats")).lag_events == 0


async def test_a_redelivered_ghost_is_recorded_once_as_a_resolved_dead_letter(pool, event_store: EventStore):
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    (first,) = await event_store.load("order-1")
    ghost = ghost_of(first, 1, cancelled("1", "c"))

    for _ in range(3):
        await checkpoints.apply_batch(event_store, CustomerStats(), [first, ghost])

    rows = await pool.fetch("SELECT stream_id, version, event_id, status, error FROM dead_letters")
    assert [(r["stream_id"], r["version"], r["event_id"], r["status"], r["error"]) for r in rows] == [
        ("order-1", 1, ghost.event_id, "skipped", checkpoints.GHOST_ERROR)]


async def test_an_event_with_another_id_at_a_stored_version_is_a_ghost_even_below_the_stream_s_end(
        pool, event_store: EventStore):
    await event_store.append("order-1", [placed("1", "c"), paid("1", "c")], NO_STREAM)
    stored = await event_store.load("order-1")
    impostor = dataclasses.replace(stored[1], event_id=uuid.uuid4(), event=cancelled("1", "c"))

    result = await checkpoints.apply_batch(event_store, OrderSummary(), [stored[0], impostor])

    assert [e.event_id for e in result.applied] == [stored[0].event_id]
    assert await pool.fetchval("SELECT version FROM checkpoints WHERE stream_id = 'order-1'") == 0
