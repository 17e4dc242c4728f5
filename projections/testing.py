"""Projections under test: a throwaway schema with their read-model tables, and events fed to their handlers.

A projection is SQL on an asyncpg connection, so an honest test of one needs PostgreSQL: an in-memory
imitation of the tables would test the imitation. What such a test does not need is the rest of the
pipeline (outbox, relay, broker, worker, checkpoints). ``read_model`` gives a freshly migrated schema of
its own with a connection on it, ``ReadModel.apply`` runs a projection's handlers on ``RecordedEvent``s
(read from an ``InMemoryEventStore``, or built by hand) in one transaction as a worker would, and the
test queries the tables on ``conn``::

    store = InMemoryEventStore()
    await Repository(store, Order).execute("order-1", place("1", "c1", items))
    async with read_model(DATABASE_URL, OrderSummary) as model:
        await model.apply(OrderSummary(), await store.read_all())
        row = await model.conn.fetchrow("SELECT status FROM order_summary")
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from projections.base import Projection
from store import db, migrate, names
from store.records import RecordedEvent


@dataclasses.dataclass(frozen=True, slots=True)
class ReadModel:
    """A throwaway schema and a connection whose unqualified names resolve in it."""

    conn: asyncpg.Connection[Any]
    schema: str

    async def apply(self, projection: Projection, events: Sequence[RecordedEvent], *, batch: bool = False) -> None:
        """Apply events (each stream's in version order) with the projection's handlers one by one, or with
        its ``apply_batch`` (``batch=True``, the worker's fast path), in one transaction."""
        async with db.translate_errors(), self.conn.transaction():
            if batch:
                await projection.apply_batch(self.conn, events)
            else:
                for event in events:
                    await projection.apply(self.conn, event)


@contextlib.asynccontextmanager
async def read_model(database_url: str, *projections: type[Projection],
                     prefix: str = "read_model") -> AsyncIterator[ReadModel]:
    """A schema of its own, migrated like a deployment's with the tables of these projections, and a
    connection on it; the schema is dropped on exit."""
    schema = names.identifier(f"{prefix}_{uuid.uuid4().hex[:16]}", what="schema")
    conn = await db.connect(database_url, schema)
    try:
        await migrate.migrate(conn, schema, extra_ddl=[cls.ddl for cls in projections])
        yield ReadModel(conn, schema)
    finally:
        try:
            async with db.translate_errors():
                await conn.execute(f"DROP SCHEMA IF EXISTS {names.quote(schema)} CASCADE")
        finally:
            await conn.close()
