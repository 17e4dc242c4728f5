"""A worker process's projections: its leases, one broker session's partition consumers and the lag monitor,
outliving outages.

In-process entry points: ``run_worker`` (until a stop event, the fleet's member), ``run_consumer`` and
``consume_until_idle`` (every partition of one projection, no leases: until a stop or until its queues are
empty)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

from aio_pika.abc import AbstractChannel, AbstractConnection

from projections import registry
from projections.base import Projection
from store import db
from store import migrate as store_migrate
from store.event_store import EventStore
from workers import broker, errors
from workers.config import Settings
from workers.projector import dlq, lag
from workers.projector.batcher import Stats
from workers.projector.consumer import Consumer
from workers.projector.deliveries import DecodeCache
from workers.projector.fleet import CATCHUPS_AT_ONCE, Fleet
from workers.projector.leases import LeaseKeeper
from workers.runtime import amqp, health, lifecycle, retry

logger = logging.getLogger(__name__)


class Backfills(Protocol):
    """The job that fills projections first seen from the store, handed to ``run_worker`` by its caller (the
    ``worker`` command and ``eventfleet.run_worker`` hand ``workers.rebuild.backfill.Backfills()``): the
    projector knows nothing of the rebuild it runs."""

    async def claim(self, store: EventStore, connection: AbstractConnection, prefix: str,
                    projections: Sequence[Projection], partitions: int, *, group: str | None = None
                    ) -> list[Projection]:
        """Claim the projections to backfill (declaring their queues, or the worker group's); return them."""

    async def run(self, store: EventStore, projections: Sequence[Projection], stop: asyncio.Event, *,
                  batch_bytes: int) -> None:
        """Backfill the claimed projections until done or ``stop``."""

    async def register_types(self, pool: db.Pool, worker: str, projections: Sequence[Projection]) -> object:
        """Record the event types the worker's code handles per read model (workers/rebuild/typebook.py)."""

    async def watch_types(self, store: EventStore, worker: str, projections: Sequence[type[Projection]], *,
                          lease_seconds: float, batch_bytes: int) -> None:
        """Until cancelled: say the worker runs its read models, and rebuild those whose types it adds once no
        worker of other code runs them."""


async def run_consumer(pool: db.Pool, connection: AbstractConnection, projection: Projection, settings: Settings, *,
                       stop: asyncio.Event, health_: health.Health | None = None) -> Stats:
    """Consume every partition queue of one projection until ``stop`` (no leases: tests and tools); return
    what it did. Each partition gets a channel of its own on ``connection``."""
    store = lifecycle.open_store(pool, settings)
    partitions = await store.partitions()
    stats, cache, health_ = Stats(), DecodeCache.of(settings), health_ or health.Health()
    copies = dlq.DeadLetterCopies(settings.amqp_urls, settings.prefix)
    consumers = [Consumer(store, await connection.channel(), projection, p, settings, health_=health_, stats=stats,
                          cache=cache, copies=copies) for p in range(partitions)]
    try:
        async with asyncio.TaskGroup() as group:
            for consumer in consumers:
                group.create_task(consumer.run(stop))
    finally:
        for consumer in consumers:
            with contextlib.suppress(Exception):
                await consumer.channel.close()
        await copies.close()
        await projection.detach()
    return stats


async def consume_until_idle(pool: db.Pool, channel: AbstractChannel, projection: Projection,
                             settings: Settings) -> Stats:
    """Apply everything in one projection's partition queues, one after the other, then return (tests,
    benchmarks: no sleeps needed), through the apply step a worker uses (``Consumer.until_idle``)."""
    store = lifecycle.open_store(pool, settings)
    stats, cache = Stats(), DecodeCache.of(settings)
    copies = dlq.DeadLetterCopies(settings.amqp_urls, settings.prefix)
    try:
        for partition in range(await store.partitions()):
            await Consumer(store, channel, projection, partition, settings, stats=stats, cache=cache,
                           copies=copies).until_idle()
    finally:
        await copies.close()
        await projection.detach()
    return stats


def pool_size(projections: int) -> int:
    """Connections a worker needs: batches of its consumers in flight (they queue beyond), two per catch-up
    at once (a read ahead of an apply), the lag monitor's one per projection, the lease ticks, one to spare, and
    three for the rebuild of a read model whose types changed (``typechange``: a read ahead, an apply, a look)."""
    return 2 * projections + 2 * CATCHUPS_AT_ONCE + projections + 2 + 3


async def run_worker(settings: Settings, projections: Sequence[Projection], health_: health.Health,
                     stop: asyncio.Event, *, pool: db.Pool | None = None,
                     backfills: Backfills | None = None) -> dict[str, Stats]:
    """Open Postgres (unless given a pool), register with the fleet, then (re)connect to RabbitMQ and consume
    the partitions this worker holds until ``stop``; then hand them over (``LeaseKeeper.leave``). Each session
    first lets ``backfills`` claim the projections first seen, and runs their backfill beside the consumers
    (without: none is backfilled here).

    A broker outage ends the session: its unacked deliveries return to the queues, and a new connection
    picks them up again (the checkpoints absorb the duplicates); the leases are kept meanwhile. Postgres
    outages are retried per batch and per tick.
    """
    stats = {p.name: Stats() for p in projections}
    async with contextlib.AsyncExitStack() as stack:
        if pool is None:
            pool = await _open_pool(stack, settings, pool_size(len(projections)), health_)
        else:
            health_.up("postgres")
        store = lifecycle.open_store(pool, settings)
        partitions = await _retrying(store.partitions, health_, stop)
        if partitions is None:
            return stats
        # A schema without the migrations this code needs is refused before anything is consumed.
        await _retrying(lambda: store_migrate.check_current(pool, settings.schema), health_, stop)
        # With a worker group, its partitions are leased as one (each feeds every read model of the group).
        leased = ([p.name for p in projections] if settings.group is None else [broker.group_lease(settings.group)])
        keeper = LeaseKeeper(pool, settings.schema, leased, partitions,
                             lease_seconds=settings.lease_seconds, wait_for_peers=True)
        stack.push_async_callback(_leave, keeper)
        # Before it consumes: the types its code handles are recorded, and the read models it adds types to
        # are rebuilt beside the consumers once no worker of other code runs them (workers/rebuild/typebook.py).
        if backfills is not None and await _retrying(
                lambda: backfills.register_types(pool, keeper.worker_id, projections), health_, stop) is None:
            return stats
        progress = Progress(stats)
        fleets: list[Fleet] = []

        def measured(projection: str, lag_: lag.Lag) -> None:
            progress.lags[projection] = lag_
            for fleet in fleets:
                fleet.note_lag(projection, lag_)

        background = {"lag monitor": lag.run_lag_monitor(pool, [p.name for p in projections], health=health_,
                                                         measured=measured, partitions=partitions)}
        if backfills is not None:
            background["read-model types"] = backfills.watch_types(
                store, keeper.worker_id, [type(p) for p in projections], lease_seconds=settings.lease_seconds,
                batch_bytes=settings.read_bytes)
        if settings.progress_seconds:
            background["progress"] = progress.run(settings.progress_seconds)
        logger.info("joined the fleet", extra={"worker": keeper.worker_id, "partitions": partitions,
                                               "projections": [p.name for p in projections]})
        await _beside(_sessions(store, settings, projections, health_, stop, stats, keeper, fleets, partitions,
                                progress.lags, backfills), background)
    return stats


async def _sessions(store: EventStore, settings: Settings, projections: Sequence[Projection],
                    health_: health.Health, stop: asyncio.Event, stats: dict[str, Stats], keeper: LeaseKeeper,
                    fleets: list[Fleet], partitions: int, lags: dict[str, lag.Lag], backfills: Backfills | None
                    ) -> None:
    """Broker sessions one after the other, through RabbitMQ outages, until ``stop``."""
    while not stop.is_set():
        try:
            async for attempt in retry.retry_until(stop):
                with attempt:
                    try:
                        await _session(store, settings, projections, health_, stop, stats, keeper, fleets,
                                       partitions, lags, backfills)
                    except retry.OUTAGE_ERRORS as exc:
                        health_.down("rabbitmq", exc)
                        raise
        except retry.OUTAGE_ERRORS:
            if not stop.is_set():
                raise  # pragma: no cover - retry_until gives up only once stop is set


async def _beside(main: Coroutine[Any, Any, None], background: dict[str, Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` with background jobs that run until cancelled. A background job that fails is logged with
    its traceback and ends ``main`` with its error (the process exits and is restarted, rather than going on
    without, say, its lag monitor); when ``main`` ends, the background jobs are cancelled."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_logged(name, job), name=name) for name, job in background.items()]
            try:
                await main
            finally:
                for task in tasks:
                    task.cancel()
    except BaseExceptionGroup as failed:
        # The common case is one failure, wrapped here and by the session's task group: raise it as itself,
        # so the command's one-line error names it.
        inner: BaseException = failed
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if isinstance(inner, BaseExceptionGroup):
            raise
        raise inner from None


async def _logged(name: str, job: Coroutine[Any, Any, None]) -> None:
    try:
        await job
    except Exception:
        logger.exception("background task failed; the worker stops", extra={"task": name})
        raise


async def _retrying(step: Any, health_: health.Health, stop: asyncio.Event) -> Any:
    """``await step()`` retried through Postgres outages until it works, or None once ``stop`` is set."""
    async for attempt in retry.retry_until(stop):
        with attempt:
            try:
                return await step()
            except retry.OUTAGE_ERRORS as exc:
                health_.down("postgres", exc)
                raise
    return None


async def _leave(keeper: LeaseKeeper) -> None:
    """Hand the partitions over at once (the consumers have stopped); a failure leaves them to expire."""
    try:
        await asyncio.wait_for(keeper.leave(), 5)
    except retry.OUTAGE_ERRORS as exc:  # the leases expire anyway: nothing is lost
        logger.warning("could not hand the partitions over; they expire instead", extra={
            "worker": keeper.worker_id, "error": f"{type(exc).__name__}: {exc}"})
    else:
        logger.info("left the fleet", extra={"worker": keeper.worker_id})


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


async def _open_pool(stack: contextlib.AsyncExitStack, settings: Settings, size: int,
                     health_: health.Health) -> db.Pool:
    """The pool, retried until Postgres answers."""
    async for attempt in retry.retry_forever():
        with attempt:
            try:
                pool = await stack.enter_async_context(
                    lifecycle.open_pool(settings, min_size=1, max_size=size,
                                        timeouts=lifecycle.session_timeouts(settings)))
            except retry.OUTAGE_ERRORS as exc:
                health_.down("postgres", exc)
                raise
            health_.up("postgres")
            return pool
    raise AssertionError("unreachable")  # pragma: no cover - retried forever


async def _session(store: EventStore, settings: Settings, projections: Sequence[Projection],
                   health_: health.Health, stop: asyncio.Event, stats: dict[str, Stats], keeper: LeaseKeeper,
                   fleets: list[Fleet], partitions: int, lags: dict[str, lag.Lag], backfills: Backfills | None
                   ) -> None:
    """One broker connection: the topology declared, the backfills of new projections, and the consumers of
    the partitions held, until stop or the connection dies."""
    name = f"eventfleet worker {socket.gethostname()}:{os.getpid()}"
    # The first node of settings.amqp_urls that answers, the previous session's tried last (amqp.connect).
    connection = await amqp.connect(settings.amqp_urls, name=name, after=health_.broker)
    async with connection:
        health_.up("rabbitmq", broker=amqp.connection_endpoint(connection))
        try:
            # Projections first seen (no status row, no queue yet) are backfilled alongside (rebuild.backfill).
            claimed = ([] if backfills is None else
                       await backfills.claim(store, connection, settings.prefix, projections, partitions,
                                             group=settings.group))
            channel = await connection.channel()
            names = broker.Names(settings.prefix)
            if settings.group is None:
                await broker.declare_partitions(channel, names, [p.name for p in projections], partitions)
            else:
                await broker.declare_group(channel, names, settings.group, [p.name for p in projections], partitions)
                await _leave_own_queues(connection, names, projections, partitions)
            await channel.close()
        except RuntimeError as exc:  # aiormq's bare "<Connection ...> closed": the connection died under us
            if not connection.is_closed:
                raise
            raise errors.ChannelLost(f"connection lost while declaring: {exc}") from exc
        fleet = Fleet(store, connection, keeper, projections, settings, health_, stats)
        fleet.lags.update(lags)  # measured before this session: a partition far behind catches up at once
        fleets[:] = [fleet]
        logger.info("consuming", extra={"projections": [p.name for p in projections], "prefix": settings.prefix})
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(fleet.run(stop))
                if claimed:
                    assert backfills is not None
                    group.create_task(backfills.run(store, claimed, stop, batch_bytes=settings.read_bytes))
        except BaseExceptionGroup as group:
            # One lost connection ends every consumer of it: report it as the single outage it is.
            if all(isinstance(e, retry.OUTAGE_ERRORS) for e in group.exceptions):
                raise group.exceptions[0] from None
            raise
        finally:
            fleets.clear()


async def _leave_own_queues(connection: AbstractConnection, names: broker.Names, projections: Sequence[Projection],
                            partitions: int) -> None:
    """A worker group's read models are fed by the group's queues: partition queues of their own, left by the
    topology before groups (docs/reference.md 6.0, "Moving a deployment to groups"), would stay bound and fill up
    with copies nobody consumes. They are deleted; what they held is in the store, and each read model reads from it
    whatever its checkpoints lack."""
    # The first partition's queue tells (they were declared together); a delete of a missing queue is a no-op.
    left = [names.partition_queue(p.name, i) for p in projections
            if await broker.passive_queue(connection, names.partition_queue(p.name, 0)) is not None
            for i in range(partitions)]
    if not left:
        return
    channel = await connection.channel()
    try:
        for queue in left:
            await channel.queue_delete(queue)
    finally:
        await channel.close()
    logger.warning("deleted the read models' own partition queues: a worker group's queues feed them now",
                   extra={"queues": left})


def resolve(names: Sequence[str]) -> list[Projection]:
    """Projection instances by name; no names = every registered projection."""
    found = registry.load()
    return [registry.get(n)() for n in names] if names else [cls() for cls in found.values()]
