"""A worker process's projections: one broker session's consumers, the lag monitor and the catch-up, outliving outages.

In-process entry points: ``run_worker`` (until a stop event), ``run_consumer`` and ``consume_until_idle``
(one projection, until a stop or until its queue is empty)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from projections import registry
from projections.base import Projection
from store import db
from store.event_store import EventStore
from workers.config import Settings
from workers.projector import catchup, lag
from workers.projector.consumer import Consumer, DecodeCache, Stats
from workers.rebuild import backfill
from workers.runtime import health, lifecycle, retry

logger = logging.getLogger(__name__)


async def run_consumer(pool: db.Pool, channel: AbstractChannel, projection: Projection, settings: Settings, *,
                       stop: asyncio.Event, health_: health.Health | None = None) -> Stats:
    """Consume one projection's queue on ``channel`` until ``stop``; return what it did."""
    consumer = Consumer(lifecycle.open_store(pool, settings), channel, projection, settings, health_=health_)
    await consumer.run(stop)
    return consumer.stats


async def consume_until_idle(pool: db.Pool, channel: AbstractChannel, projection: Projection,
                             settings: Settings) -> Stats:
    """Apply everything in one projection's queue, then return (tests, benchmarks: no sleeps needed)."""
    return await Consumer(lifecycle.open_store(pool, settings), channel, projection, settings).until_idle()




async def run_worker(settings: Settings, projections: Sequence[Projection], health_: health.Health,
                     stop: asyncio.Event, *, pool: db.Pool | None = None) -> dict[str, Stats]:
    """Open Postgres (unless given a pool), then (re)connect to RabbitMQ and consume until ``stop``.

    A broker outage ends the session: its unacked deliveries return to the queue, and a new connection
    picks them up again (the checkpoints absorb the duplicates). Postgres outages are retried per batch.
    """
    stats = {p.name: Stats() for p in projections}
    async with contextlib.AsyncExitStack() as stack:
        if pool is None:
            # Per projection a connection for its consumer's batch, one per batch a catch-up applies at once
            # and one for its lag measurement; the catch-up's reads and locks; one to spare.
            pool = await _open_pool(stack, settings, (2 + catchup.APPLYING_AHEAD) * len(projections) + 2, health_)
        else:
            health_.up("postgres")
        store = lifecycle.open_store(pool, settings)
        catch_up = catchup.CatchUp(store, settings)
        progress = Progress(stats)

        def measured(projection: str, lag_: lag.Lag) -> None:
            progress.lags[projection] = lag_
            catch_up.note_lag(projection, lag_)

        monitor = asyncio.create_task(lag.run_lag_monitor(pool, [p.name for p in projections], health=health_,
                                                          measured=measured))
        stack.push_async_callback(_cancel, monitor)
        if settings.progress_seconds:
            stack.push_async_callback(_cancel, asyncio.create_task(progress.run(settings.progress_seconds)))
        while not stop.is_set():
            try:
                async for attempt in retry.retry_until(stop):
                    with attempt:
                        try:
                            await _session(store, settings, projections, health_, stop, stats, catch_up)
                        except retry.OUTAGE_ERRORS as exc:
                            health_.down("rabbitmq", exc)
                            raise
            except retry.OUTAGE_ERRORS:
                if not stop.is_set():
                    raise  # pragma: no cover - retry_until gives up only once stop is set
    return stats


class Progress:
    """A worker's INFO line per projection every so often: what it applied since the last line, and its lag."""

    def __init__(self, stats: dict[str, Stats]) -> None:
        self.stats = stats
        self.lags: dict[str, lag.Lag] = {}
        self._reported = {name: 0 for name in stats}

    def report(self) -> None:
        for name, s in self.stats.items():
            measured = self.lags.get(name)
            logger.info("progress", extra={
                "projection": name, "applied": s.applied - self._reported[name], "applied_total": s.applied,
                "lag_events": None if measured is None else measured.lag_events,
                "lag_seconds": None if measured is None else round(measured.lag_seconds, 1)})
            self._reported[name] = s.applied

    async def run(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.report()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _open_pool(stack: contextlib.AsyncExitStack, settings: Settings, size: int,
                     health_: health.Health) -> db.Pool:
    """The pool, retried until Postgres answers."""
    async for attempt in retry.retry_forever():
        with attempt:
            try:
                pool = await stack.enter_async_context(
                    lifecycle.open_pool(settings, min_size=1, max_size=size))
            except retry.OUTAGE_ERRORS as exc:
                health_.down("postgres", exc)
                raise
            health_.up("postgres")
            return pool
    raise AssertionError("unreachable")  # pragma: no cover - retried forever


async def _session(store: EventStore, settings: Settings, projections: Sequence[Projection],
                   health_: health.Health, stop: asyncio.Event, stats: dict[str, Stats],
                   catch_up: catchup.CatchUp) -> None:
    """One broker connection: a channel and a consumer per projection, until stop or the connection dies."""
    name = f"eventfleet worker {socket.gethostname()}:{os.getpid()}"
    connection = await aio_pika.connect(settings.amqp_url, client_properties={"connection_name": name})
    async with connection:
        health_.up("rabbitmq")
        # Projections first seen (no status row, no queue yet) are backfilled alongside: see rebuild_backfill.
        backfills = await backfill.claim_backfills(store, connection, settings.prefix, projections)
        consumers, cache = [], DecodeCache()
        for projection in projections:
            channel = await connection.channel()
            consumers.append(Consumer(store, channel, projection, settings, health_=health_,
                                      stats=stats[projection.name], cache=cache))
        catch_up.attach(consumers)
        logger.info("consuming", extra={"projections": [p.name for p in projections], "prefix": settings.prefix})
        try:
            async with asyncio.TaskGroup() as group:
                for consumer in consumers:
                    group.create_task(consumer.run(stop))
                group.create_task(catch_up.run(stop))
                if backfills:
                    group.create_task(backfill.run_backfills(store, backfills, stop))
        except BaseExceptionGroup as group:
            # One lost connection ends every consumer of it: report it as the single outage it is.
            if all(isinstance(e, retry.OUTAGE_ERRORS) for e in group.exceptions):
                raise group.exceptions[0] from None
            raise


def resolve(names: Sequence[str]) -> list[Projection]:
    """Projection instances by name; no names = every registered projection."""
    found = registry.load()
    return [registry.get(n)() for n in names] if names else [cls() for cls in found.values()]
