"""One transaction for a worker's deliveries of one projection, whatever partitions they came from.

A worker holding k partitions of a projection has k consumers, each receiving its partition's batch messages.
Applying each consumer's messages in transactions of their own made a worker of a fleet pay the fixed cost of
a transaction (checkpoint claim, the statements, the commit) for a few events each: the more workers, the
smaller each one's share of a message, the more CPU per event. So the consumers hand what they received to
their projection's ``Batcher``, which applies everything handed to it so far, from every partition, in one
transaction of up to ``Settings.batch_size`` events (whole hand-overs), while the next ones gather. Each
consumer waits for its hand-over to commit before it takes more from its queue, so a partition's events still
apply in order; then it acks its own deliveries (``Consumer.settle``). Exactly-once is the checkpoints', as
ever: a combined batch is just a batch with several partitions' streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from projections.base import Projection
from store import errors as store_errors
from store.event_store import EventStore, RecordedEvent
from workers import errors
from workers.projector import parking
from workers.projector.checkpoints import BatchResult

if TYPE_CHECKING:
    from workers.projector.consumer import Consumer, Delivery

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class HandOver:
    """What one consumer handed over: its deliveries and their events to apply."""

    consumer: Consumer
    deliveries: Sequence[Delivery]
    events: list[RecordedEvent]
    #: The batch's result, and whether the deliveries are settled already (applied alone, acked or rejected).
    done: asyncio.Future[tuple[BatchResult, bool]]


class Batcher:
    """The projection's hand-overs of one worker, applied together; ``run`` until cancelled."""

    def __init__(self, store: EventStore, projection: Projection, batch_size: int) -> None:
        self.store, self.projection, self.batch_size = store, projection, batch_size
        self._waiting: list[HandOver] = []
        self._wake = asyncio.Event()

    async def hand_over(self, consumer: Consumer, deliveries: Sequence[Delivery],
                        events: list[RecordedEvent]) -> tuple[BatchResult, bool]:
        """Apply ``events`` with whatever else is waiting; return once their transaction committed: the combined
        batch's result, and True when the consumer's deliveries were settled by the consumer itself meanwhile
        (the combined batch failed and each consumer applied its own alone: nothing is left to ack)."""
        done: asyncio.Future[tuple[BatchResult, bool]] = asyncio.get_running_loop().create_future()
        self._waiting.append(HandOver(consumer, deliveries, events, done))
        self._wake.set()
        return await done

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._waiting:
                    await self._apply(self._take())
        finally:
            for waiting in self._waiting:  # stopping: they were never applied; their deliveries come back
                if not waiting.done.done():
                    waiting.done.set_exception(asyncio.CancelledError())

    def _take(self) -> list[HandOver]:
        taken: list[HandOver] = []
        events = 0
        while self._waiting and (not taken or events + len(self._waiting[0].events) <= self.batch_size):
            handover = self._waiting.pop(0)
            taken.append(handover)
            events += len(handover.events)
        return taken

    async def _apply(self, group: list[HandOver]) -> None:
        events = [e for h in group for e in h.events]
        lead = group[0].consumer
        started = time.perf_counter()
        try:
            if events:
                with lead.span(events):
                    result = await lead.outage_retrying(
                        lambda: parking.apply_or_park(self.store, self.projection, events))
            else:
                result = BatchResult()
        except (store_errors.StoreError, errors.HeldForNewerCode) as exc:
            if isinstance(exc, store_errors.TransientError):  # given up retrying: stopping, or the channel died
                self._fail(group, exc)
                return
            # A delivery naming what the store does not hold, or an event newer than this code: each consumer
            # finds its own (handle_decoded applies its deliveries alone: the one that fails dead-letters it,
            # or holds its partition).
            logger.warning("combined batch failed; its consumers apply their deliveries alone", extra={
                "projection": self.projection.name, "error": f"{type(exc).__name__}: {exc}"})
            for handover in group:
                try:
                    mine = [d for d in handover.deliveries if not isinstance(d.decoded, errors.MalformedMessage)]
                    handover.done.set_result((await handover.consumer.handle_decoded(mine), True))
                except Exception as failed:  # noqa: BLE001 - handed to the consumer that waits for it
                    handover.done.set_exception(failed)
            return
        except Exception as exc:  # noqa: BLE001 - handed to the consumers that wait for it
            self._fail(group, exc)
            return
        except BaseException as exc:
            self._fail(group, exc)
            raise
        lead.count(result, time.perf_counter() - started, messages=sum(len(h.deliveries) for h in group))
        for handover in group:
            handover.done.set_result((result, False))

    @staticmethod
    def _fail(group: list[HandOver], exc: BaseException) -> None:
        for handover in group:
            if not handover.done.done():
                handover.done.set_exception(exc)
