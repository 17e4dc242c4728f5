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


#: What this release's workers need of a schema, by the migration that creates it: a function's signature, found
#: in the catalog (``to_regprocedure``), which every role may read (a worker's role may not read schema_migrations).
WORKERS_NEED: dict[int, str] = {
    15: "claim_checkpoints(text[], text[], text[], bigint[], uuid[], text[], text[])",
}


async def check_current(conn: db.Conn | db.Pool, schema: str) -> None:
    """Raise ``SchemaBehind`` unless ``schema`` holds what this release's workers need (``WORKERS_NEED``): without
    the function ``claim_checkpoints`` of 0015, say, every batch would fail with an undefined function, the event's
    fault (sqlstates), and park."""
    missing = []
    async with db.translate_errors():
        for version, signature in sorted(WORKERS_NEED.items()):
            if not await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", f"{names.quote(schema)}.{signature}"):
                missing.append(version)
    if missing:
        raise errors.SchemaBehind(schema, missing)


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
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM events)"):
        # An empty store: the indexes cost nothing now, and a concurrent build would wait for every
        # transaction of the database to end.
        for index, definition in _ONLINE_INDEXES.items():
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {index} ON events {definition}")
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


#: Indexes on events built by ``migrate`` outside its transaction on a store that holds events (concurrently:
#: appends go on meanwhile). events_partition_idx reads one partition in read_all order (a partition's
#: catch-up); events_name_idx reads the events of one name (any version) in read_all order, so the reads of
#: a read model that handles a few types (rebuild, backfill, verify, lag) cost its events, not the store's.
#: The name is an expression of event_type (``Name.vN``; names hold no dot), not a column: appends pay one
#: index entry and nothing else (bench/append.py, BENCHMARKS.md).
_ONLINE_INDEXES: dict[str, LiteralString] = {
    "events_partition_idx": "(partition, transaction_id, global_position)",
    "events_name_idx": "(split_part(event_type, '.v', 1), transaction_id, global_position)",
}
_HAS_INDEX = "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = $1 AND indexname = $2)"
# An index whose concurrent build was interrupted stays behind invalid: it is dropped and built again.
_INVALID_INDEX = """
SELECT EXISTS (SELECT 1 FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid
               JOIN pg_namespace AS n ON n.oid = c.relnamespace
               WHERE n.nspname = $1 AND c.relname = $2 AND NOT i.indisvalid)
"""

#: Events given their partition per transaction by the fill of events older than partitions.
FILL_BATCH = 10_000


async def _fill_partitions(conn: db.Conn, schema: str) -> None:
    """Give events written before partitions existed theirs, a range of positions per transaction, then
    make the indexes of _ONLINE_INDEXES a store lacks (concurrently: appends go on meanwhile)."""
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
            for index, definition in _ONLINE_INDEXES.items():
                if await conn.fetchval(_INVALID_INDEX, schema, index):
                    await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {quoted}.{index}")
                if not await conn.fetchval(_HAS_INDEX, schema, index):
                    await conn.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {events} {definition}")
                    logger.info("index built", extra={"schema": schema, "index": index})
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", lock_key(schema))

