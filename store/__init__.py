"""The eventfleet event store: typed, versioned events in PostgreSQL with a transactional outbox."""

from __future__ import annotations

from store.aggregate import Aggregate, Executed, Repository
from store.codec import REGISTRY
from store.errors import (
    CodecError,
    CorruptEvent,
    DomainError,
    DuplicateEventId,
    EventFleetError,
    EventSchemaMismatch,
    InvalidEvent,
    InvalidExpectedVersion,
    InvalidInput,
    InvalidName,
    InvalidStreamId,
    PayloadTooLarge,
    StoreError,
    TransientError,
    UnknownEventType,
    VersionConflict,
)
from store.event_store import (
    NO_STREAM,
    AppendResult,
    EventStore,
    Horizon,
    NewEvent,
    Position,
    RecordedEvent,
    Snapshot,
)

event = REGISTRY.event
upcaster = REGISTRY.upcaster

__all__ = [
    "NO_STREAM",
    "REGISTRY",
    "Aggregate",
    "AppendResult",
    "CodecError",
    "CorruptEvent",
    "DomainError",
    "DuplicateEventId",
    "EventFleetError",
    "EventSchemaMismatch",
    "EventStore",
    "Executed",
    "Horizon",
    "InvalidEvent",
    "InvalidExpectedVersion",
    "InvalidInput",
    "InvalidName",
    "InvalidStreamId",
    "NewEvent",
    "PayloadTooLarge",
    "Position",
    "RecordedEvent",
    "Repository",
    "Snapshot",
    "StoreError",
    "TransientError",
    "UnknownEventType",
    "VersionConflict",
    "event",
    "upcaster",
]
