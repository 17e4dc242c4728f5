"""Numbered SQL migrations, applied once each under an advisory lock so concurrent runs are safe."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from importlib import resources
from typing import LiteralString

from store import db, names

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


async def migrate(conn: db.Conn, schema: str, *, extra_ddl: Sequence[LiteralString] = ()) -> list[int]:
    """Create or upgrade ``schema``; return the versions applied now (empty when already current).

    Every step runs in one transaction holding a transaction-scoped advisory lock keyed by the schema,
    so ten pods migrating at once apply each migration exactly once and the rest wait, then see it done.
    ``extra_ddl`` (idempotent DDL such as registered read models) runs after the migrations.
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
        for ddl in extra_ddl:
            await conn.execute(ddl)
    return applied_now

