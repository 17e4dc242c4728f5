"""A worker's share of the fleet in one broker session: a consumer per leased partition, started and stopped
as the leases move.

Every tick of the ``LeaseKeeper`` may hand this worker partitions (a consumer starts on a channel of its
own), ask for some back (the consumer finishes its batch in flight, its channel closes so what it had
buffered returns to the queue, then the lease is released) or report some lost (expired: the consumer
stops at once). At ``stop`` every consumer finishes its batch in flight; the caller then ``leave``s, so the
other workers take the partitions on their next tick instead of after the lease timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aio_pika.abc import AbstractChannel, AbstractConnection

from projections.base import Projection
from store.event_store import EventStore
from workers import broker, errors
from workers.config import Settings
from workers.projector import dlq, lag
from workers.projector.batcher import Batcher, Stats
from workers.projector.combiner import Combiner
from workers.projector.consumer import Consumer
from workers.projector.deliveries import DecodeCache
from workers.projector.feed import GroupFeed, View
from workers.projector.leases import REBALANCE_TICK_SECONDS, LeaseKeeper, Tick
from workers.runtime import health, metrics, retry

logger = logging.getLogger(__name__)

#: Partitions of one worker catching up from the store at once (each holds two connections while it does).
CATCHUPS_AT_ONCE = 2


@dataclasses.dataclass(slots=True)
class _Running:
    """A leased partition's consumers: one (a read model's queue), or one per read model of a worker group fed by
    the group's queue on one channel (``feed.GroupFeed``)."""

    consumers: list[Consumer]
    tasks: list[asyncio.Task[None]]
    leave: asyncio.Event
    channel: AbstractChannel


class Fleet:
    """This worker's consumers of one broker session, one per partition it holds."""

    def __init__(self, store: EventStore, connection: AbstractConnection, keeper: LeaseKeeper,
                 projections: Sequence[Projection], settings: Settings, health_: health.Health,
                 stats: Mapping[str, Stats]) -> None:
        self.store, self.connection, self.keeper, self.settings = store, connection, keeper, settings
        self.projections = {p.name: p for p in projections}
        self.health, self.stats = health_, stats
        self.cache = DecodeCache.of(settings)
        self.catchups = asyncio.Semaphore(CATCHUPS_AT_ONCE)
        #: Per lease (a projection's, or with ``settings.group`` the group's: ``broker.group_lease``) and partition.
        self.running: dict[tuple[str, int], _Running] = {}
        self.lags: dict[str, lag.Lag] = {}
        #: Every consumer's DLQ copies, on a connection of their own (a broker alarm must not hold the acks).
        self.copies = dlq.DeadLetterCopies(settings.amqp_urls, settings.prefix,
                                           name=f"{settings.prefix} worker dead-letter copies")
        #: One per projection: its apply step, its consumers' deliveries applied together (``batcher``).
        #: A worker group's read models share transactions where they can (``combiner``).
        self.combiner = Combiner(store) if settings.group is not None else None
        self.batchers = {p.name: Batcher(store, p, settings, health_=health_, stats=stats[p.name], copies=self.copies,
                                         combiner=self.combiner)
                         for p in projections}
        self._ended = asyncio.Event()  # a consumer ended by itself: look at once

    def note_lag(self, projection: str, measured: lag.Lag) -> None:
        """The lag monitor's measurement: each running consumer hears its partition's lag and the watermark."""
        self.lags[projection] = measured
        for (_, partition), running in self.running.items():
            for consumer in running.consumers:
                if consumer.projection.name == projection:
                    consumer.note_lag(measured.partitions.get(partition, 0), measured.watermark,
                                      measured.partition_ages.get(partition, 0.0))

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the leases until ``stop`` (every consumer's batch in flight commits) or the connection dies."""
        for projection, partitions in self.keeper.held.items():  # held from a previous session
            for partition in sorted(partitions):
                await self._start(projection, partition, stop)
        stopper = asyncio.ensure_future(stop.wait())
        batching = [asyncio.create_task(b.run(), name=f"batch {name}") for name, b in self.batchers.items()]
        try:
            while not stop.is_set():
                self._check_consumers()
                try:
                    tick = await self.keeper.tick()
                except retry.OUTAGE_ERRORS as exc:
                    # The consumers go on (exactly-once does not need the lease); renewal is retried next tick.
                    self.health.down("postgres", exc)
                    tick = Tick(settled=False)
                else:
                    # A tick that failed on a lock limit (another worker frozen inside its tick) marked Postgres
                    # down: on a quiet worker no batch would mark it up again, and /readyz would stay 503.
                    self.health.up("postgres")
                    await self._follow(tick, stop)
                self._export()
                wait = self.keeper.interval if tick.settled else REBALANCE_TICK_SECONDS
                ended = asyncio.ensure_future(self._ended.wait())
                await asyncio.wait({stopper, ended}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
        finally:
            stopper.cancel()
            await self._stop_all()
            for task in batching:  # after the consumers: their last hand-overs are applied
                task.cancel()
            await asyncio.gather(*batching, return_exceptions=True)
            await self.copies.close()
            for subscriber in self.projections.values():  # e.g. a publication's outlet: reopened next session
                await subscriber.detach()
        self._check_consumers()

    async def _follow(self, tick: Tick, stop: asyncio.Event) -> None:
        """Stop the consumers of every partition lost or given up at once (each after its batch in flight), then
        release the given-up ones, then start the consumers of the partitions acquired: one step each, whatever
        the number of partitions and projections, so a handover costs the slowest batch in flight, not their sum."""
        await self._stop_many([(p, n) for lost_or_surplus in (tick.lost, tick.surplus)
                               for p, partitions in lost_or_surplus.items() for n in partitions])
        for projection, partitions in tick.lost.items():
            metrics.REBALANCES.labels(projection).inc(len(partitions))
        if tick.surplus:
            await asyncio.gather(*(self.keeper.release(p, partitions) for p, partitions in tick.surplus.items()))
        for projection, partitions in tick.surplus.items():
            metrics.REBALANCES.labels(projection).inc(len(partitions))
            logger.info("partitions handed over", extra={"projection": projection, "partitions": partitions})
        await asyncio.gather(*(self._start(p, n, stop) for p, partitions in tick.acquired.items() for n in partitions))
        for projection, partitions in tick.acquired.items():
            metrics.REBALANCES.labels(projection).inc(len(partitions))
            logger.info("partitions acquired", extra={"projection": projection, "partitions": partitions})

    async def _start(self, lease: str, partition: int, stop: asyncio.Event) -> None:
        """Start the consumers of a partition just leased: the projection's (its queue), or every read model's of
        the worker group (``lease`` is the group's), fed by the group's queue (``feed.GroupFeed``)."""
        if (lease, partition) in self.running:
            return
        try:
            channel = await self.connection.channel()
        except RuntimeError as exc:  # aiormq's "<Connection ...> closed": it died under this session (an outage)
            raise errors.ChannelLost(f"cannot open a channel for {lease}.{partition}: {exc}") from exc
        on_hold = functools.partial(self.keeper.note_hold, lease)
        group = broker.group_of_lease(lease)
        if group is None:
            consumers = [self._consumer(channel, self.projections[lease], partition, on_hold)]
        else:
            feed = GroupFeed(channel, broker.Names(self.settings.prefix).group_queue(group, partition),
                             list(self.projections), group=group, prefetch=self.settings.prefetch_messages,
                             copies=self.copies)
            consumers = [self._consumer(feed.views[name], projection, partition, on_hold)
                         for name, projection in self.projections.items()]
        leave = asyncio.Event()
        tasks = []
        for consumer in consumers:
            task = asyncio.create_task(consumer.run(stop, leave), name=f"consume {consumer.queue}")
            task.add_done_callback(lambda _: self._ended.set())
            tasks.append(task)
        self.running[(lease, partition)] = _Running(consumers, tasks, leave, channel)

    def _consumer(self, channel: AbstractChannel | View, projection: Projection, partition: int,
                  on_hold: Callable[[int, str], Awaitable[None]]) -> Consumer:
        consumer = Consumer(self.store, channel, projection, partition, self.settings, health_=self.health,
                            cache=self.cache, catchups=self.catchups, batcher=self.batchers[projection.name],
                            on_hold=on_hold)
        measured = self.lags.get(projection.name)
        if measured is not None:  # a partition taken over far behind catches up at once
            consumer.note_lag(measured.partitions.get(partition, 0), measured.watermark,
                              measured.partition_ages.get(partition, 0.0))
        return consumer

    async def _stop(self, projection: str, partition: int) -> None:
        """Stop one consumer after its batch in flight, and close its channel (its buffered deliveries go
        back to the queue, for the next owner)."""
        running = self.running.pop((projection, partition), None)
        if running is None:
            return
        running.leave.set()
        for task in running.tasks:
            with contextlib.suppress(errors.ChannelLost, *retry.OUTAGE_ERRORS):
                await task
        channel = running.channel
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)

    async def _stop_many(self, keys: Sequence[tuple[str, int]]) -> None:
        """Stop these consumers together: every one is told to leave first, then each is waited for."""
        for key in keys:
            if (running := self.running.get(key)) is not None:
                running.leave.set()
        await asyncio.gather(*(self._stop(p, n) for p, n in keys))

    async def _stop_all(self) -> None:
        for running in self.running.values():
            running.leave.set()
        await asyncio.gather(*(self._stop(p, n) for p, n in list(self.running)), return_exceptions=True)

    def _check_consumers(self) -> None:
        """A consumer that ended by itself lost its channel (the connection is going): end the session."""
        self._ended.clear()
        for key, running in list(self.running.items()):
            for task in running.tasks:
                if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
                    raise exc  # the entry stays: the session's end stops the partition's other consumers
            if all(task.done() for task in running.tasks):
                del self.running[key]

    def _export(self) -> None:
        group = None if self.settings.group is None else broker.group_lease(self.settings.group)
        for projection in self.projections:
            metrics.PARTITIONS_HELD.labels(projection).set(len(self.keeper.held.get(group or projection, ())))
