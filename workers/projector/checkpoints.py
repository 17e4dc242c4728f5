"""Exactly-once effects over at-least-once delivery: a batch, its read-model writes and checkpoints, one transaction.

Per projection and stream the checkpoint is the last applied version. The batch's transaction first claims
the checkpoint rows (locks them in stream order, so workers never deadlock, and moves them to the newest
delivered version in the same statement); the versions they had decide each event's fate:
version <= checkpoint is a duplicate, checkpoint + 1 is applied, anything beyond is a gap that is filled
from the event store first. Whatever the broker does (reorder, duplicate, lose), the read model ends up
the fold of the store's events.

A delivery is news, never the truth: the claim also checks every delivered event against the store (its
stream, version and id, one index probe each in the same statement). One the store does not hold is a ghost:
published from a primary that then lost it to an asynchronous failover (or a store restored from an older
backup), perhaps with another event stored since at its version. A ghost is never applied and never moves a
checkpoint; its version, if the store holds one, is read from the store like any gap.

A read model that handles a few event types (``Projection.handled_names()``) pays only for those: the events
of other types are dropped from the batch before anything (``BatchResult.unhandled``), and its checkpoint is
the last store version up to which every event *it handles* is applied. Its versions then have gaps by design
(it sees 0, 3 and 7 of a stream), so contiguity cannot tell a gap from a duplicate: the claim returns, from
the store in the same statement, the versions of its types in (checkpoint, newest delivered]
(``claim_checkpoints`` given its names), and those, not the range, are what the batch applies, delivered or read from the
store. Nothing it handles can lie between two of them unseen.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import asyncpg.pool

from projections import reactor
from projections.base import Policy, Projection
from store import db
from store import errors as store_errors
from store.event_store import EventStore, RecordedEvent
from store.queries import load
from store.records import Undecodable, record_or_undecodable
from workers import errors, handlers, locks
from workers.handlers import Failure

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
    """What a batch did: events applied (gap fills included, in order), duplicates, held, parked, the
    delivered events the store does not hold (ghosts: dropped); for a reactor, what its applied events'
    handlers did (follow-ups, refusals)."""

    applied: list[RecordedEvent] = dataclasses.field(default_factory=list)
    duplicates: int = 0
    gaps_filled: int = 0
    held: int = 0
    parked: list[Parked] = dataclasses.field(default_factory=list)
    ghosts: list[RecordedEvent] = dataclasses.field(default_factory=list)
    reacted: reactor.Outcome = dataclasses.field(default_factory=reactor.Outcome)
    #: Delivered events of types the read model does not handle: never decoded for it, never applied, no checkpoint.
    unhandled: int = 0

    def add(self, other: BatchResult) -> None:
        self.applied += other.applied
        self.unhandled += other.unhandled
        self.duplicates += other.duplicates
        self.gaps_filled += other.gaps_filled
        self.held += other.held
        self.parked += other.parked
        self.ghosts += other.ghosts
        self.reacted.add(other.reacted)


@dataclasses.dataclass(slots=True)
class _Stream:
    """The plan of one stream in a batch: its delivered events above the checkpoint, and what fills the gaps."""

    checkpoint: int  # the version before this batch
    halted: int | None
    delivered: dict[int, RecordedEvent]
    target: int  # the newest delivered version
    #: A filtered read model's: the store versions of its types in (checkpoint, claimed version]; None: every
    #: version in that range is the projection's.
    handled: list[int] | None = None
    contiguous: bool = False  # delivered is exactly what is due: nothing to drop or fill

    def due(self) -> Sequence[int]:
        """The versions this batch must apply to the stream, in order, delivered or not."""
        return self.handled if self.handled is not None else range(self.checkpoint + 1, self.target + 1)


async def apply_batch(store: EventStore, projection: Projection, events: Sequence[RecordedEvent], *,
                      park: Mapping[tuple[str, int], Failure] | None = None,
                      set_based: bool = True) -> BatchResult:
    """Apply events to the projection and move its checkpoints, in one transaction; see the module doc.

    Events listed in ``park`` are dead-lettered instead of applied, per the projection's policy: ``halt``
    stops the stream there (its later events are held until ``dead-letters retry``), ``skip`` moves the
    checkpoint past it. A handler exception rolls everything back and raises errors.HandlerFailed (transient
    database errors raise TransientError instead, to be retried as a whole).
    """
    result, delivered, names = _prepare(projection, events)
    if not delivered:
        return result
    park = park or {}
    with reactor.recording() as outcomes:  # what a reactor's handlers did, counted once they commit
        to_apply = await _apply(store, projection, delivered, park, result, set_based, names)
    result.applied = to_apply
    result.reacted = outcomes.committed(e.event_id for e in to_apply)
    return result


def _prepare(projection: Projection, events: Sequence[RecordedEvent]
             ) -> tuple[BatchResult, dict[str, dict[int, RecordedEvent]], frozenset[str] | None]:
    """A batch's result so far (its unhandled events and duplicates within it counted), its events of the
    projection's types by stream and version, and those types."""
    result = BatchResult()
    names = projection.handled_names()
    if names is not None:
        mine = [e for e in events if e.event_type.rpartition(".v")[0] in names]
        result.unhandled = len(events) - len(mine)
        events = mine
    delivered: dict[str, dict[int, RecordedEvent]] = {}
    for event in events:
        versions = delivered.get(event.stream_id)
        if versions is None:
            delivered[event.stream_id] = {event.version: event}
        elif event.version in versions:
            result.duplicates += 1
        else:
            versions[event.version] = event
    return result, delivered, names


def _every(delivered: dict[str, dict[int, RecordedEvent]]) -> list[RecordedEvent]:
    """A batch's delivered events, stream by stream."""
    return [e for versions in delivered.values() for e in versions.values()]


async def apply_batches(store: EventStore, batches: Sequence[tuple[Projection, Sequence[RecordedEvent]]]
                        ) -> list[BatchResult]:
    """Several read models' batches in one transaction (a worker group's: ``workers.projector.combiner``), each
    as ``apply_batch`` applies it set-based with nothing to park: all commit or none does. Their checkpoint
    claims run in the order given (sort by name: every worker takes the read models' rows in one order). Not
    for a read model that appends (a reactor): its outcomes are counted per batch. Raises what ``apply_batch``
    raises; the caller then applies each batch on its own (``parking.apply_or_park``)."""
    prepared = [(projection, *_prepare(projection, events)) for projection, events in batches]
    async with _transaction(store.pool) as conn:
        # One call takes every read model's lock and claims every read model's checkpoints, and one statement
        # counts what each applied.
        delivering = [(p, result, delivered, names, _every(delivered))
                      for p, result, delivered, names in prepared if delivered]
        claimed = await _claim(conn, [locks.projection(store.schema, p.name) for p, *_ in prepared],
                               [(p, every, names) for p, _, _, names, every in delivering])
        for projection, result, delivered, names, every in delivering:
            result.applied = await _apply_in(conn, store, projection, delivered, {}, result, names, every, True,
                                             alone=False, claimed=claimed.get(projection.name, []))
        counted = [(p.name, len(r.applied)) for p, r, *_ in prepared if r.applied]
        if counted:
            await conn.execute(SQL["count_applied_many"], [c[0] for c in counted], [c[1] for c in counted])
    return [result for _, result, _, _ in prepared]


@contextlib.asynccontextmanager
async def _transaction(pool: db.Pool) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[Any]]:
    """A batch's connection, inside its transaction. A committed batch leaves no session state (its lock is the
    transaction's; a projection's statements run inside it and must not SET, LISTEN or lock for the session:
    docs/reference.md 3.4), so the connection goes back without asyncpg's reset round trip (``db.committing``)."""
    async with db.translate_errors(), db.committing(pool) as conn:
        yield conn


async def _apply(store: EventStore, projection: Projection, delivered: dict[str, dict[int, RecordedEvent]],
                 park: Mapping[tuple[str, int], Failure], result: BatchResult, set_based: bool,
                 names: frozenset[str] | None) -> list[RecordedEvent]:
    """The batch's transaction; returns the events it applied, in order."""
    every = _every(delivered)
    async with _transaction(store.pool) as conn:
        return await _apply_in(conn, store, projection, delivered, park, result, names, every, set_based)


async def _claim(conn: db.Conn, lock_keys: Sequence[str],
                 batches: Sequence[tuple[Projection, Sequence[RecordedEvent], frozenset[str] | None]]
                 ) -> dict[str, list[Any]]:
    """Take the locks ``lock_keys`` (shared), then claim the checkpoints of each read model's delivered events (its
    handled names, or None: every event), in one call; the claimed rows by read model. (A read model that handles
    no names never claims: ``_prepare`` leaves it no event.)"""
    readers, streams, versions, ids, handled_readers, handled_names = [], [], [], [], [], []
    for projection, every, names in batches:
        readers += [projection.name] * len(every)
        streams += [e.stream_id for e in every]
        versions += [e.version for e in every]
        ids += [e.event_id for e in every]
        if names is not None:
            handled_readers += [projection.name] * len(names)
            handled_names += sorted(names)
    by_reader: dict[str, list[Any]] = {}
    for row in await conn.fetch(SQL["claim_checkpoints"], list(lock_keys), readers, streams, versions, ids,
                                handled_readers, handled_names):
        by_reader.setdefault(row["projection"], []).append(row)
    return by_reader


async def _apply_in(conn: db.Conn, store: EventStore, projection: Projection,
                    delivered: dict[str, dict[int, RecordedEvent]], park: Mapping[tuple[str, int], Failure],
                    result: BatchResult, names: frozenset[str] | None, every: list[RecordedEvent], set_based: bool,
                    *, alone: bool = True, claimed: Sequence[Any] | None = None) -> list[RecordedEvent]:
    """The batch's statements on ``conn``, inside its transaction (``alone``: its own, so its claim takes the
    projection's lock first and they count what they applied last; else ``apply_batches`` does both for all,
    and the claims: ``claimed``, its rows)."""
    if claimed is None:
        claimed = (await _claim(conn, [locks.projection(store.schema, projection.name)],
                                [(projection, every, names)])).get(projection.name, [])
    streams: dict[str, _Stream] = {}
    for row in sorted(claimed, key=lambda r: r["stream_id"]):
        sid, versions = row["stream_id"], delivered[row["stream_id"]]
        for ghost in row["ghosts"] or ():
            result.ghosts.append(versions.pop(ghost))
        if versions:
            streams[sid] = _Stream(row["previous_version"], row["halted_version"], versions, max(versions),
                                   row["handled"])
    if result.ghosts:
        await _record_ghosts(conn, projection, result.ghosts)
    filled = await _load_gaps(conn, store, projection, streams, result, park)
    to_apply: list[RecordedEvent] = []
    halts: list[tuple[str, int]] = []
    for sid, plan in streams.items():
        if plan.contiguous and not park:  # the common case: apply what was delivered, in version order
            to_apply += [plan.delivered[v] for v in plan.due()]
            continue
        halted = await _walk(conn, projection, sid, plan, filled.get(sid, {}), park, result, to_apply)
        if halted is not None and plan.halted is None:
            halts.append((sid, halted))
    projection.begin(conn)
    await handlers.apply(conn, projection, to_apply, set_based=set_based)
    await projection.before_commit(conn)
    if halts:
        await conn.execute(SQL["halt_streams"], projection.name, [h[0] for h in halts], [h[1] for h in halts])
    if to_apply and alone:
        await conn.execute(SQL["count_applied"], projection.name, len(to_apply))
    return to_apply


#: The dead-letter error of a ghost (the rows say which event).
GHOST_ERROR = ("GhostEvent: delivered, but the store holds no such event at its stream and version (published, "
               "then lost with a primary by an asynchronous failover, or a store restored from an older backup, "
               "or a forged message): dropped, never applied")


async def _record_ghosts(conn: db.Conn, projection: Projection, ghosts: Sequence[RecordedEvent]) -> None:
    await conn.execute(SQL["record_ghosts"], projection.name, [g.stream_id for g in ghosts],
                       [g.version for g in ghosts], [g.global_position for g in ghosts], [g.event_id for g in ghosts],
                       GHOST_ERROR, [g.event_type for g in ghosts])


async def _load_gaps(conn: db.Conn, store: EventStore, projection: Projection, streams: dict[str, _Stream],
                     result: BatchResult, park: Mapping[tuple[str, int], Failure],
                     ) -> dict[str, dict[int, RecordedEvent]]:
    """Count duplicates and held events, and read every version missing below a delivered one, in one query."""
    ranges: list[tuple[str, int, int]] = []
    for sid, plan in streams.items():
        checkpoint, versions = plan.checkpoint, plan.delivered
        if plan.halted is None and min(versions) > checkpoint and (
                len(versions) == plan.target - checkpoint if plan.handled is None
                else sorted(versions) == plan.handled):
            plan.contiguous = True  # distinct versions above the checkpoint, as many as are due: all of them
            continue
        result.duplicates += sum(1 for v in versions if v <= checkpoint)
        plan.delivered = {v: e for v, e in versions.items() if v > checkpoint}
        if plan.halted is not None:
            result.held += len(plan.delivered)
            plan.delivered = {}
            continue
        ranges += _missing(sid, plan)
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


def _missing(sid: str, plan: _Stream) -> list[tuple[str, int, int]]:
    """The ranges of versions due below the newest delivered one that were not delivered (gaps to read)."""
    if not plan.delivered:
        return []
    newest = max(plan.delivered)
    missing = [v for v in plan.due() if v < newest and v not in plan.delivered]
    ranges: list[tuple[str, int, int]] = []
    for v in missing:  # consecutive versions in one range
        if ranges and ranges[-1][2] == v - 1:
            ranges[-1] = (sid, ranges[-1][1], v)
        else:
            ranges.append((sid, v, v))
    return ranges


def _decode_stored(row: Any, store: EventStore, projection: Projection,
                   park: Mapping[tuple[str, int], Failure]) -> RecordedEvent:
    """A stored event; one this code cannot decode is passed by, held (``handlers.passes_by``: a type of newer
    code) or poison for its stream."""
    event = record_or_undecodable(row, store.registry)
    if (isinstance(event.event, Undecodable) and (event.stream_id, event.version) not in park
            and not handlers.passes_by(projection, event)):
        raise errors.HandlerFailed(projection.name, event, event.event.error) from event.event.error
    return event  # a parked undecodable one is never applied


async def _walk(conn: db.Conn, projection: Projection, sid: str, plan: _Stream, filled: dict[int, RecordedEvent],
                park: Mapping[tuple[str, int], Failure], result: BatchResult,
                to_apply: list[RecordedEvent]) -> int | None:
    """Queue one stream's events in version order, filling gaps and parking those in ``park``; return where it
    halts, if it does."""
    if plan.halted is not None or not plan.delivered:
        return plan.halted
    newest = max(plan.delivered)
    for v in plan.due():
        if v > newest:
            break
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
