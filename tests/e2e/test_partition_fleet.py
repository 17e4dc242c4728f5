"""The fleet on partitions, as real processes: fair shares, a killed worker's partitions taken over, scaling
under load with read models exact, and never two workers applying one partition at once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from projections import registry
from store import NO_STREAM, EventStore, db, queries
from store.event_store import record_from_row
from store.partitions import partition_of
from tests.applied import all_applied as applied_by_all
from tests.conftest import AMQP_URL, DATABASE_URL, new_prefix, new_schema
from tests.unit.test_projection_fold import fold, order_life, read_models
from workers.config import Settings
from workers.fleet import Fleet as Processes
from workers.fleet import Process, open_fleet
from workers.projector import leases
from workers.runtime import retry

pytestmark = pytest.mark.slow

PROJECTIONS = ("customer_stats", "batch_recorder")
#: Every projection whose queues a fleet's relay declares (all of MODULES'): the teardown deletes them all.
DECLARED = (*PROJECTIONS, "order_summary")
#: tests/e2e/recorder.py's P and table. This process does not import it: registering batch_recorder here
#: would make every later test's relay declare its queues too.
PARTITIONS = 16
RECORDER = queries.load("tests.e2e", "recorder.sql")
MODULES = (registry.EXAMPLE, "tests.e2e.recorder")
LEASE_SECONDS = 6
RETRYABLE: tuple[type[BaseException], ...] = (*retry.OUTAGE_ERRORS, asyncpg.PostgresError)


ENV = {"EVENTFLEET_LEASE_SECONDS": str(LEASE_SECONDS), "EVENTFLEET_CATCHUP_THRESHOLD": "0",
       "EVENTFLEET_RELAY_POLL_MS": "100"}


class Fleet:
    """A relay and worker processes on one deployment (schema with 16 partitions, prefix of its own): the
    processes of a ``workers.fleet.Fleet``, workers known by pid (their lease owner names hold it)."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.schema, self.prefix, self.logs = processes.settings.schema, processes.settings.prefix, processes.logs
        self.workers: dict[int, Process] = {}
        self.reports: list[dict[str, dict[str, int]]] = []

    def _start(self, role: str, *args: str) -> Process:
        # AMQP_URL and the TEST_* variables read now: a test may point the processes elsewhere (e.g. a shorter
        # heartbeat) or tune the recorder (TEST_RECORDER_PAUSE_SECONDS) after the fleet was made.
        tests = {k: v for k, v in os.environ.items() if k.startswith("TEST_")}
        process = self.processes.add(role, *args, env={"EVENTFLEET_AMQP_URL": AMQP_URL, **tests})
        process.start()
        return process

    def start_relay(self) -> None:
        self._start("relay")

    def start_worker(self) -> int:
        process = self._start("worker", *(a for p in PROJECTIONS for a in ("--projection", p)))
        self.workers[process.pid] = process
        return process.pid

    def stop(self, pid: int, *, kill: bool = False) -> dict[str, dict[str, int]]:
        """SIGKILL (nothing reported) or SIGTERM: the worker hands over and prints its totals per projection."""
        process = self.workers.pop(pid)
        process.signal(signal.SIGKILL if kill else signal.SIGTERM)
        code = process.current.proc.wait(30)
        if kill:
            return {}
        assert code == 0, self.logs
        process.current.read_final()
        report = process.current.final
        assert report is not None, self.logs
        self.reports.append(report)
        return report

    def stop_all(self) -> None:
        for pid in list(self.workers):
            self.stop(pid)

    def total(self, key: str) -> int:
        """A counter summed over the workers stopped with SIGTERM, over every projection."""
        return sum(p[key] for report in self.reports for p in report.values())

    def alive(self) -> None:
        self.processes.check()


@contextlib.asynccontextmanager
async def deployment(logs: Path, group: str | None = None) -> AsyncIterator[Fleet]:
    """The deployment with the recorder's table (its processes in ``group``, EVENTFLEET_GROUP, when given), torn
    down after (workers.fleet) whatever happened."""
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=new_schema(),
                        prefix=new_prefix(), partitions=PARTITIONS, projection_modules=MODULES, group=group)
    async with open_fleet(settings, logs, env=ENV, projections=PROJECTIONS) as processes:
        conn = await db.connect(DATABASE_URL, settings.schema)
        try:
            await conn.execute(RECORDER["ddl"])
        finally:
            await conn.close()
        yield Fleet(processes)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with deployment(tmp_path) as f:
        yield f


@pytest.fixture
async def pool(fleet: Fleet) -> AsyncIterator[db.Pool]:
    async with db.create_pool(DATABASE_URL, fleet.schema, min_size=1, max_size=4) as p:
        yield p


async def until(check: Callable[[], Awaitable[bool]], within: float, fleet: Fleet, what: str) -> float:
    """Poll ``check`` until true; return the seconds it took."""
    began = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - began
        except RETRYABLE:
            pass
        fleet.alive()
        assert time.monotonic() - began < within, f"{what}: not within {within} s; logs in {fleet.logs}"
        await asyncio.sleep(0.05)


async def shares(pool: db.Pool) -> dict[str, collections.Counter[str]]:
    """Live lease owners' pids and how many partitions each holds, per projection."""
    held: dict[str, collections.Counter[str]] = {p: collections.Counter() for p in PROJECTIONS}
    for lease in await leases.owners(pool):
        if lease.owner is not None and lease.live:
            held[lease.projection][lease.owner.split(":")[1]] += 1
    return held


def balanced(held: dict[str, collections.Counter[str]], pids: set[int]) -> bool:
    """Every live worker holds its fair share (within one) of every projection, and nobody else holds any."""
    for counts in held.values():
        if {int(pid) for pid in counts} != pids or sum(counts.values()) != PARTITIONS:
            return False
        if max(counts.values()) - min(counts.values()) > 1:
            return False
    return True


def streams_in(partitions: set[int], count: int, tag: str) -> Iterator[str]:
    """Order stream ids whose partition is among ``partitions``."""
    i = 0
    while count:
        stream = f"order-{tag}-{i}"
        i += 1
        if partition_of(stream, PARTITIONS) in partitions:
            count -= 1
            yield stream


class Writer:
    """Appends order lives (one stream per order) until stopped; remembers what the store acknowledged."""

    def __init__(self, store: EventStore, tag: str, streams: Iterator[str] | None = None) -> None:
        self.store, self.tag, self.streams = store, tag, streams
        self.rng = random.Random(11)
        self.written = 0
        self.stopping = asyncio.Event()

    async def write(self, orders: int) -> None:
        for i in range(orders):
            stream = next(self.streams) if self.streams is not None else f"order-{self.tag}-{i}"
            await self.store.append(stream, order_life(stream, f"c{i % 13}", 4, self.rng), NO_STREAM)
            self.written += 4

    async def run(self, per_second: float) -> None:
        i = 0
        while not self.stopping.is_set():
            stream = f"order-{self.tag}-{i}"
            await self.store.append(stream, order_life(stream, f"c{i % 13}", 4, self.rng), NO_STREAM)
            self.written += 4
            i += 1
            await asyncio.sleep(4 / per_second)


async def all_applied(pool: db.Pool) -> bool:
    """Every stored event is applied by both projections (customer_stats: those of its types)."""
    return await applied_by_all(pool, PROJECTIONS)


async def assert_exact(pool: db.Pool) -> None:
    """customer_stats equals the fold of the store, and batch_recorder counted every event exactly once."""
    rows = await pool.fetch("SELECT global_position, event_id, stream_id, version, event_type, data, metadata, "
                            "recorded_at, transaction_id FROM events ORDER BY global_position")
    events = [record_from_row(r) for r in rows]
    async with pool.acquire() as conn:
        assert (await read_models(conn)).customer_stats == fold(e.event for e in events).customer_stats
    recorded = await pool.fetchval("SELECT sum(events) FROM batch_recorder")
    assert recorded == len(events)


def overlaps(batches: list[Any]) -> list[tuple[Any, Any]]:
    """Pairs of batches of one partition by different processes whose apply intervals overlap."""
    found = []
    by_partition: dict[int, list[Any]] = collections.defaultdict(list)
    for b in batches:
        by_partition[b["partition"]].append(b)
    for rows in by_partition.values():
        rows.sort(key=lambda r: r["started_at"])
        latest_end: dict[int, Any] = {}
        for row in rows:
            for pid, ended in latest_end.items():
                if pid != row["pid"] and ended > row["started_at"]:
                    found.append((pid, row))
            latest_end[row["pid"]] = max(row["ended_at"], latest_end.get(row["pid"], row["ended_at"]))
    return found


async def test_four_workers_on_sixteen_partitions_hold_fair_shares_within_ten_seconds(fleet, pool):
    pids = {fleet.start_worker() for _ in range(4)}
    # From the last worker's start: each has to import, connect and register first.
    seconds = await until(lambda: _balanced(pool, pids), 10 + 10, fleet, "fair shares")
    assert balanced(await shares(pool), pids)
    print(f"fair shares after {seconds:.1f} s")


async def _balanced(pool: db.Pool, pids: set[int]) -> bool:
    return balanced(await shares(pool), pids)


async def test_a_killed_workers_partitions_are_owned_and_applied_by_the_others_within_the_lease_plus_five_s(
        fleet, pool):
    fleet.start_relay()
    pids = {fleet.start_worker() for _ in range(4)}
    await until(lambda: _balanced(pool, pids), 30, fleet, "fair shares")
    victim = min(pids)
    theirs = {lease.partition for lease in await leases.owners(pool)
              if lease.owner is not None and lease.owner.split(":")[1] == str(victim)
              and lease.projection == "customer_stats"}
    fleet.stop(victim, kill=True)
    killed = time.monotonic()
    store = EventStore(pool, schema=fleet.schema)
    await Writer(store, "after-kill", streams_in(theirs, 20, "k")).write(20)
    rest = pids - {victim}
    await until(lambda: _balanced(pool, rest), LEASE_SECONDS + 5, fleet, "the victim's partitions owned")
    await until(lambda: all_applied(pool), LEASE_SECONDS + 5 - (time.monotonic() - killed), fleet,
                "the victim's partitions applied")
    appliers = {r["pid"] for r in await pool.fetch("SELECT DISTINCT pid FROM batch_recorder")}
    assert appliers <= rest
    assert appliers
    await assert_exact(pool)


async def test_scaling_one_to_four_to_two_under_load_keeps_read_models_exact_and_partitions_unshared(fleet, pool):
    fleet.start_relay()
    first = fleet.start_worker()
    await until(lambda: _balanced(pool, {first}), 30, fleet, "one worker holding everything")
    writer = Writer(EventStore(pool, schema=fleet.schema), "scale")
    writing = asyncio.create_task(writer.run(per_second=400))
    try:
        await asyncio.sleep(2)
        pids = {first} | {fleet.start_worker() for _ in range(3)}
        await until(lambda: _balanced(pool, pids), 20, fleet, "four fair shares")
        await asyncio.sleep(2)
        for pid in sorted(pids - {first})[:2]:
            fleet.stop(pid)  # SIGTERM: hands its partitions over
            pids.discard(pid)
        await until(lambda: _balanced(pool, pids), 10, fleet, "two fair shares")
        await asyncio.sleep(2)
    finally:
        writer.stopping.set()
        await writing
    await until(lambda: all_applied(pool), 60, fleet, "everything applied")
    await assert_exact(pool)
    batches = await pool.fetch("SELECT partition, pid, events, started_at, ended_at FROM batch_recorder")
    assert {b["pid"] for b in batches} > {first}  # the partitions did move
    assert overlaps(batches) == []
    fleet.stop_all()
    # Every handover was graceful: the old owner committed and acked before it released the lease.
    assert (fleet.total("duplicates"), fleet.total("gaps_filled")) == (0, 0)


#: The most duplicates one partition's handover can cost after a kill: the killed owner's transaction in
#: flight, committed but not acked, is delivered again (a transaction takes whole messages until it has
#: EVENTFLEET_BATCH_SIZE events, so at most that many plus a message less one).
BATCH_SIZE, MESSAGE_EVENTS = 200, 100
HANDOVER_BOUND = BATCH_SIZE + MESSAGE_EVENTS - 1


async def test_a_kill_under_load_costs_at_most_one_transaction_per_partition_in_duplicates(fleet, pool):
    fleet.start_relay()
    pids = {fleet.start_worker() for _ in range(4)}
    await until(lambda: _balanced(pool, pids), 30, fleet, "fair shares")
    victim = min(pids)
    held = sum(1 for lease in await leases.owners(pool)
               if lease.owner is not None and lease.owner.split(":")[1] == str(victim))
    writer = Writer(EventStore(pool, schema=fleet.schema), "kill")
    writing = asyncio.create_task(writer.run(per_second=800))
    try:
        await asyncio.sleep(3)
        fleet.stop(victim, kill=True)
        await until(lambda: _balanced(pool, pids - {victim}), LEASE_SECONDS + 5, fleet, "taken over")
        await asyncio.sleep(1)
    finally:
        writer.stopping.set()
        await writing
    await until(lambda: all_applied(pool), 60, fleet, "everything applied")
    await assert_exact(pool)
    fleet.stop_all()
    duplicates = fleet.total("duplicates")
    assert duplicates <= held * HANDOVER_BOUND
    assert fleet.total("handover_duplicates") == duplicates  # every duplicate was the victim's redelivery
