"""Rebuild while a writer, a relay and two workers (sharing the partitions) run, and a reader queries throughout.

Afterwards the read models equal the fold of the store; the reader never saw a table shrink (no empty or
partial table, before, during or after the swap), and the increment-only customer_stats proves that no
event was applied twice or lost across the swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

import pytest

from eventfleet.examples.orders import load
from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import db
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.integration.test_rebuild_helpers import (
    checkpoints_of,
    drop_shadows,
    expected,
    read_models,
    stream_versions,
)
from workers import broker, projector, rebuild, relay
from workers.config import Settings
from workers.projector import lag
from workers.runtime import health

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures(drop_shadows.__name__)]

PROJECTIONS = ("order_summary", "customer_stats")
READ = """SELECT (SELECT count(*) FROM order_summary) AS orders,
                 (SELECT coalesce(sum(total), 0) FROM order_summary) AS totals,
                 (SELECT coalesce(sum(orders_placed), 0) FROM customer_stats) AS placed"""


async def until(check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_rebuild_under_load_swaps_without_readers_seeing_a_partial_table(pool, event_store, schema, prefix,
                                                                              delete_prefixed):
    names = broker.Names(prefix)
    delete_prefixed([q for p in PROJECTIONS for q in (*(names.partition_queue(p, n) for n in range(PARTITIONS)),
                                                      names.dead_letter_queue(p))],
                    [names.partitions_exchange, names.exchange, names.dead_letter_exchange])
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        batch_size=50)
    stop_writing, stop = asyncio.Event(), asyncio.Event()
    seen: list[tuple[int, Any, int]] = []
    reading = True

    async def reader() -> None:
        while reading:
            row = await pool.fetchrow(READ)
            seen.append((row["orders"], row["totals"], row["placed"]))
            await asyncio.sleep(0.002)

    async def writer() -> None:
        while not stop_writing.is_set():
            await load.run_load(event_store, 40, concurrency=4)

    tasks: list[asyncio.Task[Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(_cancel_all, tasks)
        relay_pool = await stack.enter_async_context(db.create_pool(DATABASE_URL, schema, min_size=1, max_size=2))
        worker_pools = [await stack.enter_async_context(db.create_pool(DATABASE_URL, schema, min_size=1, max_size=4))
                        for _ in range(2)]
        config = relay.RelayConfig.from_settings(settings, projections=PROJECTIONS)
        tasks.append(asyncio.create_task(relay.run_relay(relay_pool, config, health.Health())))
        await load.run_load(event_store, 200, concurrency=4)
        workers = [asyncio.create_task(projector.run_worker(settings, [OrderSummary(), CustomerStats()],
                                                           health.Health(), stop, pool=p))
                   for p in worker_pools]
        tasks += workers
        await until(lambda: _covered(pool, 200), 60)  # the live tables are in use before the rebuild
        reads = asyncio.create_task(reader())
        writes = asyncio.create_task(writer())
        tasks += [reads, writes]
        results = [await rebuild.rebuild(pool, event_store, OrderSummary, batch_size=25),
                   await rebuild.rebuild(pool, event_store, CustomerStats, batch_size=25)]
        stop_writing.set()
        await writes
        await until(lambda: _drained(pool), 120)
        reading = False
        await reads
        stop.set()
        for worker in workers:
            await asyncio.wait_for(worker, 30)

    assert all(r.events > 0 for r in results)
    assert len(seen) > 10
    for before, after in itertools.pairwise(seen):
        assert all(a >= b for a, b in zip(after, before, strict=True)), (before, after)
    assert seen[0][0] > 0
    assert await read_models(pool) == await expected(event_store)
    for projection, cls in zip(PROJECTIONS, (OrderSummary, CustomerStats), strict=True):
        # Each checkpoint at its stream's last event of the projection's types (issue 25).
        assert await checkpoints_of(pool, projection) == await stream_versions(event_store, cls)
        state = await pool.fetchval("SELECT state FROM projection_status WHERE projection = $1", projection)
        assert state == "live"


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _covered(pool: db.Pool, orders: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM order_summary") >= orders // 2)


async def _drained(pool: db.Pool) -> bool:
    if await pool.fetchval("SELECT count(*) FROM outbox"):
        return False
    for projection in PROJECTIONS:
        if (await lag.measure(pool, projection)).lag_events:
            return False
    return True
