"""A worker's fleet (workers/projector/fleet.py) treats a broker connection that closed under it as an outage.

A worker taking partitions over (a rebalance) while RabbitMQ shuts down opens their channels on a connection
that has just closed: aiormq raises a bare ``RuntimeError("<Connection ...> closed")`` there. Found by the
chaos suite's ``broker_restart``: the worker exited 1 (``unexpected ExceptionGroup``) instead of reconnecting.
"""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from eventfleet.examples.orders.projections import CustomerStats
from store import db
from store.event_store import EventStore
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from workers.config import Settings
from workers.projector.batcher import Stats
from workers.projector.fleet import Fleet
from workers.projector.leases import LeaseKeeper
from workers.runtime import health, retry


async def test_partitions_acquired_on_a_connection_that_just_closed_are_an_outage(
        pool: db.Pool, event_store: EventStore, schema: str, prefix: str) -> None:
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)
    keeper = LeaseKeeper(pool, schema, ["customer_stats"], PARTITIONS)
    connection = await aio_pika.connect(AMQP_URL)
    # As the broker's shutdown leaves it: aiormq's connection closed, aio-pika's not yet told.
    await connection.transport.connection.close()  # type: ignore[union-attr]
    fleet = Fleet(event_store, connection, keeper, [CustomerStats()], settings, health.Health(),
                  {"customer_stats": Stats()})
    # The first tick acquires every partition; starting their consumers must end the session as an outage
    # (retried by run_worker), not as a bug that ends the process.
    with pytest.raises(retry.OUTAGE_ERRORS):
        await asyncio.wait_for(fleet.run(asyncio.Event()), 30)
    await keeper.leave()
    await connection.close()
