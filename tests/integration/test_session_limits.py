"""A worker's Postgres sessions under its limits: a frozen holder of the lease lock is ended by the server,
and what the limits raise is transient (retried), never a handler's failure (parked)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from store import db
from store import errors as store_errors
from tests.conftest import DATABASE_URL
from workers import locks
from workers.config import Settings
from workers.projector import handlers
from workers.projector.leases import LeaseKeeper
from workers.runtime import lifecycle

LEASE_SECONDS = 3.0  # the shortest allowed: the limits are a second


async def test_a_worker_frozen_inside_its_lease_tick_does_not_keep_the_others_from_renewing(schema):
    settings = Settings(database_url=DATABASE_URL, schema=schema, lease_seconds=LEASE_SECONDS)
    timeouts = lifecycle.session_timeouts(settings)
    async with lifecycle.open_pool(settings, max_size=2, timeouts=timeouts) as pool:
        keeper = LeaseKeeper(pool, schema, ["customer_stats"], 4, lease_seconds=LEASE_SECONDS, worker="host:1:a")
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
    assert (tick.lost, keeper.held) == ({}, {"customer_stats": {0, 1, 2, 3}})


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
    assert handlers.is_transient(error("limit"))
