"""``eventfleet status`` of a deployment whose read models a worker group feeds (``EVENTFLEET_GROUP``): the group's
queues' depth per projection, its lease's owners per partition, and the broker's queues counted as they are."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import pytest

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import NO_STREAM, EventStore
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.unit.test_projection_fold import placed, shipped
from workers import broker
from workers.config import Settings
from workers.projector import worker as projector
from workers.projector.leases import LeaseKeeper
from workers.rebuild import backfill, typebook
from workers.runtime import health

pytestmark = pytest.mark.slow

PROJECTIONS = ["customer_stats", "order_summary"]
MESSAGES = 5  # in each queue bound to the partitions exchange

Declare = Callable[..., Awaitable[None]]


@pytest.fixture
def declare(event_store: EventStore, prefix: str, delete_prefixed: Any) -> Declare:
    """Declare worker groups (``broker.declare_group``, as their relay does) and the partition queues of
    ``own`` projections, then publish 5 messages to the partitions exchange: each of those queues holds its
    partitions' share of them; all of it deleted after the test."""

    async def run(groups: Sequence[str], own: Sequence[str] = ()) -> None:
        names = broker.Names(prefix)
        delete_prefixed([*(names.group_queue(g, p) for g in groups for p in range(PARTITIONS)),
                         *(names.partition_queue(x, p) for x in own for p in range(PARTITIONS)),
                         *(names.dead_letter_queue(x) for x in PROJECTIONS)],
                        [names.partitions_exchange, names.dead_letter_exchange])
        await event_store.append("order-a", [placed("a", "c"), shipped("a", "c"), shipped("a", "c")], NO_STREAM)
        await event_store.append("order-c", [placed("c", "d"), shipped("c", "d")], NO_STREAM)
        assert partition_of("order-a", PARTITIONS) != partition_of("order-c", PARTITIONS)  # a depth is a sum
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for group in groups:
                exchange = await broker.declare_group(channel, names, group, PROJECTIONS, PARTITIONS)
            await broker.declare_partitions(channel, names, own, PARTITIONS)
            events = [*await event_store.load("order-a"), *await event_store.load("order-c")]
            assert len(events) == MESSAGES
            for event in events:
                partition = partition_of(event.stream_id, PARTITIONS)
                await exchange.publish(broker.events_message(partition, [event]), routing_key=str(partition))

    return run


async def leased(pool: Any, group: str) -> None:
    """A lease row of the group, as its workers leave it once they stopped (released: no owner)."""
    await pool.execute("INSERT INTO leases (projection, partition) VALUES ($1, 0)", broker.group_lease(group))


async def status_json(run_cli: Any, schema: str, prefix: str, **env: str) -> dict[str, Any]:
    ran = await run_cli("status", "--json", schema=schema, prefix=prefix, env=env)
    assert ran.code == 0, ran.err
    document: dict[str, Any] = json.loads(ran.out)
    return document


def queues(document: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {p["name"]: (p["queue_depth"], p["group"], p["queue_groups"]) for p in document["projections"]}


async def test_a_projection_of_a_leased_group_shows_the_groups_queue_depth(pool, schema, prefix, run_cli, declare):
    await declare(["main"])
    await leased(pool, "main")
    document = await status_json(run_cli, schema, prefix)
    # No registered worker says which group runs them: the one group whose queues exist.
    assert queues(document) == dict.fromkeys(PROJECTIONS, (MESSAGES, None, ["main"]))
    assert document["groups"] == ["main"]


async def test_the_broker_counts_the_groups_queues_and_each_projections_dlq(pool, schema, prefix, run_cli, declare):
    await declare(["main"])
    await leased(pool, "main")
    document = await status_json(run_cli, schema, prefix)
    assert document["broker"] == {"quorum_queues": PARTITIONS + 2, "file_handles": 3 * (PARTITIONS + 2),
                                  "default_node_handles": 927, "warning": None}


async def test_the_status_processs_own_group_is_known_before_any_lease(schema, prefix, run_cli, declare):
    await declare(["main"])
    assert queues(await status_json(run_cli, schema, prefix)) == dict.fromkeys(PROJECTIONS, (None, None, []))
    document = await status_json(run_cli, schema, prefix, EVENTFLEET_GROUP="main")
    assert queues(document) == dict.fromkeys(PROJECTIONS, (MESSAGES, None, ["main"]))


async def test_a_registered_worker_of_a_group_tells_its_projections_group_and_owns_their_partitions(
        pool, schema, prefix, run_cli, declare):
    await declare(["main", "other"])
    keeper = LeaseKeeper(pool, schema, [broker.group_lease("main")], PARTITIONS, worker="host:1:a")
    await keeper.tick()
    async with pool.acquire() as conn:
        await typebook.register(conn, [CustomerStats, OrderSummary], worker="host:1:a")
    document = await status_json(run_cli, schema, prefix, EVENTFLEET_GROUP="other")
    # Its group's queues alone, though "other" has as many messages.
    assert queues(document) == dict.fromkeys(PROJECTIONS, (MESSAGES, "main", ["main"]))
    assert {(p["projection"], p["partition"], p["owner"]) for p in document["partition_lags"]} == {
        (x, p, "host:1:a") for x in PROJECTIONS for p in range(PARTITIONS)}
    assert [(w["worker_id"], w["partitions"]) for w in document["workers"]] == [
        ("host:1:a", {"group:main": PARTITIONS})]


async def test_with_several_groups_and_no_worker_to_tell_a_projection_shows_their_sum(pool, schema, prefix, run_cli,
                                                                                      declare):
    await declare(["main", "other"])
    await leased(pool, "main")
    await leased(pool, "other")
    document = await status_json(run_cli, schema, prefix)
    assert queues(document) == dict.fromkeys(PROJECTIONS, (2 * MESSAGES, None, ["main", "other"]))
    assert document["broker"]["quorum_queues"] == 2 * PARTITIONS + 2


async def test_a_projection_with_queues_of_its_own_shows_them_and_counts_them_beside_the_group(
        pool, schema, prefix, run_cli, declare):
    await declare(["main"], own=["customer_stats"])
    await leased(pool, "main")
    document = await status_json(run_cli, schema, prefix)
    assert queues(document) == {"customer_stats": (MESSAGES, None, []), "order_summary": (MESSAGES, None, ["main"])}
    assert document["broker"]["quorum_queues"] == PARTITIONS + 2 + PARTITIONS


async def test_the_table_names_the_groups_and_the_arithmetic(pool, schema, prefix, run_cli, declare):
    await declare(["main", "other"])
    await leased(pool, "main")
    await leased(pool, "other")
    ran = await run_cli("status", schema=schema, prefix=prefix)
    assert ran.code == 0, ran.err
    lines = ran.out.splitlines()
    assert lines[0].split()[-2:] == ["QUEUE", "GROUP"]
    assert [line.split()[-2:] for line in lines[1:3]] == [[str(2 * MESSAGES), "main+other"]] * 2
    at = lines.index(next(line for line in lines if line.startswith("broker: ")))
    broker_line = (f"broker: this deployment declares {2 * PARTITIONS + 2} quorum queues (2 worker groups x "
                   f"{PARTITIONS} partitions + 2 projections x 1 DLQ + 0 projections outside a group x {PARTITIONS} "
                   f"partitions), ~{3 * (2 * PARTITIONS + 2)} file handles of the broker; a node with the Debian "
                   "default of 1,024 descriptors has ~927")
    queue_line = ("queue: customer_stats, order_summary: no registered worker tells which worker group runs them: "
                  "QUEUE is the sum of the queues of groups main, other")
    assert lines[at:at + 2] == [broker_line, queue_line]


async def test_the_workers_table_has_a_column_of_the_groups_lease(pool, schema, prefix, run_cli, declare):
    await declare(["main"])
    await LeaseKeeper(pool, schema, [broker.group_lease("main")], PARTITIONS, worker="host:1:a").tick()
    ran = await run_cli("status", schema=schema, prefix=prefix)
    lines = ran.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("WORKER"))
    assert lines[header].split() == ["WORKER", "HEARTBEAT", "CUSTOMER_STATS", "ORDER_SUMMARY", "GROUP:MAIN"]
    assert (lines[header + 1].split()[0], lines[header + 1].split()[-3:]) == ("host:1:a", ["0", "0", str(PARTITIONS)])


async def test_a_running_worker_of_a_group_is_what_tells_its_read_models_group(pool, schema, prefix, run_cli,
                                                                               delete_prefixed):
    names = broker.Names(prefix)
    delete_prefixed([names.group_queue("main", p) for p in range(PARTITIONS)], [])
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        group="main")
    stop = asyncio.Event()
    worker = asyncio.create_task(projector.run_worker(settings, [CustomerStats(), OrderSummary()], health.Health(),
                                                      stop, pool=pool, backfills=backfill.Backfills()))
    try:
        deadline = time.monotonic() + 30
        while await pool.fetchval("SELECT count(*) FROM leases WHERE projection = 'group:main' "
                                  "AND expires_at > clock_timestamp()") < PARTITIONS:
            assert time.monotonic() < deadline, "the worker did not lease the group's partitions"
            assert not worker.done(), worker
            await asyncio.sleep(0.05)
        document = await status_json(run_cli, schema, prefix)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    (registered,) = document["workers"]
    assert registered["partitions"] == {"group:main": PARTITIONS}
    assert queues(document) == dict.fromkeys(PROJECTIONS, (0, "main", ["main"]))
    assert {p["owner"] for p in document["partition_lags"]} == {registered["worker_id"]}
