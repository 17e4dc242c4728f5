"""``python -m workers worker`` as real processes: sharing a projection's partitions, SIGKILL, SIGTERM.
Exactly once. The events reach the partition queues through the relay's own publishing, in this process."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from eventfleet.examples.orders.projections import CustomerStats
from store import NO_STREAM, EventStore, RecordedEvent, db
from store.event_store import record_from_row
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS, delete_topology
from tests.unit.test_projection_fold import fold, order_life, read_models
from workers import broker, projector, relay
from workers.config import Settings
from workers.projector import leases
from workers.runtime import retry

pytestmark = pytest.mark.slow

PROJECTION = "customer_stats"
RETRYABLE: tuple[type[BaseException], ...] = (*retry.OUTAGE_ERRORS, asyncpg.PostgresError)
#: A killed worker's partitions wait this long for another owner (the shortest lease allowed is 3 s).
LEASE_SECONDS = "5"


@dataclasses.dataclass(frozen=True)
class Topology:
    """The projection's partition queues declared on a confirming channel, and the relay's targets."""

    channel: aio_pika.abc.AbstractChannel
    targets: broker.Targets
    names: broker.Names


@pytest.fixture
async def topology(prefix: str) -> AsyncIterator[Topology]:
    """The projection's partition queues and DLQ, and the relay's targets; deleted after the test."""
    names = broker.Names(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        yield Topology(channel, await broker.declare_topology(channel, names, [PROJECTION], PARTITIONS), names)
    # On a connection of its own: the test's may have been closed under it (a broker restart, another run's
    # close_all_connections), and the workers declared every loaded projection's queues (the prefix fixture
    # deletes them all after the test too).
    await delete_topology(prefix, [PROJECTION], PARTITIONS)


async def append_orders(event_store: EventStore, streams: int, length: int) -> list[RecordedEvent]:
    rng = random.Random(7)
    for start in range(0, streams, 50):
        await event_store.append_batch([(f"order-{i}", order_life(str(i), f"c{i % 97}", length, rng), NO_STREAM)
                                        for i in range(start, min(streams, start + 50))])
    # Not read_all: its horizon is cluster-wide, and other tests' open transactions may hold it back.
    rows = await event_store.pool.fetch(
        "SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at, "
        "transaction_id FROM events ORDER BY global_position")
    events = [record_from_row(r) for r in rows]
    assert len(events) == streams * length
    return events


async def publish(pool: db.Pool, topology: Topology, events: list[RecordedEvent]) -> None:
    """Relay the whole outbox (every appended event) to the partition queues, as the relay does."""
    assert await relay.relay_until_idle(pool, topology.targets, batch_size=2000) == len(events)


async def queues(topology: Topology) -> list[Any]:
    """The passive declarations (message and consumer counts) of the projection's partition queues."""
    return [(await topology.channel.declare_queue(topology.names.partition_queue(PROJECTION, n), passive=True)
             ).declaration_result for n in range(PARTITIONS)]


async def held(pool: db.Pool) -> list[int]:
    """How many of the projection's partitions each live lease owner holds, fewest first."""
    owners = collections.Counter(lease.owner for lease in await leases.owners(pool)
                                 if lease.projection == PROJECTION and lease.owner is not None and lease.live)
    return sorted(owners.values())


def start_worker(schema: str, prefix: str, log: Path, **env: str) -> subprocess.Popen[str]:
    environ = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL,
               "EVENTFLEET_SCHEMA": schema, "EVENTFLEET_PREFIX": prefix, "EVENTFLEET_HTTP_PORT": "0", **env}
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        return subprocess.Popen([sys.executable, "-m", "workers", "worker", "--projection", PROJECTION],
                                env=environ, stdout=subprocess.PIPE, stderr=fd, text=True)
    finally:
        os.close(fd)  # the child has its own copy


def reap(*procs: subprocess.Popen[str]) -> None:
    """SIGKILL whatever is still running (a failed test) and collect it."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def stop_worker(proc: subprocess.Popen[str], within: float) -> dict[str, Any]:
    """SIGTERM; the process must exit 0 within ``within`` seconds; return the stats it printed."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=within)
    assert proc.returncode == 0, out
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


async def applied(pool: db.Pool) -> int:
    """The events customer_stats applied (projection_status moves with the checkpoints, in their transaction)."""
    total: int = await pool.fetchval(
        "SELECT coalesce((SELECT applied FROM projection_status WHERE projection = $1), 0)", PROJECTION)
    return total


def handled(events: list[RecordedEvent]) -> int:
    """How many of the events customer_stats handles (every order event but OrderShipped: issue 25)."""
    return sum(CustomerStats().handles_type(e.event_type) for e in events)


async def until(check: Callable[[], Awaitable[bool]], within: float, *procs: subprocess.Popen[str]) -> None:
    """Poll check until true; the workers ride out outages others cause on the shared servers, so do we."""
    deadline = time.monotonic() + within
    while True:
        try:
            if await check():
                return
        except RETRYABLE:
            pass
        assert all(p.poll() is None for p in procs), "a worker died"
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def assert_exact(pool: db.Pool, events: list[RecordedEvent]) -> None:
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in events).customer_stats
    assert await pool.fetchval("SELECT applied FROM projection_status WHERE projection = $1", PROJECTION) == handled(events)


async def test_three_workers_share_a_projection_exactly_once(pool, event_store, topology, schema, prefix, tmp_path):
    events = await append_orders(event_store, 500, 40)
    # Every event through the deliveries: no catch-up from the store, which would blur the shares.
    procs = [start_worker(schema, prefix, tmp_path / f"worker{i}.log", EVENTFLEET_CATCHUP_THRESHOLD="0")
             for i in range(3)]
    try:
        async def shared() -> bool:
            # Fair shares of the 4 partitions (2, 1, 1), each partition queue consumed by its owner alone.
            return (await held(pool) == [1, 1, 2]
                    and [q.consumer_count for q in await queues(topology)] == [1] * PARTITIONS)

        await until(shared, 60, *procs)
        await publish(pool, topology, events)
        await until(lambda: _at_least(pool, handled(events)), 300, *procs)
        reports = [stop_worker(p, 15) for p in procs]
    finally:
        reap(*procs)
    shares = [r["projections"][PROJECTION]["applied"] for r in reports]
    assert all(share > 0 for share in shares), shares
    assert sum(shares) == handled(events), "every event applied by exactly one worker"
    await assert_exact(pool, events)


async def test_sigkill_mid_batch_and_sigterm_during_load_lose_and_double_nothing(pool, event_store, topology, schema,
                                                                                  prefix, tmp_path):
    events = await append_orders(event_store, 200, 20)
    await publish(pool, topology, events)
    # The consumer's own path (a catch-up would apply the whole backlog in a few store batches).
    small = {"EVENTFLEET_BATCH_SIZE": "20", "EVENTFLEET_PREFETCH": "60", "EVENTFLEET_STOP_TIMEOUT": "5",
             "EVENTFLEET_CATCHUP_THRESHOLD": "0", "EVENTFLEET_LEASE_SECONDS": LEASE_SECONDS}
    killed = start_worker(schema, prefix, tmp_path / "killed.log", **small)
    try:
        await until(lambda: _at_least(pool, 1), 60, killed)
        killed.kill()  # SIGKILL: its open transaction rolls back, its unacked deliveries come back
    finally:
        if killed.poll() is None:
            killed.kill()
        killed.communicate()
    progress = await applied(pool)
    assert progress < handled(events), "the load was over before the kill; make it longer"
    # The next worker owns the partitions once the killed one's leases expired.
    stopped = start_worker(schema, prefix, tmp_path / "stopped.log", **small)
    try:
        await until(lambda: _at_least(pool, progress + 500), 60, stopped)
        started = time.monotonic()
        report = stop_worker(stopped, within=5 + 5)
        assert time.monotonic() - started < 5 + 5
    finally:
        if stopped.poll() is None:
            stopped.kill()
            stopped.communicate()
    assert report["projections"][PROJECTION]["applied"] > 0
    assert await applied(pool) < handled(events), "SIGTERM came after the load; make it longer"
    # Whatever is left (redeliveries included) is finished in-process; the sums must be exact.
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)
    await projector.consume_until_idle(pool, topology.channel, CustomerStats(), settings)
    assert await applied(pool) == handled(events)
    await assert_exact(pool, events)


async def _at_least(pool: db.Pool, n: int) -> bool:
    return bool(await applied(pool) >= n)


async def test_a_worker_killed_during_a_catch_up_loses_and_doubles_nothing(pool, event_store, topology, schema,
                                                                         prefix, tmp_path):
    events = await append_orders(event_store, 300, 20)
    await publish(pool, topology, events)
    # Far behind (6,000 events over 4 partitions against a threshold of 100): each partition's catch-up from
    # the store runs, in small batches.
    catch_up = {"EVENTFLEET_CATCHUP_THRESHOLD": "100", "EVENTFLEET_CATCHUP_BATCH_SIZE": "150",
                "EVENTFLEET_STOP_TIMEOUT": "5", "EVENTFLEET_LEASE_SECONDS": LEASE_SECONDS}
    killed = start_worker(schema, prefix, tmp_path / "killed.log", **catch_up)
    try:
        await until(lambda: _at_least(pool, 1), 60, killed)
        killed.kill()  # SIGKILL mid catch-up: its batch rolls back, its leases expire
    finally:
        if killed.poll() is None:
            killed.kill()
        killed.communicate()
    assert await applied(pool) < handled(events), "the catch-up was over before the kill; make it longer"
    procs = [start_worker(schema, prefix, tmp_path / f"worker{i}.log", **catch_up) for i in range(2)]
    try:
        async def drained() -> bool:
            return (await applied(pool) == handled(events)
                    and [q.message_count for q in await queues(topology)] == [0] * PARTITIONS)

        await until(drained, 300, *procs)
        reports = [stop_worker(p, 15) for p in procs]
    finally:
        reap(*procs)
    stats = [r["projections"][PROJECTION] for r in reports]
    assert sum(s["caught_up"] for s in stats) > 0, "neither survivor caught up from the store"
    await assert_exact(pool, events)
