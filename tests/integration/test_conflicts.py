"""A transaction Postgres aborts for a conflict (here a real deadlock) is retried and logged as a conflict,
not as an outage of Postgres: the server is fine, and readiness stays."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from store import db, errors
from workers.runtime import health


async def deadlock(pool: db.Pool) -> errors.StoreError:
    """Two transactions that each hold the row the other wants: Postgres aborts one; its translated error."""
    await pool.execute("CREATE TABLE conflict_probe (id int PRIMARY KEY, n int NOT NULL)")
    await pool.execute("INSERT INTO conflict_probe VALUES (1, 0), (2, 0)")
    both_locked = asyncio.Barrier(2)

    async def cross(first: int, second: int) -> None:
        async with db.translate_errors(), pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE conflict_probe SET n = n + 1 WHERE id = $1", first)
            await both_locked.wait()
            await conn.execute("UPDATE conflict_probe SET n = n + 1 WHERE id = $1", second)

    results = await asyncio.gather(cross(1, 2), cross(2, 1), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1, results
    assert isinstance(failures[0], errors.StoreError)
    return failures[0]


async def test_a_deadlock_is_a_transaction_conflict_to_retry(pool):
    failure = await deadlock(pool)

    assert isinstance(failure, errors.TransactionConflict)
    assert isinstance(failure, errors.TransientError)  # every retry loop retries it
    assert isinstance(failure.__cause__, asyncpg.DeadlockDetectedError)


async def test_a_conflict_is_logged_as_a_conflict_and_leaves_postgres_ready(pool, caplog: pytest.LogCaptureFixture):
    failure = await deadlock(pool)
    status = health.Health()
    status.up("postgres")
    status.up("rabbitmq")
    caplog.set_level(logging.INFO, logger="workers.runtime.health")

    status.down("postgres", failure, projection="reactor_probe")

    assert status.ready()
    assert [(r.getMessage(), r.service, r.projection) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("transaction conflict, retrying", "postgres", "reactor_probe")]
    assert caplog.records[0].cause.startswith("DeadlockDetectedError: ")  # type: ignore[attr-defined]
