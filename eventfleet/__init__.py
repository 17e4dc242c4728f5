"""eventfleet: event sourcing on PostgreSQL, an outbox relayed to RabbitMQ, exactly-once projection workers.

The one import an application needs::

    import eventfleet as ef

    @ef.event("MoneyDeposited", version=1)
    @dataclasses.dataclass(frozen=True, slots=True)
    class MoneyDeposited: ...

Everything here is re-exported from ``store``, ``projections`` and ``workers``, which stay importable too, but
``run_worker``: the projector's, handed the backfill job of new read models as the ``worker`` command hands it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from eventfleet import _guard

_guard.check_on_import()

from projections import (
    Projection,
    StreamHalted,
    UnknownProjection,
    WaitFailed,
    WaitTimeout,
    handles,
    register,
    wait_for,
)
from projections.publication import Public, Publication, PublishUnavailable
from projections.reactor import Deadline, Effects, Reactor
from store import (
    ERASED,
    ERASED_BYTES,
    NO_STREAM,
    Aggregate,
    AppendResult,
    CodecError,
    Correlation,
    CorruptEvent,
    DomainError,
    DuplicateEventId,
    Erased,
    ErasedBytes,
    EventFleetError,
    EventSchemaMismatch,
    EventStore,
    Executed,
    InvalidExpectedVersion,
    InvalidInput,
    InvalidName,
    InvalidStreamId,
    KeyEncryptionKeyMismatch,
    KeyEncryptionKeyMissing,
    KeyEncryptionKeys,
    NewEvent,
    PayloadTooLarge,
    Personal,
    Position,
    RecordedEvent,
    Repository,
    Snapshot,
    StoreError,
    SubjectForgotten,
    TransientError,
    UnknownEventType,
    VersionConflict,
    caused_by,
    correlation,
    event,
    upcaster,
)
from store.db import Conn, Pool, create_pool
from store.errors import ConfigError
from store.queries import load as load_sql
from workers.config import Settings
from workers.errors import (
    BrokerUnavailable,
    HandlerFailed,
    MalformedMessage,
    PublishFailed,
    RebuildError,
    WorkerError,
)
from workers.projector import worker as _worker
from workers.projector.batcher import Stats as _Stats
from workers.projector.worker import consume_until_idle
from workers.rebuild.backfill import Backfills as _Backfills
from workers.relay import RelayConfig, relay_until_idle, run_relay
from workers.runtime.health import Health


async def run_worker(settings: Settings, projections: Sequence[Projection], health_: Health, stop: asyncio.Event, *,
                     pool: Pool | None = None) -> dict[str, _Stats]:
    """Join the fleet and consume the partitions held until ``stop`` (``workers.projector.worker.run_worker``),
    backfilling read models first seen from the store beside (``workers.rebuild.backfill``)."""
    return await _worker.run_worker(settings, projections, health_, stop, pool=pool, backfills=_Backfills())


__version__ = "0.1.0"

__all__ = [
    "ERASED",
    "ERASED_BYTES",
    "NO_STREAM",
    "Aggregate",
    "AppendResult",
    "BrokerUnavailable",
    "CodecError",
    "ConfigError",
    "Conn",
    "Correlation",
    "CorruptEvent",
    "Deadline",
    "DomainError",
    "DuplicateEventId",
    "Effects",
    "Erased",
    "ErasedBytes",
    "EventFleetError",
    "EventSchemaMismatch",
    "EventStore",
    "Executed",
    "HandlerFailed",
    "InvalidExpectedVersion",
    "InvalidInput",
    "InvalidName",
    "InvalidStreamId",
    "KeyEncryptionKeyMismatch",
    "KeyEncryptionKeyMissing",
    "KeyEncryptionKeys",
    "MalformedMessage",
    "NewEvent",
    "PayloadTooLarge",
    "Personal",
    "Pool",
    "Position",
    "Projection",
    "Public",
    "Publication",
    "PublishFailed",
    "PublishUnavailable",
    "Reactor",
    "RebuildError",
    "RecordedEvent",
    "RelayConfig",
    "Repository",
    "Settings",
    "Snapshot",
    "StoreError",
    "StreamHalted",
    "SubjectForgotten",
    "TransientError",
    "UnknownEventType",
    "UnknownProjection",
    "VersionConflict",
    "WaitFailed",
    "WaitTimeout",
    "WorkerError",
    "__version__",
    "caused_by",
    "consume_until_idle",
    "correlation",
    "create_pool",
    "event",
    "handles",
    "load_sql",
    "register",
    "relay_until_idle",
    "run_relay",
    "run_worker",
    "upcaster",
    "wait_for",
]
