"""``eventfleet forget SUBJECT`` and ``eventfleet rewrap-keys``: a subject's data key, and the KEK rotation."""

from __future__ import annotations

import argparse

from workers.config import Settings
from workers.runtime import lifecycle


async def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet forget SUBJECT``: delete the subject's data key and append ``SubjectForgotten``."""
    async with lifecycle.open_pool(settings, application_name="eventfleet forget") as pool:
        first = await lifecycle.open_store(pool, settings).forget(args.subject)
    print(f"subject {args.subject}: {'forgotten' if first else 'already forgotten'}")
    return 0


async def cmd_rewrap_keys(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet rewrap-keys``: wrap every subject key with the newest key-encryption key."""
    async with lifecycle.open_pool(settings, application_name="eventfleet rewrap-keys") as pool:
        store = lifecycle.open_store(pool, settings)
        done = await store.rewrap_keys()
    print(f"rewrapped {done} subject key(s) with key-encryption key {store.keys.require_keks().newest}")
    return 0
