"""Scale-out of the projection worker fleet on the same live load, the store catch-up off.

    python -m bench.scale [--events 8000] [--counts 1,2,4,8] [--partitions 16] [--writers 8] [--timeout 180]

For each worker count N of ``--counts``, in order, a fresh deployment (a new schema migrated with
``--partitions`` P, a new prefix): the relay and N ``python -m workers worker`` processes, each with an HTTP
port of its own, every one answering /readyz; then a settle period so the fleet is balanced before the
clock starts: until the workers' ``eventfleet_worker_partitions_held`` gauges sum to P x projections, evenly
spread and steady for a second, when the workers expose that metric, else until every worker consumes each
projection's queue and 3 s more. Every process runs with ``EVENTFLEET_CATCHUP_THRESHOLD=0``, so every event
reaches the read models through its deliveries.

The clock runs from the first append of ``--writers`` in-process writers (bench.pipeline's order lives,
``--events`` events) until both projections' ``projection_status`` counts say every event was applied
(lag 0). Between the clock's start and its end, per worker: the CPU of its process (user + system) and its
``eventfleet_projection_{applied,duplicates,gaps_filled}_total`` counters, summed over projections.
Applications are applied + duplicates + gap fills; CPU is per applied event, so redundant work counts
against it. Ratios are against the 1-worker run of the same invocation.

Targets: duplicates + gap fills <= 1% of applications at every count; CPU per applied event at 4 workers
<= 1.25x one worker's; time to lag 0 at 4 workers <= 1.1x one worker's. A MISS is a measurement (exit
code 0); errors exit non-zero. Each run has a deadline (``--timeout``); its schema is dropped and every
queue and exchange whose name starts with its prefix is deleted, whatever happened. Servers:
``EVENTFLEET_DATABASE_URL`` and ``EVENTFLEET_AMQP_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shlex
import shutil
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path

import aio_pika

from bench.pipeline import (
    PROJECTIONS,
    applied_all,
    cpu_seconds,
    plan,
    retrying,
    store_step,
    until,
    verdict,
    write,
)
from projections import registry
from store import EventStore, db
from workers import broker, errors, fleet, relay
from workers.config import Settings
from workers.fleet import Process, metrics
from workers.runtime import tuning

APPLIED = "eventfleet_projection_applied_total"
DUPLICATES = "eventfleet_projection_duplicates_total"
GAPS_FILLED = "eventfleet_projection_gaps_filled_total"
CAUGHT_UP = "eventfleet_projection_caught_up_total"
HELD = "eventfleet_worker_partitions_held"  # the partitioned workers' gauge, when they expose it
COUNTERS = (APPLIED, DUPLICATES, GAPS_FILLED, CAUGHT_UP)
DUPLICATE_SHARE, CPU_RATIO, TIME_RATIO, AT = 0.01, 1.25, 1.1, 4  # the targets, judged at AT workers
FALLBACK_SETTLE = 3.0  # seconds, when the workers do not say which partitions they hold


class BenchError(Exception):
    """A run that could not be measured (not a MISS): the message says why and where the logs are."""


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    workers: int
    seconds: float  # first append to lag 0
    writers_seconds: float
    applied: float  # counter deltas over the clock, summed over projections and workers
    duplicates: float
    gaps_filled: float
    caught_up: float
    cpu: float  # the workers' CPU seconds over the clock
    shares: list[float]  # applied per worker
    settle: str  # how the fleet was settled

    @property
    def applications(self) -> float:
        return self.applied + self.duplicates + self.gaps_filled

    @property
    def redundant(self) -> float:
        """Duplicates + gap fills as a share of applications."""
        return (self.duplicates + self.gaps_filled) / self.applications if self.applications else float("nan")

    @property
    def cpu_ms(self) -> float:
        """Worker CPU milliseconds per applied event."""
        return 1000 * self.cpu / self.applied if self.applied else float("nan")


# --- metrics -----------------------------------------------------------------------------------------


async def scrape(run: Fleet, worker: Process) -> dict[str, float]:
    """A worker's /metrics samples, each summed over its labels (projections)."""
    samples = await run.processes.scrape(worker)
    if samples is None:
        raise BenchError(f"/metrics of {worker.name} (port {worker.port}) did not answer 200")
    return {name: metrics.total(series) for name, series in samples.items()}


# --- one run -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Fleet:
    """One run's processes (``workers.fleet``: its deployment is removed on the way out) and what it is
    doing now, for the error messages."""

    processes: fleet.Fleet
    workers: int
    partitions: int
    phase: str = "migrating"

    @property
    def settings(self) -> Settings:
        return self.processes.settings

    def alive(self) -> None:
        """Raise, naming its log, if any process of the run has exited."""
        try:
            self.processes.check()
        except errors.FleetFailed as exc:
            raise BenchError(f"{self.workers} workers: {exc} (while {self.phase})") from exc


async def check_partitions(settings: Settings, partitions: int) -> None:
    """The schema was migrated with P partitions (not an older schema of the same name)."""
    conn = await db.connect(settings.database_url, settings.schema)
    try:
        recorded = await conn.fetchval("SELECT partitions FROM partitioning")
    finally:
        await conn.close()
    if recorded != partitions:
        raise BenchError(f"schema {settings.schema} migrated with {recorded} partitions, not {partitions}")


async def start(run: Fleet) -> None:
    """The relay (listening) and the workers (each answering /readyz on its own port)."""
    settings = run.settings
    run.phase = "starting the relay and the workers"
    run.processes.add("relay").start()
    for _ in range(run.workers):
        run.processes.add("worker").start()
    conn = await db.connect(settings.database_url, settings.schema)
    try:
        async def relay_listening() -> bool:
            run.alive()
            n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                                    " AND query LIKE 'LISTEN%'", relay.application_name(settings.schema))
            return bool(n)
        run.phase = "waiting for the relay to listen"
        await until(relay_listening, 60, "the relay listening", every=0.1)
    finally:
        await conn.close()

    async def all_ready() -> bool:
        run.alive()
        return all([await run.processes.ready(w) for w in run.processes.workers])
    run.phase = "waiting for every worker's /readyz"
    await until(all_ready, 60, f"{run.workers} workers' /readyz", every=0.1)


async def settle(run: Fleet) -> str:
    """Wait until the fleet is balanced; return how that was decided (for the report)."""
    run.phase = "settling the fleet"
    expected, now = run.partitions * len(PROJECTIONS), time.perf_counter()
    appear_by, deadline = now + 5, now + 90  # 5 s for the gauge to show up at all, 90 s to balance
    previous: list[float] | None = None
    while True:
        run.alive()
        held = [(await scrape(run, w)).get(HELD) for w in run.processes.workers]
        if all(h is None for h in held):
            if time.perf_counter() > appear_by:
                break
            await asyncio.sleep(0.5)  # pacing the scrapes until the gauge would have appeared
            continue
        counts = [h or 0.0 for h in held]
        # Balanced: all held, and each projection's P split over the workers by at most one partition.
        balanced = sum(counts) == expected and max(counts) - min(counts) <= len(PROJECTIONS)
        if balanced and counts == previous:  # the same a second apart: the hand-offs are done
            return f"{HELD} sums to {expected:.0f} ({'/'.join(f'{c:.0f}' for c in counts)} per worker)"
        previous = counts if balanced else None
        if time.perf_counter() > deadline:
            print(f"warning: {run.workers} workers not balanced after 90 s ({HELD} per worker {counts},"
                  f" expected {expected} in all); measuring anyway", file=sys.stderr, flush=True)
            return f"UNBALANCED ({HELD} per worker {counts})"
        await asyncio.sleep(1)  # pacing the scrapes, and the steadiness check
    # Workers without the gauge: every worker consuming each projection's queue, then a fixed settle.
    connection = await aio_pika.connect(run.settings.amqp_url)
    async with connection:
        async def consuming() -> bool:
            run.alive()
            found = [await broker.passive_queue(connection, broker.Names(run.settings.prefix).queue(p))
                     for p in PROJECTIONS]
            return all(q is not None and (q.consumer_count or 0) >= run.workers for q in found)
        how = f"no {HELD}; every queue has its {run.workers} consumer(s), then {FALLBACK_SETTLE:.0f} s"
        try:
            await until(consuming, 15, "consumers", every=0.1)
        except TimeoutError:
            how = f"no {HELD}; the per-projection queues lack consumers; a fixed {FALLBACK_SETTLE:.0f} s"
    await asyncio.sleep(FALLBACK_SETTLE)  # the brief's fixed settle when nothing says the fleet is balanced
    run.alive()
    return how


async def measure(run: Fleet, events: int, writers: int) -> Result:
    """Start, settle, then the load: first append to lag 0, and the workers' CPU and counters over it."""
    settings = run.settings
    schedules = plan(events, writers)
    events = sum(map(len, schedules))
    await start(run)
    how = await settle(run)
    workers = run.processes.workers
    conn = await db.connect(settings.database_url, settings.schema)
    try:
        async with db.create_pool(settings.database_url, settings.schema, min_size=writers,
                                  max_size=writers) as pool:
            step = store_step(EventStore(pool, schema=settings.schema))
            before = [await scrape(run, w) for w in workers]
            cpu = [cpu_seconds(w.pid) for w in workers]
            run.phase = "writing the load and waiting for lag 0"
            started = time.perf_counter()
            writing = asyncio.ensure_future(write(schedules, step))
            check = applied_all(conn, events, writing)

            async def current() -> bool:
                run.alive()
                return await check()
            try:
                done = await until(current, float("inf"), "lag 0", every=0.01)  # --timeout bounds it
            except BaseException:
                writing.cancel()
                with contextlib.suppress(BaseException):
                    await writing
                raise
            used = [cpu_seconds(w.pid) - c for w, c in zip(workers, cpu, strict=True)]
            writers_seconds = await writing
            run.phase = "scraping the workers' metrics"
            after = [await scrape(run, w) for w in workers]
    finally:
        await conn.close()
    delta = {name: [a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before, strict=True)]
             for name in COUNTERS}
    if not any(APPLIED in a for a in after):
        raise BenchError(f"{run.workers} workers: no worker exposes {APPLIED} on /metrics")
    return Result(run.workers, done - started, writers_seconds, sum(delta[APPLIED]), sum(delta[DUPLICATES]),
                  sum(delta[GAPS_FILLED]), sum(delta[CAUGHT_UP]), sum(used), delta[APPLIED], how)


async def purge(settings: Settings, prefixes: Sequence[str], partitions: int) -> None:
    """Delete every queue and exchange whose name starts with one of ``prefixes`` (then a '.'): those
    ``rabbitmqctl`` lists, and the names this code knows (per-event and per-partition queues, dead-letter
    queues, the exchanges) in case it cannot list them; then check that none is left."""
    known_queues, known_exchanges = set(), set()
    for prefix in prefixes:
        n = broker.Names(prefix)
        for p in PROJECTIONS:
            known_queues |= {n.queue(p), n.dead_letter_queue(p), *(n.partition_queue(p, i) for i in range(partitions))}
        known_exchanges |= {n.exchange, n.dead_letter_exchange, n.partitions_exchange}
    stems = tuple(f"{p}." for p in prefixes)
    queues, exchanges = await listed("list_queues", settings, stems), await listed("list_exchanges", settings, stems)

    async def delete() -> None:
        async with await aio_pika.connect(settings.amqp_url) as connection:
            channel = await connection.channel()
            for name in sorted(known_queues | set(queues or ())):
                await channel.queue_delete(name)
            for name in sorted(known_exchanges | set(exchanges or ())):
                await channel.exchange_delete(name)

    await retrying(delete)
    left = [*(await listed("list_queues", settings, stems) or ()),
            *(await listed("list_exchanges", settings, stems) or ())]
    if left:
        raise BenchError(f"broker objects left behind after deleting them: {left}")


async def listed(what: str, settings: Settings, stems: tuple[str, ...]) -> list[str] | None:
    """The names ``rabbitmqctl -q <what> name`` lists in the AMQP URL's vhost starting with ``stems``;
    None when it cannot tell (no rabbitmqctl, or it failed: the known names are deleted anyway)."""
    path = urllib.parse.urlsplit(settings.amqp_url).path
    vhost = urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"
    if shutil.which("rabbitmqctl") is None:
        return None
    proc = await asyncio.create_subprocess_exec("rabbitmqctl", "-q", "-p", vhost, what, "name",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    if proc.returncode != 0:
        print(f"warning: rabbitmqctl {what} failed ({err.decode().strip()}); deleting the known names only",
              file=sys.stderr)
        return None
    return [line.strip() for line in out.decode().splitlines() if line.strip().startswith(stems)]


async def one_run(settings: Settings, tag: str, logs: str, workers: int, args: argparse.Namespace) -> Result:
    """A fresh deployment with ``workers`` workers, measured within ``--timeout`` s, then removed."""
    settings = dataclasses.replace(settings, schema=f"bench_scale_{tag}_w{workers}",
                                   prefix=f"bench.scale.{tag}.w{workers}", http_port=0, catchup_threshold=0,
                                   partitions=args.partitions)
    logdir = Path(logs) / f"w{workers}"
    run: Fleet | None = None
    try:
        try:
            async with asyncio.timeout(args.timeout), fleet.open_fleet(settings, logdir) as processes:
                run = Fleet(processes, workers, args.partitions)
                await check_partitions(settings, args.partitions)
                result = await measure(run, args.events, args.writers)
                run.phase = "stopping the processes"
                await processes.stop_all(20)
                return result
        except TimeoutError as exc:
            why = str(exc) or f"the run's {args.timeout:.0f} s are up"
            phase = run.phase if run is not None else "migrating"
            raise BenchError(f"{workers} workers: timed out ({why}) while {phase}; the subprocesses' logs are in"
                             f" {logdir}: {', '.join(sorted(os.listdir(logdir)))}") from exc
        except errors.FleetFailed as exc:
            raise BenchError(f"{workers} workers: {exc}") from exc
    finally:
        # The fleet tore the deployment down; this checks that nothing of the prefix is left on the broker.
        await purge(settings, [settings.prefix], args.partitions)


# --- the report ---------------------------------------------------------------------------------------


def report(results: list[Result], args: argparse.Namespace, command: str, elapsed: float) -> None:
    base = next((r for r in results if r.workers == 1), None)
    at = next((r for r in results if r.workers == AT), None)
    print(f"{'workers':>7} {'s to lag 0':>10} {'x 1w':>10} {'applications':>12} {'dup+gap':>13}"
          f" {'CPU ms/applied':>14} {'x 1w':>10}")
    for r in results:
        time_ratio = r.seconds / base.seconds if base else float("nan")
        cpu_ratio = r.cpu_ms / base.cpu_ms if base else float("nan")
        time_mark = f" {verdict(time_ratio <= TIME_RATIO)}" if r.workers == AT and base else ""
        cpu_mark = f" {verdict(cpu_ratio <= CPU_RATIO)}" if r.workers == AT and base else ""
        print(f"{r.workers:>7} {r.seconds:>10.2f} {f'{time_ratio:.2f}{time_mark}':>10} {r.applications:>12.0f}"
              f" {f'{r.redundant:.2%} {verdict(r.redundant <= DUPLICATE_SHARE)}':>13} {r.cpu_ms:>14.3f}"
              f" {f'{cpu_ratio:.2f}{cpu_mark}':>10}")
    for r in results:
        caught = f"; {r.caught_up:.0f} read by a catch-up (expected 0)" if r.caught_up else ""
        print(f"  {r.workers} workers: writers done at {r.writers_seconds:.2f}s; applied per worker"
              f" {'/'.join(f'{s:.0f}' for s in r.shares)}; {r.duplicates:.0f} duplicates, {r.gaps_filled:.0f} gap"
              f" fills; CPU {r.cpu:.2f}s; settled: {r.settle}{caught}")
    print(f"-- targets (run took {elapsed:.0f}s, load average {os.getloadavg()[0]:.2f})")
    worst = max(results, key=lambda r: r.redundant)
    dup_ok = all(r.redundant <= DUPLICATE_SHARE for r in results)
    print(f"{verdict(dup_ok)}  duplicates + gap fills <= {DUPLICATE_SHARE:.0%} of applications at every count:"
          f" worst {worst.redundant:.2%} at {worst.workers} workers")
    if base and at:
        cpu_ratio, time_ratio = at.cpu_ms / base.cpu_ms, at.seconds / base.seconds
        print(f"{verdict(cpu_ratio <= CPU_RATIO)}  CPU per applied event at {AT} workers <= {CPU_RATIO}x one"
              f" worker's: {cpu_ratio:.2f}x ({at.cpu_ms:.3f} vs {base.cpu_ms:.3f} ms)")
        print(f"{verdict(time_ratio <= TIME_RATIO)}  time to lag 0 at {AT} workers <= {TIME_RATIO}x one worker's:"
              f" {time_ratio:.2f}x ({at.seconds:.2f} vs {base.seconds:.2f} s)")
    else:
        print(f"n/a   CPU and time at {AT} workers against one worker's: --counts lacks 1 or {AT}")
    print(f"command: {command}")
    times = ", ".join(f"{r.workers}w {r.seconds:.2f}s" + (f" ({r.seconds / base.seconds:.2f}x)" if base and r is not base
                                                        else "") for r in results)
    cpus = ", ".join(f"{r.workers}w {r.cpu_ms:.3f}" for r in results)
    verdicts = [f"dup+gap {verdict(dup_ok)}"]
    if base and at:
        verdicts += [f"CPU@{AT} {verdict(at.cpu_ms / base.cpu_ms <= CPU_RATIO)}",
                     f"time@{AT} {verdict(at.seconds / base.seconds <= TIME_RATIO)}"]
    print(f"summary: bench.scale, {args.events} events, P={args.partitions}, catch-up off,"
          f" {os.cpu_count()} cores: lag 0 {times}; dup+gap worst {worst.redundant:.2%};"
          f" worker CPU ms/applied event {cpus}; {', '.join(verdicts)}", flush=True)


async def run(args: argparse.Namespace, command: str) -> None:
    # Every process of every run (and this one's migrate): catch-up off, the chosen P.
    os.environ["EVENTFLEET_CATCHUP_THRESHOLD"] = "0"
    os.environ["EVENTFLEET_PARTITIONS"] = str(args.partitions)
    settings = Settings.from_env().with_projection_modules(registry.EXAMPLE)
    registry.load([registry.EXAMPLE])
    tag, logs = uuid.uuid4().hex[:8], tempfile.mkdtemp(prefix="bench_scale_")
    print(f"bench.scale: {args.events} events per run, {args.writers} writers, P={args.partitions}, workers"
          f" {','.join(map(str, args.counts))}, catch-up off; {os.cpu_count()} cores, load average"
          f" {os.getloadavg()[0]:.2f}", flush=True)
    started, results = time.perf_counter(), []
    try:
        for workers in args.counts:
            results.append(await one_run(settings, tag, logs, workers, args))
            r = results[-1]
            print(f"  ran {workers} workers: lag 0 at {r.seconds:.2f}s", flush=True)
    except BaseException:
        print(f"failed; the subprocesses' logs are in {logs}", file=sys.stderr)
        raise
    shutil.rmtree(logs, ignore_errors=True)
    report(results, args, command, time.perf_counter() - started)


def counts(value: str) -> list[int]:
    found = [int(v) for v in value.split(",") if v.strip()]
    if not found or any(n < 1 for n in found) or len(set(found)) != len(found):
        raise argparse.ArgumentTypeError("distinct worker counts >= 1, comma-separated")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=8000, help="events per run")
    parser.add_argument("--counts", type=counts, default=[1, 2, 4, 8], help="worker counts, one run each")
    parser.add_argument("--partitions", type=int, default=16, help="P of each run's schema")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per run, start-up to lag 0")
    args = parser.parse_args()
    command = shlex.join(["python", "-m", "bench.scale", *sys.argv[1:]])
    tuning.tune_gc()
    try:
        asyncio.run(run(args, command))
    except BenchError as exc:
        print(f"bench.scale: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
