"""Least privilege: each group role of ``migrate --roles`` can do its job and is refused everything else.

Every test logs in as a fresh LOGIN role that is a member of one group role, exactly as a deployment
would, and drops it afterwards (DROP OWNED BY, DROP ROLE); the group roles of the test's schema go too.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced
from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from eventfleet.examples.orders.reactors import REASON, PaymentTimeout
from projections import registry
from store import db, errors, outbox, roles
from store.event_store import NO_STREAM, EventStore
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS, new_schema
from tests.unit.test_projection_fold import paid, placed
from workers import admin, broker, projector, rebuild, relay
from workers.config import Settings
from workers.projector import checkpoints, deadlines, lag, leases, parking
from workers.projector.consumer import Consumer
from workers.projector.worker import pool_size
from workers.rebuild import backfill
from workers.runtime import health

# Importing the reactors module registered payment_timeout in this process: only the test that runs it has it
# registered (every later test's migrate and relay would see it otherwise).
registry.REGISTRY.pop(PaymentTimeout.name, None)

NOW = dt.datetime(2024, 3, 1, 9, tzinfo=dt.UTC)
PLACED = OrderPlaced("o1", "c1", (), Decimal(5), Decimal(0), Decimal(5), NOW)
PAID = OrderPaid("o1", "c1", Decimal(5), NOW)

Login = Callable[..., Awaitable[db.Pool]]


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

        async def open_as(group: str, max_size: int = 2) -> db.Pool:
            name = new_schema("t_login", 12)
            await _admin(f'CREATE ROLE "{name}" LOGIN IN ROLE "{group}"')
            stack.push_async_callback(_admin, f'DROP ROLE "{name}"')
            stack.push_async_callback(_admin, f'DROP OWNED BY "{name}"')
            pool = await stack.enter_async_context(
                db.create_pool(DATABASE_URL, schema, min_size=1, max_size=max_size, user=name))
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
        ("writer", "closed_streams"): "SELECT",
        ("relay", "events"): "SELECT",
        ("relay", "partitioning"): "SELECT",
        ("relay", "outbox"): "DELETE,SELECT",
        ("worker", "events"): "SELECT",
        ("worker", "partitioning"): "SELECT",
        ("worker", "subject_keys"): "SELECT",
        ("worker", "closed_streams"): "SELECT",
        **{("worker", t): "DELETE,INSERT,SELECT,UPDATE"
           for t in ("checkpoints", "projection_status", "dead_letters", "workers", "leases", "read_model_types",
                     "read_model_workers", "order_summary", "customer_stats")},
        ("reactor", "events"): "INSERT",
        ("reactor", "outbox"): "INSERT",
        ("reactor", "deadlines"): "DELETE,INSERT,SELECT,UPDATE",
        ("reactor", "reactor_refusals"): "INSERT,SELECT",
        ("reactor", "subject_keys"): "INSERT",
    }
    # The reactor has the worker's rights by membership (and so its read models' after a rebuild's swap);
    # no other role of the deployment is a member of any.
    members = await _admin(
        "SELECT r.rolname AS role, m.rolname AS member FROM pg_auth_members AS a JOIN pg_roles AS r ON r.oid = a.roleid "
        "JOIN pg_roles AS m ON m.oid = a.member WHERE r.rolname = ANY($1::text[]) OR m.rolname = ANY($1::text[])",
        list(granted.all()))
    assert [(r["member"], r["role"]) for r in members] == [(granted.reactor, granted.worker)]
    # Grants on single columns (pg_attribute's ACLs; information_schema.column_privileges lists table grants too,
    # and slowly): the relay's one.
    columns = await _admin(
        "SELECT r.rolname, c.relname, a.attname, x.privilege_type FROM pg_attribute AS a "
        "JOIN pg_class AS c ON c.oid = a.attrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace, "
        "aclexplode(a.attacl) AS x JOIN pg_roles AS r ON r.oid = x.grantee "
        "WHERE n.nspname = $1 AND a.attacl IS NOT NULL AND r.rolname = ANY($2::text[])", schema, list(granted.all()))
    assert [tuple(r) for r in columns] == [(granted.relay, "outbox", "created_at", "UPDATE")]
    # On the schema itself: USAGE, and nothing else (the reactor has it as the worker's member).
    usage = await _admin("SELECT r.rolname, a.privilege_type FROM pg_namespace AS n, aclexplode(n.nspacl) AS a "
                         "JOIN pg_roles AS r ON r.oid = a.grantee WHERE n.nspname = $1 AND r.rolname = ANY($2::text[])",
                         schema, list(granted.all()))
    assert sorted(tuple(r) for r in usage) == [(granted.relay, "USAGE"), (granted.worker, "USAGE"),
                                                (granted.writer, "USAGE")]


def test_hostile_schema_names_never_become_role_sql() -> None:
    for evil in ['x"; DROP ROLE postgres; --', "X", "a" * 49, ""]:
        with pytest.raises(errors.InvalidName):
            roles.statements(evil, [])
    with pytest.raises(errors.InvalidName):
        roles.statements("ok", ['t"; DROP TABLE events; --'])
    with pytest.raises(errors.InvalidName):
        roles.render(roles.SQL["create_role"], role="ok_admin")


async def test_migrate_without_createrole_fails_with_a_clear_message(schema: str) -> None:
    name = new_schema("t_owner", 12)
    await _admin(f'CREATE ROLE "{name}" LOGIN')
    try:
        conn = await db.connect(DATABASE_URL, schema, user=name)
        try:
            with pytest.raises(errors.StoreError, match="CREATEROLE"):
                await roles.apply(conn, new_schema(), [])
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
    # The claim itself: FOR UPDATE SKIP LOCKED (and delete), held by one relay, skipped by another; rolled back.
    async with relay_pool.acquire() as conn:
        claiming = conn.transaction()
        await claiming.start()
        claimed = await outbox.claim(conn, 10)
        assert [r["version"] for r in claimed] == [0, 1]
        async with relay_pool.acquire() as other, other.transaction():
            assert await outbox.claim(other, 10) == []
        await claiming.rollback()
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


# --- reactor -----------------------------------------------------------------------------------------

@pytest.fixture
def payment_timeout() -> Iterator[None]:
    """The example's reactor registered while the test runs (ask for it before ``schema``: migrate makes it live)."""
    registry.REGISTRY[PaymentTimeout.name] = PaymentTimeout
    yield
    registry.REGISTRY.pop(PaymentTimeout.name, None)


async def test_a_worker_logged_in_as_the_reactor_role_runs_the_reactor_and_the_read_models(
        payment_timeout: None, login: Login, granted: roles.Roles, schema: str, prefix: str, pool: db.Pool) -> None:
    """The whole least-privilege pipeline: a writer appends orders, a relay publishes them, a worker logged in as
    a member of the reactor role schedules the timeouts, fires them, appends the cancels (which the relay
    publishes and the read models apply), and parks nothing."""
    writer = EventStore(await login(granted.writer), schema=schema)
    relay_pool = await login(granted.relay)
    worker_pool = await login(granted.reactor, max_size=pool_size(3))
    timeout = PaymentTimeout()
    timeout.timeout = dt.timedelta(seconds=1)
    running = [timeout, OrderSummary(), CustomerStats()]
    names = broker.Names(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    targets = await broker.declare_topology(await connection.channel(publisher_confirms=True, on_return_raises=True),
                                            names, [p.name for p in running], PARTITIONS)
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        lease_seconds=3)
    stop = asyncio.Event()
    # The worker command's jobs too (backfills, read-model types): what the role must be allowed.
    worker = asyncio.create_task(projector.run_worker(settings, running, health.Health(), stop, pool=worker_pool,
                                                      backfills=backfill.Backfills()))
    orders = 20
    try:
        for i in range(orders):
            await writer.append(f"order-{i}", [placed(str(i), "c")], NO_STREAM)
        for i in range(orders // 2):  # paid in time: their timeouts are cancelled
            await writer.append(f"order-{i}", [paid(str(i), "c")], 0)
        deadline = time.monotonic() + 30
        while True:
            await relay.relay_until_idle(relay_pool, targets)  # the orders, then the cancels as they come
            parked = await pool.fetch("SELECT projection, error FROM dead_letters")
            assert [tuple(r) for r in parked] == []
            statuses = await pool.fetch("SELECT status, count(*) FROM order_summary GROUP BY status ORDER BY status")
            if [tuple(r) for r in statuses] == [("cancelled", orders // 2), ("paid", orders // 2)] and not (
                    await pool.fetchval("SELECT count(*) FROM deadlines")):
                break
            assert time.monotonic() < deadline, [tuple(r) for r in statuses]
            assert not worker.done(), worker
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
        await broker.delete_topology(await connection.channel(), names, [p.name for p in running], PARTITIONS)
        await connection.close()
    cancels = [e for i in range(orders) for e in await writer.load(f"order-{i}") if isinstance(e.event, OrderCancelled)]
    assert [(e.stream_id, e.event.reason) for e in cancels] == [(f"order-{i}", REASON)
                                                               for i in range(orders // 2, orders)]
    assert await pool.fetchval("SELECT count(*) FROM reactor_refusals") == 0


async def test_the_reactor_role_records_a_refusal_of_a_timeout_that_lost_to_the_payment(
        login: Login, granted: roles.Roles, event_store: EventStore, pool: db.Pool, schema: str) -> None:
    """The path the pipeline test does not take: a fired deadline whose command the domain refuses, recorded in
    reactor_refusals (INSERT .. ON CONFLICT DO NOTHING, whose conflict target needs SELECT)."""
    store = EventStore(await login(granted.reactor), schema=schema)
    timeout = PaymentTimeout()
    timeout.bind(store, PARTITIONS)
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    assert (await parking.apply_or_park(store, timeout, await store.load("order-1"))).parked == []
    await event_store.append("order-1", [paid("1", "c")], 0)  # paid; the reactor has not seen it yet
    await pool.execute("UPDATE deadlines SET due_at = clock_timestamp() - interval '1 second'")
    fired = await deadlines.Firing(store, timeout, partition_of("order-1", PARTITIONS)).round()
    assert (fired.fired, fired.parked) == (1, 0)
    assert [type(e.event) for e in await store.load("order-1")] == [OrderPlaced, OrderPaid]
    assert await pool.fetchval("SELECT stream_id FROM reactor_refusals WHERE reactor = 'payment_timeout'") == "order-1"


async def test_a_deadline_firing_refused_by_postgres_is_retried_and_says_the_grant_is_missing(
        login: Login, granted: roles.Roles, schema: str, prefix: str) -> None:
    """A reactor run under the worker role (no grant on deadlines): a missing privilege is the environment's
    fault (store/sqlstates.py), so the firing retries, never dies unseen, and /readyz says what to GRANT."""
    store = EventStore(await login(granted.worker), schema=schema)
    names = broker.Names(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    status = health.Health()
    try:
        await broker.declare_topology(await connection.channel(), names, [PaymentTimeout.name], PARTITIONS)
        settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix,
                            http_port=0)
        stop = asyncio.Event()
        consumer = Consumer(store, await connection.channel(), PaymentTimeout(), 0, settings, health_=status)
        running = asyncio.create_task(consumer.run(stop))
        async with asyncio.timeout(30):
            while "permission denied for table deadlines" not in status.reason():
                assert not running.done(), running
                await asyncio.sleep(0.05)
        assert "GRANT" in status.reason()
        assert not status.ready()
        stop.set()
        await asyncio.wait_for(running, 30)
    finally:
        await broker.delete_topology(await connection.channel(), names, [PaymentTimeout.name], PARTITIONS)
        await connection.close()


async def test_a_deadline_firing_that_fails_for_a_bug_is_logged_and_takes_its_consumer_down(
        event_store: EventStore, pool: db.Pool, schema: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Not an outage: a deadline whose stored payload no code can decode. Its firing task must neither die unseen
    nor leave the consumer consuming without it; the consumer raises its error, which ends the worker."""
    caplog.set_level(logging.ERROR, logger="workers.projector.consumer")
    await pool.execute("INSERT INTO deadlines (reactor, key, partition, due_at, deadline_id, payload) "
                       "VALUES ($1, 'k', 0, clock_timestamp(), gen_random_uuid(), '\\xc1')", PaymentTimeout.name)
    names = broker.Names(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        await broker.declare_topology(await connection.channel(), names, [PaymentTimeout.name], PARTITIONS)
        settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix,
                            http_port=0)
        consumer = Consumer(event_store, await connection.channel(), PaymentTimeout(), 0, settings)
        with pytest.raises(Exception) as raised:  # noqa: PT011 - whatever the bug is, it ends the consumer
            await asyncio.wait_for(consumer.run(asyncio.Event()), 30)
    finally:
        await broker.delete_topology(await connection.channel(), names, [PaymentTimeout.name], PARTITIONS)
        await connection.close()
    (record,) = [r for r in caplog.records if r.name == "workers.projector.consumer"]
    assert (record.levelno, record.getMessage()) == (
        logging.ERROR, "firing deadlines failed; the partition's consumer stops")
    assert (record.projection, record.partition) == (PaymentTimeout.name, 0)  # type: ignore[attr-defined]
    assert record.exc_info is not None
    assert record.exc_info[1] is raised.value


async def test_the_reactor_is_refused_everything_else(login: Login, granted: roles.Roles,
                                                  event_store: EventStore) -> None:
    await seed(event_store)
    pool = await login(granted.reactor)
    await refused(pool, "UPDATE events SET event_type = 'x'")
    await refused(pool, "SELECT * FROM outbox")
    await refused(pool, "DELETE FROM outbox")
    await refused(pool, "SELECT * FROM snapshots")
    await refused(pool, "SELECT * FROM schema_migrations")
    await refused(pool, "UPDATE reactor_refusals SET error = 'x'")
    await refused(pool, "DELETE FROM reactor_refusals")
    await refused(pool, "TRUNCATE deadlines")
    await refused(pool, "CREATE TABLE sneaky (id int)")
    await refused(pool, "DROP TABLE deadlines")


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
