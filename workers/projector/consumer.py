"""``eventfleet worker``: consume projection queues in batches and apply them exactly once.

One channel per projection (batches are acked with one multiple-ack, so tags must not interleave), one
``Consumer`` per channel. ``Consumer.handle_decoded`` is the only function that acks or rejects: after the
batch's transaction committed. Everything else (reconnecting, lag gauges, the HTTP server, graceful stop) wraps it.
In-process entry points: ``run_consumer`` (until a stop event) and ``consume_until_idle`` (until the queue
is empty), both over a pool and a channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractExchange

from projections.base import Projection
from store import codec, tracing
from store.event_store import EventStore, Position, RecordedEvent
from workers import broker, errors
from workers.config import Settings
from workers.projector import parking
from workers.projector.checkpoints import BatchResult
from workers.runtime import health, metrics, retry

logger = logging.getLogger(__name__)

T = TypeVar("T")




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
    caught_up: int = 0  # events read from the store by catch-ups (see workers.catchup)


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery as received: its tag on the channel, raw body, and the decoded event or why not."""

    tag: int
    body: bytes
    message_id: str | None
    decoded: RecordedEvent | errors.MalformedMessage


class DecodeCache:
    """Recently decoded bodies, shared by the consumers of one process: every projection's queue gets its
    own copy of each event, and decoding is the largest cost per delivery. Events are immutable."""

    def __init__(self, size: int = 4096, largest: int = 16 * 1024) -> None:
        self.size, self.largest = size, largest
        self._events: dict[bytes, RecordedEvent] = {}

    def decode(self, body: bytes, registry: codec.Registry) -> RecordedEvent:
        """The event of a body; raises MalformedMessage (never cached) like ``broker.from_body``."""
        event = self._events.get(body)
        if event is None:
            event = broker.from_body(body, registry)
            if len(body) > self.largest:  # rare and big: not worth the memory
                return event
            self._events[body] = event
            if len(self._events) > self.size:
                del self._events[next(iter(self._events))]  # the oldest: dicts keep insertion order
        return event


class Consumer:
    """One projection's deliveries on one channel: batches them, applies them, acks after commit.

    Deliveries are taken and settled on the channel's underlying aiormq channel: aio-pika's message
    objects cost more per delivery than the whole batched transaction does per event.
    """

    def __init__(self, store: EventStore, channel: AbstractChannel, projection: Projection, settings: Settings,
                 *, health_: health.Health | None = None, stats: Stats | None = None,
                 cache: DecodeCache | None = None) -> None:
        self.store, self.channel, self.projection, self.settings = store, channel, projection, settings
        self.cache = cache or DecodeCache()
        self.names = broker.Names(settings.prefix)
        self.health = health_ or health.Health()
        self.stats = stats or Stats()
        self.stopping = False  # a stop was requested: give up retrying through an outage, leave unacked
        self._dlx: AbstractExchange | None = None
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._queue: str | None = None
        # Set by a catch-up (workers.catchup): every event at or before ``cursor`` is settled for this
        # projection, and while ``catching_up`` deliveries beyond it wait for the catch-up to pass them.
        self.cursor: Position | None = None
        self.catching_up = False
        self.draining = False  # the catch-up reached the frontier: ack the settled deliveries now
        self._moved = asyncio.Event()
        metrics.CAUGHT_UP.labels(projection.name)  # exported at 0 before any catch-up, not absent

    async def open_queue(self) -> str:
        """Declare the topology (idempotent), set the prefetch and return the projection's queue name."""
        await self.channel.set_qos(prefetch_count=self.settings.prefetch)
        await broker.declare_topology(self.channel, self.names, [self.projection.name])
        self._dlx = await self.channel.get_exchange(self.names.dead_letter_exchange, ensure=False)
        self._raw = await self.channel.get_underlay_channel()
        self._queue = self.names.queue(self.projection.name)
        return self._queue

    # --- catch-up from the store (workers.catchup) ------------------------------------------------

    def begin_catch_up(self, start: Position) -> None:
        """A catch-up starts from ``start``, a position every event before which is settled.

        Until it reaches the store's frontier the consumer holds its deliveries, settled or not: acking
        them would only make the broker push more, and receiving costs the CPU the catch-up needs.
        """
        self.catching_up, self.draining = True, False
        self.settled(start)

    def at_frontier(self) -> None:
        """The catch-up has read everything committed: drain the settled deliveries while it polls on."""
        self.draining = True
        self._moved.set()

    def settled(self, position: Position) -> None:
        """Every event at or before ``position`` is settled for this projection (its batch committed)."""
        if self.cursor is None or position > self.cursor:
            self.cursor = position
        self._moved.set()

    def end_catch_up(self) -> None:
        self.catching_up = self.draining = False
        self._moved.set()

    def is_settled(self, event: RecordedEvent) -> bool:
        """Whether a catch-up already settled this event. Bodies without a transaction id (older relays)
        cannot be placed in read_all order, so they always go the checkpoint way."""
        cursor = self.cursor
        return cursor is not None and event.position.transaction_id > 0 and event.position <= cursor

    async def backlog(self) -> int:
        """Messages ready in the projection's queue (not yet delivered to any consumer)."""
        assert self._raw is not None, "open_queue() first"
        assert self._queue is not None, "open_queue() first"
        return (await self._raw.queue_declare(self._queue, passive=True)).message_count or 0

    async def apply_from_store(self, events: Sequence[RecordedEvent]) -> BatchResult:
        """Apply events read from the store (a catch-up) exactly as deliveries are applied; parked events
        get a copy in the DLQ since no delivery of theirs is at hand."""
        started = time.perf_counter()
        with self._span(events):
            result = await self._outage_retrying(
                lambda: parking.apply_or_park(self.store, self.projection, events))
        self._count(result, time.perf_counter() - started, deliveries=False)
        self.stats.caught_up += len(events)
        for parked in result.parked:
            await self._publish_dead_letter(parked.event)
        return result

    def _ahead(self, batch: Sequence[Delivery]) -> bool:
        return any(not isinstance(d.decoded, errors.MalformedMessage) and not self.is_settled(d.decoded)
                   for d in batch)

    async def _until_settled(self, batch: Sequence[Delivery], stop: asyncio.Event) -> bool:
        """While a catch-up runs, wait until it passed the batch or ended; False if stopping meanwhile."""
        while self.catching_up and (not self.draining or self._ahead(batch)):
            if stop.is_set() or self.channel.is_closed:
                return False
            self._moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), 0.5)
        return True

    def decode(self, tag: int, body: bytes, message_id: str | None = None) -> Delivery:
        """A delivery with its decoded event, or why it cannot be decoded."""
        try:
            decoded: RecordedEvent | errors.MalformedMessage = self.cache.decode(body, self.store.registry)
        except errors.MalformedMessage as exc:
            decoded = exc
        return Delivery(tag, body, message_id, decoded)

    async def handle_decoded(self, deliveries: Sequence[Delivery]) -> BatchResult:
        """The only function that settles deliveries: dead-letter the undecodable, apply the rest in one
        transaction, then reject the parked and ack everything else with one multiple-ack."""
        assert self._raw is not None, "open_queue() first"
        started = time.perf_counter()
        events: list[RecordedEvent] = []
        delivered: dict[tuple[str, int], list[int]] = {}
        bad: list[Delivery] = []
        settled: list[int] = []  # already settled by a catch-up: acked with no database work
        for d in deliveries:
            if isinstance(d.decoded, errors.MalformedMessage):
                bad.append(d)
                continue
            if self.is_settled(d.decoded):
                settled.append(d.tag)
                continue
            events.append(d.decoded)
            delivered.setdefault((d.decoded.stream_id, d.decoded.version), []).append(d.tag)
        if bad:
            await self._dead_letter_undecodable(bad)
        if events:
            with self._span(events):
                result = await self._outage_retrying(
                    lambda: parking.apply_or_park(self.store, self.projection, events))
        else:
            result = BatchResult()
        result.duplicates += len(settled)
        self._count(result, time.perf_counter() - started)
        rejected: set[int] = set()
        for parked in result.parked:
            tags = delivered.get((parked.event.stream_id, parked.event.version))
            if tags:
                await self._raw.basic_reject(tags[0], requeue=False)  # the queue's DLX moves it to the DLQ
                rejected.add(tags[0])
            else:
                await self._publish_dead_letter(parked.event)
        rest = [t for tags in delivered.values() for t in tags if t not in rejected] + settled
        if rest:
            # Every delivery up to this tag is in this batch or settled before: one frame acks them all.
            await self._raw.basic_ack(max(rest), multiple=True)
        return result

    def _span(self, events: Sequence[RecordedEvent]) -> contextlib.AbstractContextManager[None]:
        """The tracing span of one apply, linked to the producer contexts in its events' metadata."""
        return tracing.process_span(self._queue or self.names.queue(self.projection.name), self.projection.name,
                                    len(events), (e.metadata for e in events))

    async def _dead_letter_undecodable(self, bad: list[Delivery]) -> None:
        assert self._raw is not None
        items = [(str(d.decoded), d.body) for d in bad]
        await self._outage_retrying(lambda: parking.record_undecodable(self.store.pool, self.projection.name, items))
        for d in bad:
            logger.warning("undecodable message dead-lettered", extra={
                "projection": self.projection.name, "message_id": d.message_id, "error": str(d.decoded)})
            await self._raw.basic_reject(d.tag, requeue=False)
        metrics.DEAD_LETTERED.labels(self.projection.name).inc(len(bad))
        self.stats.undecodable += len(bad)
        self.stats.dead_lettered += len(bad)

    async def _publish_dead_letter(self, event: RecordedEvent) -> None:
        """A parked event that came from the store (a gap), not from a delivery: put a copy in the DLQ."""
        assert self._dlx is not None, "open_queue() first"
        await self._dlx.publish(broker.to_message(event), routing_key=self.projection.name)

    def _count(self, result: BatchResult, seconds: float, *, deliveries: bool = True) -> None:
        """Count a batch; events a catch-up read that were settled already are no duplicate deliveries."""
        name, now = self.projection.name, time.time()
        duplicates = result.duplicates if deliveries else 0
        metrics.APPLIED.labels(name).inc(len(result.applied))
        metrics.DUPLICATES.labels(name).inc(duplicates)
        metrics.GAPS_FILLED.labels(name).inc(result.gaps_filled)
        metrics.DEAD_LETTERED.labels(name).inc(len(result.parked))
        metrics.APPLY_SECONDS.labels(name).observe(seconds)
        metrics.END_TO_END_SECONDS.observe_many(
            name, [max(0.0, now - event.recorded_at.timestamp()) for event in result.applied])
        s = self.stats
        s.applied += len(result.applied)
        s.duplicates += duplicates
        s.gaps_filled += result.gaps_filled
        s.held += result.held
        s.dead_lettered += len(result.parked)
        s.batches += 1
        logger.debug("batch applied", extra={"projection": name, "applied": len(result.applied),
                                             "duplicates": duplicates, "seconds": round(seconds, 4)})

    async def _outage_retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run a database step, retrying through Postgres outages until it works, the stop, or the channel dies."""
        retrying = retry.retry_forever().copy(
            stop=lambda _: self.stopping or self.channel.is_closed)
        async for attempt in retrying:
            with attempt:
                try:
                    value = await step()
                except retry.OUTAGE_ERRORS as exc:
                    self.health.down("postgres", exc, projection=self.projection.name)
                    raise
                self.health.up("postgres")
                return value
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True

    async def _consume(self, queue: str, buffer: asyncio.Queue[Any]) -> str:
        """Start consuming; each delivery is decoded on arrival, so decoding overlaps the database work of
        the batch in flight (Postgres runs in other processes), then buffered. Returns the consumer tag."""
        assert self._raw is not None

        async def receive(message: aiormq.abc.DeliveredMessage) -> None:
            tag = message.delivery_tag
            assert tag is not None
            buffer.put_nowait(self.decode(tag, message.body, message.header.properties.message_id))

        ok = await self._raw.basic_consume(queue, receive, no_ack=False)
        assert ok.consumer_tag is not None
        return ok.consumer_tag

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set (the batch in flight is committed and acked) or the channel closes."""
        queue = await self.open_queue()
        buffer: asyncio.Queue[Delivery | None] = asyncio.Queue()
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
        stopper.add_done_callback(lambda _: setattr(self, "stopping", True))
        tag = await self._consume(queue, buffer)
        try:
            # Deliveries still buffered at a stop are never handled: they go back to the queue on close.
            while not (stop.is_set() or lost or self.channel.is_closed):
                batch: list[Delivery] = []
                delivery = await buffer.get()
                while delivery is not None:
                    batch.append(delivery)
                    if len(batch) >= self.settings.batch_size or buffer.empty():
                        break
                    delivery = buffer.get_nowait()
                if batch:
                    if self.catching_up and not await self._until_settled(batch, stop):
                        break  # stopping: the held deliveries go back to the queue
                    await self.handle_decoded(batch)
        finally:
            self.stopping = True
            stopper.cancel()
            if not self.channel.is_closed and self._raw is not None:
                with contextlib.suppress(*retry.OUTAGE_ERRORS):
                    await self._raw.basic_cancel(tag)
        if not stop.is_set():
            raise errors.ChannelLost()

    async def until_idle(self) -> Stats:
        """Consume until the queue is empty, then return; the bounded twin of ``run`` for tests and benches.

        Deliveries are pushed as in ``run``. When none is buffered, a passive declare on the same channel
        asks for the queue's ready count: its answer comes after every delivery the broker pushed before it
        (frames are ordered on a channel), so once those are handed over, zero ready means done.
        """
        queue = await self.open_queue()
        assert self._raw is not None
        buffer: asyncio.Queue[Delivery] = asyncio.Queue()
        tag = await self._consume(queue, buffer)
        try:
            while True:
                batch = _take(buffer, self.settings.batch_size)
                if batch:
                    await self.handle_decoded(batch)
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
        while batch := _take(buffer, self.settings.batch_size):  # pushed before the cancel took effect
            await self.handle_decoded(batch)
        return self.stats


def _take(buffer: asyncio.Queue[Delivery], n: int) -> list[Delivery]:
    batch: list[Delivery] = []
    while len(batch) < n and not buffer.empty():
        batch.append(buffer.get_nowait())
    return batch


async def _hand_over() -> None:
    """Let deliveries already received run through aiormq's callback task into the buffer."""
    for _ in range(8):
        await asyncio.sleep(0)


















