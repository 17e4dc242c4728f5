"""``python -m workers relay`` as real processes: killed, stopped, several at once; nothing is lost.

Duplicates bound: an event is published twice only if its batch was published and then not committed,
so each killed relay adds at most one batch (EVENTFLEET_RELAY_BATCH_SIZE events, in however many batch
messages); relays that stop cleanly or keep running add none (SKIP LOCKED: no two relays ever hold the
same row). Deliveries are counted per event, decoded from one projection's partition queues.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.integration.test_relay_helpers import (
    Collector,
    append_orders,
    declare,
    delete_topology,
    drain_queues,
    event_ids,
    outbox_count,
    partition_queues,
    unpublished_ids,
    wait_until,
)
from workers import relay

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BATCH = 100


@pytest.fixture
async def topology(amqp, prefix):
    await declare(amqp, prefix)
    yield partition_queues(prefix)  # one projection's: the queues the tests drain
    await delete_topology(amqp, prefix)


@pytest.fixture
async def spawn(schema, prefix, database_url, amqp_url, tmp_path):
    """Start relay processes of this test's schema and prefix; any still running are killed after."""
    procs: list[asyncio.subprocess.Process] = []

    async def start() -> asyncio.subprocess.Process:
        env = {**os.environ, "EVENTFLEET_DATABASE_URL": database_url, "EVENTFLEET_AMQP_URL": amqp_url,
               "EVENTFLEET_SCHEMA": schema, "EVENTFLEET_PREFIX": prefix, "EVENTFLEET_HTTP_PORT": "0",
               "EVENTFLEET_RELAY_BATCH_SIZE": str(BATCH)}
        log = (tmp_path / f"relay{len(procs)}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "workers", "relay", env=env,
                                                    cwd=ROOT, stdout=log, stderr=log)
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def listening_relays(pool, schema: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
        relay.application_name(schema))
    return count


async def wait_listening(pool, schema: str, k: int) -> None:
    async def ready() -> bool:
        return await listening_relays(pool, schema) >= k
    await wait_until(ready, 60, f"{k} relays listening")


async def wait_outbox_below(pool, n: int, within: float = 60) -> None:
    async def below() -> bool:
        return await outbox_count(pool) < n
    await wait_until(below, within, f"the outbox below {n} rows")


async def stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    return await asyncio.wait_for(proc.wait(), 30)


async def test_a_relay_killed_mid_batch_loses_nothing(pool, event_store, schema, amqp, topology, spawn):
    n = await append_orders(event_store, 1000)  # 3000 events, 30 batches
    first = await spawn()
    await wait_outbox_below(pool, n)  # batches are committing: the relay is mid-drain
    assert await stop(first, signal.SIGKILL) == -signal.SIGKILL
    assert await outbox_count(pool) > 0, "the relay was done before the kill; make the load longer"

    # Every row the dead relay deleted had been confirmed: it is in the queue.
    before = await drain_queues(amqp, topology)
    assert (await event_ids(pool)) - (await unpublished_ids(pool)) <= set(before.counts)

    second = await spawn()
    await wait_outbox_below(pool, 1)
    assert await stop(second) == 0
    after = await drain_queues(amqp, topology)
    delivered = before.counts + after.counts
    assert set(delivered) == await event_ids(pool)
    duplicates = sum(delivered.values()) - len(delivered)
    print(f"killed relay: {duplicates} duplicates of {n} events (bound {BATCH})")
    assert duplicates <= BATCH  # at most the batch the kill cut off between confirm and commit


@pytest.mark.parametrize("relays", [2, 3])
async def test_concurrent_relays_publish_everything_with_bounded_duplicates(
        pool, event_store, schema, amqp, topology, spawn, relays):
    procs = [await spawn() for _ in range(relays)]
    await wait_listening(pool, schema, relays)  # all asleep on LISTEN: one NOTIFY wakes them together
    n = await append_orders(event_store, 1500, per_batch=1500)  # 4500 events in one transaction
    await wait_outbox_below(pool, n - 10 * BATCH)
    assert await stop(procs[0], signal.SIGKILL) == -signal.SIGKILL  # its claimed batch is rolled back
    assert await outbox_count(pool) > 0, "the relays were done before the kill; make the load longer"
    await wait_outbox_below(pool, 1)  # the others publish the rest, the killed relay's rows included
    for proc in procs[1:]:
        assert await stop(proc) == 0

    delivered: Collector = await drain_queues(amqp, topology)
    assert set(delivered.counts) == await event_ids(pool)
    assert len(delivered.counts) == n
    # Only the killed relay's last batch can have gone out twice; the live relays never overlap.
    print(f"{relays} relays, one killed: {delivered.duplicates} duplicates of {n} events (bound {BATCH})")
    assert delivered.duplicates <= BATCH


async def test_sigterm_finishes_the_batch_in_flight_and_exits_0(pool, event_store, amqp, topology, spawn,
                                                                 tmp_path):
    n = await append_orders(event_store, 1000)  # 3000 events
    proc = await spawn()
    await wait_outbox_below(pool, n)
    assert await stop(proc) == 0
    assert await outbox_count(pool) > 0, "the relay was done before the stop; make the load longer"
    assert b"relay stopped" in (tmp_path / "relay0.log").read_bytes()

    delivered = await drain_queues(amqp, topology)
    published = (await event_ids(pool)) - (await unpublished_ids(pool))
    assert set(delivered.counts) == published  # deleted rows were all confirmed, kept rows never sent
    assert delivered.duplicates == 0  # the batch in flight was committed, not republished
