"""The apply step of one projection in one worker: every transaction of its events, whoever hands them in.

A worker holding k partitions of a projection has k consumers, each receiving its partition's batch messages.
Applying each consumer's messages in transactions of their own made a worker of a fleet pay the fixed cost of
a transaction (checkpoint claim, the statements, the commit) for a few events each: the more workers, the
smaller each one's share of a message, the more CPU per event. So the consumers hand what they received to
their projection's ``Batcher``, which applies everything handed to it so far, from every partition, in one
transaction of up to ``Settings.batch_size`` events (whole hand-overs), while the next ones gather. Each
consumer waits for its hand-over to commit before it takes more from its queue, so a partition's events still
apply in order; then it acks its own deliveries. Exactly-once is the checkpoints', as ever: a combined batch is
just a batch with several partitions' streams. A consumer without a shared batcher (tests, tools, benchmarks:
``Consumer.until_idle``) has a batcher of one: the same path.

The batcher owns everything of the step but the channel: the tracing span, the retry through Postgres outages
(given up once no consumer of the batch can ack any more, or the batcher stopped), ``parking.apply_or_park``,
the counting (Prometheus and ``Stats``), the DLQ copies of parked events, and the record of dead-lettered
deliveries. A catch-up's reads of the store are applied by the same step (``apply_read``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from projections.base import Projection
from projections.reactor import Outcome
from store import codec, tracing
from store import errors as store_errors
from store.event_store import EventStore, RecordedEvent
from store.records import Undecodable
from workers import broker, errors
from workers.config import Settings
from workers.projector import dlq, parking
from workers.projector.checkpoints import BatchResult
from workers.projector.combiner import Combiner, combines
from workers.projector.deliveries import Delivery
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
    messages: int = 0
    caught_up: int = 0  # events read from the store by catch-ups
    handover_duplicates: int = 0
    ghosts: int = 0  # delivered events the store does not hold: dropped
    unhandled: int = 0  # delivered events of types the projection does not handle: acked, never applied


@dataclasses.dataclass(frozen=True, slots=True)
class Settled:
    """A hand-over once its events committed: the batch's result, the deliveries dead-lettered whole (to be
    rejected, not acked), and how many of the hand-over's own events were applied."""

    result: BatchResult
    rejected: tuple[Delivery, ...] = ()
    applied: int = 0


@dataclasses.dataclass(slots=True)
class HandOver:
    """What one consumer handed over: its partition, its deliveries and their events to apply."""

    partition: int
    deliveries: Sequence[Delivery]
    events: list[RecordedEvent]
    #: Whether the consumer will ack nothing more (stopping, or its channel is gone): retrying is for others.
    gone: Callable[[], bool]
    #: No new event applied by this consumer yet: the duplicates are a handover's (counted apart).
    fresh: bool = False
    done: asyncio.Future[Settled] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    """The projection's apply step in this process: hand-overs applied together while ``run`` runs, reads of
    the store applied at once; ``close`` when done (the DLQ copies of its own are published)."""

    def __init__(self, store: EventStore, projection: Projection, settings: Settings, *,
                 health_: health.Health | None = None, stats: Stats | None = None,
                 copies: dlq.DeadLetterCopies | None = None, combiner: Combiner | None = None) -> None:
        """``combiner``: a worker group's, to apply this read model's batches in one transaction with the group's
        other read models' where they can be (``workers.projector.combiner``); ignored for a reactor or a
        publication."""
        self.store, self.projection, self.batch_size = store, projection, settings.batch_size
        self.combiner = combiner if combiner is not None and combines(projection) else None
        self.names = broker.Names(settings.prefix)
        self.health = health_ or health.Health()
        self.stats = stats or Stats()
        #: Where parked events' DLQ copies go: a connection apart from the consumers' channels (``dlq``), the
        #: worker's shared one, or one of this batcher's own that ``close`` closes.
        self.copies = copies or dlq.DeadLetterCopies(settings.amqp_urls, settings.prefix)
        self._own_copies = copies is None
        self.stopped = False  # the batcher stopped: nothing it retries will be waited for
        self._waiting: list[HandOver] = []
        self._wake = asyncio.Event()
        metrics.CAUGHT_UP.labels(projection.name)  # exported at 0 before any catch-up, not absent

    async def close(self) -> None:
        """Publish the DLQ copies still pending, if the copies' connection is this batcher's own."""
        if self._own_copies:
            await self.copies.close()

    # --- hand-overs ---------------------------------------------------------------------------------

    async def hand_over(self, handover: HandOver) -> Settled:
        """Apply the hand-over's events with whatever else is waiting; return once their transaction committed
        (or, when the combined batch failed, once each of its deliveries was applied alone or dead-lettered)."""
        self._waiting.append(handover)
        self._wake.set()
        return await handover.done

    async def run(self) -> None:
        """Apply the hand-overs as they come, until cancelled."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._waiting:
                    await self._apply_group(self._take())
        finally:
            self.stopped = True
            for waiting in self._waiting:  # stopping: they were never applied; their deliveries come back
                if not waiting.done.done():
                    waiting.done.set_exception(asyncio.CancelledError())

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """``run`` in a task of its own for the block (a batcher of one)."""
        task = asyncio.create_task(self.run(), name=f"batch {self.projection.name}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _take(self) -> list[HandOver]:
        taken: list[HandOver] = []
        events = 0
        while self._waiting and (not taken or events + len(self._waiting[0].events) <= self.batch_size):
            handover = self._waiting.pop(0)
            taken.append(handover)
            events += len(handover.events)
        return taken

    async def _apply_group(self, group: list[HandOver]) -> None:
        events = [e for h in group for e in h.events]
        # The stop condition reaches the consumers' predicates only, never the hand-overs: one that reached them
        # kept batches' events alive long past their commit (a worker of 1 MiB events peaked at 960 MiB instead
        # of about 100 in tests/e2e/test_memory_budget.py with catch-up off).
        gones = [h.gone for h in group]
        try:
            result = await self._apply(events, lambda: all(gone() for gone in gones),
                                       messages=sum(len(h.deliveries) for h in group),
                                       partitions=sorted({h.partition for h in group}))
        except (store_errors.StoreError, errors.HeldForNewerCode) as exc:
            if isinstance(exc, store_errors.TransientError):  # given up retrying: stopping, or the channels died
                self._fail(group, exc)
                return
            try:
                await self._apply_alone(group, exc)
            except BaseException as stopped:  # cancelled meanwhile: nobody is left waiting for ever
                self._fail(group, stopped)
                raise
            return
        except Exception as exc:  # noqa: BLE001 - handed to the consumers that wait for it
            self._fail(group, exc)
            return
        except BaseException as exc:
            self._fail(group, exc)
            raise
        for handover in group:
            handover.done.set_result(Settled(result, applied=self._count_handover(handover, result)))

    async def _apply_alone(self, group: list[HandOver], exc: BaseException) -> None:
        """The combined batch failed for a delivery naming what the store does not hold (``GapNotInStore``:
        versions it lacks), a store error no retry heals, or an event newer than this code: each delivery is
        applied alone, and the one that fails is dead-lettered whole, as an undecodable message is, its body kept
        (``dead-letters retry`` re-drives it once the store holds its events); an event newer than this code
        holds its consumer's partition (``HeldForNewerCode`` to it)."""
        if len(group) > 1 or len(group[0].deliveries) > 1:
            logger.warning("batch failed; its deliveries are applied alone", extra={
                "projection": self.projection.name, "error": f"{type(exc).__name__}: {exc}"})
        for handover in group:
            try:
                handover.done.set_result(await self._deliveries_alone(
                    handover, exc if len(group) == 1 and len(handover.deliveries) == 1 else None))
            except Exception as failed:  # noqa: BLE001 - handed to the consumer that waits for it
                handover.done.set_exception(failed)

    async def _deliveries_alone(self, handover: HandOver, failed: BaseException | None) -> Settled:
        """A hand-over's deliveries applied one by one (``failed``: the only one's error, known already)."""
        result, rejected = BatchResult(), []
        for d in handover.deliveries:
            if isinstance(d.decoded, errors.MalformedMessage):  # dead-lettered already
                continue
            exc = failed
            if exc is None:
                try:
                    result.add(await self._apply(list(d.decoded.events), handover.gone, messages=1,
                                                 partitions=[handover.partition]))
                    continue
                except store_errors.TransientError:
                    raise  # given up retrying: stopping, or the channel died
                except store_errors.StoreError as error:
                    exc = error
            if isinstance(exc, errors.HeldForNewerCode):
                raise exc
            if not isinstance(exc, store_errors.GapNotInStore):
                logger.error("a batch failed with an unexpected store error; its delivery is dead-lettered",
                             extra={"projection": self.projection.name, "partition": handover.partition,
                                    "error": f"{type(exc).__name__}: {exc}"})
            bad = dataclasses.replace(d, decoded=errors.MalformedMessage(f"{type(exc).__name__}: {exc}"))
            await self.dead_letter([bad], handover.gone)
            rejected.append(bad)
        return Settled(result, tuple(rejected), self._count_handover(handover, result))

    @staticmethod
    def _fail(group: list[HandOver], exc: BaseException) -> None:
        for handover in group:
            if not handover.done.done():
                handover.done.set_exception(exc)

    # --- the step -----------------------------------------------------------------------------------

    async def _apply(self, events: Sequence[RecordedEvent], gone: Callable[[], bool], *, messages: int = 0,
                     partitions: Sequence[int] = (), deliveries: bool = True) -> BatchResult:
        """One transaction: the events applied (or parked), counted, parked ones copied to the DLQ."""
        started = time.perf_counter()
        if events:
            with tracing.process_span(self._queue(partitions), self.projection.name, len(events),
                                      (e.metadata for e in events)):
                result = await self.retrying(lambda: self._apply_or_park(events), gone)
        else:
            result = BatchResult()
        self._count(result, time.perf_counter() - started, partitions, deliveries=deliveries, messages=messages)
        for parked in result.parked:
            self._copy_dead_letter(parked.event)
        return result

    async def _apply_or_park(self, events: Sequence[RecordedEvent]) -> BatchResult:
        """One attempt: in a combined transaction of the group's read models if it commits there, else alone."""
        if self.combiner is not None and (combined := await self.combiner.apply(self.projection, events)) is not None:
            return combined
        return await parking.apply_or_park(self.store, self.projection, events)

    async def apply_read(self, events: Sequence[RecordedEvent], partition: int, gone: Callable[[], bool]
                         ) -> BatchResult:
        """Apply events read from the store (a catch-up) exactly as deliveries are applied; parked events get
        a copy in the DLQ as ever (no delivery of theirs is at hand)."""
        result = await self._apply(events, gone, partitions=[partition], deliveries=False)
        self.stats.caught_up += len(events)
        metrics.CAUGHT_UP.labels(self.projection.name).inc(len(events))
        return result

    async def dead_letter(self, bad: Sequence[Delivery], gone: Callable[[], bool]) -> None:
        """Record deliveries dead-lettered whole (undecodable, or naming what the store lacks) with their
        bodies; their consumer rejects them, and the queue's DLX moves them to the DLQ."""
        items = [(str(d.decoded), d.body) for d in bad]
        await self.retrying(lambda: parking.record_undecodable(self.store.pool, self.projection.name, items), gone)
        metrics.DEAD_LETTERED.labels(self.projection.name).inc(len(bad))
        self.stats.undecodable += len(bad)
        self.stats.dead_lettered += len(bad)

    async def retrying(self, step: Callable[[], Awaitable[T]], gone: Callable[[], bool]) -> T:
        """Run a database step, retrying through Postgres outages until it works, or until ``gone()`` (nobody
        waits for it any more) or the batcher stopped."""
        retrying = retry.retry_forever().copy(stop=lambda _: self.stopped or gone())
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

    def _queue(self, partitions: Sequence[int]) -> str:
        """The queue a batch's span names: its (first) partition's."""
        return self.names.partition_queue(self.projection.name, partitions[0] if partitions else 0)

    def _copy_dead_letter(self, event: RecordedEvent) -> None:
        """A parked event: its message carries others too, so a copy of the event alone goes to the DLQ (one
        that could not be decoded flagged as such, as the relay flags what it cannot encode), published on
        the copies' own connection, never a consumer's channel (see ``dlq``): the deliveries are acked meanwhile."""
        if isinstance(event.event, Undecodable):
            message = broker.encode_undecodable_row(
                {"event_id": event.event_id, "stream_id": event.stream_id, "version": event.version,
                 "global_position": event.global_position, "transaction_id": event.position.transaction_id,
                 "event_type": event.event_type, "data": event.data, "metadata": codec.packb(event.metadata),
                 "recorded_at": event.recorded_at}, str(event.event.error))
        else:
            message = broker.to_message(event)
        self.copies.put(self.projection.name, message)

    # --- counting -----------------------------------------------------------------------------------

    def _count_handover(self, handover: HandOver, result: BatchResult) -> int:
        """A hand-over's own events applied; for a fresh consumer, its events the batch found applied already
        (a handover's duplicates: the previous owner applied them, the acks did not reach the broker)."""
        applied = {(e.stream_id, e.version) for e in result.applied}
        mine = sum((e.stream_id, e.version) in applied for e in handover.events)
        if handover.fresh:
            other = applied | {(p.event.stream_id, p.event.version) for p in result.parked} | {
                (e.stream_id, e.version) for e in result.ghosts}
            # Held events (a halted stream's) are no duplicates: when there are any, none are counted.
            duplicates = (sum((e.stream_id, e.version) not in other for e in handover.events)
                          if not result.held else 0)
            if duplicates:
                metrics.HANDOVER_DUPLICATES.labels(self.projection.name).inc(duplicates)
                self.stats.handover_duplicates += duplicates
        return mine

    def _count(self, result: BatchResult, seconds: float, partitions: Sequence[int], *, deliveries: bool = True,
               messages: int = 0) -> None:
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
                               "projection": name, "partitions": list(partitions), "ghosts": [
                                   f"{e.stream_id}@{e.version}:{e.event_id}" for e in result.ghosts[:20]],
                               "count": len(result.ghosts)})
        s.held += result.held
        s.dead_lettered += len(result.parked)
        s.batches += 1
        s.messages += messages
        if self.projection.appends:
            self.reacted(result.reacted)
        logger.debug("batch applied", extra={"projection": name, "partitions": list(partitions),
                                             "applied": len(result.applied), "duplicates": duplicates,
                                             "seconds": round(seconds, 4)})

    def reacted(self, outcome: Outcome) -> None:
        """Count what a reactor's committed causes did (their batch's own outcome: the reactor object is shared by
        every partition); wake the relay for their follow-ups."""
        metrics.REACTOR_FOLLOW_UPS.labels(self.projection.name).inc(outcome.follow_ups)
        metrics.REACTOR_REFUSALS.labels(self.projection.name).inc(outcome.refusals)
        if outcome.follow_ups:
            self.store.notifier.poke()  # appended inside our transaction: the relay hears of it now
