"""``eventfleet worker``: consume projection queues in batches and apply them exactly once.

One channel per projection (batches are acked with one multiple-ack, so tags must not interleave), one
``Consumer`` per channel. ``Consumer.handle`` is the only function that acks or rejects: after the batch's
transaction committed. Everything else (reconnecting, lag gauges, the HTTP server, graceful stop) wraps it.
In-process entry points: ``run_consumer`` (until a stop event) and ``consume_until_idle`` (until the queue
is empty), both over a pool and a channel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue

from projections import registry
from projections.base import Projection
from store import db
from store.event_store import EventStore, RecordedEvent
from workers import broker, dead_letters, errors, health, http, lag, metrics, rebuild_backfill
from workers.checkpoints import BatchResult
from workers.config import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ChannelLost(errors.BrokerUnavailable):
    """The RabbitMQ channel or connection closed under the consumer; unacked deliveries come back."""


@dataclasses.dataclass(slots=True)
class Stats:
    """What one process did for one projection (the Prometheus counters, as plain numbers)."""

    applied: int = 0
    duplicates: int = 0
    gaps_filled: int = 0
    held: int = 0
    dead_lettered: int = 0
    undecodable: int = 0
    batches: int = 0


class Consumer:
    """One projection's deliveries on one channel: batches them, applies them, acks after commit."""

    def __init__(self, store: EventStore, channel: AbstractChannel, projection: Projection, settings: Settings,
                 *, health_: health.Health | None = None, stats: Stats | None = None) -> None:
        self.store, self.channel, self.projection, self.settings = store, channel, projection, settings
        self.names = broker.Names(settings.prefix)
        self.health = health_ or health.Health()
        self.stats = stats or Stats()
        self.stopping = False
        self._dlx: AbstractExchange | None = None

    async def open_queue(self) -> AbstractQueue:
        """Declare the topology (idempotent), set the prefetch and return the projection's queue."""
        await self.channel.set_qos(prefetch_count=self.settings.prefetch)
        await broker.declare_topology(self.channel, self.names, [self.projection.name])
        self._dlx = await self.channel.get_exchange(self.names.dead_letter_exchange, ensure=False)
        return await self.channel.get_queue(self.names.queue(self.projection.name), ensure=False)

    async def handle(self, messages: Sequence[AbstractIncomingMessage]) -> BatchResult:
        """Decide the fate of a batch of deliveries: dead-letter, apply, then reject or ack each one."""
        started = time.perf_counter()
        events: list[RecordedEvent] = []
        delivered: dict[tuple[str, int], list[AbstractIncomingMessage]] = {}
        bad: list[tuple[AbstractIncomingMessage, errors.MalformedMessage]] = []
        for message in messages:
            try:
                event = broker.from_message(message, self.store.registry)
            except errors.MalformedMessage as exc:
                bad.append((message, exc))
                continue
            events.append(event)
            delivered.setdefault((event.stream_id, event.version), []).append(message)
        if bad:
            await self._dead_letter_undecodable(bad)
        result = await self._outage_retrying(
            lambda: dead_letters.apply_settled(self.store, self.projection, events))
        self._count(result, time.perf_counter() - started)
        settled: set[int] = set()
        for parked in result.parked:
            copies = delivered.get((parked.event.stream_id, parked.event.version))
            if copies:
                await copies[0].reject(requeue=False)
                settled.add(id(copies[0]))
            else:
                await self._publish_dead_letter(parked.event)
        rest = [m for ms in delivered.values() for m in ms if id(m) not in settled]
        if rest:
            last = max(rest, key=lambda m: m.delivery_tag or 0)
            await last.ack(multiple=True)
        return result

    async def _dead_letter_undecodable(self, bad: list[tuple[AbstractIncomingMessage, errors.MalformedMessage]]) -> None:
        items = [(str(exc), message.body) for message, exc in bad]
        await self._outage_retrying(lambda: dead_letters.record_undecodable(self.store.pool, self.projection.name, items))
        for message, exc in bad:
            logger.warning("undecodable message dead-lettered", extra={
                "projection": self.projection.name, "message_id": message.message_id, "error": str(exc)})
            await message.reject(requeue=False)
        metrics.DEAD_LETTERED.labels(self.projection.name).inc(len(bad))
        self.stats.undecodable += len(bad)
        self.stats.dead_lettered += len(bad)

    async def _publish_dead_letter(self, event: RecordedEvent) -> None:
        """A parked event that came from the store (a gap), not from a delivery: put a copy in the DLQ."""
        assert self._dlx is not None, "open_queue() first"
        await self._dlx.publish(broker.to_message(event), routing_key=self.projection.name)

    def _count(self, result: BatchResult, seconds: float) -> None:
        name, now = self.projection.name, time.time()
        metrics.APPLIED.labels(name).inc(len(result.applied))
        metrics.DUPLICATES.labels(name).inc(result.duplicates)
        metrics.GAPS_FILLED.labels(name).inc(result.gaps_filled)
        metrics.DEAD_LETTERED.labels(name).inc(len(result.parked))
        metrics.APPLY_SECONDS.labels(name).observe(seconds)
        end_to_end = metrics.END_TO_END_SECONDS.labels(name)
        for event in result.applied:
            end_to_end.observe(max(0.0, now - event.recorded_at.timestamp()))
        s = self.stats
        s.applied += len(result.applied)
        s.duplicates += result.duplicates
        s.gaps_filled += result.gaps_filled
        s.held += result.held
        s.dead_lettered += len(result.parked)
        s.batches += 1
        logger.debug("batch applied", extra={"projection": name, "applied": len(result.applied),
                                             "duplicates": result.duplicates, "seconds": round(seconds, 4)})

    async def _outage_retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run a database step, retrying through Postgres outages until it works, the stop, or the channel dies."""
        retrying = health.retry_forever().copy(
            stop=lambda _: self.stopping or self.channel.is_closed)
        async for attempt in retrying:
            with attempt:
                try:
                    value = await step()
                except health.OUTAGE_ERRORS as exc:
                    self.health.down("postgres", exc, projection=self.projection.name)
                    raise
                self.health.up("postgres")
                return value
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set (the batch in flight is committed and acked) or the channel closes."""
        queue = await self.open_queue()
        buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()

        lost = False

        def wake(*_: Any) -> None:
            buffer.put_nowait(None)

        def on_close(*_: Any) -> None:
            nonlocal lost
            lost = True
            wake()

        self.channel.close_callbacks.add(on_close)
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(wake)
        tag = await queue.consume(buffer.put, no_ack=False)
        try:
            # Deliveries still buffered at a stop are never handled: they go back to the queue on close.
            while not (stop.is_set() or lost or self.channel.is_closed):
                batch: list[AbstractIncomingMessage] = []
                message = await buffer.get()
                while message is not None:
                    batch.append(message)
                    if len(batch) >= self.settings.batch_size or buffer.empty():
                        break
                    message = buffer.get_nowait()
                if batch:
                    await self.handle(batch)
        finally:
            self.stopping = True
            stopper.cancel()
            if not self.channel.is_closed:
                with contextlib.suppress(*health.OUTAGE_ERRORS):
                    await queue.cancel(tag)
        if not stop.is_set():
            raise ChannelLost()

    async def until_idle(self) -> Stats:
        """Consume until the queue is empty, then return; the bounded twin of ``run`` for tests and benches.

        Deliveries are pushed as in ``run``. When none is buffered, a passive declare on the same channel
        asks for the queue's ready count: its answer comes after every delivery the broker pushed before it
        (frames are ordered on a channel), so once those are handed over, zero ready means done.
        """
        queue = await self.open_queue()
        buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        tag = await queue.consume(buffer.put, no_ack=False)
        try:
            while True:
                batch = _take(buffer, self.settings.batch_size)
                if batch:
                    await self.handle(batch)
                    continue
                probe = await self.channel.declare_queue(queue.name, passive=True)
                await _hand_over()
                if buffer.empty() and not probe.declaration_result.message_count:
                    break
                if buffer.empty():
                    await asyncio.sleep(0.005)  # ready but not yet pushed to us: the broker is on its way
        finally:
            await queue.cancel(tag)
        await _hand_over()
        while batch := _take(buffer, self.settings.batch_size):  # pushed before the cancel took effect
            await self.handle(batch)
        return self.stats


def _take(buffer: asyncio.Queue[AbstractIncomingMessage], n: int) -> list[AbstractIncomingMessage]:
    batch: list[AbstractIncomingMessage] = []
    while len(batch) < n and not buffer.empty():
        batch.append(buffer.get_nowait())
    return batch


async def _hand_over() -> None:
    """Let deliveries already received run through aiormq's and aio-pika's callback tasks into the buffer."""
    for _ in range(8):
        await asyncio.sleep(0)


async def run_consumer(pool: db.Pool, channel: AbstractChannel, projection: Projection, settings: Settings, *,
                       stop: asyncio.Event, health_: health.Health | None = None) -> Stats:
    """Consume one projection's queue on ``channel`` until ``stop``; return what it did."""
    consumer = Consumer(_store(pool, settings), channel, projection, settings, health_=health_)
    await consumer.run(stop)
    return consumer.stats


async def consume_until_idle(pool: db.Pool, channel: AbstractChannel, projection: Projection,
                             settings: Settings) -> Stats:
    """Apply everything in one projection's queue, then return (tests, benchmarks: no sleeps needed)."""
    return await Consumer(_store(pool, settings), channel, projection, settings).until_idle()


def _store(pool: db.Pool, settings: Settings) -> EventStore:
    return EventStore(pool, schema=settings.schema, max_payload_bytes=settings.max_payload_bytes)


async def run_worker(settings: Settings, projections: Sequence[Projection], health_: health.Health,
                     stop: asyncio.Event, *, pool: db.Pool | None = None) -> dict[str, Stats]:
    """Open Postgres (unless given a pool), then (re)connect to RabbitMQ and consume until ``stop``.

    A broker outage ends the session: its unacked deliveries return to the queue, and a new connection
    picks them up again (the checkpoints absorb the duplicates). Postgres outages are retried per batch.
    """
    stats = {p.name: Stats() for p in projections}
    async with contextlib.AsyncExitStack() as stack:
        if pool is None:
            pool = await _open_pool(stack, settings, len(projections) + 2, health_)
        else:
            health_.up("postgres")
        store = _store(pool, settings)
        monitor = asyncio.create_task(lag.run_lag_monitor(pool, [p.name for p in projections], health=health_))
        stack.push_async_callback(_cancel, monitor)
        failures = 0
        while not stop.is_set():
            try:
                await _session(store, settings, projections, health_, stop, stats)
                failures = 0
            except health.OUTAGE_ERRORS as exc:
                health_.down("rabbitmq", exc)
                failures += 1
                delay = random.uniform(0, min(10.0, 0.2 * 2**failures))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
    return stats


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _open_pool(stack: contextlib.AsyncExitStack, settings: Settings, size: int,
                     health_: health.Health) -> db.Pool:
    """The pool, retried until Postgres answers."""
    async for attempt in health.retry_forever():
        with attempt:
            try:
                pool = await stack.enter_async_context(
                    db.create_pool(settings.database_url, settings.schema, min_size=1, max_size=size))
            except health.OUTAGE_ERRORS as exc:
                health_.down("postgres", exc)
                raise
            health_.up("postgres")
            return pool
    raise AssertionError("unreachable")  # pragma: no cover - retried forever


async def _session(store: EventStore, settings: Settings, projections: Sequence[Projection],
                   health_: health.Health, stop: asyncio.Event, stats: dict[str, Stats]) -> None:
    """One broker connection: a channel and a consumer per projection, until stop or the connection dies."""
    name = f"eventfleet worker {socket.gethostname()}:{os.getpid()}"
    connection = await aio_pika.connect(settings.amqp_url, client_properties={"connection_name": name})
    async with connection:
        health_.up("rabbitmq")
        # Projections first seen (no status row, no queue yet) are backfilled alongside: see rebuild_backfill.
        backfills = await rebuild_backfill.claim_backfills(store, connection, settings.prefix, projections)
        consumers = []
        for projection in projections:
            channel = await connection.channel()
            consumers.append(Consumer(store, channel, projection, settings, health_=health_,
                                      stats=stats[projection.name]))
        logger.info("consuming", extra={"projections": [p.name for p in projections], "prefix": settings.prefix})
        try:
            async with asyncio.TaskGroup() as group:
                for consumer in consumers:
                    group.create_task(consumer.run(stop))
                if backfills:
                    group.create_task(rebuild_backfill.run_backfills(store, backfills, stop))
        except BaseExceptionGroup as group:
            # One lost connection ends every consumer of it: report it as the single outage it is.
            if all(isinstance(e, health.OUTAGE_ERRORS) for e in group.exceptions):
                raise group.exceptions[0] from None
            raise


def resolve(names: Sequence[str]) -> list[Projection]:
    """Projection instances by name; no names = every registered projection."""
    found = registry.load_builtin()
    return [registry.get(n)() for n in names] if names else [cls() for cls in found.values()]


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet worker [--projection NAME ...]``: run until SIGTERM/SIGINT, then stop gracefully."""
    projections = resolve(args.projection)
    health_, stop = health.Health(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with http.serve(settings.http_port, health_.ready):
        worker = asyncio.create_task(run_worker(settings, projections, health_, stop))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({worker, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not worker.done():
            logger.info("stopping", extra={"timeout": settings.stop_timeout})
            # Leave a margin for closing connections; whatever is unacked at a cancel comes back later.
            done, _ = await asyncio.wait({worker}, timeout=max(0.5, settings.stop_timeout - 1.5))
            if not done:
                logger.warning("batch in flight did not finish in time; its deliveries will be redelivered")
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
                print(json.dumps({"worker": "stopped", "timeout": True}), flush=True)
                return 0
        stats = worker.result()
    report = {name: dataclasses.asdict(s) for name, s in stats.items()}
    logger.info("worker stopped", extra={"stats": report})
    print(json.dumps({"worker": "stopped", "pid": os.getpid(), "projections": report}), flush=True)
    return 0
