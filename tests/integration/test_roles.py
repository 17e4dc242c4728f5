"""Least privilege: each group role of ``migrate --roles`` can do its job and is refused everything else.

Every test logs in as a fresh LOGIN role that is a member of one group role, exactly as a deployment
would, and drops it afterwards (DROP OWNED BY, DROP ROLE); the group roles of the test's schema go too.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from eventfleet.examples.orders.events import OrderPaid, OrderPlaced
from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import db, errors, outbox, roles
from store.event_store import NO_STREAM, EventStore
from tests.conftest import DATABASE_URL, PARTITIONS
from workers import admin, broker, rebuild, relay
from workers.projector import checkpoints, lag, leases, parking

NOW = dt.datetime(2024, 3, 1, 9, tzinfo=dt.UTC)
PLACED = OrderPlaced("o1", "c1", (), Decimal(5), Decimal(0), Decimal(5), NOW)
PAID = OrderPaid("o1", "c1", Decimal(5), NOW)

Login = Callable[[str], Awaitable[db.Pool]]


async def _admin(sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


@pytest.fixture
async def granted(schema: str) -> AsyncIterator[roles.Roles]:
    """The schema's group roles, created by the same code as ``eventfleet migrate --roles``; dropped after."""
    group = roles.Roles(schema)
    assert sorted(await admin.run_roles(DATABASE_URL, schema)) == sorted(group.all())
    yield group
    quoted = ", ".join(f'"{r}"' for r in group.all())
    await _admin(f"DROP OWNED BY {quoted}")
    await _admin(f"DROP ROLE {quoted}")


@pytest.fixture
async def login(schema: str, granted: roles.Roles) -> AsyncIterator[Login]:
    """Open a pool as a new LOGIN role that is a member of the given group role only."""
    async with contextlib.AsyncExitStack() as stack:

        async def open_as(group: str) -> db.Pool:
            name = f"t_login_{uuid.uuid4().hex[:12]}"
            await _admin(f'CREATE ROLE "{name}" LOGIN IN ROLE "{group}"')
            stack.push_async_callback(_admin, f'DROP ROLE "{name}"')
            stack.push_async_callback(_admin, f'DROP OWNED BY "{name}"')
            pool = await stack.enter_async_context(
                db.create_pool(DATABASE_URL, schema, min_size=1, max_size=2, user=name))
            assert await pool.fetchval("SELECT current_user") == name
            return pool

        yield open_as


async def refused(pool: db.Pool, sql: str, *args: Any) -> None:
    """The statement fails for lack of privilege (SQLSTATE 42501), not for any other reason."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute(sql, *args)


async def seed(event_store: EventStore) -> None:
    await event_store.append("order-o1", [PLACED, PAID], NO_STREAM)


# --- the roles themselves ----------------------------------------------------------------------------

async def test_roles_are_nologin_groups_and_apply_is_idempotent(schema: str, granted: roles.Roles) -> None:
    rows = await _admin("SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolinherit FROM pg_roles "
                        "WHERE rolname = ANY($1::text[]) ORDER BY rolname", list(granted.all()))
    assert [(r["rolname"], r["rolcanlogin"], r["rolsuper"], r["rolcreaterole"]) for r in rows] == sorted(
        (name, False, False, False) for name in granted.all())
    # Again, and three at once (as several pods would): no error, nothing created.
    again = await asyncio.gather(*(admin.run_roles(DATABASE_URL, schema) for _ in range(3)))
    assert again == [[], [], []]


async def test_the_grants_are_exactly_the_documented_ones(schema: str, granted: roles.Roles) -> None:
    rows = await _admin(
        "SELECT grantee, table_name, string_agg(privilege_type, ',' ORDER BY privilege_type) AS privileges "
        "FROM information_schema.role_table_grants WHERE table_schema = $1 AND grantee = ANY($2::text[]) "
        "GROUP BY grantee, table_name", schema, list(granted.all()))
    found = {(r["grantee"].removeprefix(f"{schema}_"), r["table_name"]): r["privileges"] for r in rows}
    assert found == {
        ("writer", "events"): "INSERT,SELECT",
        ("writer", "outbox"): "INSERT",
        ("writer", "snapshots"): "INSERT,SELECT,UPDATE",
        ("writer", "partitioning"): "SELECT",
        ("writer", "subject_keys"): "INSERT,SELECT,UPDATE",
        ("relay", "events"): "SELECT",
        ("relay", "partitioning"): "SELECT",
        ("relay", "outbox"): "DELETE,SELECT",
        ("worker", "events"): "SELECT",
        ("worker", "partitioning"): "SELECT",
        ("worker", "subject_keys"): "SELECT",
        **{("worker", t): "DELETE,INSERT,SELECT,UPDATE"
           for t in ("checkpoints", "projection_status", "dead_letters", "workers", "leases", "order_summary",
                     "customer_stats")},
    }
    columns = await _admin("SELECT grantee, table_name, column_name, privilege_type "
                           "FROM information_schema.column_privileges WHERE table_schema = $1 "
                           "AND grantee = $2 AND privilege_type = 'UPDATE'", schema, granted.relay)
    assert [(r["table_name"], r["column_name"]) for r in columns] == [("outbox", "created_at")]


def test_hostile_schema_names_never_become_role_sql() -> None:
    for evil in ['x"; DROP ROLE postgres; --', "X", "a" * 49, ""]:
        with pytest.raises(errors.InvalidName):
            roles.statements(evil, [])
    with pytest.raises(errors.InvalidName):
        roles.statements("ok", ['t"; DROP TABLE events; --'])
    with pytest.raises(errors.InvalidName):
        roles.render(roles.SQL["create_role"], role="ok_admin")


async def test_migrate_without_createrole_fails_with_a_clear_message(schema: str) -> None:
    name = f"t_owner_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE ROLE "{name}" LOGIN')
    try:
        conn = await db.connect(DATABASE_URL, schema, user=name)
        try:
            with pytest.raises(errors.StoreError, match="CREATEROLE"):
                await roles.apply(conn, f"t_{uuid.uuid4().hex[:16]}", [])
        finally:
            await conn.close()
    finally:
        await _admin(f'DROP ROLE "{name}"')


# --- writer ------------------------------------------------------------------------------------------

async def test_writer_appends_reads_and_snapshots(login: Login, granted: roles.Roles, schema: str) -> None:
    pool = await login(granted.writer)
    store = EventStore(pool, schema=schema)
    result = await store.append("order-o1", [PLACED, PAID], NO_STREAM)
    assert result.last_version == 1
    assert [e.event for e in await store.load("order-o1")] == [PLACED, PAID]
    await store.append_batch([("order-o1", [PAID], 1), ("order-o2", [PLACED], NO_STREAM)])
    assert await store.stream_version("order-o2") == 0
    await pool.execute(store.queries["save_snapshot"], "order-o1", 1, "Order.v1", b"\x80")
    await pool.execute(store.queries["save_snapshot"], "order-o1", 2, "Order.v1", b"\x81")
    assert await pool.fetchval(store.queries["load_snapshot"], "order-o1") == 2


async def test_writer_is_refused_everything_else(login: Login, granted: roles.Roles,
                                                 event_store: EventStore) -> None:
    await seed(event_store)
    pool = await login(granted.writer)
    await refused(pool, "UPDATE events SET event_type = 'x'")
    await refused(pool, "DELETE FROM events")
    await refused(pool, "TRUNCATE events")
    await refused(pool, "SELECT * FROM outbox")
    await refused(pool, "DELETE FROM outbox")
    await refused(pool, "UPDATE outbox SET created_at = now()")
    await refused(pool, "DELETE FROM snapshots")
    for table in ("checkpoints", "projection_status", "dead_letters", "order_summary", "customer_stats",
                  "schema_migrations"):
        await refused(pool, f"SELECT * FROM {table}")
    await refused(pool, "INSERT INTO checkpoints (projection, stream_id, version) VALUES ('p', 's', 0)")
    await refused(pool, "CREATE TABLE sneaky (id int)")
    await refused(pool, "SELECT nextval('events_global_position_seq')")


# --- relay -------------------------------------------------------------------------------------------

async def test_relay_claims_publishes_and_deletes_outbox_rows(
        login: Login, granted: roles.Roles, event_store: EventStore, pool: db.Pool, prefix: str,
        amqp: AbstractRobustConnection, delete_prefixed: Callable[[list[str], list[str]], None]) -> None:
    await seed(event_store)
    relay_pool = await login(granted.relay)
    # The claim itself: FOR UPDATE SKIP LOCKED, held by one relay, skipped by another.
    async with relay_pool.acquire() as conn, conn.transaction():
        claimed = await outbox.claim(conn, 10)
        assert [r["version"] for r in claimed] == [0, 1]
        async with relay_pool.acquire() as other, other.transaction():
            assert await outbox.claim(other, 10) == []
    assert (await outbox.backlog(relay_pool)).pending == 2
    # The whole job against RabbitMQ: publish with confirms, then delete. P is read from the schema as the
    # relay role, and the batch messages go to a queue of the test's own bound to every partition.
    names = broker.Names(prefix)
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    delete_prefixed([f"{prefix}.seen"], [names.partitions_exchange, names.dead_letter_exchange])
    partitions = await EventStore(relay_pool, schema=event_store.schema).partitions()
    exchange = await broker.declare_partitions(channel, names, [], partitions)
    queue = await channel.declare_queue(f"{prefix}.seen", exclusive=True)
    for partition in range(partitions):
        await queue.bind(exchange, routing_key=str(partition))
    assert await relay.relay_until_idle(relay_pool, broker.Targets(exchange, partitions), batch_size=1) == 2
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    first = await queue.get(timeout=5)
    assert isinstance(first, aio_pika.IncomingMessage)
    assert [e.event for e in broker.from_batch_body(first.body).events] == [PLACED]
    await first.ack()


async def test_relay_is_refused_everything_else(login: Login, granted: roles.Roles,
                                                event_store: EventStore) -> None:
    await seed(event_store)
    pool = await login(granted.relay)
    await refused(pool, "INSERT INTO events (event_id, stream_id, version, event_type, data, metadata) "
                        "VALUES (gen_random_uuid(), 's', 0, 't', '', '')")
    await refused(pool, "UPDATE events SET event_type = 'x'")
    await refused(pool, "INSERT INTO outbox (global_position) VALUES (999)")
    await refused(pool, "UPDATE outbox SET global_position = global_position + 1000")
    await refused(pool, "TRUNCATE outbox")
    for table in ("snapshots", "checkpoints", "projection_status", "dead_letters", "order_summary"):
        await refused(pool, f"SELECT * FROM {table}")
    await refused(pool, "CREATE TABLE sneaky (id int)")


# --- worker ------------------------------------------------------------------------------------------

async def test_worker_applies_checkpoints_dead_letters_and_lag(
        login: Login, granted: roles.Roles, event_store: EventStore, pool: db.Pool, schema: str) -> None:
    await seed(event_store)
    events = await event_store.load("order-o1")
    worker_pool = await login(granted.worker)
    worker_store = EventStore(worker_pool, schema=schema)
    for projection in (OrderSummary(), CustomerStats()):
        result = await checkpoints.apply_batch(worker_store, projection, events[1:])  # a gap: loads v0
        assert [e.version for e in result.applied] == [0, 1]
        again = await checkpoints.apply_batch(worker_store, projection, events)
        assert again.applied == []
    assert await pool.fetchval("SELECT status FROM order_summary WHERE order_id = 'o1'") == "paid"
    assert await pool.fetchval("SELECT total_spent FROM customer_stats WHERE customer_id = 'c1'") == 5
    # The same upsert the worker's checkpoint query does, directly.
    await worker_pool.execute(
        "INSERT INTO checkpoints AS c (projection, stream_id, version) VALUES ('p', 's', 0) "
        "ON CONFLICT (projection, stream_id) DO UPDATE SET version = c.version + 1")
    ids = await parking.record_undecodable(worker_pool, "order_summary", [("bad", b"\xc1")])
    assert len(ids) == 1
    measured = await lag.measure(worker_pool, "order_summary")
    assert measured.lag_events == 0


async def test_worker_reads_the_partitions_registers_and_leases_them(
        login: Login, granted: roles.Roles, schema: str) -> None:
    worker_pool = await login(granted.worker)
    worker_store = EventStore(worker_pool, schema=schema)
    partitions = await worker_store.partitions()
    assert partitions == PARTITIONS
    keeper = leases.LeaseKeeper(worker_pool, schema, ["customer_stats"], partitions)
    tick = await keeper.tick()  # heartbeat, renew, claim: alone, it takes every partition
    assert tick.acquired == {"customer_stats": list(range(PARTITIONS))}
    await keeper.leave()  # hands every partition over and ends the registration
    assert [(lease.partition, lease.owner) for lease in await leases.owners(worker_pool)] == [
        (p, None) for p in range(PARTITIONS)]
    assert await worker_pool.fetchval("SELECT count(*) FROM workers") == 0


async def test_worker_is_refused_everything_else(login: Login, granted: roles.Roles,
                                                 event_store: EventStore) -> None:
    await seed(event_store)
    pool = await login(granted.worker)
    await refused(pool, "INSERT INTO events (event_id, stream_id, version, event_type, data, metadata) "
                        "VALUES (gen_random_uuid(), 's', 9, 't', '', '')")
    await refused(pool, "UPDATE events SET event_type = 'x'")
    await refused(pool, "DELETE FROM events")
    await refused(pool, "SELECT * FROM outbox")
    await refused(pool, "DELETE FROM outbox")
    await refused(pool, "SELECT * FROM snapshots")
    await refused(pool, "SELECT * FROM schema_migrations")
    await refused(pool, "TRUNCATE checkpoints")
    await refused(pool, "CREATE TABLE sneaky (id int)")
    await refused(pool, "DROP TABLE order_summary")


# --- everyone ----------------------------------------------------------------------------------------

async def test_events_are_immutable_even_for_the_owner(pool: db.Pool, event_store: EventStore) -> None:
    # The superuser owner passes every privilege check; the triggers still refuse.
    await seed(event_store)
    for sql in ("UPDATE events SET event_type = 'x'", "DELETE FROM events", "TRUNCATE events"):
        with pytest.raises(asyncpg.RestrictViolationError, match="immutable"):
            await pool.execute(sql)
    assert await pool.fetchval("SELECT count(*) FROM events") == 2


async def test_a_read_model_table_replaced_by_a_rebuild_can_be_granted_again(
        login: Login, granted: roles.Roles, pool: db.Pool) -> None:
    worker_pool = await login(granted.worker)
    await pool.execute("DROP TABLE customer_stats")
    await pool.execute(CustomerStats.ddl)
    await refused(worker_pool, "SELECT * FROM customer_stats")
    async with pool.acquire() as conn:
        assert await roles.grant_read_models(conn, granted.schema, ["customer_stats"])
    assert await worker_pool.fetchval("SELECT count(*) FROM customer_stats") == 0


async def test_the_worker_keeps_its_grants_across_a_rebuild(
        login: Login, granted: roles.Roles, event_store: EventStore, pool: db.Pool) -> None:
    await seed(event_store)
    worker_pool = await login(granted.worker)
    assert await worker_pool.fetchval("SELECT count(*) FROM customer_stats") == 0
    await rebuild.rebuild(pool, event_store, CustomerStats)
    assert await pool.fetchval("SELECT count(*) FROM customer_stats") == 1
    assert await worker_pool.fetchval("SELECT count(*) FROM customer_stats") == 1
