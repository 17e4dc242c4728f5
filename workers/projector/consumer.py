"""One partition of one projection: its queue's batch messages decoded, handed to the apply step, acked.

A worker runs one ``Consumer`` per partition it holds the lease of (``workers.projector.fleet``), each on a
channel of its own (batches are acked with one multiple-ack, so tags must not interleave). The consumer decodes
and sorts what it receives and hands it to its projection's ``Batcher`` (``workers.projector.batcher``: the
apply step, shared by the worker's consumers of the projection, or a batcher of one of its own); after the
transaction committed, ``Consumer.handle`` acks the deliveries, or rejects those dead-lettered whole. A message
is a batch of one partition's events in order (``broker.batch_message``); several messages make one
transaction, up to ``Settings.batch_size`` events. Between batches it catches its partition up from the store
when it falls behind (``workers.projector.catchup``); a reactor's consumer fires its partition's deadlines
beside (``workers.projector.deadlines.fire``).

No delivery is acked on the strength of a position alone (a watermark, how far a catch-up read): positions
are transaction ids, which a store restored into another cluster or an asynchronous failover can hand out
again (store/clock.py), so only the checkpoints, read in the batch's own transaction, say what is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import aiormq.abc
from aio_pika.abc import AbstractChannel
from pamqp import commands as spec

from projections.base import Projection
from store import codec
from store.codec.registry import EVENT_NAME_ATTRIBUTE
from store.event_store import EventStore, Position, RecordedEvent
from workers import broker, errors
from workers.config import Settings
from workers.projector import deadlines, dlq
from workers.projector.batcher import Batcher, HandOver, Stats
from workers.projector.catchup import CatchUp
from workers.projector.deliveries import DecodeCache, Delivery
from workers.projector.feed import View
from workers.publication import outlet as publication_outlet
from workers.runtime import health, metrics, retry

logger = logging.getLogger(__name__)

_FORGOTTEN = getattr(codec.SubjectForgotten, EVENT_NAME_ATTRIBUTE, "SubjectForgotten")


class Underlay(Protocol):
    """What a consumer asks of its channel's aiormq channel (or of a worker group's ``feed.View``)."""

    async def basic_consume(self, queue: str, consumer_callback: Callable[[aiormq.abc.DeliveredMessage],
                                                                          Awaitable[None]],
                            *, no_ack: bool = False) -> spec.Basic.ConsumeOk: ...

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> Any: ...

    async def basic_reject(self, delivery_tag: int, *, requeue: bool = True) -> Any: ...

    async def basic_cancel(self, consumer_tag: str) -> Any: ...

    async def queue_declare(self, queue: str, *, passive: bool = False) -> spec.Queue.DeclareOk: ...


class Consumer:
    """One partition's deliveries for one projection on one channel: decodes them, hands them to the apply
    step, acks after commit, and catches the partition up from the store when it falls behind.

    Deliveries are taken and settled on the channel's underlying aiormq channel: aio-pika's message objects
    cost more per delivery than the batched transaction does.
    """

    def __init__(self, store: EventStore, channel: AbstractChannel | View, projection: Projection, partition: int,
                 settings: Settings, *, health_: health.Health | None = None, stats: Stats | None = None,
                 cache: DecodeCache | None = None, catchups: asyncio.Semaphore | None = None,
                 batcher: Batcher | None = None, copies: dlq.DeadLetterCopies | None = None,
                 on_hold: Callable[[int, str], Awaitable[None]] | None = None) -> None:
        """``batcher``: the projection's apply step shared by the worker's consumers (it counts into its own
        ``stats`` and copies to its own ``copies``); without one, a batcher of one of this consumer's own, with
        ``stats`` and ``copies`` (a connection of its own, closed when the consumer ends, if none is given)."""
        self.store, self.channel, self.projection, self.settings = store, channel, projection, settings
        self.partition = partition
        #: The event names the projection handles (None: all): a delivered event of another name is never decoded,
        #: applied or checkpointed here (it only gets acked with its message).
        #: SubjectForgotten is always decoded: this process drops the subject's key on sight (``decode``).
        names = projection.handled_names()
        self.names_handled = None if names is None else names | {_FORGOTTEN}
        self.cache = cache or DecodeCache.of(settings)
        self.names = broker.Names(settings.prefix)
        #: The queue it consumes: its read model's partition queue, or its worker group's (through a ``View``).
        self.queue = (channel.feed.queue if isinstance(channel, View)
                      else self.names.partition_queue(projection.name, partition))
        self.health = health_ or health.Health()
        self._own_batcher = batcher is None
        self.batcher = batcher or Batcher(store, projection, settings, health_=self.health, stats=stats,
                                          copies=copies)
        self.stats = self.batcher.stats
        self.catchup = CatchUp(self.batcher, partition, settings, catchups=catchups, gone=self.gone)
        #: Tells the fleet why this partition is held (an event newer than this code): status shows it.
        self.on_hold = on_hold
        #: What holds this partition still, if anything does (``HeldForNewerCode``): nothing more is applied or
        #: acked here; the deliveries go back to the queue when the channel closes, for a newer worker.
        self.held: errors.HeldForNewerCode | None = None
        self.stopping = False  # give up retrying through an outage, leave the rest unacked
        self._fresh = True  # no new event applied yet since this consumer started: duplicates are the handover's
        self._raw: Underlay | None = None

    async def open(self) -> None:
        """Set the prefetch (in messages); the subscriber is attached (a reactor to the store its follow-ups go
        to, a publication to its outlet)."""
        await self.projection.attach(self.store, publication_outlet.Runtime(self.settings))
        await self.channel.set_qos(prefetch_count=self.settings.prefetch_messages)
        self._raw = await self.channel.get_underlay_channel()  # type: ignore[assignment]

    def gone(self) -> bool:
        """Whether this consumer will ack nothing more: it is stopping, or its channel closed."""
        return self.stopping or self.channel.is_closed

    def note_lag(self, lag_events: int, watermark: Position, oldest_age: float = 0.0) -> None:
        """What the lag monitor measured of this partition: see ``CatchUp.note_lag``."""
        self.catchup.note_lag(lag_events, watermark, oldest_age)

    # --- applying -----------------------------------------------------------------------------------

    def decode(self, tag: int, body: bytes, message_id: str | None = None) -> Delivery:
        """A delivery with its decoded batch, or why it cannot be decoded."""
        try:
            decoded: broker.Batch | errors.MalformedMessage = self.cache.decode(body, self.store.registry,
                                                                                self.names_handled)
        except errors.MalformedMessage as exc:
            decoded = exc
        for event in () if isinstance(decoded, errors.MalformedMessage) else decoded.events:
            if isinstance(event.event, codec.SubjectForgotten):  # a forget: this process drops the key at once
                self.store.keys.forgotten(event.event.subject)
        return Delivery(tag, body, message_id, decoded)

    def _sort(self, deliveries: Sequence[Delivery]) -> tuple[list[RecordedEvent], list[Delivery]]:
        """The deliveries' events to apply and the undecodable deliveries."""
        events: list[RecordedEvent] = []
        bad: list[Delivery] = []
        for d in deliveries:
            if isinstance(d.decoded, errors.MalformedMessage):
                bad.append(d)
                continue
            if d.decoded.dropped:
                logger.warning("batch message with events that name no stream; the store fills them in", extra={
                    "projection": self.projection.name, "partition": self.partition,
                    "message_id": d.message_id, "dropped": d.decoded.dropped})
            events += d.decoded.events
        return events, bad

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        """Settle deliveries: the undecodable ones dead-lettered whole, the events of the rest handed to the apply
        step (with what the worker's other partitions received meanwhile, when the batcher is shared); once
        their transaction committed, the deliveries it dead-lettered whole are rejected and the rest acked with
        one multiple-ack. Parked events get their copy in the DLQ from the apply step."""
        assert self._raw is not None, "open() first"
        events, bad = self._sort(deliveries)
        if bad:
            await self.batcher.dead_letter(bad, self.gone)
            await self._reject(bad)
        # Deliveries a catch-up of this consumer's passed are its own duplicates, not a handover's.
        fresh = self._fresh and not self.catchup.applied
        settled = await self.batcher.hand_over(HandOver(self.partition, deliveries, events, self.gone, fresh))
        if settled.applied:
            self._fresh = False
        await self._reject(settled.rejected)
        rejected = {d.tag for d in settled.rejected}
        good = [d for d in deliveries if not isinstance(d.decoded, errors.MalformedMessage) and d.tag not in rejected]
        if good:
            # Every delivery up to this tag is in this batch or settled before: one frame acks them all.
            await self._raw.basic_ack(max(d.tag for d in good), multiple=True)
            # The events of theirs the projection does not handle: acked with their message, nothing else.
            unhandled = sum(d.decoded.unhandled for d in good if not isinstance(d.decoded, errors.MalformedMessage))
            if unhandled:
                metrics.UNHANDLED.labels(self.projection.name).inc(unhandled)
                self.stats.unhandled += unhandled

    async def _reject(self, bad: Sequence[Delivery]) -> None:
        """Reject deliveries dead-lettered whole (recorded by the apply step): the queue's DLX moves them to the
        DLQ."""
        assert self._raw is not None
        for d in bad:
            logger.warning("undecodable message dead-lettered", extra={
                "projection": self.projection.name, "partition": self.partition, "message_id": d.message_id,
                "error": str(d.decoded)})
            await self._raw.basic_reject(d.tag, requeue=False)

    # --- consuming ----------------------------------------------------------------------------------

    async def _consume(self, buffer: asyncio.Queue[Any]) -> str:
        """Start consuming; each delivery is decoded on arrival, so decoding overlaps the database work of
        the batch in flight (Postgres runs in other processes), then buffered. Returns the consumer tag."""
        assert self._raw is not None

        async def receive(message: aiormq.abc.DeliveredMessage) -> None:
            tag = message.delivery_tag
            assert tag is not None
            buffer.put_nowait(self.decode(tag, message.body, message.header.properties.message_id))

        ok = await self._raw.basic_consume(self.queue, receive, no_ack=False)
        assert ok.consumer_tag is not None
        return ok.consumer_tag

    def _take(self, first: Delivery, buffer: asyncio.Queue[Delivery | None]) -> list[Delivery]:
        """``first`` and whatever is buffered behind it, up to ``batch_size`` events (whole messages)."""
        batch, events = [first], first.events
        while events < self.settings.batch_size and not buffer.empty():
            delivery = buffer.get_nowait()
            if delivery is None:
                break
            batch.append(delivery)
            events += delivery.events
        return batch

    async def run(self, stop: asyncio.Event, leave: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` or ``leave`` is set (the batch in flight is committed and acked; what is
        buffered goes back to the queue when the channel closes) or the channel closes (raises ChannelLost)."""
        await self.open()
        buffer: asyncio.Queue[Delivery | None] = asyncio.Queue()
        leave = leave or asyncio.Event()
        lost = False

        def wake(*_: Any) -> None:
            buffer.put_nowait(None)

        def on_close(*_: Any) -> None:
            nonlocal lost
            lost = True
            wake()

        self.catchup.wake = wake
        self.channel.close_callbacks.add(on_close)
        watchers: list[asyncio.Future[Any]] = [asyncio.ensure_future(e.wait()) for e in (stop, leave)]
        for watcher in watchers:
            watcher.add_done_callback(wake)
        tag = await self._consume(buffer)
        batching = await self._batching()
        ending = False
        firing = (asyncio.create_task(deadlines.fire(
            self.batcher, self.partition,
            lambda: ending or stop.is_set() or leave.is_set() or lost or self.channel.is_closed),
            name=f"fire deadlines {self.queue}") if self.projection.fires_deadlines else None)
        if firing is not None:
            firing.add_done_callback(wake)  # it ends early only by failing: the consumer goes down with it
        try:
            while not (stop.is_set() or leave.is_set() or lost or self.channel.is_closed
                       or (firing is not None and firing.done())):
                if self.held is not None:
                    await buffer.get()  # nothing more is taken: wait for the stop, the leave or the close
                    continue
                try:
                    await self.catchup.if_due(stop)
                    delivery = await buffer.get()
                    if delivery is None:
                        continue
                    await self.handle(self._take(delivery, buffer))
                except errors.HeldForNewerCode as held:
                    await self.hold(held)
        finally:
            self.release_hold()
            ending = True  # the firing sees it and ends after its round in flight, however the loop ended
            self.stopping = True  # and gives up retrying through an outage (a missing grant retries for ever)
            if firing is not None:
                await asyncio.wait({firing})
                self._log_firing_failure(firing)
            self.catchup.wake = lambda: None
            for watcher in watchers:
                watcher.cancel()
            if not self.channel.is_closed and self._raw is not None:
                with contextlib.suppress(*retry.OUTAGE_ERRORS):
                    await self._raw.basic_cancel(tag)
            await batching.aclose()
        if firing is not None and not firing.cancelled() and (failure := firing.exception()) is not None:
            # Not an outage (those it retries): a bug or a misconfiguration such as a missing grant. Deadlines
            # must not silently stop firing while events go on being consumed: the consumer fails, and with it
            # the worker, so the orchestrator restarts it and the failure shows.
            raise failure
        if not (stop.is_set() or leave.is_set()):
            raise errors.ChannelLost()

    async def hold(self, held: errors.HeldForNewerCode) -> None:
        """Hold the partition at an event newer than this code: what it received stays unacked (it returns to
        the queue when the channel closes, for the newer worker that takes the partition over); /readyz, a
        gauge and ``status`` say why. Nothing is parked."""
        self.held = held
        key = f"{self.projection.name}.{self.partition}"
        self.health.held[key] = str(held)
        metrics.PARTITIONS_HELD_FOR_NEWER_CODE.labels(self.projection.name).inc()
        logger.warning("partition held at an event newer than this code; a worker of the newer release applies it",
                       extra={"projection": self.projection.name, "partition": self.partition,
                              "stream_id": held.event.stream_id, "version": held.event.version,
                              "event_type": held.event.event_type})
        if self.on_hold is not None:
            with contextlib.suppress(*retry.OUTAGE_ERRORS):  # status only: the hold itself needs no database
                await self.on_hold(self.partition, str(held))

    def release_hold(self) -> None:
        """The consumer ends: its hold goes with it (the next owner decides afresh)."""
        if self.held is None:
            return
        self.held = None
        self.health.held.pop(f"{self.projection.name}.{self.partition}", None)
        metrics.PARTITIONS_HELD_FOR_NEWER_CODE.labels(self.projection.name).dec()

    def _log_firing_failure(self, firing: asyncio.Task[None]) -> None:
        """Log, with its traceback, why the deadline-firing task failed (if it did)."""
        if firing.cancelled() or firing.exception() is None:
            return
        logger.error("firing deadlines failed; the partition's consumer stops", exc_info=firing.exception(),
                     extra={"projection": self.projection.name, "partition": self.partition})

    async def backlog(self) -> int:
        """Messages ready in the partition's queue (not yet delivered to any consumer)."""
        assert self._raw is not None, "open() first"
        return (await self._raw.queue_declare(self.queue, passive=True)).message_count or 0

    async def until_idle(self) -> Stats:
        """Consume until the queue is empty, then return; the bounded twin of ``run`` for tests and benches:
        the same hand-overs to the same apply step (a batcher of one, without a shared one).

        Deliveries are pushed as in ``run``. When none is buffered, a passive declare on the same channel
        asks for the queue's ready count: its answer comes after every delivery the broker pushed before it
        (frames are ordered on a channel), so once those are handed over, zero ready means done.
        """
        await self.open()
        assert self._raw is not None
        batching = await self._batching()
        buffer: asyncio.Queue[Delivery | None] = asyncio.Queue()
        try:
            tag = await self._consume(buffer)
            try:
                while True:
                    if not buffer.empty():
                        first = buffer.get_nowait()
                        if first is not None:
                            await self.handle(self._take(first, buffer))
                        continue
                    ready = await self.backlog()
                    await _hand_over()
                    if buffer.empty() and not ready:
                        break
                    if buffer.empty():
                        await asyncio.sleep(0.005)  # ready but not yet pushed to us: the broker is on its way
            finally:
                await self._raw.basic_cancel(tag)
            await _hand_over()
            while not buffer.empty():  # pushed before the cancel took effect
                first = buffer.get_nowait()
                if first is not None:
                    await self.handle(self._take(first, buffer))
        finally:
            await batching.aclose()
        return self.stats

    async def _batching(self) -> contextlib.AsyncExitStack:
        """The batcher of one run for this consumer, if it has no shared one: closed (its copies published)
        when the returned stack closes."""
        stack = contextlib.AsyncExitStack()
        if self._own_batcher:
            stack.push_async_callback(self.batcher.close)
            await stack.enter_async_context(self.batcher.running())
        return stack


async def _hand_over() -> None:
    """Let deliveries already received run through aiormq's callback task into the buffer."""
    for _ in range(8):
        await asyncio.sleep(0)
