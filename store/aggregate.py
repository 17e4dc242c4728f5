"""The write model: aggregates folded from their events, and a repository that runs commands on them.

A command is a function from the current aggregate to the new events (or an empty list); it raises a
``DomainError`` to refuse. ``Repository.execute`` loads the aggregate (newest snapshot plus the events
after it), runs the command, and appends with the loaded version as ``expected_version``. When another
writer got there first (``VersionConflict``) it reloads and runs the command again, a bounded number of
times with jittered exponential waits. A transient failure of the append itself is retried with the same
event ids, so an append whose commit was acknowledged too late is recognised, not doubled.
``Repository.load`` also gives the aggregate as it was at a version or as of a time (time travel).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, Self, TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from store import errors
from store.encoding import check_int
from store.interface import Store
from store.records import NO_STREAM, AppendResult, NewEvent, RecordedEvent, Snapshot

logger = logging.getLogger(__name__)

A = TypeVar("A", bound="Aggregate")
Command = Callable[[A], Sequence[Any]]


class Aggregate:
    """State rebuilt by ``apply``-ing a stream's events in order; ``version`` is the last one applied."""

    def __init__(self) -> None:
        self.version = NO_STREAM

    def apply(self, event: Any) -> None:
        """Change the state by one (decoded) event. Subclasses dispatch on the event's class."""
        raise NotImplementedError

    @classmethod
    def from_events(cls, events: Iterable[RecordedEvent], *, snapshot: Snapshot | None = None) -> Self:
        """Fold recorded events, in version order, onto a snapshot's state or a new aggregate."""
        aggregate = cls.from_snapshot(snapshot.state, snapshot.version) if snapshot else cls()
        for recorded in events:
            if recorded.version != aggregate.version + 1:
                raise errors.StoreError(
                    f"stream {recorded.stream_id!r}: version {recorded.version} follows {aggregate.version}")
            aggregate.apply(recorded.event)
            aggregate.version = recorded.version
        return aggregate

    def to_snapshot(self) -> Any:
        """The state as an instance of a registered class, for snapshots (aggregates that use them)."""
        raise NotImplementedError(f"{type(self).__name__} does not take snapshots")

    @classmethod
    def from_snapshot(cls, state: Any, version: int) -> Self:
        """The aggregate as of ``version`` from what ``to_snapshot`` returned."""
        raise NotImplementedError(f"{cls.__name__} does not take snapshots")


@dataclasses.dataclass(frozen=True, slots=True)
class Executed(Generic[A]):
    """What ``execute`` did: the aggregate afterwards, the append (None when the command emitted nothing)
    and how many times the command ran (1 + the version conflicts it met)."""

    aggregate: A
    result: AppendResult | None
    attempts: int


class Repository(Generic[A]):
    """Loads aggregates of one class from a store (any ``Store``: PostgreSQL or in memory) and executes
    commands on them."""

    def __init__(self, store: Store, factory: type[A], *, snapshot_every: int | None = None,
                 max_attempts: int = 32, max_wait: float = 0.2, transient_attempts: int = 3) -> None:
        if snapshot_every is not None and snapshot_every < 1:
            raise errors.InvalidInput(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.store, self.factory = store, factory
        self.snapshot_every = snapshot_every
        self.max_attempts, self.max_wait, self.transient_attempts = max_attempts, max_wait, transient_attempts
        #: Version conflicts met (and retried) by this repository, for reports such as ``eventfleet load``.
        self.conflicts = 0

    async def load(self, stream_id: str, *, version: int | None = None, as_of: dt.datetime | None = None) -> A:
        """The aggregate as of the stream's last event, or as it was: at ``version`` (inclusive) or as of a
        time (``as_of``: every event recorded at or before it).

        With snapshots on, the stream's snapshot is used when it is not newer than that version, and only
        the events after it are read; the store keeps only the newest snapshot, so a load of an older version
        replays from the start. A stream without events is a new aggregate (version NO_STREAM) for a plain
        load, and ``StreamNotFound`` for a version or time; beyond the end is ``VersionBeyondEnd``, before
        the first event ``BeforeStreamStart``.
        """
        target = None if version is None and as_of is None else await self._target(stream_id, version, as_of)
        snapshot = await self._load_snapshot(stream_id, target) if self.snapshot_every else None
        first = snapshot.version + 1 if snapshot else 0
        aggregate = self.factory.from_events(await self.store.load(stream_id, first, target), snapshot=snapshot)
        if target is not None and aggregate.version < target:
            if aggregate.version == NO_STREAM:
                raise errors.StreamNotFound(stream_id)
            raise errors.VersionBeyondEnd(stream_id, target, aggregate.version)
        return aggregate

    async def _target(self, stream_id: str, version: int | None, as_of: dt.datetime | None) -> int | None:
        """The version to load up to, when one of version and as_of is given."""
        if as_of is None:
            check_int(version, "version", 0)
            return version
        if version is not None:
            raise errors.InvalidInput("load takes a version or a time (as_of), not both")
        target = await self.store.version_at(stream_id, as_of)
        if target == NO_STREAM:
            if await self.store.stream_version(stream_id) == NO_STREAM:
                raise errors.StreamNotFound(stream_id)
            raise errors.BeforeStreamStart(stream_id, as_of)
        return target

    async def execute(self, stream_id: str, command: Command[A], *, correlation_id: str | None = None,
                      causation_id: str | None = None) -> Executed[A]:
        """Load, decide, append at the loaded version; on VersionConflict reload and decide again.

        The new events get the correlation and causation ids given (else the ``store.correlation``
        scope's), as ``Store.append`` gives them.
        """
        retrying = AsyncRetrying(retry=retry_if_exception_type(errors.VersionConflict),
                                 stop=stop_after_attempt(self.max_attempts),
                                 wait=wait_random_exponential(multiplier=0.002, max=self.max_wait), reraise=True)
        async for attempt in retrying:
            with attempt:
                number = attempt.retry_state.attempt_number
                if number > 1:
                    self.conflicts += 1
                aggregate = await self.load(stream_id)
                new = [_with_id(e) for e in command(aggregate)]
                if not new:
                    return Executed(aggregate, None, number)
                result = await self._append(stream_id, new, aggregate.version, correlation_id, causation_id)
        for event in new:
            aggregate.apply(event.payload)
        aggregate.version = result.last_version
        await self._maybe_snapshot(stream_id, aggregate, result)
        return Executed(aggregate, result, number)

    async def _append(self, stream_id: str, events: list[NewEvent], expected: int, correlation_id: str | None,
                      causation_id: str | None) -> AppendResult:
        retrying = AsyncRetrying(retry=retry_if_exception_type(errors.TransientError),
                                 stop=stop_after_attempt(self.transient_attempts),
                                 wait=wait_random_exponential(multiplier=0.05, max=1), reraise=True)
        async for attempt in retrying:
            with attempt:
                return await self.store.append(stream_id, events, expected, correlation_id=correlation_id,
                                               causation_id=causation_id)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _load_snapshot(self, stream_id: str, at_or_before: int | None) -> Snapshot | None:
        try:
            return await self.store.load_snapshot(stream_id, at_or_before=at_or_before)
        except errors.CodecError:
            # A snapshot is a cache: one this code cannot read (a newer or dropped type) is replayed past.
            logger.warning("ignoring unreadable snapshot", extra={"stream_id": stream_id}, exc_info=True)
            return None

    async def _maybe_snapshot(self, stream_id: str, aggregate: A, result: AppendResult) -> None:
        """Snapshot every ``snapshot_every`` events: when this append crossed a multiple of it."""
        every = self.snapshot_every
        if every is None or (result.last_version + 1) // every == result.first_version // every:
            return
        try:
            await self.store.save_snapshot(stream_id, aggregate.version, aggregate.to_snapshot())
        except errors.TransientError:
            logger.warning("snapshot not saved", extra={"stream_id": stream_id}, exc_info=True)


def _with_id(event: Any) -> NewEvent:
    """The event as a NewEvent with a fixed id, so that retrying its append is recognised as a retry."""
    if isinstance(event, NewEvent):
        return event if event.event_id else dataclasses.replace(event, event_id=uuid.uuid4())
    return NewEvent(event, uuid.uuid4())
