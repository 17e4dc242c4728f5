"""The eventfleet event store: typed, versioned events in PostgreSQL with a transactional outbox, or in memory
for unit tests (`InMemoryEventStore`), both behind the `Store` Protocol. Appends store correlation and causation
ids (`correlation`, `caused_by`) and, with the `eventfleet[otel]` extra, the trace context with each event."""

from __future__ import annotations

from store.aggregate import Aggregate, Executed, Repository
from store.codec import REGISTRY
from store.correlation_ids import Correlation, caused_by, correlation
from store.errors import (
    BeforeStreamStart,
    CodecError,
    CorruptEvent,
    DomainError,
    DuplicateEventId,
    EventFleetError,
    EventSchemaMismatch,
    HistoryNotFound,
    InvalidEvent,
    InvalidExpectedVersion,
    InvalidInput,
    InvalidName,
    InvalidStreamId,
    PayloadTooLarge,
    StoreError,
    StreamNotFound,
    TransientError,
    UnknownEventType,
    VersionBeyondEnd,
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
from store.interface import Store
from store.memory import InMemoryEventStore

event = REGISTRY.event
upcaster = REGISTRY.upcaster

__all__ = [
    "NO_STREAM",
    "REGISTRY",
    "Aggregate",
    "AppendResult",
    "BeforeStreamStart",
    "CodecError",
    "Correlation",
    "CorruptEvent",
    "DomainError",
    "DuplicateEventId",
    "EventFleetError",
    "EventSchemaMismatch",
    "EventStore",
    "Executed",
    "HistoryNotFound",
    "Horizon",
    "InMemoryEventStore",
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
    "Store",
    "StoreError",
    "StreamNotFound",
    "TransientError",
    "UnknownEventType",
    "VersionBeyondEnd",
    "VersionConflict",
    "caused_by",
    "correlation",
    "event",
    "upcaster",
]
