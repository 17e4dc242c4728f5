"""The relay outlives RabbitMQ and Postgres outages: every pending row gets out, each outage logs once.

Disruptive (they touch the shared servers) and slow; every test restores its service in ``finally``.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import pytest

from workers import relay
from workers.runtime import health

from .test_relay_helpers import (
    PROJECTIONS,
    append_orders,
    declare,
    delete_topology,
    drain_queues,
    event_ids,
    outbox_count,
    partition_queues,
    wait_until,
)

pytestmark = pytest.mark.slow

BATCH = 50


async def run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"{argv}: {out.decode(errors='replace')}"


async def broker_reachable(amqp_url: str) -> bool:
    try:
        connection = await aio_pika.connect(amqp_url)
    except (ConnectionError, OSError, aio_pika.exceptions.AMQPError):
        return False
    await connection.close()
    return True


@pytest.fixture
async def topology(amqp_url, prefix):
    """Declared and deleted on connections of their own: outages here close every connection."""
    connection = await aio_pika.connect(amqp_url)
    await declare(connection, prefix)
    await connection.close()
    yield partition_queues(prefix)  # one projection's: the queues the tests drain

    async def up() -> bool:
        return await broker_reachable(amqp_url)
    await wait_until(up, 120, "RabbitMQ to accept connections")
    connection = await aio_pika.connect(amqp_url)
    await delete_topology(connection, prefix)
    await connection.close()


@pytest.fixture
async def relay_task(schema, prefix, amqp_url, database_url):
    """run_relay in this process on a pool of its own: ``(status, idle, config)``; cancelled after."""
    config = relay.RelayConfig(database_url=database_url, schema=schema, amqp_url=amqp_url, prefix=prefix,
                               projections=PROJECTIONS, batch_size=BATCH, poll_interval=0.5)
    status, idle = health.Health(), asyncio.Event()
    async with relay.open_pool(config) as relay_pool:
        task = asyncio.create_task(relay.run_relay(relay_pool, config, status, idle=idle))
        yield status, idle, config
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def outages(caplog, message: str) -> list[str]:
    return [r.service for r in caplog.records if r.name == "workers.runtime.health" and r.getMessage() == message]


async def wait_drained(pool, idle: asyncio.Event, status: health.Health) -> None:
    async def drained() -> bool:
        return await outbox_count(pool) == 0
    await wait_until(drained, 120, "the outbox to drain")
    await asyncio.wait_for(idle.wait(), 60)
    assert status.ready()


async def test_close_all_connections_mid_drain(pool, event_store, amqp_url, topology, relay_task, caplog):
    caplog.set_level(logging.WARNING, logger="workers.runtime.health")
    status, idle, _ = relay_task
    n = await append_orders(event_store, 500)  # 1500 events, 30 batches

    async def draining() -> bool:
        return await outbox_count(pool) < n
    await wait_until(draining, 60, "the relay to start publishing")
    await run("rabbitmqctl", "close_all_connections", "relay outage test")
    await wait_drained(pool, idle, status)

    connection = await aio_pika.connect(amqp_url)
    delivered = await drain_queues(connection, topology)
    await connection.close()
    assert set(delivered.counts) == await event_ids(pool)
    assert delivered.duplicates <= BATCH  # only the batch the close cut off can go out twice
    assert outages(caplog, "outage").count("rabbitmq") == 1
    assert outages(caplog, "recovered").count("rabbitmq") == 1


async def test_rabbitmq_stop_start_while_rows_are_pending(pool, event_store, amqp_url, topology, relay_task,
                                                          caplog):
    caplog.set_level(logging.WARNING, logger="workers.runtime.health")
    status, idle, _ = relay_task
    await asyncio.wait_for(idle.wait(), 60)
    assert status.ready()
    try:
        await run("rabbitmqctl", "stop_app")

        async def not_ready() -> bool:
            return not status.ready()
        await wait_until(not_ready, 60, "readiness to report the outage")
        n = await append_orders(event_store, 50)  # pending while the broker is away
        assert await outbox_count(pool) == n
    finally:
        await run("rabbitmqctl", "start_app")
        await run("rabbitmqctl", "await_startup")
    await wait_drained(pool, idle, status)

    connection = await aio_pika.connect(amqp_url)
    delivered = await drain_queues(connection, topology)
    await connection.close()
    assert set(delivered.counts) == await event_ids(pool)
    assert delivered.duplicates == 0  # nothing was confirmed during the outage, nothing went out twice
    # Many reconnection attempts failed, but the outage is logged once, with its cause.
    assert outages(caplog, "outage").count("rabbitmq") == 1
    assert outages(caplog, "recovered").count("rabbitmq") == 1
    assert next(r.cause for r in caplog.records if r.getMessage() == "outage")


async def test_postgres_restart_mid_drain(database_url, schema, event_store, amqp_url, topology, relay_task,
                                          caplog):
    caplog.set_level(logging.WARNING, logger="workers.runtime.health")
    status, idle, _ = relay_task
    n = await append_orders(event_store, 500)  # 1500 events
    pool = event_store.pool

    async def draining() -> bool:
        return await outbox_count(pool) < n
    await wait_until(draining, 60, "the relay to start publishing")
    try:
        await run("pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart", "-m", "fast")
    finally:
        if not await _pg_running():
            await run("pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start")
    await pool.expire_connections()  # the test's own pool lost its connections too
    await wait_drained(pool, idle, status)

    connection = await aio_pika.connect(amqp_url)
    delivered = await drain_queues(connection, topology)
    await connection.close()
    assert set(delivered.counts) == await event_ids(pool)
    assert delivered.duplicates <= BATCH  # the batch whose commit the restart cut off
    assert outages(caplog, "outage").count("postgres") == 1
    assert outages(caplog, "recovered").count("postgres") == 1


async def _pg_running() -> bool:
    proc = await asyncio.create_subprocess_exec("pg_lsclusters", "-h", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return b"online" in out
