"""``eventfleet retire NAME [--drop-tables] --yes``: remove a read model that is no longer in the code."""

from __future__ import annotations

import argparse
import sys

from store import db
from workers import errors
from workers.admin.retire import plan, retire
from workers.admin.status import AMQP_TIMEOUT
from workers.config import Settings
from workers.runtime import amqp, retry


async def cmd_retire(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet retire NAME [--drop-tables] [--yes]``: without ``--yes``, say what would go and exit 2."""
    try:
        connection = await amqp.connect(settings.amqp_urls, name="eventfleet retire", attempt_seconds=AMQP_TIMEOUT)
    except retry.OUTAGE_ERRORS as exc:
        why = f"{exc}" if isinstance(exc, errors.BrokerUnavailable) else type(exc).__name__
        raise errors.BrokerUnavailable(f"{why}; nothing removed") from exc
    async with connection:
        conn = await db.connect(settings.database_url, settings.schema)
        try:
            found = await plan(conn, settings.prefix, args.name, connection, lease_seconds=settings.lease_seconds)
            if not args.yes:
                print(f"eventfleet retire: refusing without --yes; it would remove, of read model {args.name} in "
                      f"schema {settings.schema} and prefix {settings.prefix}:", file=sys.stderr)
                for line in found.describe(drop_tables=args.drop_tables):
                    print(f"  {line}", file=sys.stderr)
                return 2
            await retire(conn, found, connection, drop_tables=args.drop_tables)
        finally:
            await conn.close()
    for line in found.describe(drop_tables=args.drop_tables):
        print(f"retired {args.name}: {line}")
    return 0
