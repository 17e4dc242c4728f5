"""``eventfleet migrate [--roles]``: create or upgrade the schema, the read models and the roles."""

from __future__ import annotations

import argparse

from store import roles
from workers.admin.migrate import run_migrate, run_roles
from workers.config import Settings


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet migrate [--roles]``."""
    applied = await run_migrate(settings.database_url, settings.schema, partitions=settings.partitions)
    if applied:
        print(f"schema {settings.schema}: applied migrations {', '.join(map(str, applied))}")
    else:
        print(f"schema {settings.schema}: up to date")
    if getattr(args, "roles", False):
        created = await run_roles(settings.database_url, settings.schema)
        print(f"schema {settings.schema}: roles {', '.join(roles.Roles(settings.schema).all())} granted"
              + (f" (created {', '.join(created)})" if created else ""))
    return 0
