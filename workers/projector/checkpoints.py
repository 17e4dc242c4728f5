"""Exactly-once effects over at-least-once delivery: a batch, its read-model writes and checkpoints, one transaction.

Per projection and stream the checkpoint is the last applied version. The batch's transaction first claims
the checkpoint rows (locks them in stream order, so workers never deadlock, and moves them to the newest
delivered version in the same statement); the versions they had decide each event's fate:
version <= checkpoint is a duplicate, checkpoint + 1 is applied, anything beyond is a gap that is filled
from the event store first. Whatever the broker does (reorder, duplicate, lose), the read model ends up
the fold of the store's events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from projections.base import Policy, Projection
from store import db
from store import errors as store_errors
from store.event_store import EventStore, RecordedEvent
from store.queries import load
from store.records import Undecodable, record_or_undecodable
from workers import errors, locks
from workers.projector import handlers
from workers.projector.handlers import Failure

SQL = load("workers", "checkpoints.sql")
EVENTS = load("workers", "events.sql")


@dataclasses.dataclass(frozen=True, slots=True)
class Parked:
    """An event this batch dead-lettered, and what became of its stream."""

    dead_letter_id: int
    event: RecordedEvent
    policy: Policy


@dataclasses.dataclass(slots=True)
class BatchResult:
    """What a batch did: events applied (gap fills included, in order), duplicates, held and parked."""

    applied: list[RecordedEvent] = dataclasses.field(default_factory=list)
    duplicates: int = 0
    gaps_filled: int = 0
    held: int = 0
    parked: list[Parked] = dataclasses.field(default_factory=list)

    def add(self, other: BatchResult) -> None:
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.gaps_filled += other.gaps_filled
        self.held += other.held
        self.parked += other.parked


@dataclasses.dataclass(slots=True)
class _Stream:
    """The plan of one stream in a batch: its delivered events above the checkpoint, and what fills the gaps."""

    checkpoint: int  # the version before this batch
    halted: int | None
    delivered: dict[int, RecordedEvent]
    target: int  # the newest delivered version
    contiguous: bool = False  # delivered is exactly checkpoint + 1 .. target: nothing to drop or fill


async def apply_batch(store: EventStore, projection: Projection, events: Sequence[RecordedEvent], *,
                      park: Mapping[tuple[str, int], Failure] | None = None,
                      set_based: bool = True) -> BatchResult:
    """Apply events to the projection and move its checkpoints, in one transaction; see the module doc.

    Events listed in ``park`` are dead-lettered instead of applied, per the projection's policy: ``halt``
    stops the stream there (its later events are held until ``dead-letters retry``), ``skip`` moves the
    checkpoint past it. A handler exception rolls everything back and raises errors.HandlerFailed (transient
    database errors raise TransientError instead, to be retried as a whole).
    """
    result = BatchResult()
    delivered: dict[str, dict[int, RecordedEvent]] = {}
    for event in events:
        versions = delivered.get(event.stream_id)
        if versions is None:
            delivered[event.stream_id] = {event.version: event}
        elif event.version in versions:
            result.duplicates += 1
        else:
            versions[event.version] = event
    if not delivered:
        return result
    ordered = sorted(delivered)
    targets = [max(delivered[sid]) for sid in ordered]
    park = park or {}
    async with db.translate_errors(), store.pool.acquire() as conn, conn.transaction():
        await locks.share(conn, locks.projection(store.schema, projection.name))
        claimed = await conn.fetch(SQL["claim_checkpoints"], projection.name, ordered, targets)
        rows = {row["stream_id"]: row for row in claimed}
        streams = {sid: _Stream(rows[sid]["previous_version"], rows[sid]["halted_version"], delivered[sid], target)
                   for sid, target in zip(ordered, targets, strict=True)}
        filled = await _load_gaps(conn, store, projection, streams, result, park)
        to_apply: list[RecordedEvent] = []
        halts: list[tuple[str, int]] = []
        for sid, plan in streams.items():
            if plan.contiguous and not park:  # the common case: apply what was delivered, in version order
                to_apply += [plan.delivered[v] for v in range(plan.checkpoint + 1, plan.target + 1)]
                continue
            halted = await _walk(conn, projection, sid, plan, filled.get(sid, {}), park, result, to_apply)
            if halted is not None and plan.halted is None:
                halts.append((sid, halted))
        await handlers.apply(conn, projection, to_apply, set_based=set_based)
        if halts:
            await conn.execute(SQL["halt_streams"], projection.name, [h[0] for h in halts], [h[1] for h in halts])
        if to_apply:
            await conn.execute(SQL["count_applied"], projection.name, len(to_apply))
    result.applied = to_apply
    return result


async def _load_gaps(conn: db.Conn, store: EventStore, projection: Projection, streams: dict[str, _Stream],
                     result: BatchResult, park: Mapping[tuple[str, int], Failure],
                     ) -> dict[str, dict[int, RecordedEvent]]:
    """Count duplicates and held events, and read every version missing below a delivered one, in one query."""
    ranges: list[tuple[str, int, int]] = []
    for sid, plan in streams.items():
        checkpoint, versions = plan.checkpoint, plan.delivered
        if plan.halted is None and len(versions) == plan.target - checkpoint and min(versions) > checkpoint:
            plan.contiguous = True  # distinct versions, as many as the range holds, all in it
            continue
        result.duplicates += sum(1 for v in versions if v <= checkpoint)
        plan.delivered = {v: e for v, e in versions.items() if v > checkpoint}
        if plan.halted is not None:
            result.held += len(plan.delivered)
            plan.delivered = {}
        expected = checkpoint + 1
        for v in sorted(plan.delivered):
            if v > expected:
                ranges.append((sid, expected, v - 1))
            expected = v + 1
    if not ranges:
        return {}
    rows = await conn.fetch(EVENTS["load_ranges"], [r[0] for r in ranges], [r[1] for r in ranges],
                            [r[2] for r in ranges])
    filled: dict[str, dict[int, RecordedEvent]] = {}
    for row in rows:
        filled.setdefault(row["stream_id"], {})[row["version"]] = _decode_stored(row, store, projection, park)
    wanted = sum(last - first + 1 for _, first, last in ranges)
    if len(rows) != wanted:
        raise store_errors.GapNotInStore(len(rows), wanted)
    return filled


def _decode_stored(row: Any, store: EventStore, projection: Projection,
                   park: Mapping[tuple[str, int], Failure]) -> RecordedEvent:
    """A stored event; one this code cannot decode (a type from newer writers) is poison for its stream."""
    event = record_or_undecodable(row, store.registry)
    if isinstance(event.event, Undecodable) and (event.stream_id, event.version) not in park:
        raise errors.HandlerFailed(projection.name, event, event.event.error) from event.event.error
    return event  # a parked undecodable one is never applied


async def _walk(conn: db.Conn, projection: Projection, sid: str, plan: _Stream, filled: dict[int, RecordedEvent],
                park: Mapping[tuple[str, int], Failure], result: BatchResult,
                to_apply: list[RecordedEvent]) -> int | None:
    """Queue one stream's events in version order, filling gaps and parking those in ``park``; return where it
    halts, if it does."""
    if plan.halted is not None or not plan.delivered:
        return plan.halted
    for v in range(plan.checkpoint + 1, plan.target + 1):
        event = plan.delivered.get(v) or filled[v]
        failure = park.get((sid, v))
        if failure is None:
            to_apply.append(event)
            result.gaps_filled += v not in plan.delivered
            continue
        status = "parked" if projection.policy == "halt" else "skipped"
        dead_letter_id: int = await conn.fetchval(
            SQL["insert_dead_letter"], projection.name, sid, v, event.global_position,
            event.event_id, event.event_type, failure.error, failure.traceback, failure.attempts, status)
        result.parked.append(Parked(dead_letter_id, event, projection.policy))
        if projection.policy == "halt":
            result.held += sum(1 for d in plan.delivered if d > v)
            return v
    return None
