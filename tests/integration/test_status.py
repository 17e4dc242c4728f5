"""``eventfleet status`` as a process against a known state: exact lag, parked, queue depth, outbox."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import aio_pika
import pytest

from eventfleet.examples.orders.projections import CustomerStats
from store import NO_STREAM
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.unit.test_projection_fold import paid, placed, shipped
from workers import broker, locks
from workers.projector import checkpoints, lag

pytestmark = pytest.mark.slow

PROJECTIONS = ["customer_stats", "order_summary"]


async def status(schema: str, prefix: str, *args: str, amqp_url: str = AMQP_URL) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": amqp_url,
           "EVENTFLEET_SCHEMA": schema, "EVENTFLEET_PREFIX": prefix}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "workers", "status", *args, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def known_state(pool, event_store, prefix, delete_prefixed) -> dict[str, Any]:
    """7 events; customer_stats applied 4 of them; 1 parked failure; 5 messages in each projection's
    partition queues, spread over two of them (order-a's partition holds 3, order-c's 2)."""
    await event_store.append("order-a", [placed("a", "c"), paid("a", "c"), paid("a", "c")], NO_STREAM)
    await event_store.append("order-b", [placed("b", "c"), paid("b", "c")], NO_STREAM)
    await event_store.append("order-c", [placed("c", "d"), shipped("c", "d")], NO_STREAM)
    applied = [*await event_store.load("order-a"), *(await event_store.load("order-b"))[:1]]
    await checkpoints.apply_batch(event_store, CustomerStats(), applied)
    for state in ("parked", "retried"):
        await pool.execute("INSERT INTO dead_letters (projection, stream_id, version, error, status) "
                           "VALUES ('customer_stats', 'order-x', 0, 'boom', $1)", state)
    names = broker.Names(prefix)
    queues = [q for p in PROJECTIONS for q in (*(names.partition_queue(p, n) for n in range(PARTITIONS)),
                                               names.dead_letter_queue(p))]
    delete_prefixed(queues, [names.partitions_exchange, names.dead_letter_exchange])
    assert partition_of("order-a", PARTITIONS) != partition_of("order-c", PARTITIONS)  # depth is a sum
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        targets = await broker.declare_topology(channel, names, PROJECTIONS, PARTITIONS)
        for event in (await event_store.load("order-a")) + (await event_store.load("order-c")):
            partition = partition_of(event.stream_id, PARTITIONS)
            await targets.partitions_exchange.publish(broker.events_message(partition, [event]),
                                                      routing_key=str(partition))
    return {"events": 7}


async def test_json_reports_the_exact_lag_parked_queue_depth_and_outbox(pool, schema, prefix, known_state):
    result = await status(schema, prefix, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"projections", "outbox", "partitions", "workers", "partition_lags", "reactors",
                        "publications", "broker", "groups"}
    assert doc["broker"] == {"quorum_queues": 2 * (PARTITIONS + 1), "file_handles": 6 * (PARTITIONS + 1),
                             "default_node_handles": 927, "warning": None}
    for row in doc["projections"]:
        assert set(row) == {"name", "kind", "state", "applied", "lag_events", "lag_seconds", "parked", "halted",
                            "queue_depth", "handled", "types_pending", "types_added", "in_code", "group",
                            "queue_groups"}
        assert (row["group"], row["queue_groups"]) == (None, [])  # no worker group: its own queues
        assert row["kind"] == "projection"
        assert row["lag_seconds"] > 0
    got = {r["name"]: (r["state"], r["applied"], r["lag_events"], r["parked"], r["queue_depth"])
           for r in doc["projections"]}
    # customer_stats has no handler for order-c's OrderShipped: of the 3 events it has not applied, 2 are lag.
    assert got == {"customer_stats": ("live", 4, 2, 1, 5), "order_summary": ("live", 0, 7, 0, 5)}
    assert doc["outbox"]["pending"] == 7
    assert doc["outbox"]["oldest_age_seconds"] > 0
    # The same figures as the lag gauges, which come from lag.measure.
    assert (await lag.measure(pool, "customer_stats")).lag_events == 2


async def test_table_shows_a_stopped_rebuild_and_survives_rabbitmq_being_unreachable(pool, schema, prefix,
                                                                                     known_state):
    await pool.execute("UPDATE projection_status SET state = 'rebuilding' WHERE projection = 'order_summary'")
    result = await status(schema, prefix, amqp_url="amqp://guest:guest@127.0.0.1:1/")
    assert result.returncode == 0, result.stderr
    assert "eventfleet status: RabbitMQ at 127.0.0.1:1 unreachable: " in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["PROJECTION", "STATE", "APPLIED"]
    assert lines[1].split() == ["customer_stats", "live", "4", "2", lines[1].split()[4], "1", "0", "-"]
    assert lines[2].startswith("order_summary   rebuilding (not running)")
    assert lines[3].startswith("outbox: 7 pending, oldest ")  # below the projections (the fleet follows)
    assert lines[4] == (f"broker: this deployment declares {2 * (PARTITIONS + 1)} quorum queues (2 projections x "
                        f"({PARTITIONS} partitions + 1 DLQ)), ~{6 * (PARTITIONS + 1)} file handles of the broker; a "
                        "node with the Debian default of 1,024 descriptors has ~927")
    # While a rebuild holds its lock the state is just "rebuilding" (pg_locks splits the key in two).
    key = locks.rebuild(schema, "order_summary")
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", key)
        assert await pool.fetchval(locks.SQL["held"], key)
        await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)
    assert not await pool.fetchval(locks.SQL["held"], key)


async def test_queue_depth_is_null_while_no_queue_of_the_projection_exists(schema, prefix):
    result = await status(schema, prefix, "--json")
    assert result.returncode == 0, result.stderr
    assert {r["name"]: r["queue_depth"] for r in json.loads(result.stdout)["projections"]} == dict.fromkeys(
        PROJECTIONS)


async def test_an_unmigrated_schema_is_a_one_line_error(prefix):
    result = await status("t_never_migrated", prefix)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "eventfleet status: schema 't_never_migrated' is not migrated: run `eventfleet migrate`")
