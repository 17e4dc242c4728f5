"""Migrating a deployment: the store's schema, the registered read models, their status rows and the roles."""

from __future__ import annotations

import logging
from typing import LiteralString

from projections import registry
from store import db, errors, migrate, queries, roles
from workers.rebuild import backfill, typebook

logger = logging.getLogger(__name__)

SQL = queries.load("workers", "ops.sql")


def read_model_ddl() -> list[LiteralString]:
    """The DDL of every registered projection's read-model tables."""
    return [cls.ddl for cls in registry.load().values()]


async def run_migrate(database_url: str, schema: str, *, partitions: int | None = None) -> list[int]:
    """Migrate ``schema`` and create the registered read models; return the versions applied now.

    ``partitions``: P of a new schema (EVENTFLEET_PARTITIONS); an existing one must match (see store.migrate).
    """
    conn = await db.connect(database_url, schema)
    try:
        applied = await migrate.migrate(conn, schema, extra_ddl=read_model_ddl(), partitions=partitions)
        # Projections registered since the last migrate get their state; the workers backfill new ones.
        await backfill.register(conn, list(registry.load()))
        # Their types: a new read model's are its code's; a known one's are narrowed to the code's (types a
        # release removed), while types it adds wait for a rebuild (workers/typebook.py).
        await typebook.register(conn, list(registry.load().values()))
        return applied
    finally:
        await conn.close()


async def run_roles(database_url: str, schema: str) -> list[str]:
    """Create the least-privilege roles of ``schema`` and grant them; return the roles created now."""
    tables = [t for cls in registry.load().values() for t in cls.tables]
    conn = await db.connect(database_url, schema)
    try:
        return await roles.apply(conn, schema, tables)
    finally:
        await conn.close()




async def check_migrated(database_url: str, schema: str) -> None:
    """Raise ``SchemaNotMigrated`` unless ``schema`` holds a migrated deployment (one short connection)."""
    conn = await db.connect(database_url, schema)
    try:
        async with db.translate_errors():
            migrated: bool = await conn.fetchval(SQL["is_migrated"], schema)
    finally:
        await conn.close()
    if not migrated:
        raise errors.SchemaNotMigrated(schema)
