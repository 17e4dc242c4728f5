"""The values the event store takes and returns: cursors, new and recorded events, results, snapshots."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from store import codec, errors

NO_STREAM = -1


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


class Slice(list[RecordedEvent]):
    """The events of one bounded read, in order; ``full``: the read stopped at its row or byte limit, so more
    may follow at once (a read that is not full reached the tail)."""

    __slots__ = ("full",)

    def __init__(self, events: Iterable[RecordedEvent] = (), full: bool = False) -> None:
        super().__init__(events)
        self.full = full


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """A stream's state as of ``version``, decoded (and upcast) like an event."""

    stream_id: str
    version: int
    snapshot_type: str
    state: Any


@dataclasses.dataclass(frozen=True, slots=True)
class Horizon:
    """read_all returns only events of transactions below ``xmin``; the oldest writer has held it this long."""

    xmin: int
    oldest_transaction_age_seconds: float


def record_from_row(row: Mapping[str, Any], registry: codec.Registry = codec.REGISTRY) -> RecordedEvent:
    """Decode an events row (as selected by the store's queries) into a RecordedEvent."""
    stream_id, version, event_type = row["stream_id"], row["version"], row["event_type"]
    try:
        payload = registry.decode(event_type, row["data"], (row["event_id"], stream_id))
        metadata = codec.unpackb(row["metadata"])
    except errors.CodecError as exc:
        raise type(exc)(f"{exc} (stream {stream_id!r}, version {version}, type {event_type})") from exc
    position = row["global_position"]
    return _recorded(row["event_id"], stream_id, version, position, _position(row["transaction_id"], position),
                     event_type, payload, row["data"], metadata, row["recorded_at"])


def snapshot_from_row(stream_id: str, row: Mapping[str, Any],
                      registry: codec.Registry = codec.REGISTRY) -> Snapshot:
    """Decode a snapshots row (version, snapshot_type, data) of stream_id into a Snapshot."""
    try:
        state = registry.decode(row["snapshot_type"], row["data"], (None, stream_id))
    except errors.CodecError as exc:
        raise type(exc)(f"{exc} (snapshot of stream {stream_id!r}, version {row['version']})") from exc
    return Snapshot(stream_id, row["version"], row["snapshot_type"], state)


# This runs once per event read: positional constructors without the frozen __init__'s cost (see codec).
_recorded = codec.constructor(RecordedEvent)
_position = codec.constructor(Position)


@dataclasses.dataclass(frozen=True, slots=True)
class Undecodable:
    """The payload of a stored event that could not be decoded, and why: poison for its stream."""

    error: errors.CodecError


def record_or_undecodable(row: Mapping[str, Any], registry: codec.Registry = codec.REGISTRY) -> RecordedEvent:
    """Like ``record_from_row``, except that an event this code cannot decode (corrupt bytes written around
    the store's API, a newer writer's type) comes back with an ``Undecodable`` payload instead of raising."""
    try:
        return record_from_row(row, registry)
    except errors.CodecError as exc:
        return RecordedEvent(event_id=row["event_id"], stream_id=row["stream_id"], version=row["version"],
                             global_position=row["global_position"],
                             position=Position(row["transaction_id"], row["global_position"]),
                             event_type=row["event_type"], event=Undecodable(exc), data=row["data"],
                             metadata={}, recorded_at=row["recorded_at"])


def records_or_undecodable(rows: Sequence[Mapping[str, Any]], registry: codec.Registry = codec.REGISTRY,
                           ) -> list[RecordedEvent]:
    """``record_or_undecodable`` of each row, the data keys of the whole batch loaded first in one go."""
    registry.preload_keys(row["data"] for row in rows)
    return [record_or_undecodable(row, registry) for row in rows]
