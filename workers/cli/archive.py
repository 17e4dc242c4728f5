"""``eventfleet close-stream STREAM`` and ``eventfleet archive STREAM --yes``: the end of a stream's life."""

from __future__ import annotations

import argparse
import sys

from store import archive
from workers.admin import archive as admin
from workers.config import Settings
from workers.runtime import lifecycle


async def cmd_close_stream(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet close-stream STREAM [--reason TEXT]``: append ``StreamClosed``; appends fail from then on."""
    async with lifecycle.open_pool(settings, application_name="eventfleet close-stream") as pool:
        version = await archive.close(lifecycle.open_store(pool, settings), args.stream, reason=args.reason)
    print(f"stream {args.stream}: closed at version {version}")
    return 0


async def cmd_archive(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet archive STREAM --reason TEXT [--by WHO] [--yes]``: without ``--yes``, say what it would do
    and exit 2; with it, move the closed stream's events to ``events_archive``, audited."""
    async with lifecycle.open_pool(settings, application_name="eventfleet archive") as pool:
        store = lifecycle.open_store(pool, settings)
        if not args.yes:
            print(f"eventfleet archive: refusing without --yes; {admin.describe(await archive.preview(store, args.stream))}",
                  file=sys.stderr)
            return 2
        entry = await archive.archive(store, args.stream, archived_by=args.by or admin.operator(), reason=args.reason)
    print(admin.report(entry))
    return 0
