"""The eventfleet event store: typed, versioned events in PostgreSQL with a transactional outbox."""

from __future__ import annotations

from store.codec import REGISTRY
from store.errors import (
    CodecError,
    CorruptEvent,
    DuplicateEventId,
    EventFleetError,
    EventSchemaMismatch,
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
)

event = REGISTRY.event
upcaster = REGISTRY.upcaster

__all__ = [
    "NO_STREAM",
    "REGISTRY",
    "AppendResult",
    "CodecError",
    "CorruptEvent",
    "DuplicateEventId",
    "EventFleetError",
    "EventSchemaMismatch",
    "EventStore",
    "Horizon",
    "InvalidExpectedVersion",
    "InvalidInput",
    "InvalidName",
    "InvalidStreamId",
    "NewEvent",
    "PayloadTooLarge",
    "Position",
    "RecordedEvent",
    "StoreError",
    "TransientError",
    "UnknownEventType",
    "VersionConflict",
    "event",
    "upcaster",
]
