"""Every advisory lock of the runtime on one page: its key, who takes it, in which mode, for how long.

| key | taken by | mode | held |
|---|---|---|---|
| ``projection`` | every batch applied to a projection (deliveries, catch-ups, re-drives, skips; a batch's in its checkpoint claim, the function ``claim_checkpoints``) | shared | its transaction |
| ``projection`` | a rebuild's swap of the projection's tables | exclusive | the swap's transaction |
| ``projection`` | ``retire`` deleting a removed read model's bookkeeping | exclusive | its transaction |
| ``rebuild`` | a running rebuild or backfill of a projection (``status`` asks whether it is held) | try | the run (session) |
| ``watermark`` | a re-drive or skip releasing a halted stream | exclusive | its transaction |
| ``projection``, ``watermark`` | ``republish`` moving a publication's checkpoints back | exclusive | its transaction |
| ``watermark`` | the lag monitor advancing the low watermark (skips a round if busy) | try | its transaction |
| ``leases`` | every lease tick of every worker (heartbeat, renew, claim: workers/projector/leases.py) | exclusive | its transaction |
| ``store.migrate.lock_key`` | ``migrate`` and the grants of ``migrate --roles`` (the store's own); ``teardown``'s drop; ``retire`` | exclusive | its transaction |
| ``store.migrate.lock_key`` | ``migrate`` filling in the partitions of events older than partitions | exclusive | the fill (session) |

Keys name the deployment's schema, so two deployments on one server never contend. Whoever takes more
than one in a transaction takes ``projection`` before ``watermark``.
"""

from __future__ import annotations

from store import db
from store import migrate as store_migrate
from store.queries import load

SQL = load("workers", "locks.sql")

#: The migrate lock of a schema (owned by the store, which migrates without the runtime).
migrate = store_migrate.lock_key


def projection(schema: str, name: str) -> str:
    """Shared by every batch of the projection, exclusive for a rebuild's swap of its tables."""
    return f"eventfleet.projection.{schema}.{name}"


def rebuild(schema: str, name: str) -> str:
    """Held by the session of a running rebuild or backfill of the projection."""
    return f"eventfleet.rebuild.{schema}.{name}"


def leases(schema: str) -> str:
    """Serializes the lease ticks of a deployment's workers, so shares come from one consistent view."""
    return f"eventfleet.leases.{schema}"


def watermark(schema: str, name: str) -> str:
    """Serializes the lag monitor's watermark advances with re-drives releasing halted streams."""
    return f"eventfleet.watermark.{schema}.{name}"


async def share(conn: db.Conn, key: str) -> None:
    """Take ``key`` shared until the end of the current transaction."""
    await conn.execute(SQL["share_xact"], key)


async def take(conn: db.Conn, key: str) -> None:
    """Take ``key`` exclusively until the end of the current transaction (waits for holders)."""
    await conn.execute(SQL["take_xact"], key)


async def try_take(conn: db.Conn, key: str) -> bool:
    """Take ``key`` exclusively until the end of the current transaction if nobody holds it."""
    taken: bool = await conn.fetchval(SQL["try_xact"], key)
    return taken


async def try_hold(conn: db.Conn, key: str) -> bool:
    """Take ``key`` for the session if nobody holds it; ``release`` it (or end the session) after."""
    taken: bool = await conn.fetchval(SQL["try_session"], key)
    return taken


async def release(conn: db.Conn, key: str) -> None:
    """Release a session lock taken with ``try_hold``."""
    await conn.fetchval(SQL["release_session"], key)


async def is_held(conn: db.Conn | db.Pool, key: str) -> bool:
    """Whether any session holds ``key`` now."""
    held: bool = await conn.fetchval(SQL["held"], key)
    return held
