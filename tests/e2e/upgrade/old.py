"""The old release's read models: ratings per item (from ``Rated`` v1), notes per item."""

from __future__ import annotations

from typing import ClassVar, LiteralString

import eventfleet as ef
from tests.e2e.upgrade.events_v1 import Noted, RatedV1

RATINGS_DDL: LiteralString = ("CREATE TABLE IF NOT EXISTS ratings (item text PRIMARY KEY, stars bigint NOT NULL, "
                              "ratings bigint NOT NULL, comments bigint NOT NULL)")
NOTES_DDL: LiteralString = "CREATE TABLE IF NOT EXISTS notes (item text PRIMARY KEY, notes bigint NOT NULL)"
RATE: LiteralString = ("INSERT INTO ratings AS r VALUES ($1, $2, 1, $3) ON CONFLICT (item) DO UPDATE SET "
                       "stars = r.stars + EXCLUDED.stars, ratings = r.ratings + 1, comments = r.comments + EXCLUDED.comments")
NOTE: LiteralString = ("INSERT INTO notes AS n VALUES ($1, 1) ON CONFLICT (item) DO UPDATE SET notes = n.notes + 1")


@ef.register
class Ratings(ef.Projection):
    name = "ratings"
    tables = ("ratings",)
    ddl: ClassVar[LiteralString] = RATINGS_DDL

    @ef.handles(RatedV1)
    async def rated(self, conn: ef.Conn, event: ef.RecordedEvent) -> None:
        await conn.execute(RATE, event.event.item, event.event.stars, 0)


@ef.register
class Notes(ef.Projection):
    name = "notes"
    tables = ("notes",)
    ddl: ClassVar[LiteralString] = NOTES_DDL

    @ef.handles(Noted)
    async def noted(self, conn: ef.Conn, event: ef.RecordedEvent) -> None:
        await conn.execute(NOTE, event.event.item)
