"""A read model's handled types across releases (issue 25 item 5): recorded per read model, narrowed at once when
a release handles fewer, and a type added later applied from the store by a rebuild once no worker of other code
runs the read model, exactly once and in the order a fresh build would have.

``parcels`` keeps, per order, the letters of the events it applied in order (P: placed, S: shipped): an event
applied twice, missed or out of its place shows in the string."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, LiteralString

import aio_pika
import pytest

from eventfleet.examples.orders.events import OrderPlaced, OrderShipped
from projections.base import Projection, handles
from projections.reactor import Effects, Reactor
from store import EventStore, db
from store.event_store import RecordedEvent
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS, Cleanup, delete_topology
from tests.integration.test_rebuild_helpers import all_events, drop_shadows, write_orders
from workers import broker, projector, rebuild
from workers.config import Settings
from workers.rebuild import backfill, typebook, typechange
from workers.runtime import health

pytestmark = pytest.mark.usefixtures(drop_shadows.__name__)

#: Seconds a worker row stays "running" after its last refresh, in these tests.
LEASE = 3.0


class ParcelsV1(Projection):
    """The read model as the older release has it: placements only."""

    name = "parcels"
    tables = ("parcels",)
    ddl: ClassVar[LiteralString] = "CREATE TABLE IF NOT EXISTS parcels (order_id text PRIMARY KEY, log text NOT NULL)"

    @handles(OrderPlaced)
    async def placed(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute("INSERT INTO parcels AS p VALUES ($1, 'P') ON CONFLICT (order_id)"
                           " DO UPDATE SET log = p.log || 'P'", event.event.order_id)


class ParcelsV2(ParcelsV1):
    """The next release: shipments too (an UPDATE: applied before its placement, it would change nothing)."""

    @handles(OrderShipped)
    async def shipped(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute("UPDATE parcels SET log = log || 'S' WHERE order_id = $1", event.event.order_id)


class Notifier(Reactor):
    """A reactor whose next release reacts to shipments too."""

    name = "notifier"

    @handles(OrderPlaced, OrderShipped)
    async def noticed(self, fx: Effects, event: RecordedEvent) -> None:
        pass


async def expected(event_store: EventStore, projection: type[Projection]) -> dict[str, str]:
    """The fold of the store with ``projection``'s handlers, each stream in version order."""
    letters = {OrderPlaced: "P", OrderShipped: "S"}
    rows: dict[str, str] = {}
    for e in await all_events(event_store):
        if projection().handles_event(e) and (isinstance(e.event, OrderPlaced) or e.event.order_id in rows):
            rows[e.event.order_id] = rows.get(e.event.order_id, "") + letters[type(e.event)]
    return rows


async def parcels(pool: db.Pool) -> dict[str, str]:
    return {r["order_id"]: r["log"] for r in await pool.fetch("SELECT order_id, log FROM parcels")}


async def recorded(pool: db.Pool, name: str = "parcels") -> list[str] | None:
    handled: list[str] | None = await pool.fetchval("SELECT handled FROM read_model_types WHERE projection = $1", name)
    return handled


async def register(pool: db.Pool, projection: type[Projection], worker: str | None) -> typebook.Change:
    async with pool.acquire() as conn:
        return (await typebook.register(conn, [projection], worker=worker))[projection.name]


async def gone(pool: db.Pool, worker: str) -> None:
    """The worker stopped long ago: silent for an hour."""
    await pool.execute("UPDATE read_model_workers SET seen_at = seen_at - interval '1 hour' WHERE worker_id = $1",
                       worker)


@pytest.fixture
async def built_by_v1(pool: db.Pool, event_store: EventStore) -> dict[str, str]:
    """A store of 60 orders and ``parcels`` as the older release built it, run by its worker ``old``."""
    await write_orders(event_store, 60, random.Random(25))
    await rebuild.rebuild(pool, event_store, ParcelsV1)
    await register(pool, ParcelsV1, "old")
    rows = await parcels(pool)
    assert rows == await expected(event_store, ParcelsV1)
    assert rows != await expected(event_store, ParcelsV2)  # some orders were shipped
    return rows


async def test_migrate_records_the_types_each_registered_read_model_handles(pool: db.Pool) -> None:
    rows = {r["projection"]: (r["handled"], r["tables"])
            for r in await pool.fetch("SELECT projection, handled, tables FROM read_model_types")}
    assert rows == {
        "customer_stats": (["OrderCancelled", "OrderPaid", "OrderPlaced"], ["customer_stats"]),
        "order_summary": (["OrderCancelled", "OrderPaid", "OrderPlaced", "OrderShipped"], ["order_summary"]),
    }


async def test_a_read_model_seen_first_records_its_codes_types(pool: db.Pool) -> None:
    change = await register(pool, ParcelsV2, "w1")
    assert (change.built, change.pending) == (frozenset({"OrderPlaced", "OrderShipped"}), False)
    assert await recorded(pool) == ["OrderPlaced", "OrderShipped"]


async def test_code_handling_fewer_types_narrows_the_record_at_once_with_nothing_to_rebuild(pool: db.Pool) -> None:
    await register(pool, ParcelsV2, "w1")
    change = await register(pool, ParcelsV1, "w2")
    assert (change.built, change.pending) == (frozenset({"OrderPlaced"}), False)
    assert await recorded(pool) == ["OrderPlaced"]


async def test_code_adding_a_type_leaves_the_record_and_is_pending(pool: db.Pool, built_by_v1: dict[str, str]) -> None:
    change = await register(pool, ParcelsV2, "new")
    assert (change.pending, change.added) == (True, frozenset({"OrderShipped"}))
    assert await recorded(pool) == ["OrderPlaced"]


async def test_the_new_type_waits_while_a_worker_of_the_older_code_runs_the_read_model(
        pool: db.Pool, event_store: EventStore, built_by_v1: dict[str, str]) -> None:
    assert await typechange.register(pool, "new", [ParcelsV2()]) == [ParcelsV2]
    assert not await typechange.settle_once(event_store, ParcelsV2, lease_seconds=LEASE)
    assert await parcels(pool) == built_by_v1
    assert await recorded(pool) == ["OrderPlaced"]


async def test_the_new_types_past_events_are_applied_once_in_order_when_the_older_code_is_gone(
        pool: db.Pool, event_store: EventStore, built_by_v1: dict[str, str]) -> None:
    await typechange.register(pool, "new", [ParcelsV2()])
    await gone(pool, "old")
    assert await typechange.settle_once(event_store, ParcelsV2, lease_seconds=LEASE)
    assert await parcels(pool) == await expected(event_store, ParcelsV2)
    assert await recorded(pool) == ["OrderPlaced", "OrderShipped"]
    # The older code's row, silent since before the rebuild, is forgotten with the settlement.
    assert await pool.fetchval("SELECT count(*) FROM read_model_workers WHERE worker_id = 'old'") == 0


async def test_a_worker_of_older_code_running_during_the_rebuild_keeps_the_type_pending(
        pool: db.Pool, built_by_v1: dict[str, str]) -> None:
    await typechange.register(pool, "new", [ParcelsV2()])
    await gone(pool, "old")
    started = await typebook.since(pool, 0)
    await register(pool, ParcelsV1, "old-restarted")  # a pod of the older release restarted meanwhile
    async with pool.acquire() as conn:
        others = await typebook.settle(conn, ParcelsV2, started)
    assert [(o.worker_id, o.handled, o.unknown) for o in others] == [("old-restarted", frozenset({"OrderPlaced"}),
                                                                      False)]
    assert await recorded(pool) == ["OrderPlaced"]


async def test_a_worker_of_older_code_started_after_the_settlement_makes_the_type_pending_again(
        pool: db.Pool, event_store: EventStore, built_by_v1: dict[str, str]) -> None:
    await typechange.register(pool, "new", [ParcelsV2()])
    await gone(pool, "old")
    assert await typechange.settle_once(event_store, ParcelsV2, lease_seconds=LEASE)
    await register(pool, ParcelsV1, "old-again")
    assert await recorded(pool) == ["OrderPlaced"]
    assert (await register(pool, ParcelsV2, "new")).pending


async def test_the_newer_workers_rebuild_again_after_a_worker_of_older_code_came_and_went(
        pool: db.Pool, event_store: EventStore, built_by_v1: dict[str, str]) -> None:
    await typechange.register(pool, "new", [ParcelsV2()])
    await gone(pool, "old")
    watching = asyncio.create_task(typechange.watch(event_store, "new", [ParcelsV2], lease_seconds=LEASE))
    try:
        async def recorded_v2() -> bool:
            return await recorded(pool) == ["OrderPlaced", "OrderShipped"]

        await until(recorded_v2, "the watch did not rebuild the read model", watching)
        await register(pool, ParcelsV1, "old-again")  # a pod of the older release, started after the settlement
        await pool.execute("UPDATE parcels SET log = 'P' WHERE log LIKE 'P%S%'")  # it applied no shipment
        assert await recorded(pool) == ["OrderPlaced"]
        await gone(pool, "old-again")
        await until(recorded_v2, "the watch did not rebuild the read model again", watching)
        assert await parcels(pool) == await expected(event_store, ParcelsV2)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


async def test_a_registered_worker_of_a_release_that_records_no_types_counts_as_other_code(
        pool: db.Pool, event_store: EventStore, built_by_v1: dict[str, str]) -> None:
    await typechange.register(pool, "new", [ParcelsV2()])
    await gone(pool, "old")
    await pool.execute("INSERT INTO workers (worker_id, projections, expires_at)"
                       " VALUES ('before-0014', '{parcels}', clock_timestamp() + interval '1 minute')")
    others = await typebook.other_code(pool, "parcels", typebook.code_of(ParcelsV2),
                                         await typebook.since(pool, LEASE))
    assert [(o.worker_id, o.unknown) for o in others] == [("before-0014", True)]
    assert not await typechange.settle_once(event_store, ParcelsV2, lease_seconds=LEASE)
    assert await recorded(pool) == ["OrderPlaced"]


async def test_a_reactors_new_types_are_recorded_at_once(pool: db.Pool) -> None:
    # Its past shipments are not replayed (that would act on them again): its new types are its types from now on.
    await pool.execute("INSERT INTO read_model_types (projection, handled) VALUES ('notifier', '{OrderPlaced}')")
    change = await register(pool, Notifier, "w1")
    assert not change.pending
    assert await recorded(pool, "notifier") == ["OrderPlaced", "OrderShipped"]


async def test_a_worker_of_the_new_release_rebuilds_the_read_model_itself_and_records_its_types(
        pool: db.Pool, event_store: EventStore, schema: str, prefix: str, cleanup: Cleanup,
        built_by_v1: dict[str, str]) -> None:
    await gone(pool, "old")

    async def delete_queues() -> None:
        await delete_topology(prefix, ["parcels"], PARTITIONS)

    cleanup(delete_queues)
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        lease_seconds=LEASE)
    stop = asyncio.Event()
    worker = asyncio.create_task(projector.run_worker(settings, [ParcelsV2()], health.Health(), stop, pool=pool,
                                                      backfills=backfill.Backfills()))
    try:
        deadline = time.monotonic() + 60
        while await recorded(pool) != ["OrderPlaced", "OrderShipped"]:
            assert time.monotonic() < deadline, "the worker did not rebuild the read model"
            assert not worker.done(), worker
            await asyncio.sleep(0.05)
        assert await parcels(pool) == await expected(event_store, ParcelsV2)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)



async def publish(event_store: EventStore, prefix: str, streams: list[str]) -> None:
    """Publish the streams' events to their partitions, as the relay does."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(on_return_raises=True)
        exchange = await channel.get_exchange(broker.Names(prefix).partitions_exchange)
        for stream in streams:
            events = await event_store.load(stream)
            partition = partition_of(stream, PARTITIONS)
            await exchange.publish(broker.events_message(partition, events), routing_key=str(partition),
                                   mandatory=True)


async def until(condition: Callable[[], Awaitable[bool]], what: str, *workers: asyncio.Task[Any]) -> None:
    deadline = time.monotonic() + 90
    while not await condition():
        assert time.monotonic() < deadline, what
        for worker in workers:
            assert not worker.done(), worker
        await asyncio.sleep(0.05)


async def test_a_rolling_upgrade_that_adds_a_type_ends_with_every_event_applied_once_in_order(
        pool: db.Pool, event_store: EventStore, schema: str, prefix: str, cleanup: Cleanup,
        built_by_v1: dict[str, str]) -> None:
    """Workers of both releases consume side by side while events arrive; the older one stops; the newer one
    rebuilds the read model; later events arrive through its queues: the read model is the fold of the store."""
    await gone(pool, "old")

    async def delete_queues() -> None:
        await delete_topology(prefix, ["parcels"], PARTITIONS)

    cleanup(delete_queues)
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        lease_seconds=LEASE)
    stop_old, stop_new = asyncio.Event(), asyncio.Event()
    old = asyncio.create_task(projector.run_worker(settings, [ParcelsV1()], health.Health(), stop_old,
                                                   backfills=backfill.Backfills()))
    new = asyncio.create_task(projector.run_worker(settings, [ParcelsV2()], health.Health(), stop_new,
                                                   backfills=backfill.Backfills()))
    try:
        async def both_hold_partitions() -> bool:
            owners = await pool.fetch("SELECT DISTINCT owner FROM leases WHERE projection = 'parcels'"
                                      " AND expires_at > clock_timestamp()")
            return len(owners) == 2

        await until(both_hold_partitions, "the two workers did not share the partitions", old, new)
        await write_orders(event_store, 30, random.Random(7), prefix="during")
        await publish(event_store, prefix, [f"order-during{i}" for i in range(30)])
        stop_old.set()
        await asyncio.wait_for(old, 30)

        async def recorded_v2() -> bool:
            return await recorded(pool) == ["OrderPlaced", "OrderShipped"]

        await until(recorded_v2, "the newer worker did not rebuild the read model", new)
        await write_orders(event_store, 30, random.Random(8), prefix="after")
        await publish(event_store, prefix, [f"order-after{i}" for i in range(30)])
        want = await expected(event_store, ParcelsV2)

        async def folded() -> bool:
            return await parcels(pool) == want

        await until(folded, "the read model is not the fold of the store", new)
    finally:
        stop_old.set()
        stop_new.set()
        await asyncio.wait_for(asyncio.gather(old, new, return_exceptions=True), 30)


# --- status and retire, as processes ------------------------------------------------------------------------------


async def command(schema: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL,
           "EVENTFLEET_SCHEMA": schema, "EVENTFLEET_PREFIX": prefix, "EVENTFLEET_LEASE_SECONDS": "600"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "workers", *args, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def types_of(doc: dict[str, Any], name: str) -> dict[str, Any]:
    row = next(r for r in doc["projections"] if r["name"] == name)
    return {k: row[k] for k in ("handled", "types_pending", "types_added", "in_code")}


async def test_status_shows_each_read_models_types_and_a_change_waiting_for_a_rebuild(
        pool: db.Pool, schema: str, prefix: str, built_by_v1: dict[str, str]) -> None:
    await typechange.register(pool, "new", [ParcelsV2()])
    result = await command(schema, prefix, "status", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert types_of(doc, "parcels") == {"handled": ["OrderPlaced"], "types_pending": True,
                                        "types_added": ["OrderShipped"], "in_code": True}
    assert types_of(doc, "customer_stats") == {"handled": ["OrderCancelled", "OrderPaid", "OrderPlaced"],
                                               "types_pending": False, "types_added": [], "in_code": True}
    lines = (await command(schema, prefix, "status")).stdout.splitlines()
    assert ("types: customer_stats OrderCancelled, OrderPaid, OrderPlaced; order_summary OrderCancelled, OrderPaid, "
            "OrderPlaced, OrderShipped; parcels OrderPlaced") in lines
    assert ("types pending: parcels handles OrderShipped in newer code: its workers rebuild it from the store once "
            "no worker of other code runs it (or: eventfleet rebuild parcels)") in lines


async def test_status_shows_a_read_model_no_code_runs_as_no_longer_in_the_code(
        pool: db.Pool, schema: str, prefix: str, built_by_v1: dict[str, str]) -> None:
    await gone(pool, "old")
    result = await command(schema, prefix, "status", "--json")
    assert types_of(json.loads(result.stdout), "parcels") == {"handled": ["OrderPlaced"], "types_pending": False,
                                                              "types_added": [], "in_code": False}
    lines = (await command(schema, prefix, "status")).stdout.splitlines()
    assert ("not in the code: parcels: no worker runs it, yet its queues still fill on the broker; eventfleet retire "
            "parcels removes its queues and bookkeeping (--drop-tables: its tables)") in lines


@pytest.fixture
async def parcel_queues(prefix: str, cleanup: Cleanup) -> list[str]:
    """The partition queues and DLQ of ``parcels``, declared as its workers did."""
    names = broker.Names(prefix)

    async def delete_queues() -> None:
        await delete_topology(prefix, ["parcels"], PARTITIONS)

    cleanup(delete_queues)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await broker.declare_partitions(channel, names, ["parcels"], PARTITIONS)
    return [*(names.partition_queue("parcels", i) for i in range(PARTITIONS)), names.dead_letter_queue("parcels")]


async def existing_queues(queues: list[str]) -> list[str]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        return [q for q in queues if await broker.passive_queue(connection, q) is not None]


async def kept_of_parcels(pool: db.Pool) -> dict[str, int]:
    """Rows of ``parcels`` in each bookkeeping table, and whether its table exists."""
    counts = {table: await pool.fetchval(f"SELECT count(*) FROM {table} WHERE projection = 'parcels'")
              for table in ("checkpoints", "projection_status", "read_model_types", "read_model_workers")}
    counts["table"] = int(await pool.fetchval("SELECT to_regclass('parcels') IS NOT NULL"))
    return counts


async def test_retire_without_yes_lists_what_it_would_remove_and_removes_nothing(
        pool: db.Pool, schema: str, prefix: str, built_by_v1: dict[str, str], parcel_queues: list[str]) -> None:
    await gone(pool, "old")
    before = await kept_of_parcels(pool)
    result = await command(schema, prefix, "retire", "parcels")
    assert result.returncode == 2
    assert f"  queues: {', '.join(parcel_queues)}" in result.stderr.splitlines()
    assert "  kept (--drop-tables drops them): tables parcels" in result.stderr.splitlines()
    assert await existing_queues(parcel_queues) == parcel_queues
    assert await kept_of_parcels(pool) == before


async def test_retire_removes_the_queues_and_bookkeeping_and_keeps_the_tables(
        pool: db.Pool, schema: str, prefix: str, built_by_v1: dict[str, str], parcel_queues: list[str]) -> None:
    await gone(pool, "old")
    others = await pool.fetchval("SELECT count(*) FROM read_model_types WHERE projection <> 'parcels'")
    shadow = rebuild.shadow_schema(schema, "parcels")
    await pool.execute(f'CREATE SCHEMA "{shadow}"')  # a rebuild of it killed once
    result = await command(schema, prefix, "retire", "parcels", "--yes")
    assert result.returncode == 0, result.stderr
    assert await existing_queues(parcel_queues) == []
    assert await pool.fetchval("SELECT to_regnamespace($1)", shadow) is None
    assert await kept_of_parcels(pool) == {"checkpoints": 0, "projection_status": 0, "read_model_types": 0,
                                           "read_model_workers": 0, "table": 1}
    assert await pool.fetchval("SELECT count(*) FROM read_model_types") == others


async def test_retire_with_drop_tables_drops_the_tables_its_types_record(
        pool: db.Pool, schema: str, prefix: str, built_by_v1: dict[str, str], parcel_queues: list[str]) -> None:
    await gone(pool, "old")
    result = await command(schema, prefix, "retire", "parcels", "--drop-tables", "--yes")
    assert result.returncode == 0, result.stderr
    assert "retired parcels: tables: parcels" in result.stdout.splitlines()
    assert (await kept_of_parcels(pool))["table"] == 0


async def test_retire_is_refused_while_a_worker_runs_the_read_model(
        pool: db.Pool, schema: str, prefix: str, built_by_v1: dict[str, str], parcel_queues: list[str]) -> None:
    result = await command(schema, prefix, "retire", "parcels", "--yes")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "eventfleet retire: read model 'parcels' is run by live workers old: deploy the workers without it first")
    assert await existing_queues(parcel_queues) == parcel_queues
    assert (await kept_of_parcels(pool))["read_model_types"] == 1


async def test_retire_is_refused_for_a_read_model_in_the_code(schema: str, prefix: str) -> None:
    result = await command(schema, prefix, "retire", "customer_stats", "--yes")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "eventfleet retire: read model 'customer_stats' is in the loaded code")


async def test_rebuild_by_hand_records_the_new_types_once_no_worker_of_other_code_runs_it(
        pool: db.Pool, event_store: EventStore, schema: str, prefix: str, built_by_v1: dict[str, str]) -> None:
    refused = await command(schema, prefix, "rebuild", "parcels", "--projection-module", "tests.integration.parcels_v2")
    assert refused.returncode == 0, refused.stderr
    assert ("  types it handles (OrderPlaced, OrderShipped) not recorded: workers of other code ran it meanwhile: "
            "old (handles OrderPlaced); rebuild it again once they stopped") in refused.stdout.splitlines()
    assert await recorded(pool) == ["OrderPlaced"]
    await gone(pool, "old")
    ran = await command(schema, prefix, "rebuild", "parcels", "--projection-module", "tests.integration.parcels_v2")
    assert ran.returncode == 0, ran.stderr
    assert "  types recorded: OrderPlaced, OrderShipped" in ran.stdout.splitlines()
    assert await recorded(pool) == ["OrderPlaced", "OrderShipped"]
    assert await parcels(pool) == await expected(event_store, ParcelsV2)
