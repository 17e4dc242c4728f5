"""Small subcommands that need no module of their own."""

from __future__ import annotations

import argparse
import logging
from typing import LiteralString

from projections import registry
from store import db, migrate
from workers.config import Settings

logger = logging.getLogger(__name__)


def read_model_ddl() -> list[LiteralString]:
    """The DDL of every registered projection's read-model tables."""
    return [cls.ddl for cls in registry.load_builtin().values()]


async def run_migrate(database_url: str, schema: str) -> list[int]:
    """Migrate ``schema`` and create the registered read models; return the versions applied now."""
    conn = await db.connect(database_url, schema)
    try:
        return await migrate.migrate(conn, schema, extra_ddl=read_model_ddl())
    finally:
        await conn.close()


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet migrate``."""
    applied = await run_migrate(settings.database_url, settings.schema)
    if applied:
        print(f"schema {settings.schema}: applied migrations {', '.join(map(str, applied))}")
    else:
        print(f"schema {settings.schema}: up to date")
    return 0
