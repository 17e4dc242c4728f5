"""``workers.fleet``: the one supervisor of relay and worker processes that the demo, the tests and the
benchmarks share. Its deployment is removed on the way out whatever happened, and a process that dies on
its own is noticed."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from projections import registry
from tests.conftest import AMQP_URL, DATABASE_URL
from tests.integration.test_relay_helpers import topology_names
from workers import broker, errors, fleet
from workers.config import Settings

pytestmark = pytest.mark.slow

PARTITIONS = 4
PROJECTIONS = ("customer_stats", "order_summary")


def settings() -> Settings:
    return Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=f"t_{uuid.uuid4().hex[:16]}",
                    prefix=f"test.{uuid.uuid4().hex[:12]}", partitions=PARTITIONS,
                    projection_modules=(registry.EXAMPLE,))


async def leftovers(s: Settings) -> tuple[bool, list[str]]:
    """(the schema exists, the queues and exchanges of the prefix that exist)."""
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        schema = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", s.schema)
    finally:
        await conn.close()
    queues, exchanges = topology_names(s.prefix, PROJECTIONS)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        found = [q for q in queues if await broker.passive_queue(connection, q) is not None]
        found += [x for x in exchanges if await broker.exchange_exists(connection, x)]
    return schema, found


async def failing_block(s: Settings, tmp_path: Path, declared: list[str]) -> None:
    async with fleet.open_fleet(s, tmp_path) as f:
        await f.start("relay")
        await f.start("worker")
        declared += (await leftovers(s))[1]
        raise RuntimeError("the test failed")


async def test_a_fleet_whose_block_fails_still_removes_its_schema_queues_and_exchanges(tmp_path):
    s = settings()
    declared: list[str] = []
    with pytest.raises(RuntimeError, match="the test failed"):
        await failing_block(s, tmp_path, declared)
    assert declared  # the relay had declared the partition queues
    assert await leftovers(s) == (False, [])


async def test_a_process_that_exits_on_its_own_fails_the_check_and_one_the_fleet_killed_does_not(tmp_path):
    async with fleet.open_fleet(settings(), tmp_path) as f:
        killed, crashed = await f.start("worker"), await f.start("worker")
        f.kill(killed)
        assert await killed.wait_exit(10) == -signal.SIGKILL
        f.check()
        os.kill(crashed.pid, signal.SIGKILL)  # not through the fleet: a crash as far as it knows
        await crashed.wait_exit(10)
        with pytest.raises(errors.FleetFailed, match="worker-1 exited"):
            f.check()


async def test_a_worker_stopped_with_sigterm_exits_cleanly_with_its_totals_per_projection(tmp_path):
    async with fleet.open_fleet(settings(), tmp_path) as f:
        worker = await f.start("worker")
        assert await f.stop(worker) == 0
        assert set(worker.current.final or {}) == set(PROJECTIONS)
