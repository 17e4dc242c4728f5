"""A deployment on the RabbitMQ cluster for fault scenarios: a relay and worker processes, writers, a sampler of
the read side's progress, and the figures of one scenario.

A scenario (``Scenario.run``) migrates a schema of its own with P=6, starts a relay and two workers
(``python -m workers relay|worker``, every node's URL in ``EVENTFLEET_AMQP_URL``), appends order lives at a
steady rate, injects its fault, keeps writing, waits until every event is applied, stops the workers
(SIGTERM: each prints its per-projection stats as the last line) and the relay, and checks that
``customer_stats`` and ``order_summary`` equal the fold of the store.

Figures (``Figures``):

- written: events appended (and acknowledged by the store); applied, duplicates, gap fills, caught up:
  the customer_stats totals of the workers' stats;
- lost: events of the store order_summary never applied (a stream checkpoint short of the stream's last
  version), plus any counter of customer_stats below the fold; doubled: counters above the fold (orders placed
  or cancelled counted twice, money added twice): both must be 0;
- time without progress: the longest stretch during which events were waiting and none was applied
  (the read side sampled every 0.2 s: stored events vs the sum of customer_stats' checkpoints);
- time to recover: from the fault's injection to the last moment the lag stood above its pre-fault level
  (the largest lag seen while warming up, at least a quarter second of writes): how long the fault
  disturbed the read side, the fault's own duration included (``fault_seconds``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from projections import registry
from store import NO_STREAM, EventStore, db
from store.event_store import record_from_row
from tests.applied import all_applied as applied_by_all
from tests.cluster.rabbit import RabbitCluster
from tests.conftest import DATABASE_URL
from tests.unit.test_projection_fold import fold, order_life, read_models
from workers import fleet as fleet_mod
from workers.config import Settings
from workers.fleet import Fleet
from workers.runtime import retry

PARTITIONS = 6
PROJECTIONS = ("customer_stats", "order_summary")
LEASE_SECONDS = 6
#: EVENTFLEET_CLUSTER_SECONDS: the long form's fault and load durations scale with it (0: the CI's short form).
SECONDS = float(os.environ.get("EVENTFLEET_CLUSTER_SECONDS", "0") or 0)
REPORT = os.environ.get("EVENTFLEET_CLUSTER_REPORT")
#: Events per second the writers append (EVENTFLEET_CLUSTER_RATE): 120 in the short form, 200 in the long one.
RATE = float(os.environ.get("EVENTFLEET_CLUSTER_RATE") or (200 if SECONDS else 120))
RETRYABLE: tuple[type[BaseException], ...] = (*retry.OUTAGE_ERRORS, asyncpg.PostgresError)


def scaled(short: float, long_share: float) -> float:
    """A duration: ``short`` in the CI's form, ``long_share`` of EVENTFLEET_CLUSTER_SECONDS in the long one."""
    return max(short, SECONDS * long_share) if SECONDS else short


async def http_get(port: int, path: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=3)
    async with aiohttp.ClientSession(timeout=timeout) as session, \
            session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


def metric(text: str, name: str) -> float | None:
    """The value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


ENV = {"EVENTFLEET_LEASE_SECONDS": str(LEASE_SECONDS), "EVENTFLEET_RELAY_POLL_MS": "100",
       "EVENTFLEET_LOG_FORMAT": "json", "EVENTFLEET_PROGRESS_SECONDS": "0"}


def settings_of(cluster: RabbitCluster, schema: str, prefix: str) -> Settings:
    """The deployment's settings; its own broker connections (teardown) reach the nodes directly."""
    urls = tuple(node.direct_url for node in cluster.nodes)
    return Settings(database_url=DATABASE_URL, amqp_url=urls[0], amqp_urls=urls, schema=schema, prefix=prefix,
                    partitions=PARTITIONS, projection_modules=(registry.EXAMPLE,))


async def stop_all(fleet: Fleet) -> None:
    """SIGTERM every process (workers first); each must exit 0 (a worker's totals are then in ``totals``)."""
    codes = await fleet.stop_all(60)
    assert set(codes.values()) <= {0}, f"exit codes {codes}; logs in {fleet.logs}"


class Writer:
    """Appends order lives (one stream, 4 events, per order) at a steady rate until stopped."""

    def __init__(self, store: EventStore, tag: str, per_second: float) -> None:
        self.store, self.tag, self.per_second = store, tag, per_second
        self.rng = random.Random(7)
        self.written = 0
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        i = 0
        began = time.monotonic()
        while not self.stopping.is_set():
            stream = f"order-{self.tag}-{i}"
            await self.store.append(stream, order_life(stream, f"c{i % 17}", 4, self.rng), NO_STREAM)
            self.written += 4
            i += 1
            ahead = began + self.written / self.per_second - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)


@dataclasses.dataclass
class Sample:
    at: float
    stored: int
    applied: int
    outbox: int

    @property
    def lag(self) -> int:
        return self.stored - self.applied


class Sampler:
    """Stored events vs order_summary' applied events (the sum of its stream checkpoints), every 0.2 s."""

    def __init__(self, pool: db.Pool) -> None:
        self.pool = pool
        self.samples: list[Sample] = []

    async def take(self) -> Sample | None:
        with contextlib.suppress(*RETRYABLE):
            row = await self.pool.fetchrow(
                "SELECT (SELECT count(*) FROM events) AS stored, (SELECT coalesce(sum(version + 1), 0) "
                "FROM checkpoints WHERE projection = 'order_summary') AS applied, "
                "(SELECT count(*) FROM outbox) AS outbox")
            assert row is not None
            sample = Sample(time.monotonic(), int(row["stored"]), int(row["applied"]), int(row["outbox"]))
            self.samples.append(sample)
            return sample
        return None

    async def run(self) -> None:
        while True:
            await self.take()
            await asyncio.sleep(0.2)

    def baseline(self, before: float, floor: int) -> int:
        lags = [s.lag for s in self.samples if s.at < before]
        return max([floor, *lags])

    def longest_stall(self, since: float) -> float:
        """The longest stretch after ``since`` in which events waited and the applied count stood still."""
        longest, stalled_from, previous = 0.0, None, None
        for s in self.samples:
            if previous is not None and s.at >= since:
                if s.applied > previous.applied or s.lag == 0:
                    stalled_from = None
                else:
                    stalled_from = previous.at if stalled_from is None else stalled_from
                    longest = max(longest, s.at - stalled_from)
            previous = s
        return longest

    def most_pending(self, since: float, until: float) -> int:
        """The most outbox rows waiting for the broker between two moments."""
        return max([0, *(s.outbox for s in self.samples if since <= s.at <= until)])

    def recovered_after(self, since: float, baseline: int) -> float:
        """Seconds from ``since`` to the last sample whose lag stood above ``baseline``."""
        above = [s.at for s in self.samples if s.at >= since and s.lag > baseline]
        return (above[-1] - since) if above else 0.0


@dataclasses.dataclass
class Figures:
    scenario: str
    written: int = 0
    applied: int = 0
    duplicates: int = 0
    gaps_filled: int = 0
    caught_up: int = 0
    handover_duplicates: int = 0
    lost: int = 0
    doubled: int = 0
    stall_seconds: float = 0.0
    recover_seconds: float = 0.0
    fault_seconds: float = 0.0
    rate: float = 0.0
    seconds: float = 0.0  # the whole scenario, from the first write to the last event applied
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)


async def placement(cluster: RabbitCluster, prefix: str) -> dict[str, Any]:
    """Which node the relay and each worker are connected to, and how many partition queues each node leads."""
    connections = await asyncio.to_thread(cluster.connections)
    leaders = await asyncio.to_thread(cluster.leaders, f"{prefix}.")
    return {"relay": next((c["node"] for c in connections if c["name"] == f"eventfleet relay {prefix}"), None),
            "workers": sorted(c["node"] for c in connections if str(c["name"]).startswith("eventfleet worker")),
            "leaders": dict(sorted(collections.Counter(v for q, v in leaders.items() if not q.endswith(".dlq")).items()))}


def record(path: Path, figures: Figures) -> None:
    with path.open("a") as report:
        report.write(figures.line() + "\n")


async def exactness(pool: db.Pool) -> tuple[int, int, bool]:
    """(lost, doubled, read models equal the fold) of customer_stats and order_summary vs the store."""
    rows = await pool.fetch("SELECT global_position, event_id, stream_id, version, event_type, data, metadata, "
                            "recorded_at, transaction_id FROM events ORDER BY global_position")
    expected = fold(record_from_row(r).event for r in rows)
    async with pool.acquire() as conn:
        actual = await read_models(conn)
    unapplied: int = await pool.fetchval(
        "SELECT coalesce(sum(s.v - coalesce(c.version, -1)), 0) FROM "
        "(SELECT stream_id, max(version) AS v FROM events GROUP BY stream_id) AS s "
        "LEFT JOIN checkpoints AS c ON c.projection = 'order_summary' AND c.stream_id = s.stream_id "
        "WHERE c.version IS NULL OR c.version < s.v")
    lost, doubled = int(unapplied), 0
    for customer in set(expected.customer_stats) | set(actual.customer_stats):
        want = expected.customer_stats.get(customer, (0, 0, Decimal(0)))
        got = actual.customer_stats.get(customer, (0, 0, Decimal(0)))
        for w, g in zip(want[:2], got[:2], strict=True):
            lost += max(0, w - g)
            doubled += max(0, g - w)
        lost += int(got[2] < want[2])
        doubled += int(got[2] > want[2])
    equal = actual.customer_stats == expected.customer_stats and actual.order_summary == expected.order_summary
    return lost, doubled, equal


async def all_applied(pool: db.Pool) -> bool:
    return await applied_by_all(pool, PROJECTIONS)


@dataclasses.dataclass
class Context:
    """What a fault sees: the cluster, the fleet and the clock marks it sets."""

    cluster: RabbitCluster
    fleet: Fleet
    sampler: Sampler
    prefix: str
    injected: float = 0.0
    repaired: float = 0.0
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def inject(self) -> None:
        self.injected = time.monotonic()

    def repair(self) -> None:
        self.repaired = time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep while checking that every process is alive."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.fleet.check()
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking harness call (rabbitmqctl) off the event loop, so the writer and sampler go on."""
        return await asyncio.to_thread(fn, *args)


Fault = Callable[[Context], Awaitable[None]]


@contextlib.asynccontextmanager
async def deployment(cluster: RabbitCluster, logs: Path) -> Any:
    """A schema with P=6 and a prefix of its own; torn down after (workers.fleet), whatever happened."""
    settings = settings_of(cluster, f"t_{uuid.uuid4().hex[:16]}", f"cl.{uuid.uuid4().hex[:10]}")
    async with fleet_mod.open_deployment(settings, PROJECTIONS), \
            db.create_pool(DATABASE_URL, settings.schema, min_size=1, max_size=6) as pool:
        yield settings.schema, settings.prefix, pool


async def run_scenario(name: str, cluster: RabbitCluster, logs: Path, fault: Fault, *, rate: float = RATE,
                       warmup: float | None = None, tail: float | None = None, drain_within: float = 180,
                       amqp_url: str | None = None) -> Figures:
    """Run one scenario (see the module docstring); returns its figures (and appends them to the report)."""
    warmup = scaled(3, 0.2) if warmup is None else warmup
    tail = scaled(3, 0.2) if tail is None else tail
    async with deployment(cluster, logs) as (schema, prefix, pool):
        fleet = Fleet(settings_of(cluster, schema, prefix), logs,
                      {**ENV, "EVENTFLEET_AMQP_URL": amqp_url or cluster.amqp_url})
        sampler = Sampler(pool)
        context = Context(cluster, fleet, sampler, prefix)
        try:
            fleet.add("relay").start()
            for _ in range(2):
                fleet.add("worker").start()
            await fleet.wait_ready()
            writer = Writer(EventStore(pool, schema=schema), name, rate)
            began = time.monotonic()
            writing = asyncio.create_task(writer.run())
            sampling = asyncio.create_task(sampler.run())
            try:
                try:
                    await context.sleep(warmup)
                    context.notes["placement"] = await placement(cluster, prefix)
                    await fault(context)
                    await context.sleep(tail)
                finally:
                    writer.stopping.set()
                    await writing
                deadline = time.monotonic() + drain_within
                while True:
                    with contextlib.suppress(*RETRYABLE):
                        if await all_applied(pool):
                            break
                    fleet.check()
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{name}: not everything applied within {drain_within}s; logs in {logs}")
                    await asyncio.sleep(0.2)
                await sampler.take()
            finally:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
            finished = time.monotonic()
            await stop_all(fleet)
        finally:
            await fleet.close()
        lost, doubled, equal = await exactness(pool)
        baseline = sampler.baseline(context.injected, floor=int(rate / 4) + 1)
        figures = Figures(
            name, written=writer.written, applied=fleet.totals("customer_stats").get("applied", 0),
            duplicates=fleet.totals("customer_stats").get("duplicates", 0),
            gaps_filled=fleet.totals("customer_stats").get("gaps_filled", 0),
            caught_up=fleet.totals("customer_stats").get("caught_up", 0),
            handover_duplicates=fleet.totals("customer_stats").get("handover_duplicates", 0), lost=lost,
            doubled=doubled,
            stall_seconds=round(sampler.longest_stall(context.injected), 1),
            recover_seconds=round(sampler.recovered_after(context.injected, baseline), 1),
            fault_seconds=round((context.repaired or context.injected) - context.injected, 1), rate=rate,
            seconds=round(finished - began, 1), notes={**context.notes, "baseline_lag": baseline,
                                                       "order_summary_applied":
                                                           fleet.totals("order_summary").get("applied", 0)})
        print(figures.line(), flush=True)
        if REPORT:
            record(Path(REPORT), figures)
        assert equal, f"{name}: read models differ from the fold of the store ({figures.line()}); logs in {logs}"
        assert (lost, doubled) == (0, 0), figures.line()
        return figures


# --- the report: RELIABILITY.md's tables ------------------------------------------------------------------------------

def tables(lines: list[dict[str, Any]]) -> str:
    """One markdown table per scenario run (``make chaos-cluster`` prints them from EVENTFLEET_CLUSTER_REPORT)."""
    out = []
    for f in lines:
        out += [(f"**{f['scenario']}** ({f['rate']:g} events/s, fault held {f['fault_seconds']} s, "
                f"{f['seconds']} s in all)"), "",
                ("| events written | applied | duplicates | gap fills | lost | doubled | time without progress "
                "| time to recover |"), "|---:|---:|---:|---:|---:|---:|---:|---:|",
                (f"| {f['written']} | {f['applied']} | {f['duplicates']} | {f['gaps_filled']} | {f['lost']} "
                f"| {f['doubled']} | {f['stall_seconds']} s | {f['recover_seconds']} s |"), ""]
        notes = {k: v for k, v in f["notes"].items() if k != "order_summary_applied"}
        out += [f"`{json.dumps(notes, default=str)}`", ""]
    return "\n".join(out)


if __name__ == "__main__":
    report_path = Path(sys.argv[1] if len(sys.argv) > 1 else (REPORT or "/tmp/eventfleet-cluster-report.jsonl"))
    print(tables([json.loads(line) for line in report_path.read_text().splitlines() if line.strip()]))
