"""``republish``: a publication publishes again from a position, for a consumer that lost its data.

Every event at or after the global position ``from_position`` is published again, in stream order, by the
workers running the publication: in one transaction, the publication's checkpoint of each stream holding such
an event moves back to just before the stream's first one (never forward), and its low watermark to just before
the first such event in read_all order. The workers' lag monitor then sees those events unapplied and their
consumers catch the partitions up from the store (the oldest unapplied event is older than
``catchup.STALL_SECONDS``, so at once), publishing them again with the ids they had: a consumer that kept
some de-duplicates them. Messages published meanwhile for newer events go on; per stream, the republished
ones come before any newer one.

The transaction takes the publication's lock exclusively (it waits for the batches in flight to commit, and
those after it see the moved checkpoints), then its watermark lock, as a re-drive does. A stream halted at a
parked event stays halted: ``dead-letters retry`` publishes it from its (moved) checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging

from projections import registry
from store import db
from store.event_store import EventStore
from store.queries import load
from workers import errors, locks

logger = logging.getLogger(__name__)

SQL = load("workers", "publication.sql")


@dataclasses.dataclass(frozen=True, slots=True)
class Republished:
    """What a republish moved: the streams whose checkpoint went back, and the events they publish again."""

    publication: str
    from_position: int
    streams: int
    events: int


async def republish(store: EventStore, name: str, from_position: int) -> Republished:
    """Make publication ``name`` publish every event at or after ``from_position`` again (see the module doc)."""
    cls = registry.get(name)
    if cls.kind != "publication":
        raise errors.NotRetryable(f"{name} is a {cls.kind}, not a publication: only a publication is republished "
                                  f"(a read model is rebuilt: `eventfleet rebuild {name}`)")
    if from_position < 0:
        raise errors.NotRetryable(f"--from must be a global position (0 or more), not {from_position}")
    async with db.translate_errors(), store.pool.acquire() as conn, conn.transaction():
        await locks.take(conn, locks.projection(store.schema, name))
        await locks.take(conn, locks.watermark(store.schema, name))
        row = await conn.fetchrow(SQL["republish_checkpoints"], name, from_position)
        assert row is not None
        await conn.execute(SQL["republish_watermark"], name, from_position)
    done = Republished(name, from_position, row["streams"], row["events"])
    logger.info("publication moved back to republish", extra={
        "publication": name, "from_position": from_position, "streams": done.streams, "events": done.events})
    return done
