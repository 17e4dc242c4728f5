"""An event store in memory with EventStore's semantics, for unit tests of aggregates and commands.

It checks and encodes what it is given exactly as ``EventStore`` does (``store.encoding``: the registry
and msgpack, the same limits) and decodes what it returns from the stored bytes (``store.records``), so an
event that PostgreSQL could not store fails here too, and an event comes back as it would from there.

Each append call is one transaction: its events share a transaction id (a counter of appends), and every
event takes the next global position, so ``read_all`` returns them in EventStore's (transaction id,
global position) order. Streams are closed and archived as in PostgreSQL (``store.archive``'s functions take
either store): a closed stream refuses appends (``StreamIsClosed``), an archived one's events move to an
archive of its own, its version kept as a tombstone. Every call yields to the event loop once before it acts, as a round trip to a
database would, so tasks racing on one stream meet ``VersionConflict`` as they would there; what a call
checks and writes after that happens at once. tests/contract runs one suite against both stores.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from store import codec, errors, names, subject_keys
from store.archive import ArchiveEntry, ArchivePreview
from store.codec import closing, personal
from store.encoding import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Encoded,
    Encoding,
    append_context,
    check_expected,
    check_int,
    check_time,
    check_unique_ids,
    original_result,
)
from store.records import (
    NO_STREAM,
    AppendResult,
    Horizon,
    Position,
    RecordedEvent,
    Snapshot,
    record_from_row,
    snapshot_from_row,
)

Row = dict[str, Any]
_MICROSECOND = dt.timedelta(microseconds=1)
_Append = tuple[str, int, list[Encoded]]  # stream id, expected version, its encoded events


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _commit_order(row: Row) -> tuple[int, int]:
    return row["transaction_id"], row["global_position"]


class InMemoryEventStore(Encoding):
    """Append-only streams of events in this process's memory, gone with it."""

    def __init__(self, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 registry: codec.Registry = codec.REGISTRY,
                 clock: Callable[[], dt.datetime] = _utc_now,
                 keks: subject_keys.KeyEncryptionKeys | subject_keys.FromEnv | None = subject_keys.FROM_ENV,
                 ) -> None:
        """Options as ``EventStore``'s; subject keys are kept (wrapped) in memory too."""
        self.max_payload_bytes = max_payload_bytes
        self._key_table = table = subject_keys.MemoryKeyTable()
        self._use_keys(registry, subject_keys.SubjectKeys(
            table, subject_keys.resolve(keks), ttl=float("inf"),
            blocking_fetch=lambda subjects: {s: table.rows[s] for s in subjects if s in table.rows}))
        #: Where ``recorded_at`` comes from (a timezone-aware datetime); tests may pass a fake clock.
        self.clock = clock
        self._last_recorded_at: dt.datetime | None = None
        self._rows: list[Row] = []  # every event, in global position order (which is commit order here)
        self._streams: dict[str, list[Row]] = {}  # each stream's events, in version order
        self._by_id: dict[uuid.UUID, Row] = {}
        self._snapshots: dict[str, Row] = {}
        self._transaction_id = 0
        self._closed: dict[str, int] = {}  # closed streams' last versions (closed_streams): kept for good
        self._archive_log: dict[str, ArchiveEntry] = {}  # archived streams' audit entries (archive_log)
        self._archived: dict[str, list[Row]] = {}  # archived streams' events (events_archive)

    # --- writing ---------------------------------------------------------------------------------

    async def append(self, stream_id: str, events: Sequence[Any], expected_version: int, *,
                     correlation_id: str | None = None, causation_id: str | None = None) -> AppendResult:
        """Append events after expected_version (NO_STREAM: the stream must not exist), all or none; metadata
        as in ``EventStore.append``."""
        names.stream_id(stream_id)
        check_expected(expected_version)
        context = append_context(correlation_id, causation_id)
        encoded = await self.keys.encode_with_keys(lambda: self._encode_all(events, context, stream_id))
        await asyncio.sleep(0)  # see the module's docstring
        closed = stream_id in self._closed
        if self._version(stream_id) == expected_version and not self._found(encoded) and not closed:
            return self._write([(stream_id, expected_version, encoded)])[0]
        existing = original_result(stream_id, expected_version, encoded, self._found(encoded), self.registry)
        if existing is not None:
            return existing
        if closed:  # whatever the version (archived: its events gone)
            raise errors.StreamIsClosed(stream_id)
        raise errors.VersionConflict(stream_id, expected_version, self._version(stream_id))

    async def append_batch(self, batch: Sequence[tuple[str, Sequence[Any], int]], *,
                           correlation_id: str | None = None, causation_id: str | None = None,
                           ) -> list[AppendResult]:
        """Append to several streams at once: all of them or none."""
        if not batch:
            raise errors.InvalidInput("append_batch needs at least one stream")
        context = append_context(correlation_id, causation_id)
        encoded_batch = await self.keys.encode_with_keys(lambda: self._encode_batch(batch, context))
        appends: list[_Append] = [(stream_id, expected, encoded)
                                  for (stream_id, _, expected), encoded in zip(batch, encoded_batch, strict=True)]
        if len({stream_id for stream_id, _, _ in appends}) != len(appends):
            raise errors.InvalidInput("a stream appears twice in one append_batch")
        check_unique_ids([e.event_id for _, _, encoded in appends for e in encoded])
        await asyncio.sleep(0)
        mismatched = [(s, x) for s, x, _ in appends if self._version(s) != x]
        if not mismatched and not any(self._found(encoded) for _, _, encoded in appends):
            for stream_id, _, _ in appends:
                if stream_id in self._closed:
                    raise errors.StreamIsClosed(stream_id)
            return self._write(appends)
        results = []
        for stream_id, expected, encoded in appends:
            existing = original_result(stream_id, expected, encoded, self._found(encoded), self.registry)
            if existing is None:
                break
            results.append(existing)
        else:
            return results  # the whole batch is a retry of one that was written
        if mismatched:
            stream_id, expected = mismatched[0]
            raise errors.VersionConflict(stream_id, expected, self._version(stream_id))
        raise errors.DuplicateEventId("an event id of this batch exists elsewhere")

    def _write(self, appends: list[_Append]) -> list[AppendResult]:
        self._transaction_id += 1
        results = []
        for stream_id, expected, encoded in appends:
            stream = self._streams.setdefault(stream_id, [])
            for step, e in enumerate(encoded, start=1):
                row: Row = {
                    "global_position": len(self._rows) + 1, "event_id": e.event_id or uuid.uuid4(),
                    "stream_id": stream_id, "version": expected + step, "event_type": e.event_type,
                    "data": e.data, "metadata": e.metadata, "recorded_at": self._now(),
                    "transaction_id": self._transaction_id}
                self._rows.append(row)
                stream.append(row)
                self._by_id[row["event_id"]] = row
            positions = tuple(row["global_position"] for row in stream[expected + 1:])
            results.append(AppendResult(stream_id, expected + 1, expected + len(encoded), positions))
        return results

    def _now(self) -> dt.datetime:
        """The clock's time, or a microsecond after the previous event's when the clock has not moved past
        it: events are recorded in the order they are appended, never two at the same instant."""
        now = self.clock()
        last = self._last_recorded_at
        if last is not None and now <= last:
            now = last + _MICROSECOND
        self._last_recorded_at = now
        return now

    def _found(self, encoded: list[Encoded]) -> list[Row]:
        """The stored events with the ids of these (a retry, or a clash)."""
        return [self._by_id[e.event_id] for e in encoded if e.event_id in self._by_id]

    def _version(self, stream_id: str) -> int:
        return len(self._streams.get(stream_id, ())) - 1

    # --- reading ---------------------------------------------------------------------------------

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version (NO_STREAM when empty); an archived stream's last version."""
        await asyncio.sleep(0)
        version = self._version(stream_id)
        return self._closed.get(stream_id, NO_STREAM) if version == NO_STREAM else version

    async def load(self, stream_id: str, from_version: int = 0, to_version: int | None = None) -> list[RecordedEvent]:
        """A stream's events from from_version on (up to to_version inclusive), decoded and upcast, in
        version order."""
        names.stream_id(stream_id)
        check_int(from_version, "from_version", 0)
        if to_version is not None:
            check_int(to_version, "to_version", 0)
        await asyncio.sleep(0)
        end = None if to_version is None else to_version + 1
        return [record_from_row(r, self.registry) for r in self._streams.get(stream_id, [])[from_version:end]]

    async def version_at(self, stream_id: str, as_of: dt.datetime) -> int:
        """The stream's version as of a time: its last event recorded at or before it (NO_STREAM: none)."""
        names.stream_id(stream_id)
        check_time(as_of, "as_of")
        await asyncio.sleep(0)
        stream = self._streams.get(stream_id, [])
        return max((r["version"] for r in stream if r["recorded_at"] <= as_of), default=NO_STREAM)

    async def read_all(self, after: Position = Position.START, limit: int = 1000) -> list[RecordedEvent]:
        """Events of all streams after ``after`` in commit order; pass the last one's position next."""
        check_int(limit, "limit", 1, high=None)
        await asyncio.sleep(0)
        start = bisect.bisect_right(self._rows, (after.transaction_id, after.global_position), key=_commit_order)
        return [record_from_row(r, self.registry) for r in self._rows[start:start + limit]]

    async def horizon(self) -> Horizon:
        """Every append has committed: the frontier is past the last transaction, and nothing holds it."""
        await asyncio.sleep(0)
        return Horizon(self._transaction_id + 1, 0.0)

    # --- snapshots -------------------------------------------------------------------------------

    async def save_snapshot(self, stream_id: str, version: int, state: Any) -> bool:
        """Store ``state`` (a registered class) as the stream's state at ``version``; False if a newer exists."""
        names.stream_id(stream_id)
        check_int(version, "version", 0)
        snapshot_type, data = await self.keys.encode_with_keys(lambda: self._encode_snapshot(stream_id, state))
        await asyncio.sleep(0)
        newest = self._snapshots.get(stream_id)
        if newest is not None and newest["version"] >= version:
            return False
        self._snapshots[stream_id] = {"version": version, "snapshot_type": snapshot_type, "data": data}
        return True

    async def load_snapshot(self, stream_id: str, *, at_or_before: int | None = None) -> Snapshot | None:
        """The stream's newest snapshot, decoded and upcast; None when there is none, or when it is newer
        than version ``at_or_before`` (only the newest snapshot is kept, as in EventStore)."""
        names.stream_id(stream_id)
        if at_or_before is not None:
            check_int(at_or_before, "at_or_before", 0)
        await asyncio.sleep(0)
        row = self._snapshots.get(stream_id)
        if row is None or (at_or_before is not None and row["version"] > at_or_before):
            return None
        return snapshot_from_row(stream_id, row, self.registry)

    # --- personal data ---------------------------------------------------------------------------

    async def forget(self, subject: str) -> bool:
        """Forget a subject as ``EventStore.forget`` does: its key gone, ``SubjectForgotten`` appended."""
        subject = personal.subject_id(subject, "subject")
        stream_id = names.stream_id(personal.forgotten_stream(subject))
        await asyncio.sleep(0)
        self._key_table.forget(subject)
        self.keys.forgotten(subject)
        try:
            await self.append(stream_id, [personal.SubjectForgotten(subject)], NO_STREAM)
        except errors.VersionConflict:
            return False
        return True

    async def rewrap_keys(self, batch: int = 1000) -> int:
        """Wrap every subject key that another key-encryption key wraps with the newest one."""
        check_int(batch, "batch", 1, high=None)
        keks = self.keys.require_keks()
        rows = self._key_table.rows
        stale = [(s, k, w) for s, (k, w) in rows.items() if k is not None and w is not None and k != keks.newest]
        for subject, kek_id, wrapped in stale:
            rows[subject] = keks.wrap(subject, keks.unwrap(subject, kek_id, wrapped))
        return len(stale)

    # --- closing and archiving streams (store.archive) -------------------------------------------

    async def _close(self, stream_id: str, reason: str) -> int:
        """``store.archive.close`` in memory: ``StreamClosed`` appended and the stream closed at once."""
        names.stream_id(stream_id)
        version = await self.stream_version(stream_id)
        if version == NO_STREAM:
            raise errors.StreamNotFound(stream_id)
        result = await self.append(stream_id, [closing.StreamClosed(reason)], version)
        self._closed[stream_id] = result.last_version  # no await since the append wrote: one transaction
        return result.last_version

    async def _archive(self, stream_id: str, archived_by: str, reason: str) -> ArchiveEntry:
        """``store.archive.archive`` in memory: the events moved, the snapshot dropped, the entry logged and
        ``StreamArchived`` appended at once (nothing waits in an outbox, no projection halts here)."""
        names.stream_id(stream_id)
        tombstone_stream = names.stream_id(closing.archived_stream(stream_id))
        if not archived_by or not reason:
            raise errors.InvalidInput("an archival needs who (archived_by) and why (reason)")
        await asyncio.sleep(0)
        if stream_id not in self._closed:
            raise errors.StreamNotClosed(stream_id)
        if stream_id in self._archive_log:
            raise errors.AlreadyArchived(stream_id)
        rows = self._streams[stream_id]  # a closed stream holds its StreamClosed at least, until archived
        entry = ArchiveEntry(len(self._archive_log) + 1, stream_id, archived_by, reason, self.clock(), len(rows),
                             rows[0]["global_position"], rows[-1]["global_position"], rows[-1]["version"])
        tombstone = closing.StreamArchived(stream_id, entry.archive_id, entry.events, entry.last_version,
                                           entry.first_position, entry.last_position, reason)
        encoded = self._encode_all([tombstone], append_context(None, None), tombstone_stream)
        if self._version(tombstone_stream) != NO_STREAM or tombstone_stream in self._closed:
            raise errors.VersionConflict(tombstone_stream, NO_STREAM, self._version(tombstone_stream))
        # From here on nothing awaits: the archival is one transaction.
        self._archived[stream_id] = self._streams.pop(stream_id)
        moved = {id(row) for row in rows}
        self._rows = [row for row in self._rows if id(row) not in moved]
        for row in rows:
            del self._by_id[row["event_id"]]
        self._snapshots.pop(stream_id, None)
        self._archive_log[stream_id] = entry
        self._write([(tombstone_stream, NO_STREAM, encoded)])
        return entry

    def _archive_entry(self, stream_id: str) -> ArchiveEntry | None:
        return self._archive_log.get(names.stream_id(stream_id))

    def _load_archived(self, stream_id: str) -> list[RecordedEvent]:
        return [record_from_row(r, self.registry) for r in self._archived.get(names.stream_id(stream_id), [])]

    def _preview(self, stream_id: str) -> ArchivePreview:
        names.stream_id(stream_id)
        return ArchivePreview(stream_id, stream_id in self._closed, stream_id in self._archive_log,
                              len(self._streams.get(stream_id, ())), 0)
