"""The library's events of a stream's end: ``StreamClosed`` (the last event of a closed stream) and
``StreamArchived`` (the tombstone of an archived one). Every registry knows them (store/archive.py)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class StreamClosed:
    """The last event of a closed stream (``store.archive.close``): appends to the stream fail from then on
    (``errors.StreamIsClosed``). ``reason``: why, as the closer gave it."""

    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class StreamArchived:
    """Appended to stream ``archived-<stream_id>`` when ``stream_id``'s events were moved to ``events_archive``
    (``store.archive.archive``): ``events`` events, versions 0 to ``last_version``, positions
    ``first_position`` to ``last_position``; ``archive_id``: its ``archive_log`` row. A projection handling
    it drops the stream's contribution, so its live read model equals one rebuilt after the archival."""

    stream_id: str
    archive_id: int
    events: int
    last_version: int
    first_position: int
    last_position: int
    reason: str


def archived_stream(stream_id: str) -> str:
    """``archived-<stream_id>``: the stream of an archived stream's ``StreamArchived`` event."""
    return f"archived-{stream_id}"
