"""A reactor's counters agree with the store after a worker ran it on every partition at once (one reactor object
serves all of a worker's partitions and their deadline firings)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator

import aio_pika
import pytest
from prometheus_client import REGISTRY

from eventfleet.examples.orders.reactors import PaymentTimeout
from projections import registry
from store import NO_STREAM, EventStore, db
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.unit.test_projection_fold import paid, placed
from workers import broker, projector, relay
from workers.config import Settings
from workers.runtime import health

# Importing the reactors module registered payment_timeout in this process: only this module's tests see it.
registry.REGISTRY.pop(PaymentTimeout.name, None)

ORDERS = 120
PAID_LATE = 30  # paid after their timeout was due, before the reactor heard of it: the cancel is refused
COUNTERS = ("eventfleet_reactor_follow_ups_total", "eventfleet_reactor_refusals_total",
            "eventfleet_reactor_deadlines_fired_total")


@pytest.fixture(autouse=True)
def reactors() -> Iterator[None]:
    registry.REGISTRY[PaymentTimeout.name] = PaymentTimeout
    yield
    registry.REGISTRY.pop(PaymentTimeout.name, None)


def counters() -> dict[str, float]:
    return {name: REGISTRY.get_sample_value(name, {"reactor": "payment_timeout"}) or 0.0 for name in COUNTERS}


async def wait_until(pool: db.Pool, query: str, expected: int, worker: asyncio.Task[object]) -> None:
    deadline = time.monotonic() + 60
    while (found := await pool.fetchval(query)) != expected:
        assert time.monotonic() < deadline, (query, found, expected)
        assert not worker.done(), worker
        await asyncio.sleep(0.05)


async def test_the_reactor_counters_of_a_worker_holding_every_partition_match_the_store(
        pool, event_store: EventStore, schema, prefix):
    connection = await aio_pika.connect(AMQP_URL)
    names = broker.Names(prefix)
    targets = await broker.declare_topology(await connection.channel(publisher_confirms=True, on_return_raises=True),
                                            names, ["payment_timeout"], PARTITIONS)
    timeout = PaymentTimeout()
    timeout.timeout = dt.timedelta(hours=1)  # due when the test says so
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        lease_seconds=3)
    before = counters()
    stop = asyncio.Event()
    worker = asyncio.create_task(projector.run_worker(settings, [timeout], health.Health(), stop, pool=pool))
    try:
        for i in range(ORDERS):
            await event_store.append(f"order-{i}", [placed(str(i), "c")], NO_STREAM)
        await relay.relay_until_idle(pool, targets)
        await wait_until(pool, "SELECT count(*) FROM deadlines", ORDERS, worker)
        for i in range(PAID_LATE):
            await event_store.append(f"order-{i}", [paid(str(i), "c")], 0)
        # Every partition's deadlines due at once: the worker's four partitions fire them side by side.
        await pool.execute("UPDATE deadlines SET due_at = clock_timestamp() - interval '1 second'")
        await wait_until(pool, "SELECT count(*) FROM deadlines", 0, worker)
        await relay.relay_until_idle(pool, targets)  # the payments and the cancels, for the reactor's checkpoints
        await wait_until(pool, "SELECT count(*) FROM events e LEFT JOIN checkpoints c ON c.projection = "
                               "'payment_timeout' AND c.stream_id = e.stream_id WHERE c.version IS NULL "
                               "OR c.version < e.version", 0, worker)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
        await broker.delete_topology(await connection.channel(), names, ["payment_timeout"], PARTITIONS)
        await connection.close()
    after = counters()
    follow_ups = await pool.fetchval("SELECT count(*) FROM events WHERE event_type = 'OrderCancelled.v1'")
    refusals = await pool.fetchval("SELECT count(*) FROM reactor_refusals")
    assert (follow_ups, refusals) == (ORDERS - PAID_LATE, PAID_LATE)
    assert {name: after[name] - before[name] for name in COUNTERS} == {
        "eventfleet_reactor_follow_ups_total": follow_ups,
        "eventfleet_reactor_refusals_total": refusals,
        "eventfleet_reactor_deadlines_fired_total": ORDERS,
    }
    assert REGISTRY.get_sample_value("eventfleet_reactor_deadlines_pending", {"reactor": "payment_timeout"}) == 0
