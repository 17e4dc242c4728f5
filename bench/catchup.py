"""A worker's catch-ups alone against the ceiling in transactions of the same size, round after round in one run.

    python -m bench.catchup [--events 40000] [--rounds 3] [--batch 2000] [--partitions 16] [--at-once 2]

``bench/pipeline.py`` measures a whole worker (connecting, its leases, its lag monitor, its consumers); this
measures only what catch-ups do per event, for working on them: ``--events`` order events are written once
into a fresh schema of ``--partitions`` partitions; then each round empties the read models and checkpoints
and catches every partition of both projections up from the store, as one worker holding them all would:
a ``Consumer`` per projection and partition on a channel of its own (no queue is consumed), ``--at-once``
catch-ups at a time (the worker's ``CATCHUPS_AT_ONCE``), each reading its partition in reads of ``--batch``
(``CatchUp.run``), in this process, with the process settings of ``eventfleet`` commands. Right after
it the ceiling: the same events pre-decoded, applied by ``bench.pipeline_handwritten.ceiling`` in
transactions of ``--batch``, into a schema of its own. Each round prints both rates, the catch-up's CPU per
event, and their ratio; the last line gives the median.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import statistics
import time

import aio_pika

from bench import pipeline, pipeline_handwritten
from eventfleet.examples.orders.projections import CustomerStats, OrderSummary
from store import EventStore, Position, db
from store.partitions import DEFAULT_PARTITIONS
from workers.config import Settings
from workers.projector import consumer, deliveries, fleet
from workers.runtime import tuning


async def catch_up_once(store: EventStore, connection: aio_pika.abc.AbstractConnection, settings: Settings,
                        events: int, at_once: int) -> tuple[float, float]:
    """Empty the read models and checkpoints, catch every partition of both projections up; return (events/s,
    CPU us/event)."""
    await pipeline.reset_read_models(store.pool)
    partitions = await store.partitions()
    catchups = asyncio.Semaphore(at_once)
    consumers = []
    for cls in (CustomerStats, OrderSummary):
        projection, cache = cls(), deliveries.DecodeCache()
        for partition in range(partitions):
            c = consumer.Consumer(store, await connection.channel(), projection, partition, settings, cache=cache,
                                  catchups=catchups)
            await c.open()
            consumers.append(c)
    cpu, started = time.process_time(), time.perf_counter()
    read = await asyncio.gather(*(c.catchup.run(Position.START) for c in consumers))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    per_projection = {name: sum(n for c, n in zip(consumers, read, strict=True) if c.projection.name == name)
                      for name in (CustomerStats.name, OrderSummary.name)}
    if per_projection != {CustomerStats.name: events, OrderSummary.name: events}:
        raise RuntimeError(f"the catch-ups read {per_projection} of {events} events")
    for c in consumers:
        await c.channel.close()
    return events / seconds, 1e6 * cpu / events


async def run(args: argparse.Namespace) -> None:
    lab = pipeline.Lab(Settings.from_env(), partitions=args.partitions)
    try:
        settings = dataclasses.replace(await lab.deployment("catchup", topology=None), catchup_batch_size=args.batch)
        schedules = pipeline.plan(args.events, 8)
        ratios = []
        size = max(8, 2 * args.at_once + 2)  # a catch-up holds two connections: a read ahead of an apply
        async with db.create_pool(settings.database_url, settings.schema, min_size=size, max_size=size) as pool:
            store = EventStore(pool, schema=settings.schema)
            await pipeline.write(schedules, pipeline.store_step(store))
            await store.notifier.flush()
            events = int(await pool.fetchval("SELECT count(*) FROM events"))
            connection = await lab.connection()
            print(f"bench.catchup: {events} events in {args.partitions} partitions, reads and batches of"
                  f" {args.batch}, {args.at_once} catch-ups at once", flush=True)
            for n in range(1, args.rounds + 1):
                rate, cpu_us = await catch_up_once(store, connection, settings, events, args.at_once)
                ceiling_settings = await lab.deployment(f"ceiling{n}", topology=None)
                ceiling = await pipeline_handwritten.ceiling(
                    ceiling_settings.database_url, ceiling_settings.schema, pipeline.interleaved(schedules), args.batch)
                ratios.append(rate / ceiling)
                print(f"round {n}: catch-up {rate:8.0f} events/s (CPU {cpu_us:4.1f} us/event), ceiling {ceiling:8.0f}"
                      f" events/s: {rate / ceiling:.0%}", flush=True)
        print(f"median: {statistics.median(ratios):.0%} of the ceiling in transactions of {args.batch}")
    finally:
        await lab.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.catchup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2000, help="the catch-up's reads and the ceiling's transaction")
    parser.add_argument("--partitions", type=int, default=Settings.from_env().partitions or DEFAULT_PARTITIONS,
                        help="P of the schema (EVENTFLEET_PARTITIONS, else a new schema's default)")
    parser.add_argument("--at-once", type=int, default=fleet.CATCHUPS_AT_ONCE,
                        help="catch-ups running at once (a worker's limit)")
    args = parser.parse_args()
    tuning.tune_gc()  # as every eventfleet command does (workers.cli)
    asyncio.run(run(args))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
