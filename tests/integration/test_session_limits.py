"""A worker's Postgres sessions under its limits: a frozen holder of the lease lock is ended by the server,
what the limits raise is transient (retried), never a handler's failure (parked), and the outage it marked
in the worker's health ends with the next tick or lag refresh that works."""

from __future__ import annotations

import asyncio
import contextlib

import aio_pika
import asyncpg
import pytest

from eventfleet.examples.orders.projections import CustomerStats
from store import db
from store import errors as store_errors
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from workers import handlers, locks
from workers.config import Settings
from workers.projector import lag
from workers.projector.batcher import Stats
from workers.projector.fleet import Fleet
from workers.projector.leases import LeaseKeeper
from workers.runtime import health, lifecycle

LEASE_SECONDS = 3.0  # the shortest allowed: the limits are a second


async def test_a_worker_frozen_inside_its_lease_tick_does_not_keep_the_others_from_renewing(schema):
    settings = Settings(database_url=DATABASE_URL, schema=schema, lease_seconds=LEASE_SECONDS)
    timeouts = lifecycle.session_timeouts(settings)
    async with lifecycle.open_pool(settings, max_size=2, timeouts=timeouts) as pool:
        keeper = LeaseKeeper(pool, schema, ["customer_stats"], PARTITIONS, lease_seconds=LEASE_SECONDS,
                             worker="host:1:a")
        await keeper.tick()
        frozen = await db.connect(DATABASE_URL, schema, timeouts=timeouts)
        try:
            await frozen.execute("BEGIN")
            await locks.take(frozen, locks.leases(schema))  # then silence: the process stopped inside its tick
            async with asyncio.timeout(LEASE_SECONDS):  # the renewal must come before the leases expire
                while True:
                    try:
                        tick = await keeper.tick()
                        break
                    except store_errors.TransientError:  # the lock limit: the worker's next tick comes soon
                        await asyncio.sleep(0.1)
        finally:
            frozen.terminate()
    assert (tick.lost, keeper.held) == ({}, {"customer_stats": set(range(PARTITIONS))})


async def test_a_statement_that_waits_longer_than_the_lock_limit_raises_a_transient_error(pool, schema):
    settings = Settings(database_url=DATABASE_URL, schema=schema, lock_timeout_seconds=1)
    await pool.execute("INSERT INTO checkpoints (projection, stream_id, version) VALUES ('p', 's', 0)")
    async with pool.acquire() as holder, holder.transaction(), \
            lifecycle.open_pool(settings, timeouts=lifecycle.session_timeouts(settings)) as limited:
        await holder.execute("SELECT * FROM checkpoints FOR UPDATE")
        with pytest.raises(store_errors.TransientError) as raised:
            async with db.translate_errors():
                await limited.execute("UPDATE checkpoints SET version = 1")
    assert isinstance(raised.value.__cause__, asyncpg.exceptions.LockNotAvailableError)


@pytest.mark.parametrize("error", [asyncpg.exceptions.LockNotAvailableError,  # 55P03
                                   asyncpg.exceptions.IdleInTransactionSessionTimeoutError])  # 25P03
def test_what_the_limits_raise_inside_a_handler_is_retried_not_parked(error: type[Exception]) -> None:
    # (57014 query_canceled, a statement_timeout's, was transient already.)
    assert handlers.is_outage(error("limit"))


async def test_a_lease_tick_that_works_again_marks_postgres_up_after_a_lock_limit_marked_it_down(
        pool, event_store, schema, prefix):
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)
    holder = LeaseKeeper(pool, schema, ["customer_stats"], PARTITIONS, worker="host:1:holder")
    await holder.tick()  # holds every partition: the fleet under test starts no consumer
    health_ = health.Health()
    health_.down("postgres", store_errors.TransientError("LockNotAvailableError: canceling statement due to lock timeout"))
    keeper = LeaseKeeper(pool, schema, ["customer_stats"], PARTITIONS, worker="host:2:quiet")
    connection = await aio_pika.connect(AMQP_URL)
    try:
        fleet = Fleet(event_store, connection, keeper, [CustomerStats()], settings, health_, {"customer_stats": Stats()})
        stop = asyncio.Event()
        running = asyncio.create_task(fleet.run(stop))
        try:
            assert await postgres_up(health_)
        finally:
            stop.set()
            await running
    finally:
        await keeper.leave()
        await connection.close()


async def test_a_lag_refresh_that_works_again_marks_postgres_up_after_a_lock_limit_marked_it_down(pool):
    health_ = health.Health()
    health_.down("postgres", store_errors.TransientError("LockNotAvailableError: canceling statement due to lock timeout"))
    monitor = asyncio.create_task(lag.run_lag_monitor(pool, ["customer_stats"], health=health_, interval=0.05))
    try:
        assert await postgres_up(health_)
    finally:
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor


async def postgres_up(health_: health.Health, within: float = 10.0) -> bool:
    """Whether the worker's health shows Postgres up within ``within`` seconds."""
    for _ in range(int(within / 0.05)):
        if health_.postgres:
            return True
        await asyncio.sleep(0.05)
    return health_.postgres
