"""The eventfleet event store: typed, versioned events in PostgreSQL with a transactional outbox, or in memory
for unit tests (`InMemoryEventStore`), both behind the `Store` Protocol. Appends store correlation and causation
ids (`correlation`, `caused_by`) and, with the `eventfleet[otel]` extra, the trace context with each event."""

from __future__ import annotations

from store.aggregate import Aggregate, Executed, Repository
from store.codec import ERASED, ERASED_BYTES, REGISTRY, Erased, ErasedBytes, Personal, SubjectForgotten
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
    KeyEncryptionKeyMismatch,
    KeyEncryptionKeyMissing,
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
from store.subject_keys import KeyEncryptionKeys

event = REGISTRY.event
upcaster = REGISTRY.upcaster

__all__ = [
    "ERASED",
    "ERASED_BYTES",
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
    "Erased",
    "ErasedBytes",
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
    "KeyEncryptionKeyMismatch",
    "KeyEncryptionKeyMissing",
    "KeyEncryptionKeys",
    "NewEvent",
    "PayloadTooLarge",
    "Personal",
    "Position",
    "RecordedEvent",
    "Repository",
    "Snapshot",
    "Store",
    "StoreError",
    "StreamNotFound",
    "SubjectForgotten",
    "TransientError",
    "UnknownEventType",
    "VersionBeyondEnd",
    "VersionConflict",
    "caused_by",
    "correlation",
    "event",
    "upcaster",
]
