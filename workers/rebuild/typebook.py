"""The event types of read models across releases: what each was built with, what each worker's code handles.

A read model's per-stream checkpoints move past the events it does not handle without applying them. So when
a release adds a type to a read model, the events of that type behind its checkpoints were never applied, and
applying them now, out of their place among the others, is not what a fresh build would have done. The rule:

- ``read_model_types.handled`` holds the types a read model's tables and checkpoints are exact for: every event
  of those types behind the checkpoints was applied once, in order.
- Every worker (at start, before it consumes) and ``migrate`` register the read models of their code
  (``register``). A read model seen for the first time records its code's types (its backfill builds it with
  them). Otherwise the recorded types become their intersection with the code's: the types a release removed
  are no longer claimed (nothing to re-apply), and a worker of older code (a rolling upgrade, a rollback) makes
  the recorded types no more than what it applies.
- Code that handles a type the record lacks leaves its read model *pending* (``Change.added``). Its workers
  consume it as usual and, once no worker of other code runs it (``other_code``), rebuild it from the store
  with their code (``workers/rebuild/typechange.py``; or the operator runs ``eventfleet rebuild NAME``). Only
  then, in a transaction that finds no worker of other code seen since the rebuild began, is the code's set
  recorded (``settle``). A worker of other code that ran meanwhile keeps it pending: the next rebuild (once it
  is gone) makes it exact. The rebuild replaces the tables, so whatever the live path did before is moot.
- A reactor's (or a publication's: any subscriber not ``replayable``) types are recorded as they come: it acts
  on new events, and replaying old ones would act again (a publication replays with ``republish``).

Each worker says every few seconds that it still runs its read models (``refresh``); its rows stay after it
stops until nothing needs them. A worker of a release before these tables says nothing: a registered worker
running the read model without rows counts as other code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence

from projections.base import Projection
from store import db, queries

logger = logging.getLogger(__name__)

SQL = queries.load("workers", "read_models.sql")

#: The event names a read model handles; None: every event.
Names = frozenset[str] | None


def covers(built: Names, code: Names) -> bool:
    """Whether a read model built with ``built`` has every type ``code`` handles."""
    if built is None:
        return True
    return code is not None and code <= built


def narrowed(built: Names, code: Names) -> Names:
    """The types both hold (None: every event)."""
    if built is None:
        return code
    return built if code is None else built & code


def describe(names: Names) -> str:
    """``all`` or the names, comma-separated."""
    return "all" if names is None else ", ".join(sorted(names)) or "none"


def to_array(names: Names) -> list[str] | None:
    return None if names is None else sorted(names)


def from_array(names: Sequence[str] | None) -> Names:
    return None if names is None else frozenset(names)


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One read model as a registration left it: the types it is built with, those its code handles."""

    projection: str
    built: Names
    code: Names

    @property
    def pending(self) -> bool:
        """The code handles types the read model was not built with: it waits for a rebuild."""
        return not covers(self.built, self.code)

    @property
    def added(self) -> Names:
        """The types the code adds (None: the code takes every event, the read model does not)."""
        if self.code is None:
            return None if self.built is not None else frozenset()
        return self.code - (self.built or frozenset())


def code_of(projection: type[Projection]) -> Names:
    return projection.handled_names()


async def register(conn: db.Conn, projections: Sequence[type[Projection]], *,
                   worker: str | None = None) -> dict[str, Change]:
    """Record the types of the code's read models (see the module doc), and that ``worker`` runs them with it;
    one transaction. Returns each read model's types after it."""
    changes: dict[str, Change] = {}
    async with db.translate_errors(), conn.transaction():
        for cls in sorted(projections, key=lambda c: c.name):  # rows locked in one order: no deadlock
            code, tables = code_of(cls), list(cls.tables)
            if await conn.fetchval(SQL["insert_types"], cls.name, to_array(code), tables) is not None:
                built = code
            else:
                before = from_array(await conn.fetchval(SQL["lock_types"], cls.name))
                built = code if not cls.replayable else narrowed(before, code)
                await conn.execute(SQL["set_types"], cls.name, to_array(built), tables)
                if built != before:
                    logger.info("read model's types narrowed to the code's", extra={
                        "projection": cls.name, "before": describe(before), "after": describe(built)})
            if worker is not None:
                await conn.execute(SQL["register_worker"], worker, cls.name, to_array(code))
            changes[cls.name] = Change(cls.name, built, code)
    pending = [c for c in changes.values() if c.pending]
    for change in pending:
        logger.warning("read model handles new types: it is rebuilt from the store once no worker of other code "
                       "runs it", extra={"projection": change.projection, "built": describe(change.built),
                                         "added": describe(change.added)})
    return changes


async def refresh(conn: db.Conn | db.Pool, worker: str, lease_seconds: float) -> None:
    """Say that ``worker`` still runs its read models; forget the rows nothing needs any more."""
    async with db.translate_errors():
        await conn.execute(SQL["refresh_worker"], worker)
        await conn.execute(SQL["forget_workers"], 2 * lease_seconds)


async def pending(conn: db.Conn | db.Pool, projections: Sequence[type[Projection]]) -> list[type[Projection]]:
    """Those of ``projections`` whose code handles types their read model's record lacks (none recorded: not
    pending, the next registration records them). Never a reactor: its types are recorded as they come."""
    async with db.translate_errors():
        rows = await conn.fetch(SQL["built"], [p.name for p in projections])
    built = {r["projection"]: from_array(r["handled"]) for r in rows}
    return [p for p in projections
            if p.name in built and p.replayable and not covers(built[p.name], code_of(p))]


async def since(conn: db.Conn | db.Pool, seconds: float) -> dt.datetime:
    """The database's clock ``seconds`` ago."""
    async with db.translate_errors():
        at: dt.datetime = await conn.fetchval(SQL["since"], seconds)
    return at


@dataclasses.dataclass(frozen=True, slots=True)
class OtherWorker:
    """A worker running a read model with other code (``handled`` None and ``unknown``: a release that says not)."""

    worker_id: str
    handled: Names
    unknown: bool

    def __str__(self) -> str:
        return f"{self.worker_id} ({'code unknown' if self.unknown else 'handles ' + describe(self.handled)})"


async def other_code(conn: db.Conn | db.Pool, projection: str, code: Names, after: dt.datetime) -> list[OtherWorker]:
    """The workers running ``projection`` with code other than ``code`` seen after ``after`` (see the module doc)."""
    async with db.translate_errors():
        rows = await conn.fetch(SQL["other_code"], projection, to_array(code), after)
    return [OtherWorker(r["worker_id"], from_array(r["handled"]), r["unknown"]) for r in rows]


async def settle(conn: db.Conn, projection: type[Projection], started: dt.datetime) -> list[OtherWorker]:
    """Record the code's types for ``projection``, rebuilt with it by a rebuild that began at ``started``, unless a
    worker of other code ran it since (returned: then nothing is recorded, and it stays pending)."""
    code = code_of(projection)
    async with db.translate_errors(), conn.transaction():
        await conn.execute(SQL["insert_types"], projection.name, to_array(code), list(projection.tables))
        await conn.fetchval(SQL["lock_types"], projection.name)
        others = await other_code(conn, projection.name, code, started)
        if others:
            logger.warning("read model rebuilt, but workers of other code ran it meanwhile: it stays pending",
                           extra={"projection": projection.name, "workers": [str(o) for o in others]})
            return others
        await conn.execute(SQL["set_types"], projection.name, to_array(code), list(projection.tables))
        await conn.execute(SQL["forget_settled"], projection.name, started)
    logger.info("read model's types recorded after its rebuild", extra={"projection": projection.name,
                                                                        "handled": describe(code)})
    return []


@dataclasses.dataclass(frozen=True, slots=True)
class Recorded:
    """What ``status`` shows of a read model's types: recorded, and what live workers' code handles."""

    handled: Names
    tables: tuple[str, ...]
    live_codes: tuple[Names, ...]


async def recorded(conn: db.Conn | db.Pool, lease_seconds: float) -> dict[str, Recorded]:
    """Every read model's recorded types and tables, with the codes of the workers running it now."""
    async with db.translate_errors():
        rows = await conn.fetch(SQL["all_types"])
        codes = await conn.fetch(SQL["live_codes"], lease_seconds)
    live: dict[str, list[Names]] = {}
    for row in codes:
        live.setdefault(row["projection"], []).append(from_array(row["handled"]))
    return {r["projection"]: Recorded(from_array(r["handled"]), tuple(r["tables"]),
                                      tuple(live.get(r["projection"], ()))) for r in rows}
