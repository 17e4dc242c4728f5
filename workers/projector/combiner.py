"""A worker group's read models' batches applied in one transaction where they can be.

A group feeds every read model the same deliveries at the same moment (``feed``), and each read model's batcher
applies its share in a transaction of its own: a group of many read models that each handle a few types paid a
BEGIN, a COMMIT and a connection round per read model for every delivery (bench.fanout (c): 32 one-type read
models). The batchers of a group's plain read models hand their batches to one ``Combiner`` instead: the batches
handed in while a combined transaction is in flight (and in the same turn of the event loop) are applied together
in the next one (``checkpoints.apply_batches``: each read model's checkpoint claim and writes as on its own, all
committed or none). Exactly-once is unchanged: each read model's checkpoints move in the transaction of its writes.

A combined transaction that fails for any reason (a handler's error, a poison event, an outage, a lock timeout) is
rolled back and each batch goes its own way (``parking.apply_or_park`` with the batcher's retries): the combiner
is only ever a shortcut. Reactors and publications (they append, or publish, per batch) never combine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

from projections.base import Projection
from store.event_store import EventStore, RecordedEvent
from workers.projector import checkpoints
from workers.projector.checkpoints import BatchResult

logger = logging.getLogger(__name__)

#: Turns of the event loop a round waits before it takes the batches handed in: the group's other read models'
#: consumers hand theirs over a few turns after the first (the same delivery reached them together).
GATHER_TURNS = 4


@dataclasses.dataclass(slots=True)
class _Entry:
    projection: Projection
    events: Sequence[RecordedEvent]
    done: asyncio.Future[BatchResult | None]


def combines(projection: Projection) -> bool:
    """Whether a read model's batches may share a transaction with others': a plain projection's."""
    return projection.kind == "projection" and not projection.appends


class Combiner:
    """The batches of a group's read models, applied together (see the module doc)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.rounds = 0  # combined transactions that committed
        self.fallbacks = 0  # combined transactions that failed: each of their batches went its own way
        self._waiting: list[_Entry] = []
        self._round: asyncio.Task[None] | None = None

    async def apply(self, projection: Projection, events: Sequence[RecordedEvent]) -> BatchResult | None:
        """The batch's result once a combined transaction committed it; None when it did not (apply it alone)."""
        done: asyncio.Future[BatchResult | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Entry(projection, events, done))
        while not done.done():
            if self._round is None or self._round.done():
                self._round = asyncio.create_task(self._run_round(), name="combined batch")
            # Not cancelled with this waiter: the round goes on for the others (it settles every batch it took).
            await asyncio.wait({self._round})
        return done.result()

    async def _run_round(self) -> None:
        for _ in range(GATHER_TURNS):
            await asyncio.sleep(0)
        taken, self._waiting = self._waiting, []
        if not taken:
            return
        # One batch per read model a transaction (a second of the same read model waits for the next round), in
        # name order: every worker claims the read models' checkpoint rows in one order.
        first: dict[str, _Entry] = {}
        for entry in taken:
            if entry.projection.name in first:
                self._waiting.append(entry)
            else:
                first[entry.projection.name] = entry
        entries = [first[name] for name in sorted(first)]
        results: list[BatchResult | None] = [None] * len(entries)  # alone: its own way costs the same, and parks
        try:
            if len(entries) > 1:
                results = list(await checkpoints.apply_batches(
                    self.store, [(e.projection, e.events) for e in entries]))
                self.rounds += 1
        except Exception as exc:  # noqa: BLE001 - any failure: each batch goes its own way
            self.fallbacks += 1
            logger.debug("combined batch failed; each read model applies its own", extra={
                "projections": [e.projection.name for e in entries], "error": f"{type(exc).__name__}: {exc}"})
        finally:
            for entry, result in zip(entries, results, strict=True):
                if not entry.done.done():
                    entry.done.set_result(result)
