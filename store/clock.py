"""The store's transaction clock: the order of read_all survives a move to another Postgres cluster.

Events are ordered by the id of the transaction that wrote them and read only below the oldest one still
running (``read_all``), so the ids must grow with commit time. They are the cluster's own ids plus a shift
(migration 0009): a store restored from ``pg_dump`` into another cluster keeps the old cluster's ids, which may
be far above the ones the new cluster hands out. ``migrate`` then moves the shift forward so the next id is
past every id the store holds (``repair``); until it has, the store refuses appends, workers refuse to start
and ``status`` to report (``errors.ClockBehind``), rather than write events every reader would skip.

An asynchronous failover is the other way ids come back: the new primary hands out again the ids of
transactions it never received. Nothing it holds names them (what it lost is gone with its events), so its
clock is not behind; what still remembers them lives outside the database (a worker's settled position, a
message in the broker), and the workers no longer trust either for anything but news.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from store import db, queries

logger = logging.getLogger(__name__)

#: Ids left free between the newest stored id and the clock after a shift: nothing needs them, they only keep
#: a shift visibly clear of the ids it jumped (a handful of transactions ran since the reading).
MARGIN = 1_000


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    """The newest transaction id the store holds, the next id its clock hands out, and the shift so far."""

    newest: int | None
    next: int
    shift: int
    shifted_at: dt.datetime | None

    @property
    def behind(self) -> bool:
        """Whether ids the store holds are not all below the clock's next id."""
        return self.newest is not None and self.newest >= self.next


async def read(conn: db.Conn, schema: str) -> Reading:
    """The store's clock as it stands."""
    async with db.translate_errors():
        row = await conn.fetchrow(queries.bind(queries.TEMPLATES, schema)["clock"])
    assert row is not None
    newest = row["newest"]
    return Reading(None if newest is None else int(newest), int(row["next"]), int(row["shift"]), row["shifted_at"])


async def repair(conn: db.Conn, schema: str) -> Reading:
    """Move the clock past every id the store holds, if it is behind; the reading after. The caller holds the
    schema's migrate lock, so two repairs never add up."""
    found = await read(conn, schema)
    if not found.behind:
        return found
    assert found.newest is not None
    more = found.newest - found.next + 1 + MARGIN
    async with db.translate_errors():
        await conn.fetchval(queries.bind(queries.TEMPLATES, schema)["shift_clock"], more, found.newest, found.next)
    after = await read(conn, schema)
    logger.warning("the store holds transaction ids ahead of this cluster's (restored or moved from another "
                   "cluster): its clock moved past them", extra={
                       "schema": schema, "newest_stored": found.newest, "cluster_next": found.next,
                       "shifted_by": more, "shift": after.shift})
    return after
