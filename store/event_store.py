"""The event store: append with optimistic concurrency and outbox rows, load streams, read all in order.

Every append is one SQL statement (a data-modifying CTE: check the stream's version, insert the events,
insert their outbox rows), so it is one round trip and one transaction. Relays are woken after commit
(see ``store.notify``). ``read_all`` reads in (transaction id, global position) order and only below the
oldest running transaction: see ``read_all`` and ``horizon`` for why and what it costs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Collection, Sequence
from typing import Any

import asyncpg

from store import codec, db, errors, hot, key_table, names, notify, queries, subject_keys
from store.codec import personal
from store.codec.cipher import sealed_subjects
from store.encoding import DEFAULT_MAX_PAYLOAD_BYTES, Encoding, append_context, check_time, original_result
from store.encoding import Encoded as _Encoded
from store.encoding import check_expected as _check_expected
from store.encoding import check_int as _check_int
from store.encoding import check_unique_ids as _check_unique_ids
from store.partitions import partition_of
from store.records import (
    NO_STREAM,
    AppendResult,
    Horizon,
    NewEvent,
    Position,
    RecordedEvent,
    Slice,
    Snapshot,
    record_from_row,
    snapshot_from_row,
)

#: A read's byte budget when none is given.
UNBOUNDED_BYTES = 2**62

__all__ = [
    "NO_STREAM",
    "AppendResult",
    "EventStore",
    "Horizon",
    "NewEvent",
    "Position",
    "RecordedEvent",
    "Snapshot",
    "record_from_row",
]

_VERSION_KEY = "events_stream_version_key"
_EVENT_ID_KEY = "events_event_id_key"


#: read_all decodes this many rows, then lets the event loop run. Decoding a catch-up's batch of 2,000 is
#: about 10 ms of CPU; the answers to statements in flight on other connections (the batches being
#: applied meanwhile) would wait behind all of it, and Postgres with them (BENCHMARKS.md).
DECODE_SLICE = 128


class EventStore(Encoding):
    """Append-only streams of events in ``schema`` over any asyncpg pool, whatever its search_path.

    Every statement names the schema's tables itself (``store.queries.bind``), so appends cannot land in
    another schema a pool's search_path happens to name.
    """

    def __init__(self, pool: db.Pool, *, schema: str = "eventfleet",
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 registry: codec.Registry = codec.REGISTRY,
                 keks: subject_keys.KeyEncryptionKeys | subject_keys.FromEnv | None = subject_keys.FROM_ENV,
                 key_cache_seconds: float = subject_keys.DEFAULT_TTL) -> None:
        """``registry``: the event classes (``self.registry`` is a view of it sealing personal fields with
        this store's keys); ``keks``: the key-encryption keys of personal fields (by default
        ``EVENTFLEET_KEK`` or ``EVENTFLEET_KEK_FILE``; None: none, and personal fields are refused);
        ``key_cache_seconds``: how long a cached data key is used (store/subject_keys.py)."""
        self.pool = pool
        self.schema = names.identifier(schema, what="schema")
        #: The store's statements with its schema written in, built once per schema and shared.
        self.queries = queries.bind(queries.TEMPLATES, self.schema)
        #: P of the schema (fixed for its life: store.migrate refuses another), read at the first append.
        self._partitions: int | None = None
        self.max_payload_bytes = max_payload_bytes
        #: Connections kept between the store's statements (store/hot.py).
        self.hot = hot.HotConnections(pool)
        self._use_keys(registry, subject_keys.SubjectKeys(
            key_table.PostgresKeyTable(self.hot, self.queries), subject_keys.resolve(keks),
            ttl=key_cache_seconds, blocking_fetch=key_table.blocking_fetch(pool, self.queries)))
        self.notifier = notify.Notifier(self.hot, self.schema)

    # --- writing ---------------------------------------------------------------------------------

    async def _load_partitions(self) -> int:
        """P of the schema, read once: every append computes its events' partition (store.partitions). Refuses a
        store whose transaction clock is behind the ids it holds (``errors.ClockBehind``: store/clock.py)."""
        async with self.hot.use() as conn:
            row = await conn.fetchrow(self.queries["partitions"])
        if row is None:  # no partitioning row yet (a migrate not finished): asked again next time
            return 0
        if row["clock_behind"]:  # asked again next time too: `migrate` repairs it while this process lives
            raise errors.ClockBehind()
        count: int = row["partitions"]
        self._partitions = count
        return count

    async def append(self, stream_id: str, events: Sequence[Any], expected_version: int, *,
                     correlation_id: str | None = None, causation_id: str | None = None,
                     conn: db.Conn | None = None, savepoint: bool = True) -> AppendResult:
        """Append events after expected_version (NO_STREAM: the stream must not exist) in one transaction.

        Every event's metadata gets the correlation and causation ids (the arguments, else the
        ``store.correlation`` scope's) and the current trace context, under its own keys.

        ``conn``: append inside the caller's transaction on it (a reactor's follow-up commits with its
        checkpoint), in a savepoint, so a rejected append leaves that transaction usable; the caller's commit
        is what makes the events visible (and wakes the relay, by its poll or the next append's NOTIFY).
        ``savepoint=False``: no savepoint; a rejected append then aborts the caller's transaction (a caller
        that reruns its whole transaction another way on any error saves two round trips per append).
        """
        names.stream_id(stream_id)
        _check_expected(expected_version)
        context = append_context(correlation_id, causation_id)
        encoded = await self.keys.encode_with_keys(lambda: self._encode_all(events, context, stream_id), conn)
        count = self._partitions if self._partitions is not None else await self._load_partitions()
        partition = partition_of(stream_id, count) if count else None
        try:
            async with self.hot.use(conn) as c:
                if conn is None or not savepoint:
                    row = await self._insert(c, stream_id, expected_version, encoded, partition)
                else:
                    async with c.transaction():  # a savepoint of the caller's transaction
                        row = await self._insert(c, stream_id, expected_version, encoded, partition)
        except errors.StoreError as exc:
            # A racing writer took one of the versions, or an event id exists: a retry or a conflict.
            return await self._after_rejection(stream_id, expected_version, encoded, exc, conn=conn)
        assert row is not None
        positions = row["positions"]
        if positions is None:
            return await self._after_rejection(stream_id, expected_version, encoded, None, row["actual"], conn=conn)
        if conn is None:
            self.notifier.poke()
        return AppendResult(stream_id, expected_version + 1, expected_version + len(encoded), tuple(positions))

    async def _insert(self, conn: db.Conn, stream_id: str, expected_version: int, encoded: list[_Encoded],
                      partition: int | None) -> Any:
        if len(encoded) == 1:
            e = encoded[0]
            return await conn.fetchrow(self.queries["append_event"], stream_id, expected_version,
                                       e.event_id, e.event_type, e.data, e.metadata, partition)
        return await conn.fetchrow(
            self.queries["append_events"], stream_id, expected_version,
            [e.event_id for e in encoded], [e.event_type for e in encoded],
            [e.data for e in encoded], [e.metadata for e in encoded], partition)

    async def append_batch(self, batch: Sequence[tuple[str, Sequence[Any], int]], *,
                           correlation_id: str | None = None, causation_id: str | None = None,
                           conn: db.Conn | None = None, savepoint: bool = True) -> list[AppendResult]:
        """Append to several streams in one transaction: all of them or none (metadata as in ``append``;
        ``conn`` and ``savepoint`` as there)."""
        if not batch:
            raise errors.InvalidInput("append_batch needs at least one stream")
        context = append_context(correlation_id, causation_id)
        encoded_batch = await self.keys.encode_with_keys(lambda: self._encode_batch(batch, context), conn)
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
        stream_ids, expected_ids, steps, event_ids, event_types, datas, metadatas, partitions = columns
        for (stream_id, _, expected), encoded in zip(batch, encoded_batch, strict=True):
            for step, e in enumerate(encoded, start=1):
                stream_ids.append(stream_id)
                expected_ids.append(expected)
                steps.append(step)
                event_ids.append(e.event_id)
                event_types.append(e.event_type)
                datas.append(e.data)
                metadatas.append(e.metadata)
        if len(set(stream_ids)) != len(encoded_batch):
            raise errors.InvalidInput("a stream appears twice in one append_batch")
        _check_unique_ids(event_ids)
        count = self._partitions if self._partitions is not None else await self._load_partitions()
        partitions += [partition_of(sid, count) if count else None for sid in stream_ids]
        try:
            async with self.hot.use(conn) as c:
                if conn is None or not savepoint:
                    positions = await c.fetchval(self.queries["append_batch"], *columns)
                else:
                    async with c.transaction():  # a savepoint of the caller's transaction
                        positions = await c.fetchval(self.queries["append_batch"], *columns)
        except errors.StoreError as exc:
            return await self._batch_after_rejection(batch, encoded_batch, exc, conn=conn)
        if positions is None:
            return await self._batch_after_rejection(batch, encoded_batch, None, conn=conn)
        if conn is None:
            self.notifier.poke()
        results, i = [], 0
        for (stream_id, _, expected), encoded in zip(batch, encoded_batch, strict=True):
            results.append(AppendResult(stream_id, expected + 1, expected + len(encoded),
                                        tuple(positions[i:i + len(encoded)])))
            i += len(encoded)
        return results

    async def _after_rejection(self, stream_id: str, expected: int, encoded: list[_Encoded],
                               exc: errors.StoreError | None, actual: int | None = None, *,
                               conn: db.Conn | None = None) -> AppendResult:
        """Decide what a rejected append was: a retry of a committed one, a conflict or an error."""
        cause = _unique_violation(exc)
        if exc is not None and cause is None:
            raise exc
        existing = await self._existing_result(stream_id, expected, encoded, conn=conn)
        if existing is not None:
            return existing
        if cause is not None and cause.constraint_name == _EVENT_ID_KEY:
            raise errors.DuplicateEventId(f"an event id of this append to {stream_id!r} exists elsewhere") from exc
        if actual is None:
            actual = await self.stream_version(stream_id, conn=conn)
        async with self.hot.use(conn) as c:  # a closed stream refuses any version (archived: its events gone)
            if await c.fetchval(self.queries["stream_closed"], stream_id):
                raise errors.StreamIsClosed(stream_id) from exc
        raise errors.VersionConflict(stream_id, expected, actual) from exc

    async def _batch_after_rejection(self, batch: Sequence[tuple[str, Sequence[Any], int]],
                                     encoded_batch: list[list[_Encoded]],
                                     exc: errors.StoreError | None, *,
                                     conn: db.Conn | None = None) -> list[AppendResult]:
        cause = _unique_violation(exc)
        if exc is not None and cause is None:
            raise exc
        results = []
        for (stream_id, _, expected), encoded in zip(batch, encoded_batch, strict=True):
            existing = await self._existing_result(stream_id, expected, encoded, conn=conn)
            if existing is None:
                break
            results.append(existing)
        else:
            return results  # the whole batch is a retry of one that committed
        if cause is not None and cause.constraint_name == _EVENT_ID_KEY:
            raise errors.DuplicateEventId("an event id of this batch exists elsewhere") from exc
        for stream_id, _, expected in batch:
            actual = await self.stream_version(stream_id, conn=conn)
            if actual != expected:
                raise errors.VersionConflict(stream_id, expected, actual) from exc
        # Every stream is where we expected now: the writer we collided with rolled back. Retry.
        raise errors.TransientError("append_batch collided with a writer that rolled back; retry") from exc

    async def _existing_result(self, stream_id: str, expected: int, encoded: list[_Encoded], *,
                               conn: db.Conn | None = None) -> AppendResult | None:
        """The original result if these exact events already sit at these versions (a retried append)."""
        event_ids = [e.event_id for e in encoded if e.event_id is not None]
        if not event_ids:
            return None  # ids drawn by the database: this append cannot have been made before
        async with self.hot.use(conn) as c:
            rows = await c.fetch(self.queries["find_events"], event_ids)
        return original_result(stream_id, expected, encoded, rows, self.registry)

    # --- reading ---------------------------------------------------------------------------------

    async def stream_version(self, stream_id: str, *, conn: db.Conn | None = None) -> int:
        """The stream's current version (NO_STREAM when empty)."""
        async with self.hot.use(conn) as c:
            version: int = await c.fetchval(self.queries["stream_version"], stream_id)
        return version

    async def load(self, stream_id: str, from_version: int = 0, to_version: int | None = None, *,
                   conn: db.Conn | None = None) -> list[RecordedEvent]:
        """A stream's events from from_version on (up to to_version inclusive), decoded and upcast, in
        version order."""
        names.stream_id(stream_id)
        _check_int(from_version, "from_version", 0)
        if to_version is not None:
            _check_int(to_version, "to_version", 0)
        async with self.hot.use(conn) as c:
            if to_version is None:
                rows = await c.fetch(self.queries["load_stream"], stream_id, from_version)
            else:
                rows = await c.fetch(self.queries["load_stream_range"], stream_id, from_version, to_version)
        return await self._records(rows, conn)

    async def load_streams(self, stream_ids: Sequence[str], *, conn: db.Conn | None = None,
                           ) -> dict[str, list[RecordedEvent]]:
        """Every event of several streams, decoded and upcast, by stream in version order (absent: empty)."""
        for stream_id in stream_ids:
            names.stream_id(stream_id)
        async with self.hot.use(conn) as c:
            rows = await c.fetch(self.queries["load_streams"], list(stream_ids))
        found: dict[str, list[RecordedEvent]] = {}
        for row, event in zip(rows, await self._records(rows, conn), strict=True):
            found.setdefault(row["stream_id"], []).append(event)
        return found

    async def version_at(self, stream_id: str, as_of: dt.datetime, *, conn: db.Conn | None = None) -> int:
        """The stream's version as of a time: its last event recorded at or before it (NO_STREAM: none)."""
        names.stream_id(stream_id)
        check_time(as_of, "as_of")
        async with self.hot.use(conn) as c:
            version: int = await c.fetchval(self.queries["stream_version_at"], stream_id, as_of)
        return version

    async def load_range(self, conn: db.Conn, stream_id: str, first: int, last: int) -> list[RecordedEvent]:
        """A stream's events first..last inclusive, read on conn (inside the caller's transaction)."""
        async with db.translate_errors():
            rows = await conn.fetch(self.queries["load_stream_range"], stream_id, first, last)
        return await self._records(rows, conn)

    async def read_all(self, after: Position = Position.START, limit: int = 1000, *,
                       conn: db.Conn | None = None) -> list[RecordedEvent]:
        """Events of all streams after ``after`` in commit-safe order; pass the last one's position next.

        Global positions are handed out at insert but become visible at commit, so a transaction holding
        a smaller position can commit after a larger one was read. Reading only rows of transactions
        below the oldest running one, in (transaction id, position) order, means nothing can later
        appear before the cursor. The cost: one long-running writing transaction anywhere in the
        cluster holds every reader back until it ends (watch ``horizon()``).
        """
        _check_int(limit, "limit", 1, high=None)
        async with self.hot.use(conn) as c:
            rows = await c.fetch(
                self.queries["read_all"], after.transaction_id, after.global_position, limit)
        return await self._decode_slices(rows, conn)

    async def read_partition(self, partition: int, after: Position = Position.START, limit: int = 1000, *,
                             max_bytes: int | None = None, conn: db.Conn | None = None,
                             event_names: Collection[str] | None = None) -> Slice:
        """``read_all`` of one partition's streams (store.partitions): what one partition's owner catches up.
        At most ``limit`` events, and with ``max_bytes`` only while the bytes (data + metadata) before each are
        under it: the event reaching it is the last (at least one comes). ``full`` on the result: more may
        follow at once. ``event_names``: only events of these names (``OrderPaid``, any version), read along
        an index of names (a read model's ``handled_names()``); None: every event."""
        _check_int(limit, "limit", 1, high=None)
        _check_int(partition, "partition", 0, high=None)
        if max_bytes is not None:
            _check_int(max_bytes, "max_bytes", 1, high=None)
        budget = UNBOUNDED_BYTES if max_bytes is None else max_bytes
        async with self.hot.use(conn) as c:
            if event_names is None:
                rows = await c.fetch(self.queries["read_partition"], after.transaction_id, after.global_position,
                                     limit, partition, budget)
            else:
                rows = await c.fetch(self.queries["read_partition_of"], after.transaction_id,
                                     after.global_position, limit, partition, budget, sorted(event_names))
        return Slice(await self._decode_slices(rows, conn),
                     bool(rows) and (len(rows) >= limit or bool(rows[-1]["reached"])))

    async def _decode_slices(self, rows: Sequence[Any], conn: db.Conn | None = None) -> list[RecordedEvent]:
        """The rows decoded, yielding to the loop between slices (see DECODE_SLICE)."""
        events: list[RecordedEvent] = []
        for start in range(0, len(rows), DECODE_SLICE):
            if start:
                await asyncio.sleep(0)
            events += await self._records(rows[start:start + DECODE_SLICE], conn)
        return events

    async def _records(self, rows: Sequence[Any], conn: db.Conn | None = None) -> list[RecordedEvent]:
        """The rows decoded, the data keys they need loaded first (one query, on conn if given) if this
        process lacks any."""
        try:
            with self.keys.deferring():  # a key not cached raises here rather than being fetched blocking
                return [record_from_row(r, self.registry) for r in rows]
        except errors.SubjectKeyNotLoaded:
            subjects = sealed_subjects(r["data"] for r in rows)
        if conn is None:
            await self.keys.load(subjects)
            return [record_from_row(r, self.registry) for r in rows]
        # In the caller's transaction: read there, and not cached (SubjectKeys.provide).
        with self.keys.provisional(await self.keys.provide(subjects, conn, create=False)):
            return [record_from_row(r, self.registry) for r in rows]

    async def partitions(self) -> int:
        """P of the schema (recorded at its first migrate)."""
        count = self._partitions if self._partitions is not None else await self._load_partitions()
        if not count:
            raise errors.ConfigError("the schema records no partitions: run `eventfleet migrate` first")
        return count

    async def horizon(self) -> Horizon:
        """The safe frontier of read_all and how long the oldest writing transaction has held it back."""
        async with self.hot.use() as conn:
            row = await conn.fetchrow(self.queries["horizon"])
        assert row is not None
        return Horizon(row["xmin"], row["oldest_transaction_age"])

    # --- snapshots -------------------------------------------------------------------------------

    async def save_snapshot(self, stream_id: str, version: int, state: Any) -> bool:
        """Store ``state`` (a registered class) as the stream's state at ``version``; False if a newer exists."""
        names.stream_id(stream_id)
        _check_int(version, "version", 0)
        snapshot_type, data = await self.keys.encode_with_keys(lambda: self._encode_snapshot(stream_id, state))
        async with self.hot.use() as conn:
            status = await conn.execute(self.queries["save_snapshot"], stream_id, version, snapshot_type, data)
        return bool(status == "INSERT 0 1")

    async def load_snapshot(self, stream_id: str, *, at_or_before: int | None = None) -> Snapshot | None:
        """The stream's newest snapshot, decoded and upcast; None when there is none, or when it is newer
        than version ``at_or_before`` (only the newest snapshot is kept)."""
        names.stream_id(stream_id)
        if at_or_before is not None:
            _check_int(at_or_before, "at_or_before", 0)
        async with self.hot.use() as conn:
            if at_or_before is None:
                row = await conn.fetchrow(self.queries["load_snapshot"], stream_id)
            else:
                row = await conn.fetchrow(self.queries["load_snapshot_at_or_before"], stream_id, at_or_before)
        if row is None:
            return None
        await self.keys.load(sealed_subjects([row["data"]]))
        return snapshot_from_row(stream_id, row, self.registry)

    # --- personal data ---------------------------------------------------------------------------

    async def forget(self, subject: str) -> bool:
        """Forget a subject: delete its data key (keeping a tombstone, so it never gets another) and append
        ``SubjectForgotten(subject)`` to stream ``subject-<subject>``, in one transaction. From then on its
        personal fields decode to their erased values (store/codec/personal.py), in this process at once and
        in others within their key cache time. True when this call forgot it, False when it already was."""
        subject = personal.subject_id(subject, "subject")
        stream_id = names.stream_id(personal.forgotten_stream(subject))
        async with db.translate_errors(), self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self.queries["forget_subject"], subject)
            try:
                await self.append(stream_id, [personal.SubjectForgotten(subject)], NO_STREAM, conn=conn)
                first = True
            except errors.VersionConflict:
                first = False  # forgotten before: the tombstone stays as it was
        self.keys.forgotten(subject)
        if first:
            self.notifier.poke()
        return first

    async def rewrap_keys(self, batch: int = 1000) -> int:
        """Wrap every subject key that another key-encryption key wraps with the newest one (KEK rotation:
        add the new KEK last, run this, then drop the old one); the number of keys rewrapped."""
        _check_int(batch, "batch", 1, high=None)
        return await key_table.rewrap(self.pool, self.queries, self.keys.require_keks(), batch)


def _unique_violation(exc: BaseException | None) -> asyncpg.UniqueViolationError | None:
    cause = exc.__cause__ if exc is not None else None
    if isinstance(cause, asyncpg.UniqueViolationError) and cause.constraint_name in (_VERSION_KEY, _EVENT_ID_KEY):
        return cause
    return None
