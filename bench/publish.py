"""A publication of every event against the relay alone, and the pipeline with and without a publication.

    python -m bench.publish [--events 30000] [--rounds 2] [--e2e-events 12000] [--partitions 4] [--skip-e2e]
                            [--group NAME]

One run, so each ratio compares figures measured side by side on the same (busy, shared) machine.

1. Relay against publication (issue 21: the publication of every event, JSON, through the fleet at >= 50% of
   the relay's own rate; the per-event exchange got 12%). A fresh deployment with P partitions; per round,
   ``--events`` events (orders of three) are appended, then timed: the relay (``relay_until_idle``) drains the
   outbox into the partition queues of the ``every_event`` publication; then the publication's consumers of
   every partition at once (``run_consumer``: the worker's path without leases, batches of ``batch_size``, its
   checkpoints, its outlet with publisher confirms), until it applied them all, publish every event as a CloudEvents JSON message to ``{prefix}.integration``, where a
   queue of the bench's own is bound to every type (messages routed and stored, as with a consumer; purged
   after each round). Rates in events/s; the ratio of the medians.
2. End to end (>= 80% of the same without the publication): 8 writers (``EventStore.append``, one event per
   append: each writer its own orders, placed, paid and shipped) into a fresh deployment with a relay process and one worker process
   running the example's read models (``order_summary``, ``customer_stats``), from the first append to both
   having applied everything (and, with the publication, ``orders_out`` too); without, then with, ``orders_out``
   (the example's publication, every order event) in the same worker. ``--group``: both runs' relay and worker in
   that worker group (EVENTFLEET_GROUP: one queue per partition feeds the read models and the publication).

Servers: ``EVENTFLEET_DATABASE_URL`` and ``EVENTFLEET_AMQP_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg

from bench import fanout, pipeline
from bench.relay import order
from eventfleet.examples.orders.publications import OrdersOut
from projections import registry
from projections.publication import envelope
from store import EventStore, Position, db
from workers import admin, broker, projector, relay
from workers.config import Settings
from workers.publication import frames
from workers.publication.every_event import EveryEvent

DATABASE_URL = os.environ.get("EVENTFLEET_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("EVENTFLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RELAY_TARGET, E2E_TARGET = 0.5, 0.8
#: The example's read models (bench/pipeline.py's too).
READ_MODELS = ("order_summary", "customer_stats")
WRITERS = 8

# Both publications were registered by their imports: the bench names what each phase runs. The example's read
# models are loaded, so that migrate creates their tables.
for _name in (EveryEvent.name, OrdersOut.name):
    registry.REGISTRY.pop(_name, None)
registry.load([registry.EXAMPLE])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def prefill(store: EventStore, events: int, tag: str) -> None:
    """``events`` events, orders of three (placed, paid, shipped) in streams of this round's own."""
    orders = events // 3
    for start in range(0, orders, 500):
        await store.append_batch([(f"order-{tag}-{i:07d}", order(i), -1) for i in range(start, min(start + 500, orders))])


async def publish_all(pool: db.Pool, connection: aio_pika.abc.AbstractConnection, settings: Settings,
                      events: int) -> None:
    """The publication's consumers on every partition at once, as a worker holding them all runs them, until it
    applied (published) ``events`` events."""
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run_consumer(pool, connection, EveryEvent(), settings, stop=stop))

    async def done() -> bool:
        if task.done():
            task.result()
        applied = await pool.fetchval("SELECT applied FROM projection_status WHERE projection = $1", EveryEvent.name)
        return bool((applied or 0) >= events)

    try:
        await pipeline.until(done, 900, "the publication published everything", every=0.01)
    finally:
        stop.set()
        await task


@dataclasses.dataclass
class Timed:
    """Wall seconds, this process's CPU seconds and the RabbitMQ node's, of a ``timed`` block."""

    wall: float = 0.0
    client: float = 0.0
    broker: float = 0.0

    def per(self, count: int) -> str:
        """CPU per item, in microseconds: this process's and the broker's."""
        return f"this process {self.client / count * 1e6:.0f} us, RabbitMQ {self.broker / count * 1e6:.0f} us"


@contextlib.asynccontextmanager
async def timed() -> AsyncIterator[Timed]:
    """Time the block: wall clock, this process's CPU, the broker node's CPU (bench.fanout reads it from /proc)."""
    beam = await fanout.broker_pid()
    spent = Timed()
    wall, client, broker = time.perf_counter(), time.process_time(), fanout.cpu_seconds(beam)
    yield spent
    spent.wall, spent.client = time.perf_counter() - wall, time.process_time() - client
    spent.broker = fanout.cpu_seconds(beam) - broker


async def raw_ceiling(store: EventStore, exchange: str, batch: int) -> float:
    """Events/s of publishing the publication's own messages (the store's events, enveloped up front) on one
    confirming channel, ``batch`` messages per write awaiting their confirms, as the outlet does, and nothing
    else: no queue, no decoding, no checkpoint. What one message per event costs the client and the broker,
    the publication's ceiling on this machine."""
    publication = EveryEvent()
    source = f"/eventfleet/bench/publications/{publication.name}"
    messages = []
    after = Position.START
    while page := await store.read_all(after, 5000):
        after = page[-1].position
        for event in page:
            public = publication.public(event)
            if public is not None:
                messages.append(envelope(public, event, source))
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
        raw = await channel.get_underlay_channel()
        async with timed() as spent:
            for at in range(0, len(messages), batch):
                await asyncio.gather(*await frames.publish_batch(raw, exchange, messages[at:at + batch]))
        print(f"  raw ceiling: CPU per message: {spent.per(len(messages))}", flush=True)
        return len(messages) / spent.wall
    finally:
        await connection.close()


async def relay_against_publication(args: argparse.Namespace, tag: str
                                    ) -> tuple[list[float], list[float], list[float]]:
    """Per round: the relay's rate, the publication's and the raw ceiling's (events/s)."""
    schema, prefix = f"bench_pub_{tag}", f"bench.pub.{tag}"
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0)
    names = broker.Names(prefix)
    await admin.run_migrate(DATABASE_URL, schema, partitions=args.partitions)
    connection = await aio_pika.connect(AMQP_URL)
    relays: list[float] = []
    publications: list[float] = []
    ceilings: list[float] = []
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        targets = await broker.declare_topology(channel, names, [EveryEvent.name], args.partitions)
        sink_channel = await connection.channel()
        exchange = await sink_channel.declare_exchange(names.integration_exchange, aio_pika.ExchangeType.TOPIC,
                                                       durable=True)
        sink = await sink_channel.declare_queue(f"{prefix}.sink", durable=True)
        await sink.bind(exchange, "#")
        async with db.create_pool(DATABASE_URL, schema, min_size=2, max_size=6) as pool:
            store = EventStore(pool, schema=schema)
            total = 0
            for n in range(args.rounds):
                await prefill(store, args.events, f"{n}")
                started = time.perf_counter()
                published = await relay.relay_until_idle(pool, targets)
                relays.append(published / (time.perf_counter() - started))
                total += published
                async with timed() as spent:
                    await publish_all(pool, connection, settings, total)
                publications.append(published / spent.wall)
                print(f"  publication: CPU per event (this process: the worker's path): {spent.per(published)}",
                      flush=True)
                routed = (await sink_channel.declare_queue(sink.name, passive=True)).declaration_result.message_count
                assert routed == published, (routed, published)
                await sink.purge()
                ceilings.append(await raw_ceiling(store, names.integration_exchange, settings.batch_size))
                await sink.purge()
                print(f"  round: relay {relays[-1]:,.0f} events/s, publication {publications[-1]:,.0f} events/s, "
                      f"raw ceiling {ceilings[-1]:,.0f} events/s", flush=True)
            await sink.delete(if_unused=False, if_empty=False)
    finally:
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            await broker.delete_topology(cleanup, names, [EveryEvent.name], args.partitions)
            await cleanup.queue_delete(f"{prefix}.sink")
        await connection.close()
        conn = await asyncpg.connect(DATABASE_URL)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    return relays, publications, ceilings


@dataclasses.dataclass
class Deployment:
    settings: Settings
    modules: str
    processes: list[asyncio.subprocess.Process] = dataclasses.field(default_factory=list)


async def write(store: EventStore, events: int, tag: str) -> None:
    """``WRITERS`` writers, each its own orders (no conflicts), one event per append: every order placed, then
    paid, then shipped, ``events`` in all."""
    orders = events // 3

    async def writer(w: int) -> None:
        mine = range(w, orders, WRITERS)
        for step in range(3):
            for i in mine:
                await store.append(f"order-{tag}-{i:07d}", [order(i)[step]], step - 1)

    await asyncio.gather(*(writer(w) for w in range(WRITERS)))


async def spawn(d: Deployment, role: str, logs: str) -> None:
    s = d.settings
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": s.database_url, "EVENTFLEET_AMQP_URL": s.amqp_url,
           "EVENTFLEET_SCHEMA": s.schema, "EVENTFLEET_PREFIX": s.prefix, "EVENTFLEET_HTTP_PORT": "0",
           "EVENTFLEET_PROJECTION_MODULES": d.modules, "EVENTFLEET_PARTITIONS": str(s.partitions),
           **({} if s.group is None else {"EVENTFLEET_GROUP": s.group})}
    log = os.open(f"{logs}/{s.schema}-{role}.log", os.O_WRONLY | os.O_CREAT)
    try:
        d.processes.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers", role, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log))
    finally:
        os.close(log)


async def end_to_end(args: argparse.Namespace, tag: str, publish: bool, logs: str) -> float:
    """Events/s from the first append to every subscriber having applied everything."""
    kind = "with" if publish else "without"
    schema, prefix = f"bench_pub_{tag}_{kind}", f"bench.pub.{tag}.{kind}"
    subscribers = [*READ_MODELS, *([OrdersOut.name] if publish else [])]
    modules = ",".join([registry.EXAMPLE, *(["eventfleet.examples.orders.publications"] if publish else [])])
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        partitions=args.partitions, group=args.group)
    # The leases the worker holds once it consumes: each subscriber's partitions, or its group's.
    leases = args.partitions * (1 if args.group is not None else len(subscribers))
    await admin.run_migrate(DATABASE_URL, schema, partitions=args.partitions)
    deployment = Deployment(settings, modules)
    events: int = args.e2e_events // 3 * 3
    try:
        await spawn(deployment, "relay", logs)
        await spawn(deployment, "worker", logs)
        conn = await db.connect(DATABASE_URL, schema)
        try:
            async def consuming() -> bool:
                held = await conn.fetchval("SELECT count(*) FROM leases WHERE owner IS NOT NULL AND expires_at > now()")
                return bool(held == leases)
            await pipeline.until(consuming, 90, "the worker holding every subscriber's partitions", every=0.1)
            await asyncio.sleep(1)  # its consumers on their queues
            async with db.create_pool(DATABASE_URL, schema, min_size=WRITERS, max_size=WRITERS) as pool:
                started = time.perf_counter()
                writing = asyncio.ensure_future(write(EventStore(pool, schema=schema), events, tag))

                applied = pipeline.applied_all(conn, events, writing, [registry.get(p) for p in READ_MODELS]
                                               + ([OrdersOut] if publish else []))
                finished = await pipeline.until(applied, 600, "every subscriber at lag 0")
                await writing
        finally:
            await conn.close()
    finally:
        for proc in deployment.processes:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in deployment.processes:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
        async with await aio_pika.connect(AMQP_URL) as connection:
            channel = await connection.channel()
            await broker.delete_topology(channel, broker.Names(prefix), subscribers, args.partitions)
            if args.group is not None:
                await broker.delete_group(channel, broker.Names(prefix), args.group, args.partitions)
        c = await asyncpg.connect(DATABASE_URL)
        await c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await c.close()
    return events / (finished - started)


async def run(args: argparse.Namespace) -> None:
    tag = uuid.uuid4().hex[:8]
    print(f"bench.publish: {args.events:,} events x {args.rounds} rounds, P={args.partitions}; this machine is "
          "shared and busy: only the ratios, measured side by side, mean anything", flush=True)
    relays, publications, ceilings = await relay_against_publication(args, tag)
    r, p, c = statistics.median(relays), statistics.median(publications), statistics.median(ceilings)
    print(f"relay alone:                       {r:,.0f} events/s (median)")
    print(f"publication of every event (JSON): {p:,.0f} events/s (median)")
    print(f"raw ceiling, its messages alone:   {c:,.0f} events/s (median; one message per event, confirms)")
    print(f"publication / relay: {p / r:.2f} (target >= {RELAY_TARGET}) {verdict(p / r >= RELAY_TARGET)}", flush=True)
    print(f"raw ceiling / relay: {c / r:.2f}; publication / raw ceiling: {p / c:.2f} (information: what the "
          f"fleet's path costs beyond the messages themselves)", flush=True)
    if args.skip_e2e:
        return
    logs = tempfile.mkdtemp(prefix="bench_publish_")
    without = await end_to_end(args, tag, False, logs)
    print(f"end to end, 8 writers, relay, 1 worker (2 read models):               {without:,.0f} events/s", flush=True)
    with_ = await end_to_end(args, tag, True, logs)
    print(f"end to end, 8 writers, relay, 1 worker (2 read models + orders_out):  {with_:,.0f} events/s")
    print(f"with / without the publication: {with_ / without:.2f} (target >= {E2E_TARGET}) "
          f"{verdict(with_ / without >= E2E_TARGET)} (logs in {logs})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--e2e-events", type=int, default=12_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--group", default=None,
                        help="end to end: the worker in this worker group (EVENTFLEET_GROUP), its subscribers fed by "
                             "one queue per partition")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
