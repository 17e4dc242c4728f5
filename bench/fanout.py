"""What each read model costs the whole pipeline, by the events it handles (issue 25), in one run.

    python -m bench.fanout [--orders 2000] [--scenarios a,b,c] [--partitions 16] [--max-queues 250]
                           [--rebuild-events 100000] [--rounds 2] [--timeout 300] [--quick]
                           [--topology group|read-model]

Three scenarios, in order, each a fresh deployment (``workers.fleet.open_fleet``: a new schema with P
``--partitions`` and a new prefix, torn down at the end whatever happened) with one relay and one worker
as processes, catch-up off (``EVENTFLEET_CATCHUP_THRESHOLD=0``): every event reaches the read models
through their queues.

  (a) the orders example's 2 read models (they handle all four order events);
  (b) the same + 8 read models that each handle only ``OrderShipped`` (bench/fanout_models.py);
  (c) the same + 32 of them (bench/fanout_models_more.py besides).

``--topology group`` (the default) runs the worker in a worker group (``EVENTFLEET_GROUP``, docs/reference.md
6.0): P queues for the group and a dead-letter queue per read model ((c) at P=16: 50); ``--topology read-model``
gives each read model P queues of its own, as before groups.

A scenario whose quorum queues (per read model: P + 1 each, (c) at P=16 declares 578) would bring the
node's queues above ``--max-queues`` is skipped and said so: this RabbitMQ 3.10 runs out of file handles at
about 300-450 quorum queues, for everybody on the machine (``--partitions 4`` fits (c) in 170).

The load is ``eventfleet load``'s (``run_load``: ``--orders`` orders, 8 writers, seed 7, real version
conflicts) from this process. The clock runs from the first append until every read model's exact lag
(``workers.projector.lag.measure``) is 0, checked every 0.25 s once the writers are done (the
example's two read models first, cheaply, then each read model's until one lags). Over the clock: CPU
seconds (user + system, from /proc) of the worker, the relay, RabbitMQ (the node's ``beam.smp``, whose pid
``rabbitmqctl eval`` gives) and Postgres, counted two ways: the backends of this run (those whose
``pg_stat_activity.client_port`` is a port of the worker's, the relay's or the writers' sockets, sampled
every 0.5 s; the figure the ratios use) and every ``postgres`` process of the machine (others' tests
included: a noisy upper bound). After lag 0: the deployment's queues and their memory, and the node's memory
(``rabbitmqctl``). Total CPU = worker + relay + RabbitMQ + this run's Postgres backends.

Then the rebuild: a fresh schema seeded with ``--rebuild-events`` events in which ``OrderShipped`` is 5% (orders
placed and paid, 2 of every 19 also shipped), and ``--rounds``
alternating rebuilds (``workers.rebuild.rebuild``, swap included) of a one-type read model
(``fanout_shipped_01``) and of the all-types ``order_summary``. Today both read every event: the ratio is about
1. The issue's target is the one-type rebuild >= 10x faster than today's time, printed as the baseline.

Targets (issue 25): total CPU (b)/(a) <= 1.3; time to lag 0 (b)/(a) <= 1.2; RabbitMQ CPU (b)/(a) <= 1.3;
total CPU (c)/(a) <= 2. A MISS is a measurement (exit 0); a run that could not be measured exits 2.
``--quick`` (500 orders, a 20,000-event rebuild store, one round) checks that it works; the default is for
the record. Servers: ``EVENTFLEET_DATABASE_URL`` and ``EVENTFLEET_AMQP_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.rebuild import drop_schema, fresh_rebuild, redo_on_restart
from eventfleet.examples.orders.events import LineItem, OrderPaid, OrderPlaced, OrderShipped
from eventfleet.examples.orders.load import run_load
from projections import registry
from store import NO_STREAM, EventStore, TransientError, VersionConflict, db, queries
from store.partitions import DEFAULT_PARTITIONS
from workers import admin, errors, fleet
from workers import relay as relay_session
from workers.config import Settings
from workers.fleet import Process, metrics
from workers.projector import lag
from workers.runtime import lifecycle, tuning

HELD = "eventfleet_worker_partitions_held"
WRITERS = 8
#: Seconds between lag checks once the writers are done: each measures a lagging read model's tail exactly,
#: which at 34 read models and 0.1 s was a load of its own on 2 cores.
POLL = 0.25
WRITERS_APP = "bench fanout writers"  # the writers' application_name: their backends count as the run's
OPS = queries.load("workers", "ops.sql")
MODULES = {"a": (registry.EXAMPLE,),
           "b": (registry.EXAMPLE, "bench.fanout_models"),
           "c": (registry.EXAMPLE, "bench.fanout_models", "bench.fanout_models_more")}
LABELS = {"a": "2 read models", "b": "2 + 8 one-type", "c": "2 + 32 one-type"}
EXAMPLE_PROJECTIONS = ("order_summary", "customer_stats")
ONE_TYPE = "fanout_shipped_01"
# The targets: (b)/(a) total CPU, time to lag 0, broker CPU; (c)/(a) total CPU; the rebuild's speed-up.
TOTAL_B, TIME_B, BROKER_B, TOTAL_C, REBUILD_SPEEDUP = 1.3, 1.2, 1.3, 2.0, 10.0


class BenchError(Exception):
    """A run that could not be measured (not a MISS): the message says why and where the logs are."""


class Skipped(Exception):
    """A scenario this broker cannot hold now (too many quorum queues): reported, the others still run."""


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    scenario: str
    projections: int
    events: int
    conflicts: int
    writers_seconds: float
    seconds: float  # first append to lag 0
    worker: float  # CPU seconds over the clock
    relay: float
    broker: float
    postgres: float  # this run's backends
    postgres_all: float  # every postgres process of the machine
    backends: int
    queues: int  # the deployment's queues after lag 0
    queue_memory: int  # bytes, summed over them
    node_memory: int  # bytes, the RabbitMQ node's total
    node_queues: int  # every queue on the node

    @property
    def total(self) -> float:
        return self.worker + self.relay + self.broker + self.postgres


# --- helpers (bench.pipeline's, which needs the bench extra; this bench does not) ---------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str, every: float = 0.02) -> float:
    """Poll ``check`` until true; return perf_counter() at that moment; raise after ``within`` seconds."""
    deadline = time.perf_counter() + within
    while not await check():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"not within {within}s: {what}")
        await asyncio.sleep(every)
    return time.perf_counter()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- CPU -------------------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float | None:
    """A process's CPU seconds, or None if it is gone (or unreadable)."""
    try:
        return cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return None


def all_postgres() -> dict[int, float]:
    """CPU seconds of every process called ``postgres`` on the machine, by pid."""
    found: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry.name}/comm").read_text().strip() == "postgres":
                    cpu = proc_cpu(int(entry.name))
                    if cpu is not None:
                        found[int(entry.name)] = cpu
    return found


def postgres_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU the postgres processes used between two snapshots: those alive at the end (a new one from 0; one
    that exited in between is lost, so this is a lower bound of the machine's, an upper one of ours)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def local_ports(pids: Sequence[int]) -> set[int]:
    """The local TCP ports of the processes' sockets (their /proc fds matched to /proc/net/tcp{,6})."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(fd.path)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


class Backends:
    """The CPU of this run's Postgres backends: those of the fleet's processes' sockets and of the writers'
    pool, sampled every 0.5 s from ``start`` (a backend first seen later started at 0 CPU)."""

    def __init__(self, conn: db.Conn, pids: Sequence[int]) -> None:
        self.conn, self.pids = conn, list(pids)
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.started = False

    async def sample(self) -> None:
        ports = local_ports(self.pids)  # not this process's: its lag checks are the bench's, not the run's
        rows = await self.conn.fetch("SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int[])"
                                     " OR application_name = $2", sorted(ports), WRITERS_APP)
        for row in rows:
            cpu = proc_cpu(row["pid"])
            if cpu is None:
                continue
            self.first.setdefault(row["pid"], cpu if not self.started else 0.0)
            self.last[row["pid"]] = cpu
        self.started = True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self.sample()

    @property
    def used(self) -> float:
        return sum(self.last[pid] - self.first[pid] for pid in self.last)


# --- RabbitMQ -------------------------------------------------------------------------------------------


async def rabbitmqctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:
        raise BenchError("rabbitmqctl is not on PATH: the broker's pid, queues and memory come from it")
    proc = await asyncio.create_subprocess_exec("rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"rabbitmqctl {' '.join(args)} did not answer within 60 s") from None
    if proc.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


async def broker_pid() -> int:
    """The pid of the node's beam.smp (on this machine: the servers run here)."""
    out = await rabbitmqctl("eval", "list_to_integer(os:getpid()).")
    pid = int(out.strip())
    if proc_cpu(pid) is None:
        raise BenchError(f"the RabbitMQ node's pid {pid} is not readable in /proc: is the broker on this machine?")
    return pid


async def broker_footprint(prefix: str) -> tuple[int, int, int, int]:
    """(the prefix's queues, their memory in bytes, the node's memory in bytes, every queue on the node)."""
    out = await rabbitmqctl("list_queues", "name", "memory", "--no-table-headers")
    rows = [line.split() for line in out.splitlines() if line.strip()]
    ours = [r for r in rows if r[0].startswith(f"{prefix}.")]
    memory = sum(int(r[1]) for r in ours if len(r) > 1 and r[1].isdigit())
    node = int((await rabbitmqctl("eval", "erlang:memory(total).")).strip())
    return len(ours), memory, node, len(rows)


# --- one scenario ------------------------------------------------------------------------------------


async def settle(processes: fleet.Fleet, worker: Process, expected: int) -> str:
    """Until the worker holds every partition of every read model, steady for a second (or 3 s after 5 s
    without the gauge); return how."""
    appear_by, deadline, previous = time.monotonic() + 5, time.monotonic() + 90, None
    while True:
        processes.check()
        samples = await processes.scrape(worker) or {}
        held = metrics.total(samples.get(HELD)) if HELD in samples else None
        if held is None and time.monotonic() > appear_by:
            await asyncio.sleep(3)
            return f"no {HELD}: 3 s"
        if held == expected and previous == expected:
            return f"{HELD} = {expected}"
        if time.monotonic() > deadline:
            raise BenchError(f"the worker holds {held} of {expected} partitions after 90 s")
        previous = held
        await asyncio.sleep(1 if held == expected else 0.2)


async def relay_listening(processes: fleet.Fleet, conn: db.Conn) -> None:
    async def listening() -> bool:
        processes.check()
        n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                                " AND query LIKE 'LISTEN%'", relay_session.application_name(processes.settings.schema))
        return bool(n)
    await until(listening, 60, "the relay listening", every=0.1)


async def lag_zero(pool: db.Pool, names: Sequence[str]) -> bool:
    """Nothing left to publish and every read model's exact lag is 0 (order_summary, which handles every
    event, first: its lag is the likeliest not to be 0)."""
    row = await pool.fetchrow(OPS["pipeline_counts"])
    assert row is not None
    if row["pending"]:
        return False
    for name in sorted(names, key=lambda n: n != "order_summary"):
        if (await lag.measure(pool, name)).lag_events:
            return False
    return True


async def measure(processes: fleet.Fleet, names: list[str], orders: int, beam: int) -> Result:
    settings = processes.settings
    relay = await processes.start("relay")
    worker = await processes.start("worker")
    conn = await db.connect(settings.database_url, settings.schema)
    try:
        await relay_listening(processes, conn)
        partitions = await conn.fetchval("SELECT partitions FROM partitioning")
        settled = await settle(processes, worker, partitions * len(names))
        async with lifecycle.open_pool(settings, min_size=WRITERS + 1, max_size=WRITERS + 1,
                                       application_name=WRITERS_APP) as pool, \
                lifecycle.open_pool(settings, min_size=1, max_size=2, application_name="bench fanout lag") as check:
            store = lifecycle.open_store(pool, settings)
            backends = Backends(conn, [worker.pid, relay.pid])
            await backends.sample()
            sampling = asyncio.ensure_future(backends.run())
            cpu = [cpu_seconds(worker.pid), cpu_seconds(relay.pid), cpu_seconds(beam)]
            pg_before = all_postgres()
            started = time.perf_counter()
            try:
                report = await run_load(store, orders, concurrency=WRITERS, seed=7)
                await store.notifier.flush()

                async def done() -> bool:
                    processes.check()
                    return await lag_zero(check, names)
                finished = await until(done, float("inf"), "lag 0", every=POLL)  # --timeout bounds it
                used = [cpu_seconds(worker.pid), cpu_seconds(relay.pid), cpu_seconds(beam)]
                pg_all = postgres_delta(pg_before, all_postgres())
            finally:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
            await backends.sample()
    finally:
        await conn.close()
    worker_cpu, relay_cpu, broker_cpu = (a - b for a, b in zip(used, cpu, strict=True))
    queues, memory, node, node_queues = await broker_footprint(settings.prefix)
    print(f"  settled: {settled}; {report.events} events, {report.conflicts} conflicts retried, writers done at"
          f" {report.seconds:.2f}s; lag 0 at {finished - started:.2f}s", flush=True)
    return Result("", len(names), report.events, report.conflicts, report.seconds, finished - started,
                  worker_cpu, relay_cpu, broker_cpu, backends.used, pg_all, len(backends.last), queues, memory, node,
                  node_queues)


async def one_scenario(base: Settings, tag: str, logs: Path, scenario: str, args: argparse.Namespace,
                       beam: int) -> Result:
    modules = MODULES[scenario]
    names = sorted(registry.load(modules))  # registered here too: migrate creates their tables
    names = [n for n in names if n in EXAMPLE_PROJECTIONS or n in scenario_models(scenario)]
    settings = dataclasses.replace(base.with_projection_modules(*modules), schema=f"bench_fanout_{tag}_{scenario}",
                                   prefix=f"bench.fanout.{tag}.{scenario}", http_port=0, catchup_threshold=0,
                                   partitions=args.partitions, group=GROUP if args.topology == "group" else None)
    logdir = logs / scenario
    # A worker group: P queues of the group's and a dead-letter queue per read model; else P + 1 per read model.
    declares = (len(names) + args.partitions if settings.group is not None
                else len(names) * (args.partitions + 1))
    on_node = (await broker_footprint(settings.prefix))[3]
    print(f"({scenario}) {LABELS[scenario]}: {len(names)} read models, P={args.partitions}: {declares} quorum"
          f" queues (the node has {on_node})", flush=True)
    if declares + on_node > args.max_queues:
        raise Skipped(f"({scenario}) not run: its {declares} quorum queues + the node's {on_node} exceed --max-queues"
                      f" {args.max_queues} (RabbitMQ 3.10 here runs out of file handles at about 300-450); a smaller --partitions fits")
    try:
        async with asyncio.timeout(args.timeout), fleet.open_fleet(
                settings, logdir, env={"EVENTFLEET_CATCHUP_THRESHOLD": "0"}, projections=names) as processes:
            result = await measure(processes, names, args.orders, beam)
            await processes.stop_all(20)
            return dataclasses.replace(result, scenario=scenario)
    except TimeoutError as exc:
        raise BenchError(f"({scenario}): timed out after {args.timeout:.0f} s; logs in {logdir}") from exc
    except errors.FleetFailed as exc:
        raise BenchError(f"({scenario}): {exc}") from exc


#: The worker group of ``--topology group`` (EVENTFLEET_GROUP of the scenario's processes).
GROUP = "fanout"


def scenario_models(scenario: str) -> set[str]:
    from bench.fanout_models import COUNT, FIRST, MORE, model_name
    count = {"a": 0, "b": COUNT, "c": MORE}[scenario]
    return {model_name(n) for n in range(FIRST, FIRST + count)}


# --- the rebuild ----------------------------------------------------------------------------------------

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def life(i: int) -> list[Any]:
    """Order i: placed and paid; 2 of every 19 also shipped, so that OrderShipped is 5% of the events."""
    order_id, customer_id, total = f"o{i}", f"c{i % 5000}", Decimal("9.99")
    events: list[Any] = [OrderPlaced(order_id, customer_id, (LineItem("p1", "Product 1", "SKU-1", 1, total),),
                                     total, Decimal(0), total, T0), OrderPaid(order_id, customer_id, total, T0)]
    if i % 19 < 2:
        events.append(OrderShipped(order_id, customer_id, "ups", T0))
    return events


async def seed(store: EventStore, events: int, writers: int = 4) -> tuple[int, int]:
    """Append order lives until ``events`` are stored, 200 streams per transaction; (events, shipped)."""
    batches: list[list[tuple[str, list[Any], int]]] = []
    written = shipped = i = 0
    while written < events:
        batch: list[tuple[str, list[Any], int]] = []
        while len(batch) < 200 and written < events:
            lived = life(i)[: events - written]
            shipped += sum(isinstance(e, OrderShipped) for e in lived)
            batch.append((f"order-o{i}", lived, NO_STREAM))
            written, i = written + len(lived), i + 1
        batches.append(batch)

    async def writer(share: list[list[tuple[str, list[Any], int]]]) -> None:
        for batch in share:
            while True:
                try:
                    await store.append_batch(batch)
                    break
                except TransientError:
                    await asyncio.sleep(1)  # Postgres restarted (others' fault tests): again
                except VersionConflict:
                    break  # the lost acknowledgement was of a commit
    await asyncio.gather(*(writer(batches[w::writers]) for w in range(writers)))
    return written, shipped


@dataclasses.dataclass(frozen=True, slots=True)
class Rebuilds:
    events: int
    shipped: int
    one_type: list[float]  # seconds per rebuild
    all_types: list[float]


async def rebuilds(base: Settings, tag: str, args: argparse.Namespace) -> Rebuilds:
    projections = registry.load(MODULES["b"])
    schema = f"bf_{tag}_rb"  # short: the shadow schema adds _rb_<name>, 48 in all
    await admin.run_migrate(base.database_url, schema)
    try:
        async with db.create_pool(base.database_url, schema, min_size=2, max_size=6) as pool:
            store = EventStore(pool, schema=schema)
            started = time.perf_counter()
            events, shipped = await seed(store, args.rebuild_events)
            print(f"rebuild store: {events:,} events, {shipped:,} OrderShipped ({shipped / events:.1%}), seeded in"
                  f" {time.perf_counter() - started:.1f}s", flush=True)
            await pool.execute("ANALYZE events")
            one: list[float] = []
            every: list[float] = []
            for round_ in range(1, args.rounds + 1):
                for name, into in ((ONE_TYPE, one), ("order_summary", every)):
                    result = await redo_on_restart(functools.partial(fresh_rebuild, pool, store,
                                                                     projections[name], args.batch))
                    into.append(result.seconds)
                    print(f"  round {round_}: rebuild {name:<18} {result.events:,} events read in"
                          f" {result.seconds:.2f}s", flush=True)
    finally:
        await drop_schema(base.database_url, schema)
    return Rebuilds(events, shipped, one, every)


# --- the report -----------------------------------------------------------------------------------------


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(results: dict[str, Result], built: Rebuilds | None, args: argparse.Namespace, command: str,
           elapsed: float) -> list[str]:
    a = results.get("a")
    print()
    print("| | " + " | ".join(f"({r.scenario}) {LABELS[r.scenario]}" for r in results.values())
          + (" | " + " | ".join(f"({s})/(a)" for s in results if s != "a") if a else "") + " |")
    print("|---|" + "---:|" * (len(results) + (len(results) - 1 if a else 0)))

    def row(label: str, value: Any, fmt: str, ratio: bool = True) -> None:
        cells = [format(value(r), fmt) for r in results.values()]
        if a:
            cells += [f"{value(r) / value(a):.2f}x" if ratio and value(a) else "" for s, r in results.items()
                      if s != "a"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    row("events written", lambda r: r.events, ",", ratio=False)
    row("time from the first append to lag 0, s", lambda r: r.seconds, ".2f")
    row("CPU s, worker", lambda r: r.worker, ".2f")
    row("CPU s, relay", lambda r: r.relay, ".2f")
    row("CPU s, RabbitMQ", lambda r: r.broker, ".2f")
    row("CPU s, Postgres (this run's backends)", lambda r: r.postgres, ".2f")
    row("**total CPU s**", lambda r: r.total, ".2f")
    row("CPU s, every postgres process (noisy)", lambda r: r.postgres_all, ".2f")
    row("the deployment's queues", lambda r: r.queues, "d")
    row("their memory, MiB", lambda r: r.queue_memory / 2**20, ".1f")
    row("the node's memory, MiB (all queues)", lambda r: r.node_memory / 2**20, ".1f")
    print()
    for r in results.values():
        print(f"  ({r.scenario}): {r.projections} read models, writers done at {r.writers_seconds:.2f}s,"
              f" {r.conflicts} conflicts retried, {r.backends} Postgres backends counted, {r.node_queues} queues"
              f" on the node")
    print(f"-- targets (run took {elapsed:.0f}s, load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores)")
    verdicts: list[str] = []
    b, c = results.get("b"), results.get("c")
    if a and b:
        for label, ratio, limit in (("total CPU", b.total / a.total, TOTAL_B),
                                    ("time to lag 0", b.seconds / a.seconds, TIME_B),
                                    ("RabbitMQ CPU", b.broker / a.broker, BROKER_B)):
            print(f"{verdict(ratio <= limit)}  {label} (b)/(a) <= {limit}x: {ratio:.2f}x")
            verdicts.append(f"{label} b/a {ratio:.2f}x {verdict(ratio <= limit)}")
    else:
        print("n/a   the (b)/(a) targets: --scenarios lacks a or b")
    if a and c:
        ratio = c.total / a.total
        print(f"{verdict(ratio <= TOTAL_C)}  total CPU (c)/(a) <= {TOTAL_C}x: {ratio:.2f}x; (c)'s queues"
              f" {c.queues} ({mib(c.queue_memory)}), the node {mib(c.node_memory)}")
        verdicts.append(f"total CPU c/a {ratio:.2f}x {verdict(ratio <= TOTAL_C)}")
    else:
        print("n/a   the (c)/(a) target: (a) or (c) not run (--scenarios, or skipped: below)")
    if built is not None:
        one, every = statistics.median(built.one_type), statistics.median(built.all_types)
        print(f"info  rebuild of a one-type read model ({built.shipped / built.events:.1%} of {built.events:,}"
              f" events): {one:.2f}s (median of {len(built.one_type)}) vs {every:.2f}s for order_summary (all"
              f" types): {every / one:.2f}x faster")
        print(f"base  today's one-type rebuild time {one:.2f}s: the target (>= {REBUILD_SPEEDUP:.0f}x faster) is"
              f" <= {one / REBUILD_SPEEDUP:.2f}s on this store (a later run compares against this figure)")
        verdicts.append(f"one-type rebuild {one:.2f}s vs all-types {every:.2f}s")
    print(f"command: {command}")
    figures = ", ".join(f"({r.scenario}) lag 0 {r.seconds:.2f}s CPU {r.total:.2f}s broker {r.broker:.2f}s"
                        f" queues {r.queues}" for r in results.values())
    print(f"summary: bench.fanout, {args.orders} orders, topology {args.topology}, catch-up off, {os.cpu_count()} cores: {figures};"
          f" {'; '.join(verdicts)}", flush=True)
    return verdicts


async def run(args: argparse.Namespace, command: str) -> None:
    os.environ["EVENTFLEET_CATCHUP_THRESHOLD"] = "0"
    base = Settings.from_env()
    tag, logs = uuid.uuid4().hex[:8], Path(tempfile.mkdtemp(prefix="bench_fanout_"))
    beam = await broker_pid()
    print(f"bench.fanout: {args.orders} orders per scenario ({','.join(args.scenarios)}), {WRITERS} writers,"
          f" one relay and one worker, topology {args.topology}, catch-up off; {os.cpu_count()} cores, load average"
          f" {os.getloadavg()[0]:.2f}; RabbitMQ pid {beam}", flush=True)
    started, results, skipped = time.perf_counter(), {}, []
    try:
        for scenario in args.scenarios:
            try:
                results[scenario] = await one_scenario(base, tag, logs, scenario, args, beam)
            except Skipped as exc:
                skipped.append(str(exc))
                print(exc, flush=True)
        built = await rebuilds(base, tag, args) if args.rebuild_events else None
    except BaseException:
        print(f"failed; the subprocesses' logs are in {logs}", file=sys.stderr)
        raise
    shutil.rmtree(logs, ignore_errors=True)
    report(results, built, args, command, time.perf_counter() - started)
    for line in skipped:
        print(f"skipped: {line}")


def scenarios(value: str) -> list[str]:
    found = [v.strip() for v in value.split(",") if v.strip()]
    if not found or any(v not in MODULES for v in found) or len(set(found)) != len(found):
        raise argparse.ArgumentTypeError("distinct scenarios of a, b, c, comma-separated")
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=2000, help="orders written per scenario")
    parser.add_argument("--scenarios", type=scenarios, default=["a", "b", "c"])
    parser.add_argument("--rebuild-events", type=int, default=100_000, help="events of the rebuild's store (0: none)")
    parser.add_argument("--rounds", type=int, default=2, help="rebuilds of each read model, alternating")
    parser.add_argument("--batch", type=int, default=5000, help="a rebuild's read size")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS, help="P of each scenario's schema")
    parser.add_argument("--max-queues", type=int, default=250,
                        help="skip a scenario whose quorum queues would bring the node's queues above this")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per scenario, start-up to lag 0")
    parser.add_argument("--quick", action="store_true", help="500 orders, a 20,000-event rebuild, one round")
    parser.add_argument("--topology", choices=("group", "read-model"), default="group",
                        help="group: the read models' worker in a worker group (EVENTFLEET_GROUP, one queue per "
                             "partition); read-model: P queues per read model")
    args = parser.parse_args()
    if args.quick:
        args.orders, args.rebuild_events, args.rounds = 500, 20_000, 1
    if args.orders < 1 or args.rounds < 1 or args.rebuild_events < 0:
        parser.error("--orders and --rounds must be at least 1, --rebuild-events at least 0")
    command = shlex.join(["python", "-m", "bench.fanout", *sys.argv[1:]])
    tuning.tune_gc()
    try:
        asyncio.run(run(args, command))
    except BenchError as exc:
        print(f"bench.fanout: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
