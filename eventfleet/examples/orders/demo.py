"""What ``eventfleet demo`` runs (``workers/cli/demo.py`` checks the services and calls ``run_demo``).

On a deployment of its own (``workers.fleet``): one relay and three workers as processes, ready and their
partition leases dealt (each holds its share: no handover while the load runs), the orders load with progress
and lag, lag 0, every payment timeout fired and its cancellation applied, the read models compared with a
replay of the store, a summary (end-to-end latency per subscriber, after the first ``WARM_UP_SECONDS`` of the
load, as bench.pipeline measures it); the deployment is torn down on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

from eventfleet.examples.orders import load, reactors
from eventfleet.examples.orders.events import OrderCancelled, OrderPaid
from projections import registry
from projections.reactor import Reactor
from store import EventStore, db
from store.records import record_from_row
from workers import broker, errors, fleet
from workers.admin import verify as admin_verify
from workers.config import Settings
from workers.fleet import metrics, progress
from workers.runtime import lifecycle

SQL = progress.SQL
WORKERS = 3
DRAIN_WITHIN = 120.0
#: How long the demo waits for the workers' leases to be dealt before it writes anyway.
DEAL_WITHIN = 30.0
#: The first seconds of the load, left out of the latency figures (bench.pipeline leaves out as many).
WARM_UP_SECONDS = 2.0
E2E = "eventfleet_end_to_end_seconds_bucket"
#: The payment_timeout reactor's timeout in the demo (the example's default is 15 minutes).
PAYMENT_TIMEOUT_SECONDS = 3.0
#: The modules the demo's processes load: the example's projections and its reactor.
MODULES = (registry.EXAMPLE, reactors.__name__)


async def run_with_progress(pool: db.Pool, store: EventStore, orders: int, projections: list[str],
                            processes: fleet.Fleet) -> tuple[load.LoadReport, float, metrics.Samples]:
    """Run the load, showing progress, then wait for lag 0; return the load report, seconds to lag 0 and the
    workers' samples at the end of the warm-up (``WARM_UP_SECONDS`` after the first write)."""
    started = time.perf_counter()
    writer = asyncio.create_task(load.run_load(store, orders, concurrency=8, seed=1))
    every = 0.25 if sys.stderr.isatty() else 2.0
    deadline: float | None = None
    warm: metrics.Samples | None = None
    try:
        while True:
            elapsed = time.perf_counter() - started
            await asyncio.wait({writer}, timeout=every if warm is not None else min(every, WARM_UP_SECONDS - elapsed))
            if warm is None and time.perf_counter() - started >= WARM_UP_SECONDS:
                warm = await processes.scrape_all("worker")
            processes.check()
            current = await progress.snapshot(pool, projections)
            if writer.done():
                report = writer.result()
                deadline = deadline or time.monotonic() + DRAIN_WITHIN
                if current.drained:
                    progress.show(current, final=True)
                    seconds = time.perf_counter() - started
                    return report, seconds, warm if warm is not None else {}
                if time.monotonic() > deadline:
                    progress.show(current, final=True)
                    raise errors.DemoFailed(f"lag still {current.lag_events} events after {DRAIN_WITHIN:.0f}s")
                every = 0.1
            progress.show(current)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer


async def verify(pool: db.Pool, store: EventStore) -> list[tuple[str, int, int]]:
    """Replay the store into scratch tables per projection and compare; (table, rows, mismatched rows).
    Reactors have no read model to compare: ``timeouts`` checks theirs against the store."""
    return [(t.table, t.rows, t.mismatched) for checked in await admin_verify.verify_all(pool, store)
            for t in checked.tables]


@dataclasses.dataclass(frozen=True, slots=True)
class Timeouts:
    """The payment_timeout reactor's work, from the store: orders never paid, and timeout cancellations."""

    unpaid: int  # orders whose only event before any cancellation is the placement
    cancelled: int  # OrderCancelled events with the timeout's reason
    streams: int  # distinct orders those cancelled
    refused: int  # cancellations the domain refused (paid meanwhile)

    @property
    def ok(self) -> bool:
        return self.unpaid == self.cancelled == self.streams


async def wait_for_timeouts(pool: db.Pool, projections: list[str], processes: fleet.Fleet) -> float:
    """Wait until every deadline fired and the fleet applied their follow-ups; return the seconds waited."""
    began = time.monotonic()
    while True:
        processes.check()
        async with db.translate_errors():
            pending: int = await pool.fetchval(SQL["deadlines_pending"])
        current = await progress.snapshot(pool, projections)
        if pending == 0 and current.drained:
            return time.monotonic() - began
        if time.monotonic() - began > DRAIN_WITHIN + PAYMENT_TIMEOUT_SECONDS:
            raise errors.DemoFailed(f"{pending} payment timeouts still pending")
        await asyncio.sleep(0.2)


async def timeouts(pool: db.Pool) -> Timeouts:
    """Count from the store's events (their reasons are in the payloads)."""
    async with db.translate_errors():
        rows = await pool.fetch(SQL["events_named"], ["OrderPlaced", "OrderPaid", "OrderCancelled"])
        refused: int = await pool.fetchval(SQL["refusals"], "payment_timeout")
    placed, settled, timed_out = set(), set(), []
    for event in map(record_from_row, rows):
        if isinstance(event.event, OrderCancelled) and event.event.reason == reactors.REASON:
            timed_out.append(event.stream_id)
        elif isinstance(event.event, OrderPaid | OrderCancelled):
            settled.add(event.stream_id)
        else:
            placed.add(event.stream_id)
    return Timeouts(len(placed - settled), len(timed_out), len(set(timed_out)), refused)


async def run_demo(settings: Settings, orders: int, logs: Path) -> bool:
    """The demo on a deployment of its own (removed after); True if every read-model row matched the replay."""
    began = time.perf_counter()
    print(f"demo: schema and prefix {settings.schema}; logs in {logs}")
    projections = list(registry.load(settings.projection_modules))
    env = {"EVENTFLEET_LOG_FORMAT": "text", "EVENTFLEET_EXAMPLE_PAYMENT_TIMEOUT_SECONDS": str(PAYMENT_TIMEOUT_SECONDS)}
    async with fleet.open_fleet(settings, logs, env=env) as processes, \
            lifecycle.open_pool(settings, min_size=2, max_size=10) as pool:
        processes.add("relay").start()
        for _ in range(WORKERS):
            processes.add("worker").start()
        await processes.wait_ready()
        ready = time.perf_counter() - began
        store = lifecycle.open_store(pool, settings)
        # Writing before the leases are dealt would load a worker that holds every partition while it hands
        # most of them over: the first seconds' events would wait for the handovers.
        leased = projections if settings.group is None else [broker.group_lease(settings.group)]
        dealing = await progress.wait_dealt(pool, leased, await store.partitions(), WORKERS, DEAL_WITHIN)
        dealt = (f"their leases dealt {dealing:.1f}s later" if dealing is not None
                 else f"their leases not dealt after {DEAL_WITHIN:.0f}s")
        print(f"demo: 1 relay and {WORKERS} workers ready after {ready:.1f}s, {dealt}; writing {orders:,} orders "
              f"({', '.join(projections)} projected)")
        report, seconds, warm = await run_with_progress(pool, store, orders, projections, processes)
        waited = await wait_for_timeouts(pool, projections, processes)
        timed_out = await timeouts(pool)
        samples = await processes.scrape_all("worker")
        await processes.stop_all(settings.stop_timeout + 5)
        checked = await verify(pool, store)
    reactor_names = {name for name, cls in registry.load().items() if issubclass(cls, Reactor)}
    summary(report, seconds, len(projections), samples, timed_out, waited, warm, reactor_names)
    print("read models against a replay of the store:")
    for table, rows, mismatched in checked:
        print(f"  {table:<16} {rows:>8,} rows  " + ("match" if mismatched == 0 else f"{mismatched:,} rows differ"))
    ok = all(mismatched == 0 for _, _, mismatched in checked) and timed_out.ok
    print(("result: OK" if ok else "result: MISMATCH") + f" (demo took {time.perf_counter() - began:.1f}s)")
    return ok


def since(after: metrics.Samples, before: metrics.Samples, name: str) -> dict[metrics.Labels, float]:
    """The observations of a histogram's buckets made between two scrapes."""
    old = before.get(name, {})
    return {labels: value - old.get(labels, 0.0) for labels, value in after.get(name, {}).items()}


def latency_lines(samples: metrics.Samples, warm: metrics.Samples, reactors_: set[str]) -> list[str]:
    """End to end after the warm-up: every subscriber's observations merged, then each subscriber's."""
    end_to_end = since(samples, warm, E2E)
    whole = samples.get(E2E)
    lines = [(f"end to end:  p50 {1000 * metrics.quantile(0.5, end_to_end):,.0f} ms, "
              f"p99 {1000 * metrics.quantile(0.99, end_to_end):,.0f} ms over every subscriber after the first "
              f"{WARM_UP_SECONDS:.0f}s (recorded_at to commit, the workers' histograms; the whole run: "
              f"p50 {1000 * metrics.quantile(0.5, whole):,.0f} ms, p99 {1000 * metrics.quantile(0.99, whole):,.0f} ms)")]
    for name in sorted({dict(labels).get("projection", "") for labels in end_to_end}):
        mine = {labels: v for labels, v in end_to_end.items() if dict(labels).get("projection") == name}
        count = sum(v for labels, v in mine.items() if dict(labels)["le"] == "+Inf")
        lines.append(f"             {name:<16} p50 {1000 * metrics.quantile(0.5, mine):6,.0f} ms, "
                     f"p99 {1000 * metrics.quantile(0.99, mine):6,.0f} ms"
                     f"  ({'reactor' if name in reactors_ else 'read model'}, {count:,.0f} events)")
    return lines


def summary(report: load.LoadReport, seconds: float, projections: int, samples: metrics.Samples,
            timed_out: Timeouts, waited: float, warm: metrics.Samples, reactors_: set[str]) -> None:
    """The figures of the run: the load, throughput, end-to-end latency, delivery, timeouts."""
    print(f"events:      {report.events:,} for {report.orders:,} orders, {report.conflicts:,} version conflicts "
          f"retried; written at {report.rate:,.0f} events/s")
    print(f"throughput:  {report.events / seconds:,.0f} events/s from the first write to lag 0 ({seconds:.1f}s), "
          f"{metrics.total(samples.get('eventfleet_projection_applied_total')):,.0f} applications over "
          f"{projections} projections")
    print("\n".join(latency_lines(samples, warm, reactors_)))
    print(f"delivery:    {metrics.total(samples.get('eventfleet_projection_duplicates_total')):,.0f} duplicates skipped, "
          f"{metrics.total(samples.get('eventfleet_projection_gaps_filled_total')):,.0f} gaps filled from the store, "
          f"{metrics.total(samples.get('eventfleet_projection_dead_lettered_total')):,.0f} dead-lettered")
    print(f"timeouts:    {timed_out.unpaid:,} orders left unpaid, {timed_out.cancelled:,} cancelled by payment_timeout "
          f"after {PAYMENT_TIMEOUT_SECONDS:.0f}s ({timed_out.streams:,} orders, {timed_out.refused:,} refused as paid "
          f"meanwhile; the last fired {waited:.1f}s after lag 0): "
          + ("match" if timed_out.ok else "MISMATCH"))
