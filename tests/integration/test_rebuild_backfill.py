"""A projection registered for the first time is backfilled from the store before it goes live."""

from __future__ import annotations

import asyncio
import random
import time

import aio_pika
import pytest

import eventfleet as ef
from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.integration.test_rebuild_helpers import drop_shadows, expected, read_models, write_orders
from workers import admin, broker
from workers.config import Settings
from workers.rebuild import backfill
from workers.runtime import health

pytestmark = pytest.mark.usefixtures(drop_shadows.__name__)


async def state_of(pool, projection: str) -> str | None:
    state: str | None = await pool.fetchval("SELECT state FROM projection_status WHERE projection = $1", projection)
    return state


async def forget(pool, projection: str) -> None:
    """As if the projection had been registered after the deployment's last migrate."""
    await pool.execute("DELETE FROM projection_status WHERE projection = $1", projection)


async def test_migrate_registers_projections_live_over_an_empty_store_and_backfilling_otherwise(
        pool, event_store, schema):
    assert [await state_of(pool, p) for p in ("customer_stats", "order_summary")] == ["live", "live"]
    await write_orders(event_store, 3, random.Random(1))
    await forget(pool, "order_summary")
    await admin.run_migrate(DATABASE_URL, schema)
    assert [await state_of(pool, p) for p in ("customer_stats", "order_summary")] == ["live", "backfilling"]
    result = await backfill.backfill_if_new(pool, event_store, OrderSummary, queue_exists=True)
    assert result is not None
    assert await state_of(pool, "order_summary") == "live"


async def test_backfill_if_new_fills_once_and_an_empty_store_goes_live_at_once(pool, event_store):
    for projection in ("customer_stats", "order_summary"):
        await forget(pool, projection)
    assert await backfill.backfill_if_new(pool, event_store, CustomerStats) is None
    assert await state_of(pool, "customer_stats") == "live"

    total = await write_orders(event_store, 30, random.Random(3))
    # A queue that exists delivers everything: no backfill for a projection merely without a status row.
    assert await backfill.backfill_if_new(pool, event_store, OrderSummary, queue_exists=True) is None
    assert await state_of(pool, "order_summary") is None

    result = await backfill.backfill_if_new(pool, event_store, OrderSummary)
    assert result is not None
    assert result.events == total
    assert await state_of(pool, "order_summary") == "live"
    assert (await read_models(pool)).order_summary == (await expected(event_store)).order_summary
    assert await backfill.backfill_if_new(pool, event_store, OrderSummary) is None


@pytest.mark.slow
@pytest.mark.parametrize("registered_by", ["migrate", "worker"])
async def test_a_worker_backfills_a_new_projection_whose_events_predate_its_queue(pool, event_store, schema,
                                                                                   prefix, cleanup, registered_by):
    # Events published before the projection's queue existed never reach it: only the store has them.
    await write_orders(event_store, 40, random.Random(5))
    await forget(pool, "customer_stats")
    names = broker.Names(prefix)
    amqp = await aio_pika.connect(AMQP_URL)
    if registered_by == "migrate":
        # The deploy order: migrate registers it, then a relay may declare its queues before any worker runs.
        await admin.run_migrate(DATABASE_URL, schema)
        await broker.declare_topology(await amqp.channel(), names, ["customer_stats"], PARTITIONS)

    async def delete_topology() -> None:
        await broker.delete_topology(await amqp.channel(), names, ["customer_stats"], PARTITIONS)
        await amqp.close()

    cleanup(delete_topology)
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)
    stop = asyncio.Event()
    # The facade's worker, as the worker command: handed the backfill job (the projector knows no rebuild).
    worker = asyncio.create_task(ef.run_worker(settings, [CustomerStats()], health.Health(), stop, pool=pool))
    try:
        deadline = time.monotonic() + 60
        while await state_of(pool, "customer_stats") != "live":
            assert time.monotonic() < deadline, "no backfill"
            assert not worker.done(), worker
            await asyncio.sleep(0.05)
        assert (await read_models(pool)).customer_stats == (await expected(event_store)).customer_stats
        # Events written from now on arrive through the queue and are applied once, on the new table.
        await write_orders(event_store, 5, random.Random(6), prefix="late")
        channel = await amqp.channel(on_return_raises=True)
        exchange = await channel.get_exchange(names.partitions_exchange)  # declared by the worker
        for i in range(5):
            late = await event_store.load(f"order-late{i}")
            p = partition_of(late[0].stream_id, PARTITIONS)
            await exchange.publish(broker.events_message(p, late), routing_key=str(p), mandatory=True)
        await channel.close()
        want = (await expected(event_store)).customer_stats
        while (await read_models(pool)).customer_stats != want:
            assert time.monotonic() < deadline + 30, "late events not applied"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
