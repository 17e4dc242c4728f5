"""``eventfleet rebuild NAME``: rebuild a projection from the store while live workers serve the old tables.

The rebuild fills shadow copies of the projection's tables in the schema ``<schema>_rb_<projection>``. Its
connection resolves names with ``"<shadow>", "<schema>"`` on the search_path, so the handlers' unqualified
table names hit the shadow tables while ``events`` and ``checkpoints`` stay the live ones. It reads the
store with ``read_all`` in large batches and records, in the transaction of each batch, the shadow's
checkpoint of every stream and its read cursor: a killed rebuild resumes where it stopped. The shadow's
tables are unlogged while they fill (no WAL) and made logged once before the swap.

Once it has caught up with the tail, one swap transaction takes the projection's exclusive advisory lock
(live workers hold it shared per batch, so they pause), applies to the shadow whatever the live workers
applied that the shadow lacks (per stream, from the store), replaces the live tables by the shadow ones,
adopts the shadow's checkpoints, settles the parked dead letters of events the shadow got past (a fixed
handler applied them) and drops the shadow. Readers see the old tables until that commit and the new ones
after it; a stream the shadow got further in than the live workers is skipped by them as duplicates, so
no event is lost or applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, LiteralString

import asyncpg

from projections.base import Projection
from store import db, errors, names, queries, roles
from store.event_store import EventStore, Position
from store.records import records_or_undecodable
from workers import errors as worker_errors
from workers import locks
from workers.rebuild import applier, reader

logger = logging.getLogger(__name__)

SQL = queries.load("workers", "rebuild.sql")
EVENTS = queries.load("workers", "events.sql")

BATCH_SIZE = 5000
_BOOKKEEPING = ("rebuild_checkpoints", "rebuild_cursor")
_SWAP_ATTEMPTS = 5
_FIRST_PAUSE = 0.05
#: The longest pause between two looks at the horizon at the tail: a rebuild that reads a few types is done
#: in a fraction of a second, and a pause of a second after the last old transaction ended would double it.
_LAST_PAUSE = 0.2
_SWAP_LOCK_TIMEOUT: LiteralString = "SET LOCAL lock_timeout = '5s'"

State = Literal["rebuilding", "backfilling"]
#: Called after every batch with (events done, events in all, seconds so far).
Progress = Callable[[int, int, float], None]






@dataclasses.dataclass(frozen=True, slots=True)
class RebuildResult:
    """What a rebuild did."""

    projection: str
    events: int  # read from the store by this run (not counting a killed run's share)
    seconds: float
    resumed: bool
    caught_up_streams: int  # streams the live workers were ahead in at the swap
    skipped: int  # events whose handler failed under the "skip" policy
    halted_streams: tuple[str, ...]  # streams stopped at a failing event under the "halt" policy
    resolved_dead_letters: int = 0  # parked dead letters whose events the rebuild got past (see _swap_once)


def shadow_schema(schema: str, projection: str, kind: str = "rb") -> str:
    """The shadow schema of a rebuild: ``<schema>_rb_<projection>``, hashed down to 63 characters.

    ``kind`` "vf" names the scratch schema of a verifying replay instead.
    """
    name = f"{schema}_{kind}_{projection}"
    if len(name) > 63:
        digest = hashlib.sha256(f"{schema}.{projection}".encode()).hexdigest()[:16]
        name = f"{schema[:40]}_{kind}_{digest}"
    return names.identifier(name, what="shadow schema", max_length=names.MAX_DERIVED_LENGTH)


def _quote(identifier: str) -> str:
    """A schema or table name of a rebuild, quoted: shadow names are derived, so they may use all 63."""
    return names.quote(identifier, max_length=names.MAX_DERIVED_LENGTH)




_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"})


def _grant(grant: Any, table: str) -> str:
    """The GRANT re-creating one privilege of a replaced table (grantee quoted, privilege from a fixed set)."""
    privilege = grant["privilege_type"]
    if privilege not in _PRIVILEGES:
        raise worker_errors.RebuildError(f"unexpected privilege {privilege!r} on a read-model table")
    grantee = "PUBLIC" if grant["grantee"] is None else '"' + grant["grantee"].replace('"', '""') + '"'
    option = " WITH GRANT OPTION" if grant["is_grantable"] else ""
    return f"GRANT {privilege} ON {table} TO {grantee}{option}"






def _fingerprint(projection: type[Projection]) -> str:
    """What a resumed rebuild must share with the killed one: the tables, their DDL and the types it reads."""
    handled = projection.handled_names()
    text = "\n".join([projection.name, *projection.tables, projection.ddl,
                      *(["*"] if handled is None else sorted(handled))])
    return hashlib.sha256(text.encode()).hexdigest()


class Rebuild:
    """One rebuild (or backfill) of one projection; ``run()`` does it all."""

    def __init__(self, pool: db.Pool, store: EventStore, projection: type[Projection], *,
                 state: State = "rebuilding", batch_size: int = BATCH_SIZE, batch_bytes: int = reader.READ_BYTES,
                 progress: Progress | None = None, shadow: str | None = None, reference: bool = False,
                 settled: bool = False) -> None:
        """``reference``: the verifying replay's path (handlers one event at a time, failures only counted);
        ``settled``: nobody writes to the store any more (see ``replay``)."""
        if set(projection.tables) & set(_BOOKKEEPING):
            raise worker_errors.RebuildError(f"projection {projection.name!r} uses a table name reserved by rebuild")
        self.pool, self.store, self.projection = pool, store, projection
        self.schema = store.schema
        self.shadow = shadow or shadow_schema(self.schema, projection.name)
        self.state, self.batch_size, self.progress = state, batch_size, progress
        self.batch_bytes = batch_bytes  # event bytes per read: the rebuild holds two reads
        #: The event names it handles (None: all): the rebuild reads only those (issue 25).
        self.names = projection.handled_names()
        self.applier = applier.Applier(projection(), store, reference=reference)
        self.events = 0
        self.resolved = 0  # parked dead letters the swap settled
        self._created = False  # the shadow schema was created by this run (empty)
        self.settled = settled

    async def run(self) -> RebuildResult:
        """Rebuild into the shadow, catch up, swap; raise worker_errors.RebuildRunning if another process is at it."""
        started = time.monotonic()
        async with self.pool.acquire() as conn:
            async with db.translate_errors():
                locked = await locks.try_hold(conn, locks.rebuild(self.schema, self.projection.name))
            if not locked:
                raise worker_errors.RebuildRunning(f"projection {self.projection.name!r} is being rebuilt by another process")
            try:
                async with db.translate_errors():
                    previous = await conn.fetchval(SQL["projection_state"], self.projection.name)
                await self._create_shadow(conn)
                await self._set_state(conn, self.state)
                try:
                    cursor, resumed = await self._open_cursor(conn)
                    await self._fill(conn, cursor)
                    await self._make_durable(conn)
                    caught_up = await self._swap(conn)
                except BaseException:
                    if self.state == "rebuilding":  # the old tables still serve: say so
                        with contextlib.suppress(Exception):
                            await self._set_state(conn, previous or "live")
                    raise
            finally:
                with contextlib.suppress(*db.TRANSIENT):
                    await locks.release(conn, locks.rebuild(self.schema, self.projection.name))
                    await conn.execute("RESET search_path")  # even if the pool skips its reset
                    await conn.execute("RESET synchronous_commit")
        return RebuildResult(self.projection.name, self.events, time.monotonic() - started, resumed, caught_up,
                             self.applier.skipped, tuple(sorted(self.applier.halted)), self.resolved)

    async def replay(self) -> int:
        """Fill a fresh shadow from the whole store and leave it there (see the module function ``replay``)."""
        async with self.pool.acquire() as conn:
            try:
                async with db.translate_errors():
                    await conn.execute(f"DROP SCHEMA IF EXISTS {_quote(self.shadow)} CASCADE")
                await self._create_shadow(conn)
                cursor, _ = await self._open_cursor(conn)
                return await self._fill(conn, cursor)
            finally:
                with contextlib.suppress(*db.TRANSIENT):
                    await conn.execute("RESET search_path")
                    await conn.execute("RESET synchronous_commit")

    async def _set_state(self, conn: db.Conn, state: str) -> None:
        async with db.translate_errors():
            await conn.execute(SQL["set_state"], self.projection.name, state)

    async def _create_shadow(self, conn: db.Conn) -> None:
        """Create the shadow schema and tables (a no-op when resuming); point the session's path at it."""
        main, shadow = _quote(self.schema), _quote(self.shadow)
        async with db.translate_errors():
            await conn.execute(f"SET search_path TO {shadow}, {main}")
            # The shadow is filled unlogged (no WAL: the bulk of a rebuild's write cost) and made durable
            # before the swap. A server crash empties unlogged tables, the cursor with them, so the next
            # run starts over; a killed rebuild (the server lives on) resumes.
            await conn.execute("SET synchronous_commit = off")
            async with conn.transaction():
                # A shadow this run creates holds nothing: ``_open_cursor`` need not drop and create it again.
                self._created = not await conn.fetchval(SQL["schema_exists"], self.shadow)
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {shadow}")
                # Only the shadow on the path: CREATE TABLE IF NOT EXISTS must not see the live tables.
                await conn.execute(f"SET LOCAL search_path TO {shadow}")
                await conn.execute(self.projection.ddl)
                await conn.execute(SQL["create_rebuild_tables"])
                await self._set_persistence(conn, "UNLOGGED")

    async def _set_persistence(self, conn: db.Conn, persistence: Literal["LOGGED", "UNLOGGED"]) -> list[str]:
        """Make the shadow's tables (un)logged, in as many passes as foreign keys between them need.

        A logged table may not reference an unlogged one, so the order matters. Returns the tables that
        could not change (a key from a table outside the projection): unlogged, they only cost speed.
        """
        pending = list(self.projection.tables)
        while pending:
            failed = []
            for table in pending:
                try:
                    async with conn.transaction():
                        await conn.execute(f"ALTER TABLE {_quote(self.shadow)}.{_quote(table)} SET {persistence}")
                except asyncpg.PostgresError:
                    failed.append(table)
            if len(failed) == len(pending):
                return failed
            pending = failed
        return []

    async def _make_durable(self, conn: db.Conn) -> None:
        """Write the filled shadow tables to the WAL once (outside the swap's pause of the workers)."""
        async with db.translate_errors():
            failed = await self._set_persistence(conn, "LOGGED")
        if failed:  # never swap in a table a crash would empty
            raise worker_errors.RebuildError(f"could not make shadow tables {failed} of {self.projection.name!r} logged")

    async def _open_cursor(self, conn: db.Conn) -> tuple[Position, bool]:
        """The cursor of a killed run of the same projection code, or a fresh shadow at the start."""
        fingerprint = _fingerprint(self.projection)
        async with db.translate_errors():
            row = await conn.fetchrow(SQL["read_cursor"], self.projection.name)
            if row is not None and row["fingerprint"] == fingerprint:
                cursor = Position(row["transaction_id"], row["global_position"])
                logger.info("resuming rebuild", extra={"projection": self.projection.name,
                                                       "events_done": row["events"]})
                return cursor, True
            # No cursor (a first run, or a crash emptied the unlogged shadow) or other projection code:
            # whatever the shadow holds is of no use, and would be applied twice (unless this run created it).
            if not self._created:
                await conn.execute(f"DROP SCHEMA {_quote(self.shadow)} CASCADE")
                await self._create_shadow(conn)
            await conn.execute(SQL["start_cursor"], self.projection.name, fingerprint)
        return Position.START, False

    async def _fill(self, conn: db.Conn, cursor: Position) -> int:
        """Apply the store from cursor on to the shadow, batch by batch, up to the tail.

        The tail is where read_all comes back short once every transaction older than this call has
        ended: a writer that committed before the rebuild began but behind an older open transaction is
        still read, so a new projection misses nothing published before its queue existed.
        """
        async with db.translate_errors():
            total: int = await (
                conn.fetchval(SQL["count_after"], cursor.transaction_id, cursor.global_position)
                if self.names is None else
                conn.fetchval(SQL["count_after_of"], cursor.transaction_id, cursor.global_position,
                              sorted(self.names)))
            must_pass = await conn.fetchval(SQL["snapshot_xmax"])
        done, started, pause = 0, time.monotonic(), _FIRST_PAUSE
        read = (reader.settled_reader(self.store, self.names) if self.settled
                else reader.all_reader(self.store, self.names))
        batches = reader.Prefetcher(self.store, cursor, self.batch_size, read, max_bytes=self.batch_bytes)
        try:
            while True:
                events = await batches.next()
                if events:
                    async with db.translate_errors(), conn.transaction():
                        await self.applier.apply(conn, events)
                        last = events[-1].position
                        await conn.execute(SQL["advance_cursor"], self.projection.name, last.transaction_id,
                                           last.global_position, len(events))
                    done += len(events)
                    if self.progress:
                        self.progress(done, max(total, done), time.monotonic() - started)
                if events.full:
                    continue
                async with db.translate_errors():
                    if self.settled or await conn.fetchval(SQL["horizon_passed"], must_pass):
                        break  # at the tail: the swap applies what live workers did since
                if pause == _FIRST_PAUSE:
                    logger.info("rebuild waits for transactions older than it to end",
                                extra={"projection": self.projection.name})
                await asyncio.sleep(pause)
                pause = min(pause * 2, _LAST_PAUSE)
        finally:
            await batches.aclose()
        self.events += done
        return done

    async def _swap(self, conn: db.Conn) -> int:
        """Pause live workers, bring the shadow level with them, swap tables and checkpoints; retry on lock waits."""
        for attempt in range(1, _SWAP_ATTEMPTS + 1):
            try:
                async with db.translate_errors(), conn.transaction():
                    await conn.execute(_SWAP_LOCK_TIMEOUT)
                    await conn.execute("SET LOCAL synchronous_commit = on")
                    return await self._swap_once(conn)
            except errors.StoreError as exc:
                if not isinstance(exc.__cause__, asyncpg.exceptions.LockNotAvailableError):
                    raise
                logger.warning("rebuild swap waited too long for a lock; retrying",
                               extra={"projection": self.projection.name, "attempt": attempt})
                await self._fill(conn, await self._cursor(conn))
        raise worker_errors.RebuildError(f"could not swap {self.projection.name!r}: its tables stayed locked by readers")

    async def _cursor(self, conn: db.Conn) -> Position:
        row = await conn.fetchrow(SQL["read_cursor"], self.projection.name)
        assert row is not None
        return Position(row["transaction_id"], row["global_position"])

    async def _swap_once(self, conn: db.Conn) -> int:
        name, main, shadow = self.projection.name, _quote(self.schema), _quote(self.shadow)
        await locks.take(conn, locks.projection(self.schema, name))
        if self.names is None:
            behind = await conn.fetch(SQL["live_ahead"], name)
        else:
            read = await self._cursor(conn)
            behind = await conn.fetch(SQL["live_ahead_of"], name, read.transaction_id, read.global_position,
                                      sorted(self.names))
        if behind:
            rows = await self.applier.load_ranges(conn, [r["stream_id"] for r in behind],
                                                  [r["shadow_version"] + 1 for r in behind],
                                                  [r["live_version"] for r in behind])
            await self.applier.apply(conn, records_or_undecodable(rows, self.store.registry))
        for table in self.projection.tables:
            grants = await conn.fetch(SQL["table_grants"], self.schema, table)
            await conn.execute(f"DROP TABLE IF EXISTS {main}.{_quote(table)}")
            await conn.execute(f"ALTER TABLE {shadow}.{_quote(table)} SET SCHEMA {main}")
            for grant in grants:  # readers of the old table (an API role, say) keep their access
                await conn.execute(_grant(grant, f"{main}.{_quote(table)}"))
        await roles.grant_read_models(conn, self.schema, self.projection.tables)
        await conn.execute(SQL["adopt_shadow_checkpoints"], name)
        # The adopted checkpoints release the streams the live workers had halted at a parked event the
        # shadow applied; their dead letters must not stay parked (listed, counted, re-drivable) with them.
        resolved = await conn.fetch(SQL["resolve_dead_letters"], name)
        self.resolved = len(resolved)
        if resolved:
            logger.info("rebuild resolved parked dead letters", extra={
                "projection": name, "dead_letters": {r["id"]: r["status"] for r in resolved}})
        cursor = await self._cursor(conn)
        await conn.execute(SQL["finish_status"], name, cursor.transaction_id, cursor.global_position)
        await conn.execute(f"DROP SCHEMA {shadow} CASCADE")
        return len(behind)


def not_replayable(projection: type[Projection], what: str) -> str:
    """Why a subscriber whose effects are not its tables (``Projection.replayable``) has nothing to ``what``."""
    if projection.kind == "reactor":
        return (f"{projection.name} is a reactor: its effects are events in the store, not tables a rebuild could "
                "replay into; replaying it would act again (its follow-up ids make that a no-op, its deadlines "
                f"would not be). There is nothing to {what}")
    if projection.kind == "publication":
        return (f"{projection.name} is a publication: its effects are messages to other services, not tables; "
                f"there is nothing to {what} (`eventfleet republish {projection.name} --from POSITION` publishes "
                "again from a position)")
    return f"{projection.name} is a {projection.kind}: its effects are not its tables; there is nothing to {what}"


async def replay(pool: db.Pool, store: EventStore, projection: type[Projection], shadow: str, *,
                 settled: bool = False) -> int:
    """Replay the whole store into fresh tables in schema ``shadow`` and leave them there (verification).

    The reference path: the handlers one event at a time, no set-based or deferred batching, nothing
    recorded in the live state (status, checkpoints, dead letters). ``settled``: nobody writes to the
    store any more, so read it in position order without waiting for the read_all horizon (which any
    old transaction anywhere on the server holds back). Returns the events replayed; the caller drops
    ``shadow``.
    """
    return await Rebuild(pool, store, projection, shadow=shadow, reference=True, settled=settled).replay()


async def rebuild(pool: db.Pool, store: EventStore, projection: type[Projection], **kwargs: Any) -> RebuildResult:
    """Rebuild one projection (see Rebuild); a reactor or a publication is refused (``ReactorNotRebuildable``)."""
    if not projection.replayable:
        raise worker_errors.ReactorNotRebuildable(not_replayable(projection, "rebuild"))
    return await Rebuild(pool, store, projection, **kwargs).run()




