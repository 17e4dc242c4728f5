"""Shared by the rebuild, status and demo tests: write order lives, fold the store, read the read models."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from projections.base import Projection
from store import NO_STREAM, EventStore, RecordedEvent, db
from store.event_store import record_from_row
from tests.conftest import DATABASE_URL
from tests.unit.test_projection_fold import Models, fold, order_life, read_models

__all__ = ["Models", "all_events", "drop_shadows", "expected", "read_models", "stream_versions", "write_orders"]


async def write_orders(event_store: EventStore, count: int, rng: random.Random, *, prefix: str = "o",
                       chunk: int = 50) -> int:
    """Append ``count`` order streams of 1 to 4 events, ``chunk`` streams per transaction; return events written."""
    written = 0
    batch: list[tuple[str, list[Any], int]] = []
    for i in range(count):
        order_id = f"{prefix}{i}"
        life = order_life(order_id, f"c{rng.randint(0, max(count // 4, 1))}", rng.randint(1, 4), rng)
        batch.append((f"order-{order_id}", life, NO_STREAM))
        written += len(life)
        if len(batch) == chunk:
            await event_store.append_batch(batch)
            batch = []
    if batch:
        await event_store.append_batch(batch)
    return written


async def all_events(event_store: EventStore) -> list[RecordedEvent]:
    """Every event of the store, stream by stream in version order.

    Not read_all: that stops below the cluster's oldest open transaction, which other tests sharing the
    server may hold open; an oracle must see everything committed.
    """
    rows = await event_store.pool.fetch(
        "SELECT global_position, event_id, stream_id, version, event_type, data, metadata, recorded_at,"
        " transaction_id FROM events ORDER BY stream_id, version")
    return [record_from_row(r) for r in rows]


async def expected(event_store: EventStore) -> Models:
    """The read models as the fold of the whole store."""
    return fold(e.event for e in await all_events(event_store))


async def stream_versions(event_store: EventStore, projection: type[Projection] | None = None) -> dict[str, int]:
    """Each stream's last version (of the events ``projection`` handles, when given)."""
    versions: dict[str, int] = {}
    for e in await all_events(event_store):
        if projection is not None and not projection().handles_type(e.event_type):
            continue
        versions[e.stream_id] = max(versions.get(e.stream_id, -1), e.version)
    return versions


async def checkpoints_of(pool: db.Pool, projection: str) -> dict[str, int]:
    rows = await pool.fetch("SELECT stream_id, version FROM checkpoints WHERE projection = $1", projection)
    return {r["stream_id"]: r["version"] for r in rows}


@pytest.fixture
async def drop_shadows(schema: str) -> AsyncIterator[None]:
    """Drop the test schema's shadow and scratch schemas (a rebuild cut short leaves its shadow)."""
    yield
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        for row in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1 OR nspname LIKE $2",
                                    f"{schema}\\_rb\\_%", f"{schema}\\_vf\\_%"):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
    finally:
        await conn.close()
