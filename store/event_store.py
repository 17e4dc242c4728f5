"""The event store: append with optimistic concurrency and outbox rows, load streams, read all in order."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import asyncpg

from store import codec, db, errors, names
from store.queries import QUERIES

NO_STREAM = -1
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
_EMPTY_METADATA = codec.packb({})


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Position:
    """A cursor of read_all: the writing transaction's id, then the global position."""

    transaction_id: int
    global_position: int

    START: ClassVar[Position]


Position.START = Position(0, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class NewEvent:
    """An event payload to append, with an explicit id (generated when None) and metadata."""

    payload: Any
    event_id: uuid.UUID | None = None
    metadata: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append put its events."""

    stream_id: str
    first_version: int
    last_version: int
    global_positions: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored, with its payload decoded and upcast to the newest class of its name."""

    event_id: uuid.UUID
    stream_id: str
    version: int
    global_position: int
    position: Position
    event_type: str
    event: Any
    data: bytes
    metadata: Mapping[str, Any]
    recorded_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class _Encoded:
    event_id: uuid.UUID
    event_type: str
    data: bytes
    metadata: bytes


def record_from_row(row: Mapping[str, Any], registry: codec.Registry = codec.REGISTRY) -> RecordedEvent:
    """Decode an events row (as selected by the store's queries) into a RecordedEvent."""
    stream_id, version, event_type = row["stream_id"], row["version"], row["event_type"]
    try:
        payload = registry.decode(event_type, row["data"])
        metadata = codec.unpackb(row["metadata"])
    except errors.CodecError as exc:
        raise type(exc)(f"{exc} (stream {stream_id!r}, version {version}, type {event_type})") from exc
    return RecordedEvent(
        event_id=row["event_id"], stream_id=stream_id, version=version,
        global_position=row["global_position"],
        position=Position(row["transaction_id"], row["global_position"]),
        event_type=event_type, event=payload, data=row["data"], metadata=metadata,
        recorded_at=row["recorded_at"],
    )


class EventStore:
    """Append-only streams of events over an asyncpg pool whose search_path is the store's schema."""

    def __init__(self, pool: db.Pool, *, schema: str = "eventfleet",
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 registry: codec.Registry = codec.REGISTRY) -> None:
        self.pool = pool
        self.schema = names.identifier(schema, what="schema")
        self.max_payload_bytes = max_payload_bytes
        self.registry = registry

    # --- writing ---------------------------------------------------------------------------------

    async def append(self, stream_id: str, events: Sequence[Any], expected_version: int) -> AppendResult:
        """Append events after expected_version (NO_STREAM: the stream must not exist) in one transaction."""
        names.stream_id(stream_id)
        _check_expected(expected_version)
        encoded = self._encode_all(events)
        async with db.translate_errors():
            try:
                row = await self.pool.fetchrow(
                    QUERIES["append_stream"], stream_id, expected_version,
                    [e.event_id for e in encoded], [e.event_type for e in encoded],
                    [e.data for e in encoded], [e.metadata for e in encoded],
                )
            except asyncpg.UniqueViolationError as exc:
                # A racing writer took a version (or the event ids exist): decide which it was.
                return await self._after_unique_violation(stream_id, expected_version, encoded, exc)
        assert row is not None
        if row["positions"] is None:
            return await self._after_mismatch(stream_id, expected_version, encoded, row["actual"])
        return AppendResult(stream_id, expected_version + 1, expected_version + len(encoded),
                            tuple(row["positions"]))

    async def append_batch(self, batch: Sequence[tuple[str, Sequence[Any], int]]) -> list[AppendResult]:
        """Append to several streams in one transaction: all of them or none."""
        if not batch:
            raise errors.InvalidInput("append_batch needs at least one stream")
        seen: set[str] = set()
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
        encoded_batch: list[list[_Encoded]] = []
        for stream_id, events, expected in batch:
            names.stream_id(stream_id)
            _check_expected(expected)
            if stream_id in seen:
                raise errors.InvalidInput(f"stream {stream_id!r} appears twice in one batch")
            seen.add(stream_id)
            encoded = self._encode_all(events)
            encoded_batch.append(encoded)
            for step, e in enumerate(encoded, start=1):
                for column, value in zip(columns, (stream_id, expected, step, e.event_id, e.event_type,
                                                   e.data, e.metadata), strict=True):
                    column.append(value)
        async with db.translate_errors():
            try:
                rows = await self.pool.fetch(QUERIES["append_streams"], *columns)
            except asyncpg.UniqueViolationError as exc:
                return await self._batch_after_unique_violation(batch, encoded_batch, exc)
        if rows and rows[0]["global_position"] is not None:
            results, i = [], 0
            for (stream_id, _, expected), encoded in zip(batch, encoded_batch, strict=True):
                positions = tuple(r["global_position"] for r in rows[i:i + len(encoded)])
                results.append(AppendResult(stream_id, expected + 1, expected + len(encoded), positions))
                i += len(encoded)
            return results
        return await self._batch_after_unique_violation(batch, encoded_batch, None)

    def _encode_all(self, events: Sequence[Any]) -> list[_Encoded]:
        if isinstance(events, (str, bytes)) or not isinstance(events, Sequence) or not events:
            raise errors.InvalidInput("append needs a non-empty sequence of events")
        return [self._encode(e) for e in events]

    def _encode(self, event: Any) -> _Encoded:
        new = event if isinstance(event, NewEvent) else NewEvent(event)
        event_type, data = self.registry.encode(new.payload)
        metadata = _EMPTY_METADATA if not new.metadata else codec.packb(dict(new.metadata))
        if len(data) + len(metadata) > self.max_payload_bytes:
            raise errors.PayloadTooLarge(
                f"{event_type} encodes to {len(data) + len(metadata)} bytes, over the {self.max_payload_bytes} limit")
        return _Encoded(new.event_id or uuid.uuid4(), event_type, data, metadata)

    async def _after_mismatch(self, stream_id: str, expected: int, encoded: list[_Encoded],
                              actual: int) -> AppendResult:
        existing = await self._existing_result(stream_id, expected, encoded)
        if existing is not None:
            return existing
        raise errors.VersionConflict(stream_id, expected, actual)

    async def _after_unique_violation(self, stream_id: str, expected: int, encoded: list[_Encoded],
                                      exc: asyncpg.UniqueViolationError) -> AppendResult:
        existing = await self._existing_result(stream_id, expected, encoded)
        if existing is not None:
            return existing
        if exc.constraint_name == "events_event_id_key":
            raise errors.DuplicateEventId(f"an event id of this append to {stream_id!r} exists elsewhere") from exc
        actual = await self.stream_version(stream_id)
        raise errors.VersionConflict(stream_id, expected, actual) from exc

    async def _batch_after_unique_violation(
        self, batch: Sequence[tuple[str, Sequence[Any], int]], encoded_batch: list[list[_Encoded]],
        exc: asyncpg.UniqueViolationError | None,
    ) -> list[AppendResult]:
        results = []
        for (stream_id, _, expected), encoded in zip(batch, encoded_batch, strict=True):
            existing = await self._existing_result(stream_id, expected, encoded)
            if existing is None:
                break
            results.append(existing)
        else:
            return results
        if exc is not None and exc.constraint_name == "events_event_id_key":
            raise errors.DuplicateEventId("an event id of this batch exists elsewhere") from exc
        for stream_id, _, expected in batch:
            actual = await self.stream_version(stream_id)
            if actual != expected:
                raise errors.VersionConflict(stream_id, expected, actual) from exc
        raise errors.TransientError("append_batch raced with another writer; retry") from exc

    async def _existing_result(self, stream_id: str, expected: int,
                               encoded: list[_Encoded]) -> AppendResult | None:
        """The original result if these exact event ids already sit at these versions (a retried append)."""
        async with db.translate_errors():
            rows = await self.pool.fetch(QUERIES["find_events"], [e.event_id for e in encoded])
        if not rows:
            return None
        found = {r["event_id"]: r for r in rows}
        positions = []
        for step, e in enumerate(encoded, start=1):
            row = found.get(e.event_id)
            if row is None or row["stream_id"] != stream_id or row["version"] != expected + step:
                raise errors.DuplicateEventId(
                    f"event {e.event_id} was appended before at another stream or version")
            positions.append(row["global_position"])
        return AppendResult(stream_id, expected + 1, expected + len(encoded), tuple(positions))

    # --- reading ---------------------------------------------------------------------------------

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version (NO_STREAM when empty)."""
        async with db.translate_errors():
            version: int = await self.pool.fetchval(QUERIES["stream_version"], stream_id)
        return version

    async def load(self, stream_id: str, from_version: int = 0, *,
                   conn: db.Conn | None = None) -> list[RecordedEvent]:
        """A stream's events from from_version on, decoded and upcast, in version order."""
        names.stream_id(stream_id)
        async with db.translate_errors():
            rows = await (conn or self.pool).fetch(QUERIES["load_stream"], stream_id, from_version)
        return [record_from_row(r, self.registry) for r in rows]

    async def load_range(self, conn: db.Conn, stream_id: str, first: int, last: int) -> list[RecordedEvent]:
        """A stream's events first..last inclusive, read on conn (inside the caller's transaction)."""
        async with db.translate_errors():
            rows = await conn.fetch(QUERIES["load_stream_range"], stream_id, first, last)
        return [record_from_row(r, self.registry) for r in rows]

    async def read_all(self, after: Position = Position.START, limit: int = 1000, *,
                       conn: db.Conn | None = None) -> list[RecordedEvent]:
        """Events of all streams after ``after`` in commit-safe order; pass the last one's position next."""
        async with db.translate_errors():
            rows = await (conn or self.pool).fetch(
                QUERIES["read_all"], after.transaction_id, after.global_position, limit)
        return [record_from_row(r, self.registry) for r in rows]

    async def horizon(self) -> Horizon:
        """The safe frontier of read_all and how long the oldest open transaction has held it back."""
        async with db.translate_errors():
            row = await self.pool.fetchrow(QUERIES["horizon"])
        assert row is not None
        return Horizon(row["xmin"], row["oldest_transaction_age"])


@dataclasses.dataclass(frozen=True, slots=True)
class Horizon:
    """read_all returns only events of transactions below ``xmin``."""

    xmin: int
    oldest_transaction_age_seconds: float


def _check_expected(expected: object) -> None:
    if not isinstance(expected, int) or isinstance(expected, bool) or expected < NO_STREAM or expected >= 2**62:
        raise errors.InvalidExpectedVersion(f"expected_version must be an int >= -1, got {expected!r}")


def positions_of(results: Iterable[AppendResult]) -> list[int]:
    """All global positions of several append results, in order."""
    return [p for r in results for p in r.global_positions]
