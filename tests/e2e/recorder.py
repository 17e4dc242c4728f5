"""``batch_recorder``: a test-only projection that records each applied batch's partition, process and time.

Loaded into worker processes with ``EVENTFLEET_PROJECTION_MODULES=tests.e2e.recorder``. Its rows commit
with the batch, so they show exactly which process applied which partition when: two processes applying
one partition at overlapping times would show as overlapping intervals.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Sequence

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped
from projections.base import Projection, handles
from projections.registry import register
from store import db, queries
from store.event_store import RecordedEvent
from store.partitions import partition_of

SQL = queries.load("tests.e2e", "recorder.sql")
#: P of the schemas this projection is used with (its tests migrate with it).
PARTITIONS = 16
#: Seconds each batch waits inside its transaction after recording itself (TEST_RECORDER_PAUSE_SECONDS, unset =
#: none): a worker that spends most of its time inside transactions is easy to freeze inside one.
PAUSE = float(os.environ.get("TEST_RECORDER_PAUSE_SECONDS", "0"))


@register
class BatchRecorder(Projection):
    name = "batch_recorder"
    tables = ("batch_recorder",)
    ddl = SQL["ddl"]

    @handles(OrderPlaced, OrderPaid, OrderShipped, OrderCancelled)
    async def record(self, conn: db.Conn, event: RecordedEvent) -> None:
        await self.apply_batch(conn, [event])

    async def apply_batch(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        counts = collections.Counter(partition_of(e.stream_id, PARTITIONS) for e in events)
        await conn.execute(SQL["record"], list(counts), os.getpid(), list(counts.values()))
        if PAUSE:
            await asyncio.sleep(PAUSE)
