"""The event store's public API as a Protocol, so that code written against it (``Repository``, commands,
tests) runs on PostgreSQL (``EventStore``) and in memory (``InMemoryEventStore``) alike.

What is left out is PostgreSQL's own: the pool, the schema, the kept connections and the relay wake-up,
and the ``conn=`` arguments that read inside a caller's transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from store import codec
from store.records import AppendResult, Horizon, Position, RecordedEvent, Snapshot


class Store(Protocol):
    """Append-only streams of versioned events (the first at version 0), read per stream or all in order."""

    @property
    def registry(self) -> codec.Registry:
        """The event classes the store encodes and decodes with."""
        ...

    async def append(self, stream_id: str, events: Sequence[Any], expected_version: int, *,
                     correlation_id: str | None = None, causation_id: str | None = None) -> AppendResult:
        """Append events after expected_version (NO_STREAM: the stream must not exist), all or none;
        VersionConflict when the stream is elsewhere. Re-appending the same event ids at the same versions
        with the same content returns the original result. Each event's metadata gets the correlation and
        causation ids (these arguments, else the ``store.correlation`` scope's) and the current trace
        context, unless its ``NewEvent`` metadata has those keys itself."""
        ...

    async def append_batch(self, batch: Sequence[tuple[str, Sequence[Any], int]], *,
                           correlation_id: str | None = None, causation_id: str | None = None,
                           ) -> list[AppendResult]:
        """Append to several streams (each once) at their expected versions: all of them or none; metadata as
        in ``append``."""
        ...

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version (NO_STREAM when empty)."""
        ...

    async def load(self, stream_id: str, from_version: int = 0, to_version: int | None = None) -> list[RecordedEvent]:
        """A stream's events from from_version on (up to to_version inclusive), decoded and upcast, in
        version order; the ones there are (none when the stream does not exist)."""
        ...

    async def version_at(self, stream_id: str, as_of: dt.datetime) -> int:
        """The stream's version as of a (timezone-aware) time: its last event recorded at or before it;
        NO_STREAM when there is none."""
        ...

    async def read_all(self, after: Position = Position.START, limit: int = 1000) -> list[RecordedEvent]:
        """Events of all streams after ``after`` in commit order; pass the last one's position next."""
        ...

    async def horizon(self) -> Horizon:
        """The frontier below which read_all returns events, and how long the oldest writer has held it."""
        ...

    async def save_snapshot(self, stream_id: str, version: int, state: Any) -> bool:
        """Store ``state`` (a registered class) as the stream's state at ``version``; False if a newer exists."""
        ...

    async def load_snapshot(self, stream_id: str, *, at_or_before: int | None = None) -> Snapshot | None:
        """The stream's newest snapshot, decoded and upcast; None when there is none, or when it is newer
        than version ``at_or_before``: a store keeps only the newest snapshot of a stream."""
        ...

    async def forget(self, subject: str) -> bool:
        """Forget a subject: delete its data key and append ``SubjectForgotten`` to ``subject-<subject>``; its
        personal fields decode to their erased values from then on. False when it was forgotten before."""
        ...


if TYPE_CHECKING:  # mypy checks here that both stores still satisfy the Protocol
    from store.event_store import EventStore
    from store.memory import InMemoryEventStore

    _postgres: type[Store] = EventStore
    _memory: type[Store] = InMemoryEventStore
