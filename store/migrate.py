"""Numbered SQL migrations, applied once each under an advisory lock so concurrent runs are safe."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from importlib import resources
from typing import LiteralString

from store import clock, db, errors, names
from store.partitions import DEFAULT_PARTITIONS, MAX_PARTITIONS

logger = logging.getLogger(__name__)

_LOCK_NAMESPACE = "eventfleet.migrate"


def lock_key(schema: str) -> str:
    """The advisory lock a migration of ``schema`` holds for its transaction (and the grants of its roles)."""
    return f"{_LOCK_NAMESPACE}.{schema}"


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One schema change: a number, a name, its SQL."""

    version: int
    name: str
    sql: LiteralString


def store_migrations() -> list[Migration]:
    """The migrations shipped in store/sql/migrations, in version order."""
    found = []
    for entry in resources.files("store").joinpath("sql", "migrations").iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            # Shipped with the package and reviewed like code: as trusted as a literal.
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: db.Conn, schema: str, *, extra_ddl: Sequence[LiteralString] = (),
                  partitions: int | None = None) -> list[int]:
    """Create or upgrade ``schema``; return the versions applied now (empty when already current).

    Every step runs in one transaction holding a transaction-scoped advisory lock keyed by the schema,
    so ten pods migrating at once apply each migration exactly once and the rest wait, then see it done.
    ``extra_ddl`` (idempotent DDL such as registered read models) runs after the migrations.
    ``partitions``: P for a new schema (default 16); an existing schema must have been migrated with the
    same P, or this raises PartitionsMismatch before changing anything. A store restored from another
    cluster gets its transaction clock moved past the ids it holds (store/clock.py). Events older than
    partitions are then given theirs, in batches, each its own transaction (writers go on meanwhile).
    """
    quoted = names.quote(schema)
    applied_now: list[int] = []
    async with db.translate_errors(), conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", lock_key(schema))
        # CREATE SCHEMA IF NOT EXISTS is not safe under concurrency by itself; the lock makes it so.
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        await conn.execute(f"SET LOCAL search_path TO {quoted}")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in store_migrations():
            if migration.version in done:
                continue
            logger.info("applying migration", extra={"schema": schema, "migration": migration.version,
                                                      "migration_name": migration.name})
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                               migration.version, migration.name)
            applied_now.append(migration.version)
        await _record_partitions(conn, schema, partitions)
        await clock.repair(conn, schema)
        for ddl in extra_ddl:
            await conn.execute(ddl)
    await _fill_partitions(conn, schema)
    return applied_now


async def _record_partitions(conn: db.Conn, schema: str, partitions: int | None) -> None:
    recorded: int | None = await conn.fetchval("SELECT partitions FROM partitioning")
    if recorded is None and not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM events)"):
        # A new store: the index costs nothing now, and a concurrent build would wait for every transaction
        # of the database to end.
        await conn.execute(f"CREATE INDEX IF NOT EXISTS {_PARTITION_INDEX}"
                           " ON events (partition, transaction_id, global_position)")
    if recorded is None:
        chosen = DEFAULT_PARTITIONS if partitions is None else partitions
        if not 1 <= chosen <= MAX_PARTITIONS:
            raise errors.ConfigError(f"EVENTFLEET_PARTITIONS must be between 1 and {MAX_PARTITIONS}, got {chosen}")
        await conn.execute("INSERT INTO partitioning (partitions) VALUES ($1)", chosen)
        logger.info("partitions recorded", extra={"schema": schema, "partitions": chosen})
    elif partitions is not None and partitions != recorded:
        raise errors.PartitionsMismatch(
            f"schema {schema} has {recorded} partitions, not {partitions} (EVENTFLEET_PARTITIONS): the number is "
            f"fixed when a schema is first migrated, because every event carries its partition. Unset "
            f"EVENTFLEET_PARTITIONS or set it to {recorded}; for another number, migrate a new schema with it "
            f"and move the writers there (their projections rebuild from its store)")


_PARTITION_INDEX = "events_partition_idx"
_HAS_PARTITION_INDEX = "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = $1 AND indexname = 'events_partition_idx')"

#: Events given their partition per transaction by the fill of events older than partitions.
FILL_BATCH = 10_000


async def _fill_partitions(conn: db.Conn, schema: str) -> None:
    """Give events written before partitions existed theirs, a range of positions per transaction, then
    make the index that reads one partition in order (concurrently: appends go on meanwhile)."""
    quoted = names.quote(schema)
    events = f"{quoted}.events"
    async with db.translate_errors():
        await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", lock_key(schema))
        try:
            last: int = await conn.fetchval(
                f"SELECT coalesce(max(global_position), 0) FROM {events} WHERE partition IS NULL")
            position, filled = 0, 0
            while position < last:
                status = await conn.execute(
                    f"UPDATE {events} SET partition = {quoted}.stream_partition(stream_id,"
                    f" (SELECT partitions FROM {quoted}.partitioning))"
                    f" WHERE global_position > $1 AND global_position <= $2 AND partition IS NULL",
                    position, position + FILL_BATCH)
                filled += int(status.split()[-1])
                position += FILL_BATCH
            if filled:
                logger.info("partitions filled in", extra={"schema": schema, "events": filled})
            if not await conn.fetchval(_HAS_PARTITION_INDEX, schema):
                await conn.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {_PARTITION_INDEX}"
                                   f" ON {events} (partition, transaction_id, global_position)")
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", lock_key(schema))

