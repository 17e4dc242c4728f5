"""The error tree of eventfleet: every error the project raises derives from EventFleetError.

The class says what the caller should do: ``TransientError`` may succeed when retried, everything else
will fail the same way again.
"""

from __future__ import annotations

import datetime as dt


class EventFleetError(Exception):
    """Unexpected eventfleet error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class StoreError(EventFleetError):
    """Unexpected event store error."""


class TransientError(StoreError):
    """The database was unreachable or aborted the transaction; retrying may succeed."""


class DatabaseUnreachable(TransientError):
    """PostgreSQL could not be reached (the message names its host and port); retrying may succeed."""


class TransactionConflict(TransientError):
    """Postgres aborted the transaction for a conflict with another one (a deadlock or a serialization
    failure): not an outage; retrying the transaction succeeds."""


class EnvironmentFailure(TransientError):
    """The database refused for a reason of its environment (disk full, out of memory, a lock or statement
    timeout, read-only, a missing privilege: ``store.sqlstates``), not of the event; retried until fixed."""

    def __init__(self, message: str, sqlstate: str, condition: str, remedy: str) -> None:
        super().__init__(f"{message} [SQLSTATE {sqlstate} {condition}: {remedy}]")
        self.sqlstate = sqlstate
        self.condition = condition
        self.remedy = remedy


class InvalidInput(EventFleetError, ValueError):
    """The input was rejected before it reached the database."""


class InvalidStreamId(InvalidInput):
    """A stream id must be 1 to 255 characters of printable text without NUL."""


class InvalidName(InvalidInput):
    """A schema, prefix or projection name must be lowercase letters, digits and underscores."""


class PayloadTooLarge(InvalidInput):
    """An encoded event is larger than the configured limit."""


class InvalidExpectedVersion(InvalidInput):
    """expected_version must be an int >= -1 (NO_STREAM)."""


class VersionConflict(StoreError):
    """The stream moved past the expected version before this append committed."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id!r} is at version {actual}, expected {expected}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class StreamIsClosed(StoreError):
    """The stream is closed: it takes no more events (store/archive.py)."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} is closed: it takes no more events")
        self.stream_id = stream_id


class ArchiveRefused(StoreError):
    """The stream cannot be archived now (store/archive.py); nothing was changed."""

    def __init__(self, stream_id: str, why: str | None = None) -> None:
        super().__init__(f"stream {stream_id!r} cannot be archived: {why or self.__doc__}")
        self.stream_id = stream_id


class StreamNotClosed(ArchiveRefused):
    """only a closed stream is archived: close it first (eventfleet close-stream)"""


class AlreadyArchived(ArchiveRefused):
    """it was archived before"""


class HaltedStream(ArchiveRefused):
    """a projection holds it halted at a parked dead letter: retry or skip that first (eventfleet dead-letters)"""


class UnpublishedEvents(ArchiveRefused):
    """the relay has not published all its events yet: archive it once the outbox holds none of them"""


class GapNotInStore(StoreError):
    """A delivery names versions whose predecessors the store does not hold (a message from another store, or
    from events an async failover lost): nothing can fill the gap before them."""

    def __init__(self, found: int, wanted: int) -> None:
        super().__init__(f"gap filling found {found} of {wanted} missing events in the store")
        self.found = found
        self.wanted = wanted


class DuplicateEventId(StoreError):
    """An event id was appended before at another stream or version."""


class HistoryNotFound(StoreError, LookupError):
    """The stream has no state at the requested version or time."""


class StreamNotFound(HistoryNotFound):
    """The stream has no events."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} has no events")
        self.stream_id = stream_id


class VersionBeyondEnd(HistoryNotFound):
    """The stream has not reached the requested version."""

    def __init__(self, stream_id: str, version: int, last_version: int) -> None:
        super().__init__(f"stream {stream_id!r} ends at version {last_version}, before version {version}")
        self.stream_id = stream_id
        self.version = version
        self.last_version = last_version


class BeforeStreamStart(HistoryNotFound):
    """The stream's first event was recorded after the requested time."""

    def __init__(self, stream_id: str, as_of: dt.datetime) -> None:
        super().__init__(f"stream {stream_id!r} has no event recorded at or before {as_of.isoformat()}")
        self.stream_id = stream_id
        self.as_of = as_of


class CodecError(StoreError):
    """An event could not be encoded or decoded; it is poison and is never retried."""


class UnknownEventType(CodecError):
    """No event class is registered under this type name."""


class NewerEventVersion(UnknownEventType):
    """The event type is a newer version than this code registers: written by a newer release."""


class CorruptEvent(CodecError):
    """The stored or delivered bytes are not a valid encoded event."""


class EventSchemaMismatch(CodecError):
    """The decoded fields do not fit the event class."""


class InvalidEvent(EventSchemaMismatch, InvalidInput):
    """An event's fields do not fit its class, so it would not decode back: refused at append, before the
    database. It is an ``InvalidInput`` (nothing was written; fix the event) and an ``EventSchemaMismatch``,
    the same misfit the decoder would report on every read of it."""


class ConfigError(EventFleetError):
    """Invalid configuration."""


class SchemaNotMigrated(ConfigError):
    """The schema has no eventfleet tables yet: run `eventfleet migrate`."""

    def __init__(self, schema: str) -> None:
        super().__init__(f"schema {schema!r} is not migrated: run `eventfleet migrate`")
        self.schema = schema


class PartitionsMismatch(ConfigError):
    """The partitions asked for differ from the ones the schema was migrated with."""


class DomainError(EventFleetError):
    """A command was rejected by the domain model."""


class SchemaBehind(StoreError):
    """The schema lacks migrations this release's workers need: run `eventfleet migrate` before starting them."""

    def __init__(self, schema: str, missing: list[int]) -> None:
        super().__init__(f"schema {schema!r} lacks migrations {', '.join(map(str, missing))}, which this release's "
                         "workers need: run `eventfleet migrate` first")
        self.schema = schema
        self.missing = missing


class ClockBehind(StoreError):
    """The store holds transaction ids ahead of this Postgres cluster's (restored or moved from another cluster): run `eventfleet migrate` to move its clock past them."""


class KeyEncryptionKeyMissing(ConfigError):
    """Personal fields need a key-encryption key: set EVENTFLEET_KEK (base64 of 32 bytes) or EVENTFLEET_KEK_FILE."""


class KeyEncryptionKeyMismatch(ConfigError):
    """A subject's data key does not unwrap with the configured key-encryption keys (EVENTFLEET_KEK or
    EVENTFLEET_KEK_FILE): the key it was wrapped with is missing or wrong."""


class SubjectKeyNotLoaded(StoreError):
    """A subject's data key is not in this process's cache: the store loads it and decodes again (internal)."""

    def __init__(self, subjects: frozenset[str]) -> None:
        super().__init__(f"data keys not loaded for {len(subjects)} subject(s)")
        self.subjects = subjects
