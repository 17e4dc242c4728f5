"""A store moved to another Postgres cluster: a deployment's ``pg_dump`` restored into a freshly initialised one.

The new cluster hands out transaction ids far below the ones the restored events carry. Before the store's
clock (store/clock.py), every event appended there sorted before the restored watermark and was acked unapplied
while ``status`` said lag 0, and ``read_all`` never returned the restored events (they sat above the horizon).
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import NO_STREAM, EventStore, RecordedEvent, clock, db, errors
from store.records import Position
from tests.cluster.postgres import Node, postgres_alone, unavailable
from tests.conftest import AMQP_URL, PARTITIONS
from tests.unit.test_projection_fold import fold, order_life, read_models
from workers import admin, broker
from workers.config import Settings
from workers.projector import checkpoints, lag
from workers.projector.worker import consume_until_idle
from workers.relay.publish import relay_until_idle

pytestmark = pytest.mark.cluster

PROJECTIONS = (OrderSummary, CustomerStats)
#: Transaction ids the source's events must carry at least: far above what the new cluster reaches in the test.
SOURCE_IDS = 20_000


@pytest.fixture
def new_cluster(tmp_path: Path) -> Iterator[Node]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"postgres harness: {reason}")
    with postgres_alone() as node:
        yield node


async def burn_transaction_ids(pool: db.Pool, at_least: int) -> None:
    """Make the source cluster's next transaction id at least ``at_least`` (subtransactions take ids too)."""
    async with pool.acquire() as conn:
        now = int(await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"))
        if now >= at_least:
            return
        await conn.execute("CREATE TEMP TABLE burn (n int)")
        await conn.execute(f"""
            DO $$ BEGIN FOR i IN 1..{at_least - now} LOOP
                BEGIN INSERT INTO burn VALUES (i); EXCEPTION WHEN others THEN NULL; END;
            END LOOP; END $$""")
        await conn.execute("DROP TABLE burn")


async def append_orders(store: EventStore, first: int, orders: int) -> list[str]:
    streams = [f"order-{i}" for i in range(first, first + orders)]
    await store.append_batch([(sid, order_life(sid, f"c{i % 7}", 3, random.Random(first + i)), NO_STREAM) for i, sid in enumerate(streams)])
    return streams


async def everything(store: EventStore) -> list[RecordedEvent]:
    """Every event read_all returns, from the start (the bounded reader tests use)."""
    found: list[RecordedEvent] = []
    after = Position.START
    while batch := await store.read_all(after, 500):
        found += batch
        after = batch[-1].position
    return found


def move(schema: str, node: Node, dump: Path) -> None:
    """pg_dump the deployment's schema from the machine's cluster, restore it into ``node``'s."""
    subprocess.run(["pg_dump", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-n", schema, "--no-owner",
                    "--no-privileges", "-f", str(dump)], check=True, capture_output=True, timeout=120)
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(node.port), "-U",
                    "postgres", "-d", "postgres", "-f", str(dump)], check=True, capture_output=True, timeout=120)


@pytest.fixture
async def moved(schema: str, pool: db.Pool, event_store: EventStore, new_cluster: Node,
                tmp_path: Path) -> tuple[str, list[str]]:
    """A deployment with 40 orders applied by both read models and their watermarks advanced, its schema restored
    into the new cluster: (the new cluster's URL, the orders' streams)."""
    await burn_transaction_ids(pool, SOURCE_IDS)
    streams = await append_orders(event_store, 0, 40)
    events = await everything(event_store)
    for projection in PROJECTIONS:
        await checkpoints.apply_batch(event_store, projection(), events)
        await lag.advance(pool, projection.name)
    move(schema, new_cluster, tmp_path / "dump.sql")
    return new_cluster.url, streams


async def test_a_store_restored_into_a_new_cluster_refuses_appends_until_migrate_moves_its_clock(schema, moved):
    url, _ = moved
    async with db.create_pool(url, schema, min_size=1, max_size=2) as pool:
        with pytest.raises(errors.ClockBehind, match="eventfleet migrate"):
            await append_orders(EventStore(pool, schema=schema), 40, 1)
        async with pool.acquire() as conn:
            assert (await clock.read(conn, schema)).behind

        await admin.run_migrate(url, schema, partitions=PARTITIONS)

        async with pool.acquire() as conn:
            reading = await clock.read(conn, schema)
        assert (reading.behind, reading.shift > 0) == (False, True)
        assert len(await append_orders(EventStore(pool, schema=schema), 40, 1)) == 1


async def test_a_store_restored_into_a_new_cluster_and_migrated_applies_every_event_and_reads_them_all(
        schema, prefix, moved):
    url, restored_streams = moved
    await admin.run_migrate(url, schema, partitions=PARTITIONS)
    settings = Settings(database_url=url, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        prefetch=100, batch_size=50)
    names = broker.Names(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, db.create_pool(url, schema, min_size=1, max_size=6) as pool:
        channel = await connection.channel()
        targets = await broker.declare_topology(channel, names, [p.name for p in PROJECTIONS], PARTITIONS)
        try:
            store = EventStore(pool, schema=schema)
            new_streams = await append_orders(store, 40, 30)

            await relay_until_idle(pool, targets)
            for projection in PROJECTIONS:
                await consume_until_idle(pool, channel, projection(), settings)

            stored = await pool.fetch("SELECT event_id FROM events ORDER BY global_position")
            read = await everything(store)
            assert [e.event_id for e in read] == [r["event_id"] for r in stored]  # all of them, in commit order
            async with pool.acquire() as conn:
                models = await read_models(conn)
            assert models == fold(e.event for e in read)
            assert {sid for sid in models.order_summary} == set(restored_streams) | set(new_streams)
            for projection in PROJECTIONS:
                measured = await lag.measure(pool, projection.name)
                types = projection.handled_names()
                handled = [e for e in read if types is None or e.event_type.rpartition(".v")[0] in types]
                # The watermark stands at the last event the read model handles (the rest are none of its lag).
                assert (measured.lag_events, measured.watermark) == (0, handled[-1].position)
        finally:
            await broker.delete_topology(channel, names, [p.name for p in PROJECTIONS], PARTITIONS)


async def test_a_store_whose_clock_never_moved_reads_its_next_id_above_everything_it_holds(pool, event_store,
                                                                                           schema):
    await append_orders(event_store, 0, 3)
    async with pool.acquire() as conn:
        reading = await clock.read(conn, schema)
        assert (reading.behind, reading.shift) == (False, 0)
        assert reading.newest is not None
        assert reading.newest < reading.next
        assert await conn.fetchval("SELECT store_xmin() = pg_snapshot_xmin(pg_current_snapshot())")

