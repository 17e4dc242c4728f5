"""``eventfleet teardown --yes``: one deployment's schemas, queues, exchanges and roles go; another's stay.

The two deployments are named to defeat any rule by name prefix: the second's schema is ``<first>_rb_b``, the
unhashed shadow name of a projection ``b`` of the first, and its own rebuild shadow starts with ``<first>_rb_``.
The first's schema is 41 characters long, so its hashed shadow names (and the second's) keep only its first
40 characters: prefixes cannot tell them apart either.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, ClassVar, LiteralString

import aio_pika
import asyncpg
import pytest

from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from projections import registry
from projections.base import Projection
from store import NO_STREAM, EventStore, db, outbox, roles
from store.partitions import partition_of
from tests.conftest import AMQP_URL, CREATED, DATABASE_URL, PARTITIONS, new_schema
from tests.unit.test_projection_fold import paid, placed
from workers import admin, broker, rebuild, relay
from workers.projector import checkpoints, leases


class LongNamed(Projection):
    """A projection whose name is long enough to hash its shadow schemas' names."""

    name = "teardown_probe_with_a_rather_long_name"
    tables = ("teardown_probe",)
    ddl: ClassVar[LiteralString] = "CREATE TABLE IF NOT EXISTS teardown_probe (id text PRIMARY KEY)"


PROJECTIONS = ("customer_stats", "order_summary", LongNamed.name)
#: The projection whose queue of its own from before partitions a deployment still has.
LEGACY = "order_summary"


@dataclasses.dataclass(frozen=True)
class Deployment:
    schema: str
    prefix: str
    shadows: tuple[str, ...]

    @property
    def names(self) -> broker.Names:
        return broker.Names(self.prefix)

    @property
    def queues(self) -> list[str]:
        """Per projection: its partition queues, the queue it had before partitions (``LEGACY`` only), its DLQ."""
        n = self.names
        return [q for p in PROJECTIONS
                for q in (*(n.partition_queue(p, i) for i in range(PARTITIONS)), *([n.queue(p)] if p == LEGACY else []),
                          n.dead_letter_queue(p))]

    @property
    def exchanges(self) -> list[str]:
        return [self.names.partitions_exchange, self.names.exchange, self.names.dead_letter_exchange]

    @property
    def filled(self) -> set[str]:
        """The queues ``deploy`` published to: the partition queues of order-1 and order-2, the legacy one."""
        partition = partition_of("order-1", PARTITIONS)
        return {*(self.names.partition_queue(p, partition) for p in PROJECTIONS), self.names.queue(LEGACY)}

    @property
    def roles(self) -> tuple[str, ...]:
        return roles.Roles(self.schema).all()


async def admin_fetch(sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def drop_roles(names: tuple[str, ...]) -> None:
    """Drop these roles where they exist, with whatever privileges they still hold in this database."""
    for role in await existing_roles(names):
        await admin_fetch(f'DROP OWNED BY "{role}"')
        await admin_fetch(f'DROP ROLE "{role}"')


async def deploy(schema: str, prefix: str, cleanup) -> Deployment:
    """Migrate (with roles), write and project events, declare and fill the queues (one message per event in
    the partition queues, the legacy queue of ``LEGACY`` too), leave three shadows."""
    shadows = (rebuild.shadow_schema(schema, "order_summary"), rebuild.shadow_schema(schema, "customer_stats", "vf"),
               rebuild.shadow_schema(schema, LongNamed.name))
    deployment = Deployment(schema, prefix, shadows)
    cleanup(lambda: undeploy(deployment))
    await admin.run_migrate(DATABASE_URL, schema, partitions=PARTITIONS)
    await admin.run_roles(DATABASE_URL, schema)
    async with db.create_pool(DATABASE_URL, schema, min_size=1, max_size=4) as pool:
        store = EventStore(pool, schema=schema)
        await store.append("order-1", [placed("1", "c1"), paid("1", "c1")], NO_STREAM)
        await store.append("order-2", [placed("2", "c2")], NO_STREAM)
        events = [*await store.load("order-1"), *await store.load("order-2")]
        await checkpoints.apply_batch(store, OrderSummary(), events)
        # A killed rebuild's shadow, a verifying replay's, and a rebuild shadow with a hashed name.
        await rebuild.replay(pool, store, OrderSummary, shadows[0], settled=True)
        await rebuild.replay(pool, store, CustomerStats, shadows[1], settled=True)
        await rebuild.replay(pool, store, LongNamed, shadows[2], settled=True)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            targets = await broker.declare_topology(channel, deployment.names, PROJECTIONS, PARTITIONS,
                                                    events_exchange=True)
            for event in events:
                partition = partition_of(event.stream_id, PARTITIONS)
                await targets.partitions_exchange.publish(broker.events_message(partition, [event]),
                                                          routing_key=str(partition))
            # The queue of its own a projection had before partitions, with what it still held.
            legacy = await channel.declare_queue(deployment.names.queue(LEGACY), durable=True,
                                                 arguments={"x-queue-type": "quorum"})
            for event in events:
                await channel.default_exchange.publish(broker.to_message(event), routing_key=legacy.name)
    return deployment


async def undeploy(deployment: Deployment) -> None:
    for name in (*deployment.shadows, deployment.schema):
        await admin_fetch(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    await drop_roles(deployment.roles)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await broker.delete_topology(channel, deployment.names, PROJECTIONS, PARTITIONS)
        await channel.queue_delete(deployment.names.queue(LEGACY))


@pytest.fixture
async def two(monkeypatch, cleanup) -> tuple[Deployment, Deployment]:
    """Two deployments, both migrated, with events, read models, shadows, roles and filled queues."""
    monkeypatch.setitem(registry.REGISTRY, LongNamed.name, LongNamed)
    tag = uuid.uuid4().hex[:12]
    first = f"t_{tag}_teardown_".ljust(41, "a")
    second = f"{first}_rb_b"
    CREATED.add_schema(first)  # and so second, named after it; the session check finds what is left of them
    CREATED.add_prefix(f"test.{tag}")
    a = await deploy(first, f"test.{tag}.first", cleanup)
    b = await deploy(second, f"test.{tag}.second", cleanup)
    assert len(a.schema) == 41
    assert b.shadows[0].startswith(f"{a.schema}_rb_")
    assert a.shadows[2][:40] == b.shadows[2][:40] == a.schema[:40]
    return a, b


async def schemas(names: tuple[str, ...]) -> set[str]:
    rows = await admin_fetch("SELECT nspname FROM pg_namespace WHERE nspname = ANY($1::text[])", list(names))
    return {r[0] for r in rows}


async def existing_roles(names: tuple[str, ...]) -> set[str]:
    return {r[0] for r in await admin_fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])", list(names))}


async def contents(deployment: Deployment) -> dict[str, int]:
    """Every table of the deployment's schemas, with its row count."""
    tables = await admin_fetch("SELECT schemaname, tablename FROM pg_tables WHERE schemaname = ANY($1::text[])",
                               [deployment.schema, *deployment.shadows])
    found = {}
    for row in tables:
        (count,) = await admin_fetch(f'SELECT count(*) FROM "{row[0]}"."{row[1]}"')
        found[f"{row[0]}.{row[1]}"] = count[0]
    return found


async def broker_state(deployment: Deployment) -> dict[str, int | None]:
    """Each queue's message count and each exchange's presence (0), by passive declare; None if missing."""
    found: dict[str, int | None] = {}
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for name in [*deployment.queues, *deployment.exchanges]:
            channel = await connection.channel()
            try:
                if name in deployment.queues:
                    queue = await channel.declare_queue(name, passive=True)
                    found[name] = queue.declaration_result.message_count
                else:
                    await channel.declare_exchange(name, passive=True)
                    found[name] = 0
            except aio_pika.exceptions.ChannelNotFoundEntity:
                found[name] = None
            finally:
                if not channel.is_closed:
                    await channel.close()
    return found


async def test_teardown_leaves_everything_of_another_deployment_as_it_was(two, run_cli):
    a, b = two
    tables, queues = await contents(b), await broker_state(b)
    assert tables[f"{b.schema}.events"] == 3
    assert tables[f"{b.shadows[0]}.order_summary"] == 2
    # The partition queue of order-1 and order-2 holds their 3 messages, as does the legacy queue; the
    # other partition queues and the dead-letter queues hold none.
    assert partition_of("order-1", PARTITIONS) == partition_of("order-2", PARTITIONS)
    assert queues == {name: 3 if name in b.filled else 0 for name in [*b.queues, *b.exchanges]}

    ran = await run_cli("teardown", "--yes", schema=a.schema, prefix=a.prefix)

    assert ran.code == 0, ran.err
    assert await contents(b) == tables
    assert await broker_state(b) == queues
    assert await schemas((b.schema, *b.shadows)) == {b.schema, *b.shadows}
    assert await existing_roles(b.roles) == set(b.roles)


async def test_teardown_drops_every_schema_queue_exchange_and_role_of_its_deployment(two, run_cli):
    a, _ = two
    assert await schemas((a.schema, *a.shadows)) == {a.schema, *a.shadows}

    ran = await run_cli("teardown", "--yes", schema=a.schema, prefix=a.prefix)

    assert (ran.code, ran.err) == (0, "")
    assert ran.out.splitlines() == [
        f"dropped queues: {', '.join(a.queues)}",
        f"dropped exchanges: {a.prefix}.partitions, {a.prefix}.events, {a.prefix}.dlx",
        f"dropped schema: {a.schema}",
        f"dropped shadow schemas: {', '.join(sorted(a.shadows))}",
        f"dropped roles: {a.schema}_writer, {a.schema}_relay, {a.schema}_worker, {a.schema}_reactor",
    ]
    assert await schemas((a.schema, *a.shadows)) == set()
    assert await existing_roles(a.roles) == set()
    assert await broker_state(a) == dict.fromkeys([*a.queues, *a.exchanges])


async def test_teardown_without_yes_names_what_it_would_drop_and_drops_nothing(two, run_cli):
    a, _ = two
    queues = await broker_state(a)

    ran = await run_cli("teardown", schema=a.schema, prefix=a.prefix)

    assert (ran.code, ran.out) == (2, "")
    assert ran.err.splitlines() == [
        f"eventfleet teardown: refusing without --yes; it would drop, for schema {a.schema} and prefix {a.prefix}:",
        f"  queues: {', '.join(a.queues)}",
        f"  exchanges: {a.prefix}.partitions, {a.prefix}.events, {a.prefix}.dlx",
        f"  schema: {a.schema}",
        f"  shadow schemas: {', '.join(sorted(a.shadows))}",
        f"  roles: {a.schema}_writer, {a.schema}_relay, {a.schema}_worker, {a.schema}_reactor",
        "stop the relay and workers first; roles are cluster-wide",
    ]
    assert await schemas((a.schema, *a.shadows)) == {a.schema, *a.shadows}
    assert await existing_roles(a.roles) == set(a.roles)
    assert await broker_state(a) == queues


async def test_teardown_keeps_a_role_still_granted_something_outside_its_deployment(schema, prefix, cleanup,
                                                                                     run_cli):
    await admin.run_roles(DATABASE_URL, schema)
    group = roles.Roles(schema)
    cleanup(lambda: drop_roles(group.all()))
    elsewhere = f"{schema}_elsewhere"
    cleanup(lambda: admin_fetch(f'DROP SCHEMA IF EXISTS "{elsewhere}" CASCADE'))
    await admin_fetch(f'CREATE SCHEMA "{elsewhere}"')
    await admin_fetch(f'CREATE TABLE "{elsewhere}".reports (id int)')
    await admin_fetch(f'GRANT SELECT ON "{elsewhere}".reports TO "{group.writer}"')

    ran = await run_cli("teardown", "--yes", schema=schema, prefix=prefix)

    assert ran.code == 0, ran.err
    assert f"dropped roles: {group.relay}, {group.worker}, {group.reactor}" in ran.out.splitlines()
    assert ran.out.splitlines()[-1] == (f"kept role {group.writer}: it is still granted privileges outside this "
                                        "deployment (roles are cluster-wide)")
    assert await existing_roles(group.all()) == {group.writer}
    assert await schemas((schema,)) == set()


async def test_teardown_drops_a_shadow_whose_cursor_a_crash_emptied(pool, event_store, schema, prefix, cleanup,
                                                                    run_cli):
    """Unlogged, the cursor is emptied by a server crash: the shadow's name is still that of a known projection."""
    shadow = rebuild.shadow_schema(schema, "order_summary")
    cleanup(lambda: admin_fetch(f'DROP SCHEMA IF EXISTS "{shadow}" CASCADE'))
    await rebuild.replay(pool, event_store, OrderSummary, shadow, settled=True)
    await pool.execute(f'DELETE FROM "{shadow}".rebuild_cursor')

    ran = await run_cli("teardown", "--yes", schema=schema, prefix=prefix)

    assert ran.code == 0, ran.err
    assert f"dropped shadow schemas: {shadow}" in ran.out.splitlines()
    assert await schemas((shadow,)) == set()


async def test_teardown_drops_a_shadow_of_a_projection_no_longer_known_by_its_cursor(pool, event_store, schema,
                                                                                     prefix, cleanup, run_cli):
    class Retired(LongNamed):
        name = "retired_probe"  # neither registered nor with a status row: only the shadow's cursor names it

    shadow = rebuild.shadow_schema(schema, Retired.name)
    cleanup(lambda: admin_fetch(f'DROP SCHEMA IF EXISTS "{shadow}" CASCADE'))
    await rebuild.replay(pool, event_store, Retired, shadow, settled=True)

    ran = await run_cli("teardown", "--yes", schema=schema, prefix=prefix)

    assert ran.code == 0, ran.err
    assert f"dropped shadow schemas: {shadow}" in ran.out.splitlines()
    assert await schemas((shadow,)) == set()


async def test_teardown_refuses_a_schema_that_is_not_a_deployment(cleanup, prefix, run_cli):
    name = f"{new_schema(length=12)}_plain"
    cleanup(lambda: admin_fetch(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    await admin_fetch(f'CREATE SCHEMA "{name}"')
    await admin_fetch(f'CREATE TABLE "{name}".precious (id int)')

    ran = await run_cli("teardown", "--yes", schema=name, prefix=prefix)

    assert (ran.code, ran.out) == (1, "")
    assert ran.err == (f"eventfleet teardown: schema {name!r} is not an eventfleet deployment "
                       "(no schema_migrations); nothing dropped\n")
    assert await schemas((name,)) == {name}


async def test_teardown_with_rabbitmq_unreachable_drops_nothing(schema, prefix, run_cli):
    ran = await run_cli("teardown", "--yes", schema=schema, prefix=prefix, amqp_url="amqp://guest:guest@127.0.0.1:1/")

    assert (ran.code, ran.out) == (1, "")
    assert ran.err.startswith("eventfleet teardown: RabbitMQ at 127.0.0.1:1 unreachable: ")
    assert ran.err.endswith("; nothing dropped\n")
    assert await schemas((schema,)) == {schema}


# --- refusing while the deployment is in use ---------------------------------------------------------------


async def test_teardown_refuses_while_a_worker_is_live_and_names_it(pool, schema, prefix, run_cli):
    keeper = leases.LeaseKeeper(pool, schema, ["order_summary"], PARTITIONS, lease_seconds=60)
    await keeper.tick()  # a worker's heartbeat: registered, live for a minute

    ran = await run_cli("teardown", "--yes", schema=schema, prefix=prefix)

    assert (ran.code, ran.out) == (1, "")
    assert ran.err == (f"eventfleet teardown: schema {schema!r} is in use: live workers {keeper.worker_id}; stop the "
                       "relays and workers first (a stopped worker's heartbeat expires within "
                       "EVENTFLEET_LEASE_SECONDS), or pass --force; nothing dropped\n")
    assert await schemas((schema,)) == {schema}


async def test_teardown_without_yes_says_what_uses_the_deployment(pool, schema, prefix, run_cli):
    keeper = leases.LeaseKeeper(pool, schema, ["order_summary"], PARTITIONS, lease_seconds=60)
    await keeper.tick()

    ran = await run_cli("teardown", schema=schema, prefix=prefix)

    assert ran.code == 2
    assert f"  in use now: live workers {keeper.worker_id}\n" in ran.err


async def test_teardown_refuses_while_a_relay_is_connected(schema, prefix, run_cli):
    config = relay.RelayConfig(database_url=DATABASE_URL, schema=schema, amqp_url=AMQP_URL, prefix=prefix,
                               projections=())
    async with relay.open_pool(config) as relay_pool, relay_pool.acquire() as conn:  # an idle relay's session
        pid = conn.get_server_pid()
        ran = await run_cli("teardown", "--yes", schema=schema, prefix=prefix)

    assert ran.code == 1
    assert ran.err.startswith(f"eventfleet teardown: schema {schema!r} is in use: relay sessions (pids {pid}); ")
    assert await schemas((schema,)) == {schema}


async def test_teardown_refuses_while_a_relay_batch_holds_a_claim(pool, event_store, schema, prefix, run_cli):
    await event_store.append("order-1", [placed("order-1", "alice")], expected_version=NO_STREAM)
    async with pool.acquire() as conn, conn.transaction():
        claimed = await outbox.claim(conn, 100)  # the relay's claim, as publish_batch makes it
        ran = await run_cli("teardown", "--yes", schema=schema, prefix=prefix)

    assert len(claimed) == 1
    assert ran.code == 1
    assert ran.err.startswith(f"eventfleet teardown: schema {schema!r} is in use: 1 outbox rows claimed by a relay's "
                              "batch; ")
    assert await schemas((schema,)) == {schema}


async def test_teardown_force_drops_a_deployment_in_use(pool, schema, prefix, run_cli):
    await leases.LeaseKeeper(pool, schema, ["order_summary"], PARTITIONS, lease_seconds=60).tick()
    await pool.close()  # its sessions would hold the schema's locks against the drop

    ran = await run_cli("teardown", "--yes", "--force", schema=schema, prefix=prefix)

    assert ran.code == 0, ran.err
    assert f"dropped schema: {schema}" in ran.out.splitlines()
    assert await schemas((schema,)) == set()
