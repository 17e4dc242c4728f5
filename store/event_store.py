"""The event store: append with optimistic concurrency and outbox rows, load streams, read all in order.

Every append is one SQL statement (a data-modifying CTE: check the stream's version, insert the events,
insert their outbox rows), so it is one round trip and one transaction. Relays are woken after commit
(see ``store.notify``). ``read_all`` reads in (transaction id, global position) order and only below the
oldest running transaction: see ``read_all`` and ``horizon`` for why and what it costs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import asyncpg

from store import codec, db, errors, hot, names, notify
from store.queries import QUERIES
from store.records import (
    NO_STREAM,
    AppendResult,
    Horizon,
    NewEvent,
    Position,
    RecordedEvent,
    Snapshot,
    record_from_row,
)

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

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
_EMPTY_METADATA = codec.packb({})
_VERSION_KEY = "events_stream_version_key"
_EVENT_ID_KEY = "events_event_id_key"


class _Encoded(NamedTuple):
    event_id: uuid.UUID | None  # None: the database draws one (nothing to recognise on a retry anyway)
    event_type: str
    data: bytes
    metadata: bytes


#: read_all decodes this many rows, then lets the event loop run. Decoding a catch-up's batch of 2,000 is
#: about 10 ms of CPU; the answers to statements in flight on other connections (the batches being
#: applied meanwhile) would wait behind all of it, and Postgres with them (BENCHMARKS.md).
DECODE_SLICE = 128


class EventStore:
    """Append-only streams of events over an asyncpg pool whose search_path is the store's schema."""

    def __init__(self, pool: db.Pool, *, schema: str = "eventfleet",
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 registry: codec.Registry = codec.REGISTRY) -> None:
        self.pool = pool
        self.schema = names.identifier(schema, what="schema")
        self.max_payload_bytes = max_payload_bytes
        self.registry = registry
        #: Connections kept between the store's statements (store/hot.py).
        self.hot = hot.HotConnections(pool)
        self.notifier = notify.Notifier(self.hot, self.schema)

    # --- writing ---------------------------------------------------------------------------------

    async def append(self, stream_id: str, events: Sequence[Any], expected_version: int) -> AppendResult:
        """Append events after expected_version (NO_STREAM: the stream must not exist) in one transaction."""
        names.stream_id(stream_id)
        _check_expected(expected_version)
        encoded = self._encode_all(events)
        try:
            async with self.hot.use() as conn:
                if len(encoded) == 1:
                    e = encoded[0]
                    row = await conn.fetchrow(QUERIES["append_event"], stream_id, expected_version,
                                              e.event_id, e.event_type, e.data, e.metadata)
                else:
                    row = await conn.fetchrow(
                        QUERIES["append_events"], stream_id, expected_version,
                        [e.event_id for e in encoded], [e.event_type for e in encoded],
                        [e.data for e in encoded], [e.metadata for e in encoded])
        except errors.StoreError as exc:
            # A racing writer took one of the versions, or an event id exists: a retry or a conflict.
            return await self._after_rejection(stream_id, expected_version, encoded, exc)
        assert row is not None
        positions = row["positions"]
        if positions is None:
            return await self._after_rejection(stream_id, expected_version, encoded, None, row["actual"])
        self.notifier.poke()
        return AppendResult(stream_id, expected_version + 1, expected_version + len(encoded), tuple(positions))

    async def append_batch(self, batch: Sequence[tuple[str, Sequence[Any], int]]) -> list[AppendResult]:
        """Append to several streams in one transaction: all of them or none."""
        if not batch:
            raise errors.InvalidInput("append_batch needs at least one stream")
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
        stream_ids, expected_ids, steps, event_ids, event_types, datas, metadatas = columns
        encoded_batch: list[list[_Encoded]] = []
        for stream_id, events, expected in batch:
            names.stream_id(stream_id)
            _check_expected(expected)
            encoded = self._encode_all(events)
            encoded_batch.append(encoded)
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
        try:
            async with self.hot.use() as conn:
                positions = await conn.fetchval(QUERIES["append_batch"], *columns)
        except errors.StoreError as exc:
            return await self._batch_after_rejection(batch, encoded_batch, exc)
        if positions is None:
            return await self._batch_after_rejection(batch, encoded_batch, None)
        self.notifier.poke()
        results, i = [], 0
        for (stream_id, _, expected), encoded in zip(batch, encoded_batch, strict=True):
            results.append(AppendResult(stream_id, expected + 1, expected + len(encoded),
                                        tuple(positions[i:i + len(encoded)])))
            i += len(encoded)
        return results

    def _encode_all(self, events: Sequence[Any]) -> list[_Encoded]:
        if isinstance(events, (str, bytes)) or not isinstance(events, Sequence) or not events:
            raise errors.InvalidInput("append needs a non-empty sequence of events")
        encoded = [self._encode(e) for e in events]
        if len(encoded) > 1:
            _check_unique_ids([e.event_id for e in encoded])
        return encoded

    def _encode(self, event: Any) -> _Encoded:
        if isinstance(event, NewEvent):
            payload, event_id, meta = event.payload, event.event_id, event.metadata
        else:
            payload, event_id, meta = event, None, None
        # The log is immutable: an event that would not decode back is refused, not stored as poison.
        event_type, data = self.registry.encode_checked(payload)
        metadata = codec.encode_metadata(meta) if meta else _EMPTY_METADATA
        if len(data) + len(metadata) > self.max_payload_bytes:
            raise errors.PayloadTooLarge(
                f"{event_type} encodes to {len(data) + len(metadata)} bytes, over the {self.max_payload_bytes} limit")
        return _Encoded(event_id, event_type, data, metadata)

    async def _after_rejection(self, stream_id: str, expected: int, encoded: list[_Encoded],
                               exc: errors.StoreError | None, actual: int | None = None) -> AppendResult:
        """Decide what a rejected append was: a retry of a committed one, a conflict or an error."""
        cause = _unique_violation(exc)
        if exc is not None and cause is None:
            raise exc
        existing = await self._existing_result(stream_id, expected, encoded)
        if existing is not None:
            return existing
        if cause is not None and cause.constraint_name == _EVENT_ID_KEY:
            raise errors.DuplicateEventId(f"an event id of this append to {stream_id!r} exists elsewhere") from exc
        if actual is None:
            actual = await self.stream_version(stream_id)
        raise errors.VersionConflict(stream_id, expected, actual) from exc

    async def _batch_after_rejection(self, batch: Sequence[tuple[str, Sequence[Any], int]],
                                     encoded_batch: list[list[_Encoded]],
                                     exc: errors.StoreError | None) -> list[AppendResult]:
        cause = _unique_violation(exc)
        if exc is not None and cause is None:
            raise exc
        results = []
        for (stream_id, _, expected), encoded in zip(batch, encoded_batch, strict=True):
            existing = await self._existing_result(stream_id, expected, encoded)
            if existing is None:
                break
            results.append(existing)
        else:
            return results  # the whole batch is a retry of one that committed
        if cause is not None and cause.constraint_name == _EVENT_ID_KEY:
            raise errors.DuplicateEventId("an event id of this batch exists elsewhere") from exc
        for stream_id, _, expected in batch:
            actual = await self.stream_version(stream_id)
            if actual != expected:
                raise errors.VersionConflict(stream_id, expected, actual) from exc
        # Every stream is where we expected now: the writer we collided with rolled back. Retry.
        raise errors.TransientError("append_batch collided with a writer that rolled back; retry") from exc

    async def _existing_result(self, stream_id: str, expected: int,
                               encoded: list[_Encoded]) -> AppendResult | None:
        """The original result if these exact events already sit at these versions (a retried append)."""
        event_ids = [e.event_id for e in encoded if e.event_id is not None]
        if not event_ids:
            return None  # ids drawn by the database: this append cannot have been made before
        async with self.hot.use() as conn:
            rows = await conn.fetch(QUERIES["find_events"], event_ids)
        if not rows:
            return None
        found = {r["event_id"]: r for r in rows}
        positions = []
        for step, e in enumerate(encoded, start=1):
            row = found.get(e.event_id)
            if row is None or row["stream_id"] != stream_id or row["version"] != expected + step:
                raise errors.DuplicateEventId(
                    f"event {e.event_id or '(without id)'} of a retried append is not where it was appended")
            if row["event_type"] != e.event_type or row["data"] != e.data or row["metadata"] != e.metadata:
                raise errors.DuplicateEventId(f"event {e.event_id} was appended before with other content")
            positions.append(row["global_position"])
        return AppendResult(stream_id, expected + 1, expected + len(encoded), tuple(positions))

    # --- reading ---------------------------------------------------------------------------------

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version (NO_STREAM when empty)."""
        async with self.hot.use() as conn:
            version: int = await conn.fetchval(QUERIES["stream_version"], stream_id)
        return version

    async def load(self, stream_id: str, from_version: int = 0, *,
                   conn: db.Conn | None = None) -> list[RecordedEvent]:
        """A stream's events from from_version on, decoded and upcast, in version order."""
        names.stream_id(stream_id)
        _check_int(from_version, "from_version", 0)
        async with self.hot.use(conn) as c:
            rows = await c.fetch(QUERIES["load_stream"], stream_id, from_version)
        return [record_from_row(r, self.registry) for r in rows]

    async def load_range(self, conn: db.Conn, stream_id: str, first: int, last: int) -> list[RecordedEvent]:
        """A stream's events first..last inclusive, read on conn (inside the caller's transaction)."""
        async with db.translate_errors():
            rows = await conn.fetch(QUERIES["load_stream_range"], stream_id, first, last)
        return [record_from_row(r, self.registry) for r in rows]

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
                QUERIES["read_all"], after.transaction_id, after.global_position, limit)
        events: list[RecordedEvent] = []
        for start in range(0, len(rows), DECODE_SLICE):
            if start:
                await asyncio.sleep(0)  # see DECODE_SLICE
            events += [record_from_row(r, self.registry) for r in rows[start:start + DECODE_SLICE]]
        return events

    async def horizon(self) -> Horizon:
        """The safe frontier of read_all and how long the oldest writing transaction has held it back."""
        async with self.hot.use() as conn:
            row = await conn.fetchrow(QUERIES["horizon"])
        assert row is not None
        return Horizon(row["xmin"], row["oldest_transaction_age"])

    # --- snapshots -------------------------------------------------------------------------------

    async def save_snapshot(self, stream_id: str, version: int, state: Any) -> bool:
        """Store ``state`` (a registered class) as the stream's state at ``version``; False if a newer exists."""
        names.stream_id(stream_id)
        _check_int(version, "version", 0)
        snapshot_type, data = self.registry.encode(state)
        if len(data) > self.max_payload_bytes:
            raise errors.PayloadTooLarge(f"snapshot of {stream_id!r} encodes to {len(data)} bytes")
        async with self.hot.use() as conn:
            status = await conn.execute(QUERIES["save_snapshot"], stream_id, version, snapshot_type, data)
        return bool(status == "INSERT 0 1")

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        """The stream's newest snapshot, decoded and upcast; None when there is none."""
        names.stream_id(stream_id)
        async with self.hot.use() as conn:
            row = await conn.fetchrow(QUERIES["load_snapshot"], stream_id)
        if row is None:
            return None
        try:
            state = self.registry.decode(row["snapshot_type"], row["data"])
        except errors.CodecError as exc:
            raise type(exc)(f"{exc} (snapshot of stream {stream_id!r}, version {row['version']})") from exc
        return Snapshot(stream_id, row["version"], row["snapshot_type"], state)


def _check_int(value: object, what: str, low: int, high: int | None = 2**62,
               error: type[errors.InvalidInput] = errors.InvalidInput) -> None:
    """A real int (not a bool) from ``low`` up to below ``high`` (by default well inside Postgres's bigint)."""
    if (not isinstance(value, int) or isinstance(value, bool) or value < low
            or (high is not None and value >= high)):
        raise error(f"{what} must be an int >= {low}, got {value!r}")


def _check_expected(expected: object) -> None:
    _check_int(expected, "expected_version", NO_STREAM, error=errors.InvalidExpectedVersion)


def _check_unique_ids(event_ids: list[uuid.UUID | None]) -> None:
    given = [i for i in event_ids if i is not None]
    if len(set(given)) != len(given):
        raise errors.DuplicateEventId("the same event id appears twice in one append")


def _unique_violation(exc: BaseException | None) -> asyncpg.UniqueViolationError | None:
    cause = exc.__cause__ if exc is not None else None
    if isinstance(cause, asyncpg.UniqueViolationError) and cause.constraint_name in (_VERSION_KEY, _EVENT_ID_KEY):
        return cause
    return None
