"""One partition of one projection: its queue's batch messages applied exactly once, its backlog read from the store.

A worker runs one ``Consumer`` per partition it holds the lease of (``workers.projector.fleet``), each on a
channel of its own (batches are acked with one multiple-ack, so tags must not interleave).
``Consumer.handle_decoded`` is the only function that acks or rejects: after the batch's transaction
committed. A message is a batch of one partition's events in order (``broker.batch_message``); several
messages make one transaction, up to ``Settings.batch_size`` events.

Catch-up. When the lag monitor finds the partition ``Settings.catchup_threshold`` events behind, the
consumer reads the partition's backlog from the store (``EventStore.read_partition``, from the projection's
low watermark, in reads of ``catchup_batch_size`` events or ``read_bytes``, the next overlapping the apply) and applies
it through the same exactly-once path; deliveries it has passed are then duplicates to their checkpoints. Every
worker catches up its own partitions, at the same time. Correctness depends on none of it: every event goes
through the per-stream checkpoints in its batch's transaction.

No delivery is acked on the strength of a position alone (a watermark, how far a catch-up read): positions
are transaction ids, which a store restored into another cluster or an asynchronous failover can hand out
again (store/clock.py), so only the checkpoints, read in the batch's own transaction, say what is applied.
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
from aio_pika.abc import AbstractChannel

from projections.base import Projection
from projections.reactor import Outcome, Reactor
from store import codec, db, tracing
from store import errors as store_errors
from store.codec.registry import EVENT_NAME_ATTRIBUTE
from store.event_store import EventStore, Position, RecordedEvent
from store.partitions import partition_of
from store.queries import load
from store.records import Undecodable
from workers import broker, errors
from workers.config import Settings
from workers.projector import deadlines, dlq, parking
from workers.projector.batcher import Batcher
from workers.projector.checkpoints import BatchResult
from workers.publication import outlet as publication_outlet
from workers.runtime import health, metrics, retry

logger = logging.getLogger(__name__)

SQL = load("workers", "rebuild.sql")

T = TypeVar("T")

_FORGOTTEN = getattr(codec.SubjectForgotten, EVENT_NAME_ATTRIBUTE, "SubjectForgotten")

#: How long an unapplied event of a partition may wait before the partition catches up from the store, however
#: few events it lags (``Consumer.note_lag``): several lag refreshes (``lag.REFRESH_SECONDS``), far above the
#: second or two the live path takes.
STALL_SECONDS = 10.0


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
    messages: int = 0
    caught_up: int = 0  # events read from the store by catch-ups
    handover_duplicates: int = 0
    ghosts: int = 0  # delivered events the store does not hold: dropped
    unhandled: int = 0  # delivered events of types the projection does not handle: acked, never applied


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery as received: its tag on the channel, raw body, and the decoded batch or why not."""

    tag: int
    body: bytes
    message_id: str | None
    decoded: broker.Batch | errors.MalformedMessage

    @property
    def events(self) -> int:
        return 0 if isinstance(self.decoded, errors.MalformedMessage) else len(self.decoded.events)


class DecodeCache:
    """Recently decoded batch bodies, shared by the consumers of one process: every projection's queue of a
    partition gets its own copy of each batch, and decoding is the largest cost per event. Events are immutable.
    Bounded in bytes, not entries (256 bodies of a megabyte would not fit a pod): a kept batch costs its body and
    what decoding it made, counted as its events' data twice (the bytes unpacked from the body, and the payload
    decoded from them: for a 1 MiB event, 3 MiB in all, where counting the body alone let a 16 MiB budget hold
    48); one costing over a quarter of the budget is not kept. Bodies over ``max_message_bytes`` are refused as malformed: a
    worker takes what the broker can deliver (EVENTFLEET_BROKER_MAX_MESSAGE_BYTES), so a message published under
    larger limits than today's (events stored before EVENTFLEET_MAX_PAYLOAD_BYTES was lowered) is still applied,
    not dead-lettered with the events it carries. A batch holding personal fields is never kept: its values in
    the clear would outlive a ``forget`` (each consumer decodes it with the store's keys, whose cache the
    reference bounds by ``key_cache_seconds``)."""

    def __init__(self, max_bytes: int = 16 * 1024 * 1024, *, max_message_bytes: int = broker.MAX_MESSAGE_BYTES
                 ) -> None:
        self.max_bytes, self.largest, self.max_message_bytes = max_bytes, max_bytes // 4, max_message_bytes
        self.bytes = 0  # the cached bodies' length
        #: Per body and the event names decoded (None: all; a read model that handles a few names decodes only
        #: those, and read models of the same names share it): the batch and what it costs (``cost``).
        self._batches: dict[tuple[frozenset[str] | None, bytes], tuple[broker.Batch, int]] = {}

    @classmethod
    def of(cls, settings: Settings) -> DecodeCache:
        """The cache a worker of these settings keeps (EVENTFLEET_DECODE_CACHE_BYTES)."""
        return cls(settings.decode_cache_bytes, max_message_bytes=settings.broker_max_message_bytes)

    def decode(self, body: bytes, registry: codec.Registry, names: frozenset[str] | None = None) -> broker.Batch:
        """The batch of a body, its events of ``names`` only when given; raises MalformedMessage (never cached)
        like ``broker.from_batch_body``."""
        kept = self._batches.get((names, body))
        if kept is not None:
            return kept[0]
        batch = broker.from_batch_body(body, registry, max_bytes=self.max_message_bytes, names=names)
        cost = self.cost(body, batch)
        if cost > self.largest or any(registry.personal(type(e.event)) for e in batch.events):
            return batch
        self._batches[(names, body)] = (batch, cost)
        self.bytes += cost
        while self.bytes > self.max_bytes:  # the oldest first: dicts keep insertion order
            oldest = next(iter(self._batches))
            self.bytes -= self._batches.pop(oldest)[1]
        return batch

    @staticmethod
    def cost(body: bytes, batch: broker.Batch) -> int:
        """What keeping a decoded batch holds: its body, and its events' data twice (unpacked, and decoded)."""
        return len(body) + 2 * sum(len(e.data) for e in batch.events)


class Consumer:
    """One partition's deliveries for one projection on one channel: batches them, applies them, acks after
    commit, and catches the partition up from the store when it falls behind.

    Deliveries are taken and settled on the channel's underlying aiormq channel: aio-pika's message objects
    cost more per delivery than the batched transaction does.
    """

    def __init__(self, store: EventStore, channel: AbstractChannel, projection: Projection, partition: int,
                 settings: Settings, *, health_: health.Health | None = None, stats: Stats | None = None,
                 cache: DecodeCache | None = None, catchups: asyncio.Semaphore | None = None,
                 batcher: Batcher | None = None, copies: dlq.DeadLetterCopies | None = None,
                 on_hold: Callable[[int, str], Awaitable[None]] | None = None) -> None:
        self.store, self.channel, self.projection, self.settings = store, channel, projection, settings
        self.partition = partition
        #: The event names the projection handles (None: all): a delivered event of another name is never decoded,
        #: applied or checkpointed here (it only gets acked with its message).
        #: SubjectForgotten is always decoded: this process drops the subject's key on sight (``decode``).
        names = projection.handled_names()
        self.names_handled = None if names is None else names | {_FORGOTTEN}
        self.cache = cache or DecodeCache.of(settings)
        self.names = broker.Names(settings.prefix)
        self.queue = self.names.partition_queue(projection.name, partition)
        self.health = health_ or health.Health()
        self.stats = stats or Stats()
        self.catchups = catchups or asyncio.Semaphore(1)
        self.batcher = batcher
        #: Tells the fleet why this partition is held (an event newer than this code): status shows it.
        self.on_hold = on_hold
        #: What holds this partition still, if anything does (``HeldForNewerCode``): nothing more is applied or
        #: acked here; the deliveries go back to the queue when the channel closes, for a newer worker.
        self.held: errors.HeldForNewerCode | None = None
        self.stopping = False  # give up retrying through an outage, leave the rest unacked
        self._catchup_from: Position | None = None  # a catch-up is due, from there
        self._fresh = True  # no new event applied yet since this consumer started: duplicates are the handover's
        #: Where parked events' DLQ copies go: a connection apart from this channel's (``dlq``), the worker's
        #: shared one, or one of this consumer's own that it closes when it ends.
        self.copies = copies or dlq.DeadLetterCopies(settings.amqp_urls, settings.prefix)
        self._own_copies = copies is None
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._wake: Callable[[], None] = lambda: None
        metrics.CAUGHT_UP.labels(projection.name)  # exported at 0 before any catch-up, not absent

    async def open(self) -> None:
        """Set the prefetch (in messages); the subscriber is attached (a reactor to the store its follow-ups go
        to, a publication to its outlet)."""
        await self.projection.attach(self.store, publication_outlet.Runtime(self.settings))
        await self.channel.set_qos(prefetch_count=self.settings.prefetch_messages)
        self._raw = await self.channel.get_underlay_channel()

    async def close_copies(self) -> None:
        """Publish the DLQ copies still pending, if the copies' connection is this consumer's own."""
        if self._own_copies:
            await self.copies.close()

    # --- what the lag monitor tells ---------------------------------------------------------------

    def note_lag(self, lag_events: int, watermark: Position, oldest_age: float = 0.0) -> None:
        """The partition's lag, the age of its oldest unapplied event and the projection's watermark: catch up
        from the watermark when far behind (``catchup_threshold`` events), or when an unapplied event has waited
        ``STALL_SECONDS`` (catch-up on: a threshold of 0 turns both off).

        The second is the store being the truth whatever the broker says: committed events that no message will
        bring any more (an asynchronous failover lost the worker's own apply after the broker had its ack, a
        message dropped by a broker) would wait for news that never comes; a live partition applies its events
        within a second or two, so one that waited that long is stalled, or so far behind that reading the store
        is the faster way anyway."""
        threshold = self.settings.catchup_threshold
        due = bool(threshold) and (lag_events >= threshold or (lag_events > 0 and oldest_age >= STALL_SECONDS))
        if due and self._catchup_from is None:
            self._catchup_from = watermark
            self._wake()

    # --- applying -----------------------------------------------------------------------------------

    def decode(self, tag: int, body: bytes, message_id: str | None = None) -> Delivery:
        """A delivery with its decoded batch, or why it cannot be decoded."""
        try:
            decoded: broker.Batch | errors.MalformedMessage = self.cache.decode(body, self.store.registry, self.names_handled)
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
        """Settle deliveries: alone (``handle_decoded``), or through the projection's batcher, together with
        what the worker's other partitions received meanwhile (``workers.projector.batcher``)."""
        if self.batcher is None:
            await self.handle_decoded(deliveries)
            return
        events, bad = self._sort(deliveries)
        if bad:
            await self._dead_letter_undecodable(bad)
        result, done = await self.batcher.hand_over(self, deliveries, events)
        if not done:
            await self.settle(deliveries, events, result)

    async def settle(self, deliveries: Sequence[Delivery], events: Sequence[RecordedEvent],
                     result: BatchResult) -> None:
        """After the combined batch holding these deliveries' events committed: count this consumer's
        handover duplicates, put copies of its parked events in the DLQ, ack its deliveries."""
        assert self._raw is not None, "open() first"
        if self._fresh:
            applied = {(e.stream_id, e.version) for e in result.applied}
            parked = {(p.event.stream_id, p.event.version) for p in result.parked}
            mine = sum((e.stream_id, e.version) in applied for e in events)
            # Held events (a halted stream's) are no duplicates: when there are any, none are counted.
            duplicates = (sum((e.stream_id, e.version) not in applied | parked for e in events)
                          if not result.held else 0)
            if duplicates:
                metrics.HANDOVER_DUPLICATES.labels(self.projection.name).inc(duplicates)
                self.stats.handover_duplicates += duplicates
            if mine:
                self._fresh = False
        partitions = await self.store.partitions()
        for parked_event in result.parked:
            if partition_of(parked_event.event.stream_id, partitions) == self.partition:
                self._copy_dead_letter(parked_event.event)
        await self._ack(deliveries)

    async def handle_decoded(self, deliveries: Sequence[Delivery]) -> BatchResult:
        """Settle deliveries alone: dead-letter the undecodable messages whole, apply the events of the rest in
        one transaction (parked events get a copy in the DLQ), then ack every delivery with one multiple-ack."""
        assert self._raw is not None, "open() first"
        started = time.perf_counter()
        events, bad = self._sort(deliveries)
        if bad:
            await self._dead_letter_undecodable(bad)
        if events:
            try:
                with self.span(events):
                    result = await self.outage_retrying(
                        lambda: parking.apply_or_park(self.store, self.projection, events))
            except store_errors.TransientError:
                raise  # given up retrying: stopping, or the channel died
            except store_errors.StoreError as exc:
                # Neither an outage nor a handler's failure: a delivery naming what the store does not hold
                # (GapNotInStore: versions it lacks), or a store error no retry heals. Find which delivery by
                # applying them one by one; that one is dead-lettered whole, as an undecodable message is,
                # its body kept (``dead-letters retry`` re-drives it once the store holds its events).
                if not isinstance(exc, store_errors.GapNotInStore):
                    logger.error("a batch failed with an unexpected store error; its delivery is dead-lettered",
                                 extra={"projection": self.projection.name, "partition": self.partition,
                                        "error": f"{type(exc).__name__}: {exc}"})
                if len(deliveries) == 1:
                    await self._dead_letter_undecodable([dataclasses.replace(
                        deliveries[0], decoded=errors.MalformedMessage(f"{type(exc).__name__}: {exc}"))])
                    return BatchResult()
                result = BatchResult()
                for d in deliveries:
                    if not isinstance(d.decoded, errors.MalformedMessage):  # those are dead-lettered already
                        result.add(await self.handle_decoded([d]))
                return result
        else:
            result = BatchResult()
        if self._fresh:
            if result.duplicates:
                metrics.HANDOVER_DUPLICATES.labels(self.projection.name).inc(result.duplicates)
                self.stats.handover_duplicates += result.duplicates
            if result.applied:
                self._fresh = False
        self.count(result, time.perf_counter() - started, messages=len(deliveries))
        for parked in result.parked:
            self._copy_dead_letter(parked.event)
        await self._ack(deliveries)
        return result

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        """Ack the decodable deliveries (the undecodable ones are rejected already) and count the events of theirs
        the projection does not handle."""
        assert self._raw is not None
        good = [d for d in deliveries if not isinstance(d.decoded, errors.MalformedMessage)]
        if not good:
            return
        # Every delivery up to this tag is in this batch or settled before: one frame acks them all.
        await self._raw.basic_ack(max(d.tag for d in good), multiple=True)
        unhandled = sum(d.decoded.unhandled for d in good if not isinstance(d.decoded, errors.MalformedMessage))
        if unhandled:
            metrics.UNHANDLED.labels(self.projection.name).inc(unhandled)
            self.stats.unhandled += unhandled

    async def apply_from_store(self, events: Sequence[RecordedEvent]) -> BatchResult:
        """Apply events read from the store (a catch-up) exactly as deliveries are applied; parked events
        get a copy in the DLQ since no delivery of theirs is at hand."""
        started = time.perf_counter()
        with self.span(events):
            result = await self.outage_retrying(
                lambda: parking.apply_or_park(self.store, self.projection, events))
        self.count(result, time.perf_counter() - started, deliveries=False)
        if result.applied:
            self._fresh = False  # deliveries the catch-up passed are this consumer's duplicates, not a handover's
        self.stats.caught_up += len(events)
        metrics.CAUGHT_UP.labels(self.projection.name).inc(len(events))
        for parked in result.parked:
            self._copy_dead_letter(parked.event)
        return result

    async def catch_up(self, start: Position, stop: asyncio.Event | None = None) -> int:
        """Read the partition's events after ``start`` from the store and apply them until the frontier;
        move the cursor as each batch commits; return the events read. One read runs ahead of each apply."""
        limit, max_bytes = self.settings.catchup_batch_size, self.settings.read_bytes
        # Only the types it handles: an event of another type is nothing to this read model (issue 25).
        names = self.projection.handled_names()
        read = 0
        began = time.perf_counter()
        async with self.catchups:
            events = await self.store.read_partition(self.partition, start, limit, max_bytes=max_bytes,
                                                     event_names=names)
            while events:
                pending = (asyncio.ensure_future(self.store.read_partition(
                    self.partition, events[-1].position, limit, max_bytes=max_bytes, event_names=names))
                    if events.full else None)
                try:
                    await self.apply_from_store(events)
                except BaseException:
                    if pending is not None:  # a cancelled query would spoil its connection: let it finish
                        with contextlib.suppress(Exception):
                            await pending
                    raise
                read += len(events)
                if pending is None or (stop is not None and stop.is_set()) or self.channel.is_closed:
                    if pending is not None:
                        with contextlib.suppress(Exception):
                            await pending
                    break
                events = await pending
        level = logging.INFO if read >= self.settings.catchup_threshold else logging.DEBUG
        logger.log(level, "caught up", extra={"projection": self.projection.name, "partition": self.partition,
                                              "events": read, "seconds": round(time.perf_counter() - began, 3)})
        return read

    async def _catch_up_if_due(self, stop: asyncio.Event) -> None:
        start, self._catchup_from = self._catchup_from, None
        if start is None:
            return
        try:
            async with db.translate_errors():
                state = await self.store.pool.fetchval(SQL["projection_state"], self.projection.name)
        except retry.OUTAGE_ERRORS:
            return
        if state not in (None, "live"):
            return  # a backfill or rebuild fills it from the store; its consumers keep the queue moving
        try:
            await self.catch_up(start, stop)
        except store_errors.CodecError as exc:
            logger.warning("catch-up stopped at an event it cannot decode; the queue carries on",
                           extra={"projection": self.projection.name, "partition": self.partition, "error": str(exc)})
        except retry.OUTAGE_ERRORS as exc:
            logger.warning("catch-up interrupted by an outage; the queue carries on", extra={
                "projection": self.projection.name, "partition": self.partition,
                "error": f"{type(exc).__name__}: {exc}"})

    def span(self, events: Sequence[RecordedEvent]) -> contextlib.AbstractContextManager[None]:
        """The tracing span of one apply, linked to the producer contexts in its events' metadata."""
        return tracing.process_span(self.queue, self.projection.name, len(events), (e.metadata for e in events))

    async def _dead_letter_undecodable(self, bad: list[Delivery]) -> None:
        assert self._raw is not None
        items = [(str(d.decoded), d.body) for d in bad]
        await self.outage_retrying(lambda: parking.record_undecodable(self.store.pool, self.projection.name, items))
        for d in bad:
            logger.warning("undecodable message dead-lettered", extra={
                "projection": self.projection.name, "partition": self.partition, "message_id": d.message_id,
                "error": str(d.decoded)})
            await self._raw.basic_reject(d.tag, requeue=False)  # the queue's DLX moves it to the DLQ
        metrics.DEAD_LETTERED.labels(self.projection.name).inc(len(bad))
        self.stats.undecodable += len(bad)
        self.stats.dead_lettered += len(bad)

    def _copy_dead_letter(self, event: RecordedEvent) -> None:
        """A parked event: its message carries others too, so a copy of the event alone goes to the DLQ (one
        that could not be decoded flagged as such, as the relay flags what it cannot encode), published on
        the copies' own connection, never this channel's (see ``dlq``): the deliveries are acked meanwhile."""
        if isinstance(event.event, Undecodable):
            message = broker.encode_undecodable_row(
                {"event_id": event.event_id, "stream_id": event.stream_id, "version": event.version,
                 "global_position": event.global_position, "transaction_id": event.position.transaction_id,
                 "event_type": event.event_type, "data": event.data, "metadata": codec.packb(event.metadata),
                 "recorded_at": event.recorded_at}, str(event.event.error))
        else:
            message = broker.to_message(event)
        self.copies.put(self.projection.name, message)

    def count(self, result: BatchResult, seconds: float, *, deliveries: bool = True, messages: int = 0) -> None:
        """Count a batch; events a catch-up read that were applied already are no duplicate deliveries."""
        name, now = self.projection.name, time.time()
        duplicates = result.duplicates if deliveries else 0
        metrics.APPLIED.labels(name).inc(len(result.applied))
        metrics.DUPLICATES.labels(name).inc(duplicates)
        metrics.GAPS_FILLED.labels(name).inc(result.gaps_filled)
        metrics.GHOSTS.labels(name).inc(len(result.ghosts))
        metrics.DEAD_LETTERED.labels(name).inc(len(result.parked))
        metrics.APPLY_SECONDS.labels(name).observe(seconds)
        metrics.END_TO_END_SECONDS.observe_many(
            name, [max(0.0, now - event.recorded_at.timestamp()) for event in result.applied])
        s = self.stats
        s.applied += len(result.applied)
        s.duplicates += duplicates
        s.gaps_filled += result.gaps_filled
        s.ghosts += len(result.ghosts)
        s.unhandled += result.unhandled  # a catch-up's reads are of its types: none there
        if result.ghosts:
            logger.warning("delivered events the store does not hold were dropped (lost with a primary by an "
                           "asynchronous failover, or a store restored from an older backup)", extra={
                               "projection": name, "partition": self.partition, "ghosts": [
                                   f"{e.stream_id}@{e.version}:{e.event_id}" for e in result.ghosts[:20]],
                               "count": len(result.ghosts)})
        s.held += result.held
        s.dead_lettered += len(result.parked)
        s.batches += 1
        s.messages += messages
        if self.projection.appends:
            self._reacted(result.reacted)
        logger.debug("batch applied", extra={"projection": name, "partition": self.partition,
                                             "applied": len(result.applied), "duplicates": duplicates,
                                             "seconds": round(seconds, 4)})

    def _reacted(self, outcome: Outcome) -> None:
        """Count what a reactor's committed causes did (their batch's own outcome: the reactor object is shared by
        every partition); wake the relay for their follow-ups."""
        metrics.REACTOR_FOLLOW_UPS.labels(self.projection.name).inc(outcome.follow_ups)
        metrics.REACTOR_REFUSALS.labels(self.projection.name).inc(outcome.refusals)
        if outcome.follow_ups:
            self.store.notifier.poke()  # appended inside our transaction: the relay hears of it now

    async def fire_deadlines(self, done: Callable[[], bool]) -> None:
        """A reactor's partition: fire its due deadlines until ``done()``, looking again when the next is
        due, or every ``deadlines.POLL_SECONDS`` (deadlines scheduled by other partitions' consumers)."""
        assert isinstance(self.projection, Reactor)
        firing = deadlines.Firing(self.store, self.projection, self.partition)
        while not done():
            try:
                fired = await self.outage_retrying(firing.round)
            except retry.OUTAGE_ERRORS:
                return  # stopping, or the channel is gone: the next owner fires them
            if fired.fired:
                self._reacted(fired.reacted)
            wait = deadlines.POLL_SECONDS if fired.next_due is None else min(max(fired.next_due, 0.0),
                                                                              deadlines.POLL_SECONDS)
            slept = 0.0
            while slept < wait and not done():
                await asyncio.sleep(min(0.1, wait - slept))
                slept += 0.1

    async def outage_retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run a database step, retrying through Postgres outages until it works, the stop, or the channel dies."""
        retrying = retry.retry_forever().copy(
            stop=lambda _: self.stopping or self.channel.is_closed)
        async for attempt in retrying:
            with attempt:
                try:
                    value = await step()
                except retry.OUTAGE_ERRORS as exc:
                    self.health.down("postgres", exc, projection=self.projection.name, **retry.condition_of(exc))
                    raise
                self.health.up("postgres")
                return value
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True

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

        self._wake = wake
        self.channel.close_callbacks.add(on_close)
        watchers: list[asyncio.Future[Any]] = [asyncio.ensure_future(e.wait()) for e in (stop, leave)]
        for watcher in watchers:
            watcher.add_done_callback(wake)
        tag = await self._consume(buffer)
        ending = False
        firing = (asyncio.create_task(self.fire_deadlines(
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
                    await self._catch_up_if_due(stop)
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
            self._wake = lambda: None
            for watcher in watchers:
                watcher.cancel()
            if not self.channel.is_closed and self._raw is not None:
                with contextlib.suppress(*retry.OUTAGE_ERRORS):
                    await self._raw.basic_cancel(tag)
            await self.close_copies()
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
        """Consume until the queue is empty, then return; the bounded twin of ``run`` for tests and benches.

        Deliveries are pushed as in ``run``. When none is buffered, a passive declare on the same channel
        asks for the queue's ready count: its answer comes after every delivery the broker pushed before it
        (frames are ordered on a channel), so once those are handed over, zero ready means done.
        """
        await self.open()
        assert self._raw is not None
        buffer: asyncio.Queue[Delivery | None] = asyncio.Queue()
        tag = await self._consume(buffer)
        try:
            while True:
                if not buffer.empty():
                    first = buffer.get_nowait()
                    if first is not None:
                        await self.handle_decoded(self._take(first, buffer))
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
                await self.handle_decoded(self._take(first, buffer))
        await self.close_copies()
        return self.stats


async def _hand_over() -> None:
    """Let deliveries already received run through aiormq's callback task into the buffer."""
    for _ in range(8):
        await asyncio.sleep(0)
