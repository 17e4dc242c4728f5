"""A rebuild of a one-type read model, reading only its type against reading every event (issue 25 item 4).

    python -m bench.typefilter [--events 100000] [--rounds 2]

Seeds a fresh schema (dropped at the end) with bench.rebuild's order lives, in which ``OrderCancelled`` is
about 6% of the events. Then, ``--rounds`` times and alternating (this machine is shared), rebuilds from
scratch a read model of cancelled orders that handles that one type: once as it is (the rebuild reads its
type along events_name_idx) and once declared to take every event (``all_events``: what every rebuild read
before the filter). Prints each and the ratio (target >= 10x). Database: ``EVENTFLEET_DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import time
import uuid
from typing import ClassVar, LiteralString

from bench.rebuild import analyze, drop_schema, fresh_rebuild, redo_on_restart, seed
from eventfleet.examples.orders.events import OrderCancelled
from projections.base import Projection, handles
from store import EventStore, db
from store.event_store import RecordedEvent
from workers import admin, rebuild
from workers.config import DEFAULT_DATABASE_URL

TARGET = 10.0


class Cancellations(Projection):
    """One row per cancelled order: a read model of one type."""

    name = "bench_cancellations"
    tables = ("bench_cancellations",)
    ddl: ClassVar[LiteralString] = ("CREATE TABLE IF NOT EXISTS bench_cancellations"
                                    " (order_id text PRIMARY KEY, reason text NOT NULL)")

    @handles(OrderCancelled)
    async def cancelled(self, conn: db.Conn, event: RecordedEvent) -> None:
        await conn.execute("INSERT INTO bench_cancellations VALUES ($1, $2) ON CONFLICT DO NOTHING",
                           event.event.order_id, event.event.reason)


class EveryEventCancellations(Cancellations):
    """The same read model reading every event, as every rebuild did before the filter."""

    all_events = True


def _recorder(seconds: list[float]) -> rebuild.Progress:
    """A progress callback keeping the seconds of each batch (the last: the reads and applies of the rebuild)."""

    def record(done: int, of: int, so_far: float) -> None:
        seconds.append(so_far)

    return record


async def main(args: argparse.Namespace) -> None:
    dsn = os.environ.get("EVENTFLEET_DATABASE_URL", DEFAULT_DATABASE_URL)
    schema = f"bench_typefilter_{uuid.uuid4().hex[:8]}"
    await admin.run_migrate(dsn, schema)
    try:
        async with db.create_pool(dsn, schema, min_size=2, max_size=6) as pool:
            store = EventStore(pool, schema=schema)
            started = time.perf_counter()
            total = await seed(store, args.events)
            share = await pool.fetchval("SELECT count(*) FROM events WHERE event_type LIKE 'OrderCancelled.%'")
            print(f"seeded {total:,} events in {time.perf_counter() - started:.1f}s ({schema}); "
                  f"OrderCancelled: {share:,} = {100 * share / total:.1f}%")
            await redo_on_restart(lambda: analyze(pool))
            seconds: dict[str, list[float]] = {}
            filling: dict[str, list[float]] = {}
            for round_ in range(1, args.rounds + 1):
                order = (Cancellations, EveryEventCancellations)
                for projection in order if round_ % 2 else order[::-1]:
                    progress: list[float] = [0.0]
                    result = await redo_on_restart(functools.partial(
                        fresh_rebuild, pool, store, projection, args.batch, progress=_recorder(progress)))
                    label = "its type" if projection is Cancellations else "every event"
                    seconds.setdefault(label, []).append(result.seconds)
                    filling.setdefault(label, []).append(progress[-1])
                    print(f"round {round_}: rebuild reading {label:<11} {result.events:,} events in "
                          f"{result.seconds:.3f}s (read and applied in {progress[-1]:.3f}s)")
            for what, figures in (("rebuild", seconds), ("its reads and applies", filling)):
                filtered, full = statistics.mean(figures["its type"]), statistics.mean(figures["every event"])
                # Judged on the round least in its favour: a mean lets one slow round carry the other.
                ratios = [f / t for f, t in zip(figures["every event"], figures["its type"], strict=True)]
                verdict = "PASS" if min(ratios) >= TARGET else "MISS"
                print(f"{what} of a one-type read model: {full:.3f}s reading every event, {filtered:.3f}s "
                      f"reading its type (means); per round {', '.join(f'{r:.1f}x' for r in ratios)} faster, "
                      f"the least {min(ratios):.1f}x (target >= {TARGET:.0f}x) {verdict}")
    finally:
        await drop_schema(dsn, schema)


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.typefilter", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=rebuild.BATCH_SIZE)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
