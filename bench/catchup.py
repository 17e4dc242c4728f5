"""A catch-up alone against the ceiling in transactions of the same size, round after round in one run.

    python -m bench.catchup [--events 40000] [--rounds 3] [--batch 2000]

``bench/pipeline.py`` measures a whole worker (connecting, its lag monitor, its consumers); this measures
only what a catch-up does per event, for working on it: ``--events`` order events are written once into a
fresh schema; then each round empties the read models and checkpoints, runs ``CatchUp.catch_up`` over
both projections (their consumers on real channels of empty queues, in this process, with the process
settings of ``eventfleet`` commands), and right after it the ceiling: the same events pre-decoded, applied
by ``bench.pipeline_handwritten.ceiling`` in transactions of ``--batch``, into a schema of its own. Each
round prints both rates, the catch-up's CPU per event, and their ratio; the last line gives the median.
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
from store import EventStore, db
from workers.config import Settings
from workers.projector import catchup, consumer
from workers.runtime import tuning


async def catch_up_once(store: EventStore, connection: aio_pika.abc.AbstractConnection,
                        settings: Settings) -> tuple[float, float]:
    """Empty the read models and checkpoints, catch both projections up; return (events/s, CPU us/event)."""
    await pipeline.reset_read_models(store.pool)
    consumers = []
    for cls in (CustomerStats, OrderSummary):
        c = consumer.Consumer(store, await connection.channel(), cls(), settings)
        await c.open_queue()
        consumers.append(c)
    cpu, started = time.process_time(), time.perf_counter()
    read = await catchup.CatchUp(store, settings).catch_up(consumers)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    events = read["customer_stats"]
    if read != {"customer_stats": events, "order_summary": events}:
        raise RuntimeError(f"the catch-up read {read}")
    for c in consumers:
        await c.channel.close()
    return events / seconds, 1e6 * cpu / events


async def run(args: argparse.Namespace) -> None:
    lab = pipeline.Lab(Settings.from_env())
    try:
        settings = dataclasses.replace(await lab.deployment("catchup"), catchup_batch_size=args.batch)
        schedules = pipeline.plan(args.events, 8)
        ratios = []
        async with db.create_pool(settings.database_url, settings.schema, min_size=8, max_size=8) as pool:
            store = EventStore(pool, schema=settings.schema)
            await pipeline.write(schedules, pipeline.store_step(store))
            await store.notifier.flush()
            connection = await lab.connection()
            print(f"bench.catchup: {args.events} events, batches of {args.batch}", flush=True)
            for n in range(1, args.rounds + 1):
                rate, cpu_us = await catch_up_once(store, connection, settings)
                ceiling_settings = await lab.deployment(f"ceiling{n}")
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
    parser.add_argument("--batch", type=int, default=2000, help="the catch-up's batch and the ceiling's transaction")
    args = parser.parse_args()
    tuning.tune_gc()  # as every eventfleet command does (workers.cli)
    asyncio.run(run(args))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
