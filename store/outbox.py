"""The transactional outbox: claim rows with their events (deleting them), measure the backlog.

The relay calls ``claim`` inside a transaction of its own and commits once the broker confirmed what it
published (else rolls back: the rows stay); nothing here commits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from store import db, queries

SQL = queries.load("store", "outbox.sql")


@dataclasses.dataclass(frozen=True, slots=True)
class Backlog:
    """Outbox rows not yet published, and how old the oldest of them is."""

    pending: int
    oldest_age_seconds: float


#: A claim's byte budget when none is given: no bound but the rows'.
UNBOUNDED = 2**62


async def claim(conn: db.Conn, limit: int, max_bytes: int = UNBOUNDED) -> list[Any]:
    """Lock up to ``limit`` unclaimed rows (skipping locked ones) and return their events rows in order, while
    the events' bytes (data + metadata) before each are under ``max_bytes`` (so at least one; the last row
    returned reaches the budget when its ``reached`` column is true: more may wait then). The rows returned are
    deleted in the same statement.

    Must run inside a transaction: the locks, and the rows' fate, end with it (a commit forgets the rows
    returned, a rollback leaves every row where it was).
    """
    async with db.translate_errors():
        return await conn.fetch(SQL["claim"], limit, max_bytes)


async def backlog(conn: db.Conn | db.Pool) -> Backlog:
    """Count the pending rows and the age of the oldest."""
    async with db.translate_errors():
        row = await conn.fetchrow(SQL["pending"])
    assert row is not None
    return Backlog(row["pending"], row["oldest_age_seconds"])
