"""The new release's read models: ratings count comments now (``Rated`` v2); notes as before."""

from __future__ import annotations

from typing import ClassVar, LiteralString

import eventfleet as ef
from tests.e2e.upgrade.events_v2 import Noted, Rated
from tests.e2e.upgrade.tables import NOTE, NOTES_DDL, RATE, RATINGS_DDL


@ef.register
class Ratings(ef.Projection):
    name = "ratings"
    tables = ("ratings",)
    ddl: ClassVar[LiteralString] = RATINGS_DDL

    @ef.handles(Rated)
    async def rated(self, conn: ef.Conn, event: ef.RecordedEvent) -> None:
        await conn.execute(RATE, event.event.item, event.event.stars, 1 if event.event.comment else 0)


@ef.register
class Notes(ef.Projection):
    name = "notes"
    tables = ("notes",)
    ddl: ClassVar[LiteralString] = NOTES_DDL

    @ef.handles(Noted)
    async def noted(self, conn: ef.Conn, event: ef.RecordedEvent) -> None:
        await conn.execute(NOTE, event.event.item)
