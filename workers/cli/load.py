"""``eventfleet load``: the orders example's writer load through the store API."""

from __future__ import annotations

import argparse

from eventfleet.examples.orders.load import run_load
from store import errors
from workers.config import Settings
from workers.runtime import lifecycle


async def cmd_load(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet load --orders N [--concurrency C] [--seed S]``."""
    if args.orders < 1 or args.concurrency < 1:
        raise errors.InvalidInput("--orders and --concurrency must be at least 1")
    async with lifecycle.open_pool(settings, min_size=1,
                              max_size=args.concurrency + 1) as pool:
        store = lifecycle.open_store(pool, settings)
        report = await run_load(store, args.orders, concurrency=args.concurrency, seed=args.seed)
        await store.notifier.flush()
    print(f"wrote {report.events} events for {report.orders} orders in {report.seconds:.2f}s"
          f" ({report.rate:.0f} events/s, {report.conflicts} version conflicts retried)")
    return 0
