"""The suite's own clean-up (tests/conftest.py): a test's topology deleted whatever it did, and the session
check that finds what a run left of its deployments, and of nobody else's."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import asyncpg
from aio_pika.abc import AbstractRobustConnection

from tests.conftest import AMQP_URL, DATABASE_URL, Created, delete_topology, leftovers, remove_leftovers
from workers import broker


async def test_delete_topology_deletes_a_deployments_queues_and_exchanges(amqp: AbstractRobustConnection,
                                                                          prefix: str) -> None:
    names = broker.Names(prefix)
    await broker.declare_topology(await amqp.channel(), names, ["balances"], 3, events_exchange=True)
    await delete_topology(prefix, ["balances"], partitions=3)
    queues = [names.partition_queue("balances", i) for i in range(3)] + [names.dead_letter_queue("balances")]
    assert [q for q in queues if await broker.passive_queue(amqp, q) is not None] == []
    exchanges = [names.partitions_exchange, names.dead_letter_exchange, names.exchange]
    assert [x for x in exchanges if await broker.exchange_exists(amqp, x)] == []


async def _make(prefixes: list[str], schemas: list[str], roles: list[str]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for prefix in prefixes:
            await channel.declare_queue(f"{prefix}.balances.0", durable=True)
            await channel.declare_exchange(f"{prefix}.partitions", durable=True)
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        for schema in schemas:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        for role in roles:
            await conn.execute(f'CREATE ROLE "{role}"')
    finally:
        await conn.close()


def test_leftovers_are_what_exists_of_the_runs_own_names_and_are_removed() -> None:
    tag = uuid.uuid4().hex[:12]
    prefix, schema = f"test.{tag}", f"t_{tag}"
    # Named like them but another run's: a prefix that only starts the same, a schema with a longer name.
    others = Created({f"test.{tag}x": ""}, {f"t_{tag}x": ""})
    ours = Created({prefix: ""}, {schema: ""})
    asyncio.run(_make([prefix, *others.prefixes], [schema, f"{schema}_rb_balances", *others.schemas],
                      [f"{schema}_worker", *(f"{s}_worker" for s in others.schemas)]))
    try:
        left = leftovers(ours)
        assert left == {"queues": [f"{prefix}.balances.0"], "exchanges": [f"{prefix}.partitions"],
                        "schemas": [schema, f"{schema}_rb_balances"], "roles": [f"{schema}_worker"]}
        asyncio.run(remove_leftovers(left))
        assert leftovers(ours) == {"queues": [], "exchanges": [], "schemas": [], "roles": []}
    finally:
        asyncio.run(remove_leftovers(leftovers(others)))
    assert leftovers(others) == {"queues": [], "exchanges": [], "schemas": [], "roles": []}
