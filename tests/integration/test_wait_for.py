"""projections.wait_for: read-after-write on a projection's checkpoint."""

from __future__ import annotations

import asyncio
from typing import ClassVar, LiteralString

import aio_pika
import pytest
import tenacity

import projections
from eventfleet.examples.orders.events import OrderPaid
from eventfleet.examples.orders.projections import OrderSummary
from projections.base import Projection, handles
from store import NO_STREAM, RecordedEvent, db
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.unit.test_projection_fold import paid, placed, shipped
from workers import broker, projector
from workers.config import Settings
from workers.projector import parking
from workers.runtime import health

SET_CHECKPOINT = """
INSERT INTO checkpoints AS c (projection, stream_id, version) VALUES ($1, $2, $3)
ON CONFLICT (projection, stream_id) DO UPDATE SET version = EXCLUDED.version
"""


async def test_returns_once_the_version_is_applied(pool, schema):
    waiting = asyncio.create_task(projections.wait_for(pool, "order_summary", "order-1", 2, timeout=30,
                                                       schema=schema))
    await pool.execute(SET_CHECKPOINT, "order_summary", "order-1", 1)
    await pool.execute(SET_CHECKPOINT, "customer_stats", "order-1", 5)  # another projection: not enough
    done, _ = await asyncio.wait({waiting}, timeout=0.3)
    assert not done, "returned before version 2 was applied"
    await pool.execute(SET_CHECKPOINT, "order_summary", "order-1", 3)
    assert await waiting == 3


async def test_a_version_of_a_type_the_read_model_does_not_handle_is_settled_by_the_events_before_it(
        pool, schema, event_store):
    # customer_stats does not handle OrderShipped: its checkpoint stops at 1, the OrderPaid before it.
    await event_store.append("order-s", [placed("s", "c"), paid("s", "c"), shipped("s", "c")], NO_STREAM)
    waiting = asyncio.create_task(projections.wait_for(pool, "customer_stats", "order-s", 2, timeout=30,
                                                       schema=schema))
    await pool.execute(SET_CHECKPOINT, "customer_stats", "order-s", 0)
    done, _ = await asyncio.wait({waiting}, timeout=0.3)
    assert not done, "returned before the OrderPaid at version 1 was applied"
    await pool.execute(SET_CHECKPOINT, "customer_stats", "order-s", 1)
    assert await waiting == 2


async def test_returns_at_once_when_already_applied(pool, schema):
    await pool.execute(SET_CHECKPOINT, "order_summary", "order-9", 4)
    assert await projections.wait_for(pool, "order_summary", "order-9", 4, timeout=0, schema=schema) == 4


async def test_raises_wait_timeout_naming_how_far_it_got(pool, schema):
    await pool.execute(SET_CHECKPOINT, "order_summary", "order-2", 0)
    with pytest.raises(projections.WaitTimeout, match="up to version 0, not 1") as info:
        await projections.wait_for(pool, "order_summary", "order-2", 1, timeout=0.1, schema=schema)
    assert isinstance(info.value, TimeoutError)
    with pytest.raises(projections.WaitTimeout, match="up to version -1"):
        await projections.wait_for(pool, "order_summary", "order-unknown", 0, timeout=0.05, schema=schema)


async def test_an_unknown_projection_fails_at_once_naming_the_deployments_projections(pool, schema):
    known = [r["projection"] for r in await pool.fetch("SELECT projection FROM projection_status ORDER BY 1")]
    assert "order_summary" in known
    with pytest.raises(projections.UnknownProjection) as info:
        await projections.wait_for(pool, "order_sumary", "order-1", 0, timeout=1, schema=schema)
    assert (info.value.projection, info.value.known) == ("order_sumary", tuple(known))
    assert str(info.value) == f"no projection 'order_sumary' in this deployment; it has: {', '.join(known)}"


class Refuses(Projection):
    """Fails on every payment: its stream halts there."""

    name = "refuses_payments"
    tables = ()
    ddl: ClassVar[LiteralString] = "SELECT 1"

    @handles(OrderPaid)
    async def paid(self, conn: db.Conn, event: RecordedEvent) -> None:
        raise ValueError(f"cannot take payments ({event.stream_id})")


async def test_a_stream_halted_by_a_parked_event_fails_at_once_naming_its_dead_letter(pool, event_store, schema):
    await event_store.append("order-h", [placed("h", "c"), paid("h", "c"), paid("h", "c")], NO_STREAM)
    result = await parking.apply_or_park(event_store, Refuses(), await event_store.load("order-h"),
                                         wait=tenacity.wait_none())
    (parked,) = result.parked
    with pytest.raises(projections.StreamHalted, match=rf"halted at version 1 by dead letter {parked.dead_letter_id} "
                                                       r"\(ValueError: cannot take payments \(order-h\)\)") as info:
        await projections.wait_for(pool, "refuses_payments", "order-h", 2, timeout=1, schema=schema)
    halted = info.value
    assert (halted.dead_letter_id, halted.projection, halted.stream_id, halted.version, halted.error) == (
        parked.dead_letter_id, "refuses_payments", "order-h", 1, "ValueError: cannot take payments (order-h)")


async def test_the_version_before_a_halt_is_still_returned(pool, event_store, schema):
    await event_store.append("order-h", [placed("h", "c"), paid("h", "c")], NO_STREAM)
    await parking.apply_or_park(event_store, Refuses(), await event_store.load("order-h"), wait=tenacity.wait_none())
    assert await projections.wait_for(pool, "refuses_payments", "order-h", 0, timeout=1, schema=schema) == 0


@pytest.mark.slow
async def test_read_after_write_through_a_running_worker(pool, event_store, schema, prefix, cleanup):
    names = broker.Names(prefix)
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)
    connection = await aio_pika.connect(AMQP_URL)
    stop = asyncio.Event()
    async with connection:
        targets = await broker.declare_topology(await connection.channel(), names, ["order_summary"], PARTITIONS)

        async def undeclare() -> None:
            async with await aio_pika.connect(AMQP_URL) as other:
                await broker.delete_topology(await other.channel(), names, ["order_summary"], PARTITIONS)

        cleanup(undeclare)
        worker = asyncio.create_task(projector.run_worker(settings, [OrderSummary()], health.Health(), stop,
                                                         pool=pool))
        try:
            written = await event_store.append("order-rw", [placed("rw", "c", 3, "42.00"), paid("rw", "c", "42.00")],
                                               NO_STREAM)
            events = await event_store.load("order-rw")
            p = partition_of("order-rw", PARTITIONS)
            await targets.partitions_exchange.publish(broker.events_message(p, events), routing_key=str(p))
            assert await projections.wait_for(pool, "order_summary", "order-rw", written.last_version, 30,
                                              schema=schema) == 1
            # Read-after-write: the row the API would serve now reflects the payment.
            row = await pool.fetchrow("SELECT status, item_count FROM order_summary WHERE order_id = 'rw'")
            assert tuple(row) == ("paid", 3)
        finally:
            stop.set()
            await asyncio.wait_for(worker, 30)
