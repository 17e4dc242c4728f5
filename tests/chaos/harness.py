"""One chaos run: a fleet under a steady write load while a seeded schedule injects faults, then the proof.

``run_scenario`` migrates the schema, starts two relays and three workers (``fleet.Fleet``), writes orders
at a steady rate from in-process writers (``Writer``: the load's order lives, through the Repository),
injects the scheduled faults one after another, stops the writers, waits for lag 0 on every projection
and an empty outbox, compares every read model with a fold of the store (``verify``), stops the fleet
with SIGTERM and returns a ``Report``: events written, applied, duplicates skipped, gaps filled, time to
recover after each fault, lost and doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from projections import registry
from store import EventStore, db
from store.queries import load
from tests.chaos import faults as faults_mod
from tests.chaos.fleet import PAYMENT_TIMEOUT_SECONDS, PROJECTIONS, ROOT, Fleet
from tests.chaos.verify import verify
from tests.chaos.writer import TRANSIENT, Writer, retrying
from workers import fleet as fleet_mod
from workers.config import Settings
from workers.projector import lag

LEDGER = load("tests.chaos", "ledger.sql")

#: Scale of the runs: CI keeps them short; ``make chaos`` lengthens them through the environment.
SECONDS = float(os.environ.get("EVENTFLEET_CHAOS_SECONDS", "0"))  # write load per scenario, at least (0: the schedule)
RATE = float(os.environ.get("EVENTFLEET_CHAOS_RATE", "60"))  # events per second
REPEAT = int(os.environ.get("EVENTFLEET_CHAOS_REPEAT", "1"))  # injections of each fault kind per run
REPORT_FILE = os.environ.get("EVENTFLEET_CHAOS_REPORT")  # JSON lines of every report, for RELIABILITY.md


@dataclasses.dataclass
class Sample:
    t: float  # seconds since the load started
    lag: dict[str, int] | None  # per projection; None while the database was unreachable
    outbox: int | None
    lag_seconds: float | None = None  # age of the oldest unapplied event, worst projection

    @property
    def total(self) -> int | None:
        return None if self.lag is None else sum(self.lag.values())


class LagMonitor:
    """Samples every projection's exact lag (``workers.lag.measure``) and the outbox backlog."""

    def __init__(self, pool: db.Pool, t0: float, interval: float = 0.5) -> None:
        self.pool, self.t0, self.interval = pool, t0, interval
        self.samples: list[Sample] = []

    async def sample(self) -> Sample:
        t = time.monotonic() - self.t0
        lags: dict[str, int] | None
        seconds: float | None
        try:
            measured = {p: await lag.measure(self.pool, p) for p in PROJECTIONS}
            outbox: int | None = await self.pool.fetchval("SELECT count(*) FROM outbox")
            lags = {p: m.lag_events for p, m in measured.items()}
            seconds = max(m.lag_seconds for m in measured.values())
        except TRANSIENT:
            lags, outbox, seconds = None, None, None
        sample = Sample(t, lags, outbox, seconds)
        self.samples.append(sample)
        return sample

    async def run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval)

    async def wait_drained(self, fleet: Fleet, within: float) -> float:
        """Until every projection's lag is 0 and the outbox is empty; return when (seconds since t0)."""
        deadline = time.monotonic() + within
        while True:
            fleet.check()
            sample = await self.sample()
            if sample.total == 0 and sample.outbox == 0:
                return sample.t
            if time.monotonic() > deadline:
                raise AssertionError(f"lag not back to 0 within {within}s: {sample}")
            await asyncio.sleep(0.2)

    def max_between(self, start: float, end: float) -> int:
        return max((s.total or 0 for s in self.samples if start <= s.t <= end), default=0)


@dataclasses.dataclass
class Injection:
    kind: str
    started: float
    ended: float
    details: dict[str, Any]
    recover_seconds: float | None = None


@dataclasses.dataclass
class Report:
    scenario: str
    seed: int
    load_seconds: float
    rate: float
    written: int
    applied: dict[str, int]
    published: int
    duplicates: int
    gaps_filled: int
    dead_lettered: int
    writer_retries: int
    steady_lag: int
    max_lag: int
    drain_seconds: float
    recover_seconds_max: float | None
    lost: int
    doubled: int
    exact: bool
    exit_codes: dict[str, int]
    injections: list[Injection]
    memory: list[dict[str, Any]]
    samples: list[tuple[float, int | None, float | None]]  # (t, lag summed over projections, worst lag s)
    timeouts: int = 0  # orders payment_timeout cancelled (each exactly once: checked by verify)
    #: Per read model, the store's events of the types it handles: what it must have applied (issue 25).
    handled: dict[str, int] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        recover = "-" if self.recover_seconds_max is None else f"{self.recover_seconds_max:.1f}s"
        return (f"[chaos {self.scenario} seed={self.seed}] faults={len(self.injections)} written={self.written} "
                f"applied={min(self.applied.values(), default=0)}/projection duplicates={self.duplicates} "
                f"gaps_filled={self.gaps_filled} recover_max={recover} drain={self.drain_seconds:.1f}s "
                f"lost={self.lost} doubled={self.doubled} timeouts={self.timeouts}")

    def emit(self) -> None:
        print(self.line())
        for inj in self.injections:
            recover = "-" if inj.recover_seconds is None else f"{inj.recover_seconds:.1f}s"
            print(f"    {inj.kind:<18} at {inj.started:5.1f}s took {inj.ended - inj.started:4.1f}s "
                  f"recovered in {recover}  {inj.details}")
        if REPORT_FILE:
            with Path(REPORT_FILE).open("a") as f:
                f.write(json.dumps(dataclasses.asdict(self) | {"at": dt.datetime.now(dt.UTC).isoformat()},
                                   default=str) + "\n")


@dataclasses.dataclass(frozen=True)
class Deployment:
    """Where a run lives: its database, schema (migrated with ``partitions``), broker vhost and prefix."""

    database_url: str
    amqp_url: str
    vhost: str
    schema: str
    prefix: str
    partitions: int  # P of the schema: each projection (or the worker group) has as many queues
    #: The fleet's worker group (EVENTFLEET_GROUP of every process); None: P queues per read model.
    group: str | None = None

    def settings(self) -> Settings:
        return Settings.from_env(self.env())

    def env(self) -> dict[str, str]:
        return {**({} if self.group is None else {"EVENTFLEET_GROUP": self.group}),
                "EVENTFLEET_DATABASE_URL": self.database_url, "EVENTFLEET_AMQP_URL": self.amqp_url,
                "EVENTFLEET_SCHEMA": self.schema, "EVENTFLEET_PREFIX": self.prefix,
                "EVENTFLEET_PARTITIONS": str(self.partitions),
                "EVENTFLEET_STOP_TIMEOUT": "5", "EVENTFLEET_LOG_FORMAT": "text",
                # A backlog of a few seconds (a kill, an outage) starts a catch-up from the store, in small
                # batches, so faults also land in the middle of catch-ups.
                "EVENTFLEET_CATCHUP_THRESHOLD": "50", "EVENTFLEET_CATCHUP_BATCH_SIZE": "100"}


#: The event names of the chaos ledgers (tests/chaos/ledger.py is imported by the workers only: registering it
#: here would show it to every other test of the session).
LEDGER_NAMES: dict[str, frozenset[str] | None] = {"chaos_ledger": None, "chaos_shipments": frozenset({"OrderShipped"})}


def handled_counts(names: dict[str, int]) -> dict[str, int]:
    """What each read model must have applied: the store's events of the types it handles."""
    counts: dict[str, int] = {}
    for projection in PROJECTIONS:
        cls = registry.REGISTRY.get(projection)
        handled = (LEDGER_NAMES[projection] if projection in LEDGER_NAMES
                   else None if not isinstance(cls, type) else cls.handled_names())
        counts[projection] = sum(n for name, n in names.items() if handled is None or name in handled)
    return counts


def vhost_url(amqp_url: str, vhost: str) -> str:
    return amqp_url.rstrip("/") + "/" + vhost


async def prepare(deployment: Deployment) -> None:
    """Create the chaos ledger's tables (the schema is migrated by the caller)."""
    async with db.create_pool(deployment.database_url, deployment.schema, min_size=1, max_size=1) as pool:
        await pool.execute(LEDGER["ddl"])
        await pool.execute(LEDGER["ddl_shipments"])


async def remove(deployment: Deployment) -> None:
    """Tear the run's deployment down (workers.fleet: schema, queues, exchanges, roles), waiting for the
    broker if another test has stopped it."""
    await fleet_mod.remove(deployment.settings(), PROJECTIONS)


@contextlib.asynccontextmanager
async def background(*coros: Any) -> AsyncIterator[None]:
    """Run coroutines as tasks for the block; cancel them after it."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def run_scenario(name: str, kinds: Sequence[str], deployment: Deployment, logdir: Path, *,
                       seed: int | None = None, seconds: float = SECONDS, rate: float = RATE,
                       warmup: float = 2.0, drain_within: float = 180) -> Report:
    """Run the fleet under load with the faults ``kinds`` injected in that order; verify; report."""
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    print(f"[chaos {name}] seed={seed} faults={list(kinds)} logs={logdir}")
    await prepare(deployment)
    writer_name = f"eventfleet chaos writer {deployment.schema}"[:63]
    async with contextlib.AsyncExitStack() as stack:
        writer_pool = await stack.enter_async_context(db.create_pool(
            deployment.database_url, deployment.schema, min_size=0, max_size=16, application_name=writer_name))
        pool = await stack.enter_async_context(db.create_pool(
            deployment.database_url, deployment.schema, min_size=0, max_size=2,
            application_name=f"eventfleet chaos observer {deployment.schema}"[:63]))
        store = EventStore(writer_pool, schema=deployment.schema)
        fleet = await stack.enter_async_context(Fleet(deployment.env(), logdir))
        await fleet.start_all()
        t0 = time.monotonic()
        monitor = LagMonitor(pool, t0)
        writer = Writer(store, rate, rng.getrandbits(64))
        stop_writing = asyncio.Event()
        ctx = faults_mod.Context(fleet, rng, deployment.database_url, deployment.vhost, writer_name, store,
                                 _cli(fleet))
        injections: list[Injection] = []
        async with background(monitor.run(), fleet.run_scraper()):
            writing = asyncio.create_task(writer.run(stop_writing))
            try:
                # The seeded schedule: faults spread over the load's length (back to back when it is 0), each
                # at least 1-3 s after the previous one ended, so that each recovery can be seen on its own.
                planned = sorted(rng.uniform(warmup, max(warmup, seconds - 10)) for _ in kinds)
                await _sleep_or_fail(warmup, writing, fleet)
                for kind, at in zip(kinds, planned, strict=True):
                    await _sleep_or_fail(at - (time.monotonic() - t0), writing, fleet)
                    started = time.monotonic() - t0
                    details = await faults_mod.FAULTS[kind](ctx)
                    injections.append(Injection(kind, started, time.monotonic() - t0, details))
                    print(f"    {kind} at {started:.1f}s took {time.monotonic() - t0 - started:.1f}s", flush=True)
                    await _sleep_or_fail(rng.uniform(1.0, 3.0), writing, fleet)
                await _sleep_or_fail(max(0.0, seconds - (time.monotonic() - t0)), writing, fleet)
            finally:
                stop_writing.set()
                await writing
            load_end = time.monotonic() - t0
            drained = await monitor.wait_drained(fleet, drain_within)
            # payment_timeout's last deadlines fall due up to its timeout after the last placement.
            await _deadlines_fired(pool, fleet, PAYMENT_TIMEOUT_SECONDS + drain_within)
            drained = max(drained, await monitor.wait_drained(fleet, drain_within))
        verdict = await retrying(lambda: verify(store))
        stats = await pool.fetch("SELECT projection, applied FROM projection_status")
        names = {r["name"]: r["events"] for r in await pool.fetch(LEDGER["store_names"])}
        dead = await pool.fetchval("SELECT count(*) FROM dead_letters WHERE status = 'parked'")
        exit_codes = await fleet.stop_all()
    samples = [(round(x.t, 1), x.total, None if x.lag_seconds is None else round(x.lag_seconds, 2))
               for x in monitor.samples]
    steady = steady_lag(samples, injections[0].started if injections else load_end)
    for inj, back in zip(injections, recoveries(samples, [(i.started, i.ended) for i in injections], steady, rate),
                         strict=True):
        inj.recover_seconds = back
    totals = fleet.totals()
    recovers = [i.recover_seconds for i in injections if i.recover_seconds is not None]
    report = Report(
        scenario=name, seed=seed, load_seconds=round(load_end, 1), rate=rate, written=verdict.events,
        applied={r["projection"]: r["applied"] for r in stats}, published=int(totals.get("published", 0)),
        duplicates=int(totals.get("duplicates", 0)), gaps_filled=int(totals.get("gaps_filled", 0)),
        dead_lettered=int(totals.get("dead_lettered", 0)), writer_retries=writer.retries, steady_lag=steady,
        max_lag=monitor.max_between(0, drained), drain_seconds=round(drained - load_end, 2),
        recover_seconds_max=max(recovers, default=None), lost=verdict.lost, doubled=verdict.doubled,
        exact=verdict.exact, exit_codes=exit_codes, injections=injections, memory=fleet.memory(),
        samples=samples, timeouts=verdict.timeouts, handled=handled_counts(names))
    report.emit()
    assert verdict.exact, (verdict.summary_mismatches[:5], verdict.stats_mismatches[:5], verdict.timeouts_missing,
                           verdict.follow_ups_doubled)
    assert dead == 0, f"{dead} dead letters still parked"
    return report


Samples = list[tuple[float, int | None, float | None]]


def steady_lag(samples: Samples, first_fault: float) -> int:
    """The pre-fault lag: the 90th percentile of the samples between 1 s and the first fault (robust to a
    spike another test's outage may cause)."""
    before = sorted(total for t, total, _ in samples if 1.0 <= t < first_fault and total is not None)
    return before[int(0.9 * (len(before) - 1))] if before else 0


def recoveries(samples: Samples, faults: Sequence[tuple[float, float]], steady: int,
               rate: float) -> list[float | None]:
    """Per fault (started, ended): seconds from its end to the first sample back at steady state (at most
    twice the pre-fault lag, or one second of load), or None if that did not happen before the next fault."""
    threshold = max(2 * steady, int(rate))
    out: list[float | None] = []
    for (_, ended), (following, _) in zip(faults, [*faults[1:], (float("inf"), 0.0)], strict=True):
        back = next((t for t, total, _ in samples
                     if ended <= t < following and total is not None and total <= threshold), None)
        out.append(None if back is None else round(back - ended, 2))
    return out


async def _deadlines_fired(pool: db.Pool, fleet: Fleet, within: float) -> None:
    deadline = time.monotonic() + within
    while await retrying(lambda: pool.fetchval("SELECT count(*) FROM deadlines")):
        fleet.check()
        assert time.monotonic() < deadline, "payment_timeout's deadlines did not all fire"
        await asyncio.sleep(0.25)


async def _sleep_or_fail(seconds: float, writing: asyncio.Task[None], fleet: Fleet) -> None:
    """Sleep (the schedule's pause) checking that the writers and the fleet's processes keep running."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.wait({writing}, timeout=min(left, 0.5))
        if writing.done():
            writing.result()
            raise AssertionError("the writers stopped before the end of the load")
        fleet.check()


def _cli(fleet: Fleet) -> Any:
    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers", *args, cwd=ROOT, env={**fleet.env, "EVENTFLEET_HTTP_PORT": "0"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace")
    return cli


def unique(kind: str) -> str:
    return f"chaos_{kind}_{uuid.uuid4().hex[:10]}"
