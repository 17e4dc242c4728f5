"""Relay throughput against the raw ceiling of aio-pika publishing with confirms, in one run.

    python -m bench.relay [--events 50000] [--batch-size N] [--window 1000] [--segments 4] [--partitions P]
                          [--message-events N]

Raw ceiling: the same messages (the pre-filled events as the relay's batches make them: per claim of
``--batch-size`` rows, each partition's events in messages of up to ``--message-events``, all encoded
before the clock starts) published on one confirming channel, ``--window`` publishes started before
their confirms are awaited together, mandatory and persistent, to the deployment's partitions exchange:
the same routing as the relay (routing key = partition, each projection's quorum queue of that partition
bound to it). Relay: ``relay_until_idle`` draining a pre-filled outbox of ``--events`` events (claim,
group by partition, encode, publish pipelined, confirm, delete, commit per batch). Rates are in events/s
(and batch messages/s). The two run in ``--segments`` alternating segments of equal size (ABBA) so the
load of this shared machine hits both alike; queues are purged after every segment and deleted at the
end, and the schema (migrated with ``--partitions``) is dropped. Servers: ``EVENTFLEET_DATABASE_URL`` and
``EVENTFLEET_AMQP_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import functools
import time
import uuid
from decimal import Decimal
from typing import Any

import aio_pika
import asyncpg
import tenacity
from aio_pika.abc import AbstractChannel, AbstractExchange

from eventfleet.examples.orders.events import LineItem, OrderPaid, OrderPlaced, OrderShipped
from projections import registry
from store import EventStore, db
from store.partitions import DEFAULT_PARTITIONS
from workers import admin, broker, relay
from workers.config import Settings
from workers.relay.publish import partition_batches
from workers.runtime import metrics


def order(i: int) -> list[Any]:
    now = dt.datetime.now(dt.UTC)
    oid = f"{i:08d}"
    items = (LineItem("p-1", "Widget", "W-1", 2, Decimal("4.50")), LineItem("p-2", "Gadget", "G-2", 1, Decimal(12)))
    return [OrderPlaced(oid, "c-1", items, Decimal("21.00"), Decimal("2.10"), Decimal("23.10"), now),
            OrderPaid(oid, "c-1", Decimal("23.10"), now), OrderShipped(oid, "c-1", "ups", now)]


async def prefill(store: EventStore, events: int) -> None:
    """Append ``events`` events (orders of three, the last maybe shorter) in transactions of 1,500."""
    orders = (events + 2) // 3
    for start in range(0, orders, 500):
        await store.append_batch([(f"order-{i:08d}", order(i)[:events - 3 * i], -1)
                                  for i in range(start, min(start + 500, orders))])


class Clock:
    """Accumulated events, batch messages and seconds of one side of the comparison."""

    def __init__(self) -> None:
        self.events, self.messages, self.seconds = 0, 0, 0.0

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def message_rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def batches(rows: list[Any], targets: broker.Targets, batch_size: int) -> list[tuple[str, aio_pika.Message]]:
    """The batch messages the relay makes of these rows, claimed ``batch_size`` at a time."""
    messages: list[tuple[str, aio_pika.Message]] = []
    for i in range(0, len(rows), batch_size):
        messages += partition_batches(rows[i:i + batch_size], targets.partitions,
                                      message_events=targets.message_events, message_bytes=targets.message_bytes)[0]
    return messages


async def raw_segment(exchange: AbstractExchange, messages: list[tuple[str, aio_pika.Message]], events: int,
                      window: int, clock: Clock) -> None:
    """Publish with confirms, ``window`` at a time pipelined (the same code path as the relay's batch)."""
    started = time.perf_counter()
    for i in range(0, len(messages), window):
        await relay.publish_confirmed(exchange, messages[i:i + window], confirm_timeout=60)
    clock.seconds += time.perf_counter() - started
    clock.events += events
    clock.messages += len(messages)


async def relay_segment(pool: db.Pool, targets: broker.Targets, batch_size: int, until: int | None,
                        clock: Clock) -> None:
    """Let the relay publish batches until ``until`` events in all (None: until the outbox is empty)."""
    sent = relay_messages()
    started = time.perf_counter()
    if until is None:
        clock.events += await relay.relay_until_idle(pool, targets, batch_size=batch_size)
    else:
        while clock.events < until:
            clock.events += await relay.publish_batch(pool, targets, batch_size)
    clock.seconds += time.perf_counter() - started
    clock.messages += int(relay_messages() - sent)


def relay_messages() -> float:
    """The relay's count of batch messages published (eventfleet_relay_messages_total)."""
    return metrics.registry.get_sample_value("eventfleet_relay_messages_total") or 0.0


async def purge(channel: AbstractChannel, names: broker.Names, projections: list[str], partitions: int) -> None:
    for p in projections:
        for n in range(partitions):
            await (await channel.get_queue(names.partition_queue(p, n))).purge()


async def run(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    tag = uuid.uuid4().hex[:8]
    schema, names = f"bench_relay_{tag}", broker.Names(f"bench.{tag}")
    projections = list(registry.load([registry.EXAMPLE]))
    try:
        await admin.run_migrate(settings.database_url, schema, partitions=args.partitions)
        connection = await aio_pika.connect(settings.amqp_url)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            targets = await broker.declare_topology(channel, names, projections, args.partitions,
                                                    message_events=args.message_events)
            raw, relayed = await compare(args, settings, schema, channel, targets, names, projections)
            batches_only, with_events = await events_exchange_cost(args, settings, schema, channel, targets, names,
                                                                  projections)
        finally:
            await connection.close()
        print(f"raw aio-pika, pipelined confirms: {raw.rate:8.0f} events/s ({raw.message_rate:.0f} msgs/s)")
        print(f"relay draining the outbox:        {relayed.rate:8.0f} events/s ({relayed.message_rate:.0f} msgs/s)")
        print(f"ratio relay / raw:                {relayed.rate / raw.rate:8.2f}")
        print(f"relay, partition batches only:    {batches_only.rate:8.0f} events/s")
        print(f"relay, + {names.exchange} (one message per event, a queue bound with '#'): "
              f"{with_events.rate:8.0f} events/s: the option costs {1 - with_events.rate / batches_only.rate:.0%}"
              " of the relay's rate")
    finally:
        await clean_up(settings, schema, names, projections, args.partitions)


async def compare(args: argparse.Namespace, settings: Settings, schema: str, channel: AbstractChannel,
                  targets: broker.Targets, names: broker.Names, projections: list[str]) -> tuple[Clock, Clock]:
    """Pre-fill the outbox, then time raw publishing and the relay in alternating segments."""
    async with db.create_pool(settings.database_url, schema, min_size=1, max_size=2) as pool:
        store = EventStore(pool, schema=schema)
        await prefill(store, args.events)
        await store.notifier.flush()
        rows = list(await pool.fetch("SELECT * FROM events ORDER BY global_position LIMIT $1", args.events))
        print(f"{len(rows)} events, {args.partitions} partitions x {len(projections)} projections' quorum queues"
              f" bound to {names.partitions_exchange}, relay batch {args.batch_size}, messages of up to"
              f" {args.message_events} events, raw window {args.window}, {args.segments} segments", flush=True)
        # Segments alternate raw/relay, relay/raw, ... so drift of this shared machine hits both.
        raw, relayed = Clock(), Clock()
        size = -(-len(rows) // args.segments)
        for k in range(args.segments):
            chunk = rows[k * size:(k + 1) * size]
            messages = batches(chunk, targets, args.batch_size)  # encoded before the clock starts
            until = None if k == args.segments - 1 else min(len(rows), (k + 1) * size)
            sides = [functools.partial(raw_segment, targets.partitions_exchange, messages, len(chunk), args.window,
                                       raw),
                     functools.partial(relay_segment, pool, targets, args.batch_size, until, relayed)]
            for side in sides if k % 2 == 0 else sides[::-1]:
                await side()
                await purge(channel, names, projections, args.partitions)
        assert relayed.events == len(rows), (relayed.events, len(rows))
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    return raw, relayed


async def events_exchange_cost(args: argparse.Namespace, settings: Settings, schema: str, channel: AbstractChannel,
                               targets: broker.Targets, names: broker.Names, projections: list[str],
                               ) -> tuple[Clock, Clock]:
    """The relay over the same events again, without and with the per-event exchange (EVENTFLEET_EVENTS_EXCHANGE),
    in alternating segments; the per-event messages go to one queue of another consumer, bound with '#'."""
    events_targets = dataclasses.replace(targets, events_exchange=await broker.declare_exchange(channel, names))
    other = await channel.declare_queue(f"{names.prefix}.other-consumer", durable=True,
                                        arguments={"x-queue-type": "quorum"})
    await other.bind(names.exchange, routing_key="#")
    only, both = Clock(), Clock()
    try:
        async with db.create_pool(settings.database_url, schema, min_size=1, max_size=2) as pool:
            positions = [r["global_position"] for r in await pool.fetch(
                "SELECT global_position FROM events ORDER BY global_position")]
            size = -(-len(positions) // args.segments)
            for k in range(args.segments):
                chunk = positions[k * size:(k + 1) * size]
                sides = [(targets, only), (events_targets, both)]
                for side_targets, clock in sides if k % 2 == 0 else sides[::-1]:
                    await pool.execute("INSERT INTO outbox (global_position) SELECT unnest($1::bigint[])", chunk)
                    await relay_segment(pool, side_targets, args.batch_size, None, clock)
                    await purge(channel, names, projections, args.partitions)
                    await other.purge()
    finally:
        await other.delete(if_unused=False, if_empty=False)
    return only, both


async def clean_up(settings: Settings, schema: str, names: broker.Names, projections: list[str],
                   partitions: int) -> None:
    """Delete the queues and exchanges and drop the schema, each on a fresh connection and retried:
    another engineer's fault test may be restarting a server right now, and nothing may leak."""
    async for attempt in _patiently():
        with attempt:
            connection = await aio_pika.connect(settings.amqp_url)
            try:
                channel = await connection.channel()
                await broker.delete_topology(channel, names, projections, partitions)
            finally:
                await connection.close()
    async for attempt in _patiently():
        with attempt:
            conn = await asyncpg.connect(settings.database_url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()


def _patiently() -> tenacity.AsyncRetrying:
    return tenacity.AsyncRetrying(stop=tenacity.stop_after_delay(120), wait=tenacity.wait_fixed(1), reraise=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=Settings().relay_batch_size)
    parser.add_argument("--window", type=int, default=1000, help="raw publishes in flight per confirm wait")
    parser.add_argument("--segments", type=int, default=4, help="alternating raw/relay segments")
    parser.add_argument("--partitions", type=int, default=Settings.from_env().partitions or DEFAULT_PARTITIONS,
                        help="P of the bench's schema (EVENTFLEET_PARTITIONS, else 16)")
    parser.add_argument("--message-events", type=int, default=Settings().message_events,
                        help="events per batch message at most (EVENTFLEET_MESSAGE_EVENTS)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
