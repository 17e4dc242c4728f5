"""Shared fixtures: a freshly migrated schema per test, a pool on it, unique RabbitMQ names, clean-ups."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import eventfleet.examples.orders.events  # noqa: F401 - registers the orders events
from projections import registry
from store import db
from store.event_store import EventStore
from tests import tracing
from workers import admin

DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

Cleanup = Callable[[Callable[[], Awaitable[object]]], None]

# The suite runs the orders example, which a deployment gets only when it names it: here, and in every
# process a test starts with this environment (tests of the default remove the variable).
registry.load([registry.EXAMPLE])
os.environ.setdefault("EVENTFLEET_PROJECTION_MODULES", registry.EXAMPLE)
# Every schema of the suite has 4 partitions (16 is the default): each is a quorum queue per projection, and
# the broker's file handles are few (deploy/local/services.sh). Processes a test starts inherit it.
PARTITIONS = 4
os.environ.setdefault("EVENTFLEET_PARTITIONS", str(PARTITIONS))


@pytest.fixture
def database_url() -> str:
    return DATABASE_URL


@pytest.fixture
def amqp_url() -> str:
    return AMQP_URL


@pytest.fixture
async def cleanup() -> AsyncIterator[Cleanup]:
    """Collect async undo callbacks; run them last-in first-out after the test (aio-pika's add_cleanup)."""
    callbacks: list[Callable[[], Awaitable[object]]] = []
    yield callbacks.append
    for callback in reversed(callbacks):
        await callback()


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A schema of its own for this test, migrated with the store and the read models; dropped after."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    await admin.run_migrate(DATABASE_URL, name, partitions=PARTITIONS)
    yield name
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pool(schema: str) -> AsyncIterator[db.Pool]:
    async with db.create_pool(DATABASE_URL, schema, min_size=1, max_size=10) as p:
        yield p


@pytest.fixture
async def event_store(pool: db.Pool, schema: str) -> EventStore:
    return EventStore(pool, schema=schema)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span finished during the test (``get_finished_spans()``), from an SDK tracer provider (tests/tracing.py)."""
    yield from tracing.recording()


@pytest.fixture
def prefix() -> str:
    """A RabbitMQ name prefix of its own for this test."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def amqp(request: pytest.FixtureRequest, cleanup: Cleanup) -> AsyncIterator[AbstractRobustConnection]:
    """A RabbitMQ connection named after the test."""
    connection = await aio_pika.connect_robust(AMQP_URL, client_properties={"connection_name": request.node.nodeid})
    yield connection
    await connection.close()


@pytest.fixture
async def delete_prefixed(prefix: str, amqp: AbstractRobustConnection, cleanup: Cleanup) -> Callable[[list[str], list[str]], None]:
    """Register queues and exchanges to delete after the test."""

    def register(queues: list[str], exchanges: list[str]) -> None:
        async def undo() -> None:
            # Its own connection: `cleanup` tears down after the `amqp` fixture has closed its connection.
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel()
                for q in queues:
                    await channel.queue_delete(q)
                for x in exchanges:
                    await channel.exchange_delete(x)

        cleanup(undo)

    return register
