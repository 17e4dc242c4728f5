"""Where the demo's end-to-end latency goes: the demo's fleet and load, with each stage's figures over time.

    python -m bench.demo_latency [--orders 2000] [--workers 3] [--settle] [--catchup-threshold N]
                                 [--partitions P]

The fleet of ``eventfleet demo`` (``workers.fleet``: one relay and ``--workers`` workers, the example's two read
models and its payment_timeout reactor with a 3 s timeout, default settings otherwise) and its load
(``run_load``, 8 writers, seed 1), started as the demo starts it: writing as soon as every process answers
/readyz (``--settle``: only once the workers' ``eventfleet_worker_partitions_held`` gauges sum to P x
subscribers and stay so for a second; ``eventfleet demo`` itself waits for the leases to be dealt since
issue 25). ``--partitions`` migrates the deployment with another P. Meanwhile:

- a transient classic queue of this process bound to every partition of the partitions exchange, consumed
  without database work: recorded_at to the relay's publish reaching the broker, per event (bench.pipeline's
  observer);
- every process's /metrics scraped every second: the workers' ``eventfleet_end_to_end_seconds`` (recorded_at
  to commit, per subscriber), ``eventfleet_projection_apply_seconds`` (one batch's transaction), the relay's
  ``eventfleet_relay_publish_batch_seconds`` (publish + confirm of one batch), the partitions each worker holds.

Prints each stage's p50/p99 over the run, each subscriber's end to end after the first ``WARM_UP`` seconds
(as ``eventfleet demo`` and bench.pipeline report it), the processes' CPU per event written, and, per second
of the run, the end-to-end observations, how many were over 0.5 s and 1 s, and the partitions each worker
held: when the slow ones happened, and what the fleet was doing then. A diagnostic for
bench/LATENCY-NOTES.md, no targets.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import aiormq

from eventfleet.examples.orders import load, reactors
from projections import registry
from workers import broker, fleet
from workers.config import Settings
from workers.fleet import Process, metrics, progress
from workers.runtime import lifecycle

E2E = "eventfleet_end_to_end_seconds_bucket"
APPLY = "eventfleet_projection_apply_seconds_bucket"
RELAY = "eventfleet_relay_publish_batch_seconds_bucket"
HELD = "eventfleet_worker_partitions_held"
WARM_UP = 2.0
MODULES = (registry.EXAMPLE, reactors.__name__)


@dataclasses.dataclass
class Tick:
    at: float  # seconds since the first append
    workers: list[metrics.Samples]
    relay: metrics.Samples


def count_over(buckets: dict[metrics.Labels, float] | None, bound: float) -> tuple[float, float]:
    """(observations, observations above ``bound``) of a histogram's buckets, every label set merged."""
    total = over = 0.0
    below: dict[float, float] = {}
    for labels, value in (buckets or {}).items():
        le = float(dict(labels)["le"])
        below[le] = below.get(le, 0.0) + value
    if below:
        total = below[float("inf")]
        over = total - below.get(bound, total)
    return total, over


def diff(after: metrics.Samples, before: metrics.Samples, name: str) -> dict[metrics.Labels, float]:
    old = before.get(name, {})
    return {labels: value - old.get(labels, 0.0) for labels, value in after.get(name, {}).items()}


def only(series: dict[metrics.Labels, float], label: str, value: str) -> dict[metrics.Labels, float]:
    return {labels: v for labels, v in series.items() if dict(labels).get(label) == value}


async def observe(settings: Settings, partitions: int, delivered: list[tuple[float, float]]
                  ) -> aio_pika.abc.AbstractConnection:
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(f"{settings.prefix}.latency_observer", exclusive=True, auto_delete=True)
    for partition in range(partitions):
        await queue.bind(broker.Names(settings.prefix).partitions_exchange, routing_key=str(partition))
    raw = await channel.get_underlay_channel()

    async def receive(message: aiormq.abc.DeliveredMessage) -> None:
        now = time.time()
        delivered.extend((e.recorded_at.timestamp(), now) for e in broker.from_batch_body(message.body).events)

    await raw.basic_consume(queue.name, receive, no_ack=True)
    return connection


async def settle(processes: fleet.Fleet, expected: float, subscribers: int) -> float:
    """Until the workers hold every partition, dealt evenly (each subscriber's P split by at most one), the
    same a second apart; the seconds it took."""
    began, previous = time.monotonic(), None
    while True:
        held = [metrics.total((await processes.scrape(w) or {}).get(HELD)) for w in processes.workers]
        balanced = sum(held) == expected and max(held) - min(held) <= subscribers
        if balanced and held == previous:
            return time.monotonic() - began
        previous = held if balanced else None
        await asyncio.sleep(1 if balanced else 0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(args: argparse.Namespace) -> None:
    name = f"bench_latency_{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env().with_projection_modules(*MODULES)
    settings = dataclasses.replace(settings, schema=name, prefix=name, partitions=args.partitions)
    subscribers = list(registry.load(settings.projection_modules))
    env = {"EVENTFLEET_LOG_FORMAT": "text", "EVENTFLEET_EXAMPLE_PAYMENT_TIMEOUT_SECONDS": "3"}
    if args.catchup_threshold is not None:
        env["EVENTFLEET_CATCHUP_THRESHOLD"] = str(args.catchup_threshold)
    logs = Path(tempfile.mkdtemp(prefix="bench_latency_"))
    delivered: list[tuple[float, float]] = []
    ticks: list[Tick] = []
    async with fleet.open_fleet(settings, logs, env=env) as processes, \
            lifecycle.open_pool(settings, min_size=2, max_size=10) as pool:
        relay: Process = processes.add("relay")
        relay.start()
        for _ in range(args.workers):
            processes.add("worker").start()
        await processes.wait_ready()
        partitions = await pool.fetchval("SELECT partitions FROM partitioning")
        observer = await observe(settings, partitions, delivered)
        if args.settle:
            waited = await settle(processes, partitions * len(subscribers), len(subscribers))
            print(f"settled in {waited:.1f}s")
        store = lifecycle.open_store(pool, settings)

        async def scrape(at: float) -> Tick:
            return Tick(at, [await processes.scrape(w) or {} for w in processes.workers],
                        await processes.scrape(relay) or {})
        start_tick = await scrape(0.0)
        pids = {p.name: p.pid for p in processes.processes}
        cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started, wall = time.perf_counter(), time.time()
        writer = asyncio.ensure_future(load.run_load(store, args.orders, concurrency=8, seed=1))
        while True:
            await asyncio.sleep(1.0)
            ticks.append(await scrape(time.perf_counter() - started))
            if writer.done() and (await progress.snapshot(pool, subscribers)).drained:
                break
        cpu = {name: cpu_seconds(pid) - cpu[name] for name, pid in pids.items()}
        report = writer.result()
        await observer.close()
        await processes.stop_all(30)
    print(f"{report.events} events for {args.orders} orders written in {report.seconds:.1f}s ({report.rate:.0f}/s),"
          f" {args.workers} workers, P={partitions}, settle {'yes' if args.settle else 'no'}; logs {logs}")
    workers_cpu = sum(v for k, v in cpu.items() if k.startswith("worker"))
    print(f"  CPU ms per event written: workers {1000 * workers_cpu / report.events:.2f},"
          f" relay {1000 * sum(v for k, v in cpu.items() if k.startswith('relay')) / report.events:.2f}")
    warm = next((t for t in ticks if t.at >= WARM_UP), ticks[0])
    after = diff(metrics.merge(ticks[-1].workers), metrics.merge(warm.workers), E2E)
    for label in sorted({dict(k).get("projection", "") for k in after}):
        part = only(after, "projection", label)
        n, over1 = count_over(part, 1.0)
        print(f"  {f'end to end after {warm.at:.1f}s':<36} {label:<16} p50 {1000 * metrics.quantile(0.5, part):7.1f} ms"
              f"  p99 {1000 * metrics.quantile(0.99, part):7.1f} ms  n={n:.0f}  >1s {over1:.0f}")
    end = ticks[-1]
    merged_end, merged_start = metrics.merge(end.workers), metrics.merge(start_tick.workers)
    for stage, name_, samples_end, samples_start in (
            ("relay publish+confirm per batch", RELAY, end.relay, start_tick.relay),
            ("worker apply per batch", APPLY, merged_end, merged_start),
            ("end to end (recorded_at to commit)", E2E, merged_end, merged_start)):
        series = diff(samples_end, samples_start, name_)
        labels = sorted({dict(k).get("projection", "") for k in series})
        for label in labels:
            part = only(series, "projection", label) if label else series
            n, over1 = count_over(part, 1.0)
            print(f"  {stage:<36} {label:<16} p50 {1000 * metrics.quantile(0.5, part):7.1f} ms"
                  f"  p99 {1000 * metrics.quantile(0.99, part):7.1f} ms  n={n:.0f}  >1s {over1:.0f}")
    waits = sorted(d - r for r, d in delivered if r >= wall)
    print(f"  {'recorded_at to broker (observer)':<36} {'':<16} p50 {1000 * pct(waits, 0.5):7.1f} ms"
          f"  p99 {1000 * pct(waits, 0.99):7.1f} ms  n={len(waits)}  >1s {sum(w > 1 for w in waits)}")
    print("per second: end-to-end observations, > 0.5 s, > 1 s; recorded_at->broker p99; partitions held per worker")
    previous = start_tick
    for tick in ticks:
        series = diff(metrics.merge(tick.workers), metrics.merge(previous.workers), E2E)
        n, over05 = count_over(series, 0.5)
        _, over1 = count_over(series, 1.0)
        window = sorted(d - r for r, d in delivered if previous.at <= r - wall < tick.at)
        held = "/".join(f"{metrics.total(w.get(HELD)):.0f}" for w in tick.workers)
        print(f"  t={tick.at:5.1f}s  e2e n={n:5.0f}  >0.5s {over05:4.0f}  >1s {over1:4.0f}"
              f"  broker p99 {1000 * pct(window, 0.99):7.1f} ms  held {held}")
        previous = tick


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--settle", action="store_true", help="write only once the leases are dealt and steady")
    parser.add_argument("--catchup-threshold", type=int, default=None)
    parser.add_argument("--partitions", type=int, default=None, help="P of the deployment (the store's default)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
