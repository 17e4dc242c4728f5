"""``eventfleet demo``: the main job end to end on one machine, in under a minute.

Checks that PostgreSQL and RabbitMQ answer (saying which one does not and how to start it), migrates a
schema of its own (``eventfleet_demo_<random>``, the same name as RabbitMQ prefix), starts one relay and
three workers as subprocesses, runs the writer load while showing written / published / applied and the
lag, waits for lag 0, replays the store into scratch tables through the handlers one event at a time and
compares every read-model row, prints a summary and cleans up its schema and queues. Exit 0 only if every
row matched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from eventfleet.examples.orders import load
from eventfleet.examples.orders.events import OrderCancelled, OrderPaid
from projections import registry
from store import EventStore, db, names, queries
from store.partitions import DEFAULT_PARTITIONS
from store.records import record_from_row
from workers import admin, broker, errors
from workers.admin import verify as admin_verify
from workers.config import Settings
from workers.projector import lag
from workers.runtime import lifecycle, redact, retry

SQL = queries.load("workers", "ops.sql")
WORKERS = 3
READY_WITHIN = 60.0
DRAIN_WITHIN = 120.0
CONNECT_TIMEOUT = 5.0
#: The example's reactor, which the demo runs besides the projections, and its timeout there.
REACTORS = "eventfleet.examples.orders.reactors"
PAYMENT_TIMEOUT_SECONDS = 3.0


@dataclasses.dataclass
class Child:
    """A relay or worker subprocess with its HTTP port and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in text)




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def preflight(settings: Settings) -> None:
    """Raise errors.DemoFailed naming the service that does not answer and how to start it."""
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=CONNECT_TIMEOUT)
        await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise errors.DemoFailed(
            f"PostgreSQL is not reachable at {redact.url(settings.database_url)} ({type(exc).__name__}: {exc}).\n"
            "  Start it, e.g. `pg_ctlcluster 15 main start`, or `docker run -d -p 5432:5432 "
            "-e POSTGRES_HOST_AUTH_METHOD=trust postgres:15`; or point EVENTFLEET_DATABASE_URL at it.") from exc
    quiet = logging.getLogger("aiormq.connection")
    level, quiet.level = quiet.level, logging.CRITICAL  # it logs the refused connection we report below
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=CONNECT_TIMEOUT)
        await connection.close()
    except retry.OUTAGE_ERRORS as exc:
        raise errors.DemoFailed(
            f"RabbitMQ is not reachable at {redact.url(settings.amqp_url)} ({type(exc).__name__}: {exc}).\n"
            "  Start it, e.g. `rabbitmq-server -detached`, or `docker run -d -p 5672:5672 rabbitmq:3`; "
            "or point EVENTFLEET_AMQP_URL at it.") from exc
    finally:
        quiet.setLevel(level)


class Fleet:
    """The relay and workers of the demo, as subprocesses of this one."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings, self.logs = settings, logs
        self.children: list[Child] = []

    def start(self, name: str, *args: str) -> None:
        port = _free_port()
        env = {**os.environ, "EVENTFLEET_DATABASE_URL": self.settings.database_url,
               "EVENTFLEET_AMQP_URL": self.settings.amqp_url, "EVENTFLEET_SCHEMA": self.settings.schema,
               "EVENTFLEET_PREFIX": self.settings.prefix, "EVENTFLEET_HTTP_PORT": str(port),
               "EVENTFLEET_LOG_FORMAT": "text",
               "EVENTFLEET_PROJECTION_MODULES": ",".join(self.settings.projection_modules),
               "EVENTFLEET_EXAMPLE_PAYMENT_TIMEOUT_SECONDS": str(PAYMENT_TIMEOUT_SECONDS)}
        log = self.logs / f"{name}.log"
        with log.open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "workers", *args], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        self.children.append(Child(name, proc, port, log))

    def check_alive(self) -> None:
        for child in self.children:
            if child.proc.poll() is not None:
                raise errors.DemoFailed(f"{child.name} exited with status {child.proc.returncode}; its log:\n{child.tail()}")

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + READY_WITHIN
        waiting = list(self.children)
        while waiting:
            self.check_alive()
            if time.monotonic() > deadline:
                raise errors.DemoFailed(f"{', '.join(c.name for c in waiting)} not ready after {READY_WITHIN:.0f}s")
            still = []
            for child in waiting:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"http://127.0.0.1:{child.port}/readyz") as response:
                        if response.status == 200:
                            continue
                still.append(child)
            waiting = still
            if waiting:
                await asyncio.sleep(0.1)

    async def scrape(self, session: aiohttp.ClientSession) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Every worker's samples, summed across workers: {sample name: {labels: value}}."""
        merged: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for child in self.children:
            if not child.name.startswith("worker"):
                continue
            async with session.get(f"http://127.0.0.1:{child.port}/metrics") as response:
                text = await response.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name.startswith("eventfleet_"):
                        series = merged.setdefault(sample.name, {})
                        key = tuple(sorted(sample.labels.items()))
                        series[key] = series.get(key, 0.0) + sample.value
        return merged

    def stop(self) -> None:
        """SIGTERM everyone, wait, SIGKILL the stragglers."""
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.stop_timeout + 5
        for child in self.children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


def total(samples: dict[tuple[tuple[str, str], ...], float] | None) -> float:
    return sum((samples or {}).values())


def quantile(q: float, samples: dict[tuple[tuple[str, str], ...], float] | None) -> float:
    """histogram_quantile over the buckets of every label set merged (linear within a bucket)."""
    buckets: dict[float, float] = {}
    for labels, value in (samples or {}).items():
        le = float(dict(labels)["le"])
        buckets[le] = buckets.get(le, 0.0) + value
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] == 0:
        return math.nan
    rank, lower, below = q * ordered[-1][1], 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = le, count
    return lower


@dataclasses.dataclass
class Snapshot:
    """Counts from one database snapshot; ``lag`` is the gauges' figure (done when it is 0 everywhere)."""

    written: int
    published: int
    applied: int  # by the slowest projection
    lag_events: int
    lag_seconds: float


async def snapshot(pool: db.Pool, projections: list[str]) -> Snapshot:
    """Where the pipeline stands now."""
    lag_events, lag_seconds = 0, 0.0
    for name in projections:
        measured = await lag.measure(pool, name)
        lag_events, lag_seconds = max(lag_events, measured.lag_events), max(lag_seconds, measured.lag_seconds)
    async with db.translate_errors():
        row = await pool.fetchrow(SQL["pipeline_counts"], projections)
    assert row is not None
    return Snapshot(row["written"], row["written"] - row["pending"], row["applied"], lag_events, lag_seconds)


def show(s: Snapshot, final: bool = False) -> None:
    width = 24
    done = min(width, int(width * s.applied / s.written)) if s.written else 0
    line = (f"[{'#' * done}{'.' * (width - done)}] written {s.written:,}  published {s.published:,}  "
            f"applied {s.applied:,}  lag {s.written - s.applied:,} events / {s.lag_seconds:.1f}s")
    if sys.stderr.isatty():
        print("\r" + line.ljust(110), end="\n" if final else "", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


async def run_with_progress(pool: db.Pool, store: EventStore, orders: int,
                            projections: list[str], fleet: Fleet) -> tuple[load.LoadReport, float]:
    """Run the load, showing progress, then wait for lag 0; return the load report and seconds to lag 0."""
    started = time.perf_counter()
    writer = asyncio.create_task(load.run_load(store, orders, concurrency=8, seed=1))
    every = 0.25 if sys.stderr.isatty() else 2.0
    deadline: float | None = None
    try:
        while True:
            await asyncio.wait({writer}, timeout=every)
            fleet.check_alive()
            current = await snapshot(pool, projections)
            if writer.done():
                report = writer.result()
                deadline = deadline or time.monotonic() + DRAIN_WITHIN
                if current.lag_events == 0 and current.written == current.published == current.applied:
                    show(current, final=True)
                    return report, time.perf_counter() - started
                if time.monotonic() > deadline:
                    show(current, final=True)
                    raise errors.DemoFailed(f"lag still {current.lag_events} events after {DRAIN_WITHIN:.0f}s")
                every = 0.1
            show(current)
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


async def wait_for_timeouts(pool: db.Pool, projections: list[str], fleet: Fleet) -> float:
    """Wait until every deadline fired and the fleet applied their follow-ups; return the seconds waited."""
    began = time.monotonic()
    while True:
        fleet.check_alive()
        async with db.translate_errors():
            pending: int = await pool.fetchval(SQL["deadlines_pending"])
        current = await snapshot(pool, projections)
        if pending == 0 and current.lag_events == 0 and current.written == current.published == current.applied:
            return time.monotonic() - began
        if time.monotonic() - began > DRAIN_WITHIN + PAYMENT_TIMEOUT_SECONDS:
            raise errors.DemoFailed(f"{pending} payment timeouts still pending")
        await asyncio.sleep(0.2)


async def timeouts(pool: db.Pool) -> Timeouts:
    """Count from the store's events (their reasons are in the payloads)."""
    reason: str = importlib.import_module(REACTORS).REASON
    async with db.translate_errors():
        rows = await pool.fetch(SQL["events_named"], ["OrderPlaced", "OrderPaid", "OrderCancelled"])
        refused: int = await pool.fetchval(SQL["refusals"], "payment_timeout")
    placed, settled, timed_out = set(), set(), []
    for event in map(record_from_row, rows):
        if isinstance(event.event, OrderCancelled) and event.event.reason == reason:
            timed_out.append(event.stream_id)
        elif isinstance(event.event, OrderPaid | OrderCancelled):
            settled.add(event.stream_id)
        else:
            placed.add(event.stream_id)
    return Timeouts(len(placed - settled), len(timed_out), len(set(timed_out)), refused)


async def clean_up(settings: Settings) -> None:
    """Drop the demo's schema, queues and exchanges."""
    with contextlib.suppress(*retry.OUTAGE_ERRORS, asyncpg.PostgresError):
        conn = await asyncpg.connect(settings.database_url, timeout=CONNECT_TIMEOUT)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {names.quote(settings.schema)} CASCADE")
        finally:
            await conn.close()
    with contextlib.suppress(*retry.OUTAGE_ERRORS):
        connection = await aio_pika.connect(settings.amqp_url, timeout=CONNECT_TIMEOUT)
        async with connection:
            channel = await connection.channel()
            await broker.delete_topology(channel, broker.Names(settings.prefix), registry.load(settings.projection_modules),
                                         settings.partitions or DEFAULT_PARTITIONS)


async def run_demo(settings: Settings, orders: int, logs: Path) -> bool:
    """Everything between preflight and clean-up; True if every read-model row matched the replay."""
    began = time.perf_counter()
    print(f"demo: schema and prefix {settings.schema}; logs in {logs}")
    await admin.run_migrate(settings.database_url, settings.schema, partitions=settings.partitions)
    projections = list(registry.load(settings.projection_modules))
    fleet = Fleet(settings, logs)
    fleet.start("relay", "relay")
    for n in range(1, WORKERS + 1):
        fleet.start(f"worker{n}", "worker")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
                lifecycle.open_pool(settings, min_size=2, max_size=10) as pool:
            await fleet.wait_ready(http)
            print(f"demo: 1 relay and {WORKERS} workers ready after {time.perf_counter() - began:.1f}s; "
                  f"writing {orders:,} orders "
                  f"({', '.join(projections)} projected)")
            store = lifecycle.open_store(pool, settings)
            report, seconds = await run_with_progress(pool, store, orders, projections, fleet)
            waited = await wait_for_timeouts(pool, projections, fleet)
            timed_out = await timeouts(pool)
            samples = await fleet.scrape(http)
            fleet.stop()
            checked = await verify(pool, store)
    finally:
        fleet.stop()
    end_to_end = samples.get("eventfleet_end_to_end_seconds_bucket")
    print(f"events:      {report.events:,} for {report.orders:,} orders, {report.conflicts:,} version conflicts "
          f"retried; written at {report.rate:,.0f} events/s")
    print(f"throughput:  {report.events / seconds:,.0f} events/s from the first write to lag 0 ({seconds:.1f}s), "
          f"{total(samples.get('eventfleet_projection_applied_total')):,.0f} applications over "
          f"{len(projections)} projections")
    print(f"end to end:  p50 {1000 * quantile(0.5, end_to_end):,.0f} ms, p99 {1000 * quantile(0.99, end_to_end):,.0f} ms "
          "(recorded_at to read-model commit, from the workers' histograms)")
    print(f"delivery:    {total(samples.get('eventfleet_projection_duplicates_total')):,.0f} duplicates skipped, "
          f"{total(samples.get('eventfleet_projection_gaps_filled_total')):,.0f} gaps filled from the store, "
          f"{total(samples.get('eventfleet_projection_dead_lettered_total')):,.0f} dead-lettered")
    print(f"timeouts:    {timed_out.unpaid:,} orders left unpaid, {timed_out.cancelled:,} cancelled by payment_timeout "
          f"after {PAYMENT_TIMEOUT_SECONDS:.0f}s ({timed_out.streams:,} orders, {timed_out.refused:,} refused as paid "
          f"meanwhile; the last fired {waited:.1f}s after lag 0): "
          + ("match" if timed_out.ok else "MISMATCH"))
    print("read models against a replay of the store:")
    for table, rows, mismatched in checked:
        print(f"  {table:<16} {rows:>8,} rows  " + ("match" if mismatched == 0 else f"{mismatched:,} rows differ"))
    ok = all(mismatched == 0 for _, _, mismatched in checked) and timed_out.ok
    print(("result: OK" if ok else "result: MISMATCH") + f" (demo took {time.perf_counter() - began:.1f}s)")
    return ok


async def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet demo [--orders N]``."""
    name = f"eventfleet_demo_{uuid.uuid4().hex[:8]}"
    # The demo runs the orders example: it names its projections itself (and whatever else is configured).
    settings = dataclasses.replace(settings, schema=name, prefix=name).with_projection_modules(
        registry.EXAMPLE, REACTORS)
    registry.load(settings.projection_modules)
    try:
        await preflight(settings)
    except errors.DemoFailed as exc:
        print(f"eventfleet demo: {exc}", file=sys.stderr)
        return 1
    logs = Path(tempfile.mkdtemp(prefix="eventfleet-demo-"))
    ok = False
    try:
        ok = await run_demo(settings, args.orders, logs)
    except errors.DemoFailed as exc:
        print(f"eventfleet demo: {exc}", file=sys.stderr)
    finally:
        await clean_up(settings)
    if ok:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"eventfleet demo: failed; the processes' logs are in {logs}", file=sys.stderr)
    return 0 if ok else 1
