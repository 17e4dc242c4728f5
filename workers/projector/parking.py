"""Poison events and undecodable messages: retry with backoff, park per policy, list, show, re-drive, skip.

A handler that raises is retried a few times with short backoff; then its event is parked in
``dead_letters`` and the projection's policy decides the stream's fate (``halt``: it stops there, later
events wait and count as lag; ``skip``: the checkpoint moves past it). The other streams of the batch are
committed regardless. ``eventfleet dead-letters retry ID`` re-drives a parked event after a fix; ``skip ID``
moves its stream past it for good.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import tenacity

from projections import registry
from projections.base import Projection, Runtime
from store import correlation_ids, db
from store.codec import personal
from store.event_store import EventStore, RecordedEvent
from store.queries import load
from workers import broker, errors, handlers, locks
from workers.handlers import Failure
from workers.projector import checkpoints
from workers.projector.checkpoints import BatchResult

logger = logging.getLogger(__name__)

SQL = load("workers", "dead_letters.sql")

#: Tries of a failing event before it is parked, and the backoff between them: few and short, because
#: the rest of the stream waits meanwhile and deterministic bugs do not heal in seconds.
ATTEMPTS = 3
WAIT = tenacity.wait_exponential(multiplier=0.05, max=0.5)




async def apply_or_park(store: EventStore, projection: Projection, events: Sequence[RecordedEvent], *,
                        attempts: int = ATTEMPTS, wait: tenacity.wait.wait_base = WAIT) -> BatchResult:
    """Apply a batch; streams whose handler keeps failing are retried, then parked; the rest commits.

    The fast path is one set-based transaction. If a handler fails, the batch is re-run event by event to
    find the failing streams, the others are committed, and each failing stream is retried on its own.
    """
    try:
        return await checkpoints.apply_batch(store, projection, events)
    except errors.HandlerFailed:
        logger.debug("batch failed, re-running it event by event", extra={"projection": projection.name})
    good, failing = list(events), dict[str, list[RecordedEvent]]()
    result = BatchResult()
    while True:
        try:
            result.add(await checkpoints.apply_batch(store, projection, good, set_based=False))
            break
        except errors.HandlerFailed as failed:
            if failed.event is None or failed.event.stream_id not in {e.stream_id for e in good}:
                raise
            sid = failed.event.stream_id
            failing[sid] = [e for e in good if e.stream_id == sid]
            good = [e for e in good if e.stream_id != sid]
    for stream_events in failing.values():
        result.add(await _settle_stream(store, projection, stream_events, attempts, wait))
    return result


async def _settle_stream(store: EventStore, projection: Projection, events: list[RecordedEvent],
                         attempts: int, wait: tenacity.wait.wait_base) -> BatchResult:
    """Retry one stream's events with backoff; park each event that keeps failing, until the rest applies."""
    park: dict[tuple[str, int], Failure] = {}
    while True:
        try:
            async for attempt in tenacity.AsyncRetrying(
                retry=tenacity.retry_if_exception_type(errors.HandlerFailed), stop=tenacity.stop_after_attempt(attempts),
                wait=wait, reraise=True,
            ):
                with attempt:
                    return await checkpoints.apply_batch(store, projection, events, park=park, set_based=False)
        except errors.HandlerFailed as failed:
            event = failed.event
            if event is None or (event.stream_id, event.version) in park:
                raise
            park[(event.stream_id, event.version)] = Failure.of(failed, attempts)
            logger.warning("parking poison event", extra={
                "projection": projection.name, "stream_id": event.stream_id, "version": event.version,
                "event_type": event.event_type, "policy": projection.policy,
                "error": personal.redact(str(failed.__cause__), event.event),
                **correlation_ids.of(event.metadata)})
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


async def record_undecodable(pool: db.Pool, projection: str, items: Sequence[tuple[str, bytes]]) -> list[int]:
    """Keep undecodable messages (error, raw body) as parked dead letters; return their ids."""
    async with db.translate_errors():
        rows = await pool.fetch(SQL["insert_undecodable"], projection, [e for e, _ in items], [b for _, b in items])
    return [r["id"] for r in rows]


@dataclasses.dataclass(frozen=True, slots=True)
class Redriven:
    """What a retry did: the streams it released, how many events it applied, and where the stream stands
    (``stream_id`` and ``version`` are None for a whole batch message, which can hold several streams)."""

    dead_letter_id: int
    projection: str
    stream_id: str | None
    applied: int
    version: int | None
    streams: tuple[str, ...] = ()
    held: tuple[str, ...] = ()  # streams of a batch message halted by another dead letter: left to it


async def retry(store: EventStore, dead_letter_id: int,
                resolve: Callable[[str], Projection] = lambda name: registry.get(name)(), *,
                runtime: Runtime | None = None) -> Redriven:
    """Re-drive a parked dead letter: apply its stream from the checkpoint to the store's head, release it.

    A dead letter holding a whole batch message (a delivery dead-lettered whole: undecodable then, or naming
    versions the store did not hold) re-drives every stream of the batch the same way, in stream order;
    a stream another dead letter halts stays halted (that one's retry applies it). The store is the truth:
    what the message carried is only which streams to look at, and the checkpoints absorb what was applied.
    One transaction with the checkpoints (and the watermark lock, so lag never misses the released events).
    If a handler still fails, nothing changes but the dead letter's attempts and error, and it raises.
    """
    try:
        async with db.translate_errors(), store.pool.acquire() as conn, conn.transaction():
            return await _redrive(conn, store, dead_letter_id, resolve, runtime)
    except errors.HandlerFailed as failed:
        failure = Failure.of(failed, 1)
        async with db.translate_errors():
            await store.pool.execute(SQL["count_failed_retry"], dead_letter_id, failure.error, failure.traceback)
        raise


async def _redrive(conn: db.Conn, store: EventStore, dead_letter_id: int,
                   resolve: Callable[[str], Projection], runtime: Runtime | None) -> Redriven:
    row = await _lock_parked(conn, dead_letter_id, "re-driven")
    projection = resolve(row["projection"])
    stream_id, version = row["stream_id"], row["version"]
    if stream_id is None:
        streams = _streams_of(dead_letter_id, row["body"], store)
        if isinstance(streams, RecordedEvent):  # a one-event message
            stream_id, version = streams.stream_id, streams.version
        else:
            return await _redrive_batch(conn, store, projection, dead_letter_id, streams, runtime)
    applied, last = await _release(conn, store, projection, stream_id, runtime=runtime)
    await conn.execute(SQL["resolve_dead_letter"], dead_letter_id, stream_id, version)
    logger.info("dead letter re-driven", extra={"dead_letter": dead_letter_id, "projection": projection.name,
                                                "stream_id": stream_id, "applied": applied})
    return Redriven(dead_letter_id, projection.name, stream_id, applied, last, (stream_id,))


def _streams_of(dead_letter_id: int, body: bytes, store: EventStore) -> RecordedEvent | list[str]:
    """The event of a one-event body, or the streams of a batch body, sorted; NotRetryable if it is neither."""
    try:
        return broker.from_body(body, store.registry)
    except errors.MalformedMessage as exc:
        one = exc
    try:
        batch = broker.from_batch_body(body, store.registry)
    except errors.MalformedMessage as exc:
        raise errors.NotRetryable(f"dead letter {dead_letter_id} is still undecodable: {one}; as a batch: {exc}"
                                  ) from exc
    streams = sorted({e.stream_id for e in batch.events})
    if not streams:
        raise errors.NotRetryable(f"dead letter {dead_letter_id} is a batch message that names no stream")
    return streams


async def _redrive_batch(conn: db.Conn, store: EventStore, projection: Projection, dead_letter_id: int,
                         streams: list[str], runtime: Runtime | None) -> Redriven:
    """Release every stream of a batch message that no other dead letter halts; mark the dead letter retried."""
    applied, released, held = 0, [], []
    for sid in streams:
        done = await _release(conn, store, projection, sid, keep_halted=True, runtime=runtime)
        if done is None:
            held.append(sid)
            continue
        applied += done[0]
        released.append(sid)
    await conn.execute(SQL["resolve_dead_letter"], dead_letter_id, None, None)
    logger.info("dead letter re-driven", extra={"dead_letter": dead_letter_id, "projection": projection.name,
                                                "streams": len(released), "held": held, "applied": applied})
    return Redriven(dead_letter_id, projection.name, None, applied, None, tuple(released), tuple(held))


@dataclasses.dataclass(frozen=True, slots=True)
class Skipped:
    """What a skip did: the event its stream moved past, the events applied after it and where it stands.

    ``stream_id``, ``skipped_version`` and ``version`` are None for an undecodable message, which has no stream.
    """

    dead_letter_id: int
    projection: str
    stream_id: str | None
    skipped_version: int | None
    applied: int
    version: int | None


async def skip(store: EventStore, dead_letter_id: int,
               resolve: Callable[[str], Projection] = lambda name: registry.get(name)(), *,
               runtime: Runtime | None = None) -> Skipped:
    """Move a parked dead letter's stream past its event without applying it; mark the dead letter skipped.

    One transaction, with the locks and the path of a re-drive: the checkpoint goes to the parked version,
    the halt is lifted and the stream's later events, up to the store's head, are applied (they were held
    and acked while it was halted, and no delivery brings them again). If a handler fails on one of them,
    nothing changes and it raises. An undecodable message halted no stream: it is only marked skipped.
    """
    async with db.translate_errors(), store.pool.acquire() as conn, conn.transaction():
        row = await _lock_parked(conn, dead_letter_id, "skipped")
        name, stream_id, skipped = row["projection"], row["stream_id"], row["version"]
        applied, last = 0, None
        if stream_id is not None:
            applied, last = await _release(conn, store, resolve(name), stream_id, past=skipped, runtime=runtime)
        await conn.execute(SQL["skip_dead_letter"], dead_letter_id)
    logger.info("dead letter skipped", extra={"dead_letter": dead_letter_id, "projection": name,
                                              "stream_id": stream_id, "version": skipped, "applied": applied})
    return Skipped(dead_letter_id, name, stream_id, skipped, applied, last)


async def _lock_parked(conn: db.Conn, dead_letter_id: int, verb: str) -> Any:
    """The dead letter's row, locked; raise unless it exists and is parked (``verb``: what only those can be)."""
    row = await conn.fetchrow(SQL["lock_dead_letter"], dead_letter_id)
    if row is None:
        raise errors.NoDeadLetter(f"no dead letter {dead_letter_id}")
    if row["status"] != "parked":
        raise errors.NotRetryable(f"dead letter {dead_letter_id} is {row['status']}; only parked ones can be {verb}")
    return row


@overload
async def _release(conn: db.Conn, store: EventStore, projection: Projection, stream_id: str, *,
                   past: int = -1, keep_halted: Literal[False] = False, runtime: Runtime | None = None,
                   ) -> tuple[int, int]: ...
@overload
async def _release(conn: db.Conn, store: EventStore, projection: Projection, stream_id: str, *,
                   past: int = -1, keep_halted: bool, runtime: Runtime | None = None) -> tuple[int, int] | None: ...
async def _release(conn: db.Conn, store: EventStore, projection: Projection, stream_id: str, *,
                   past: int = -1, keep_halted: bool = False, runtime: Runtime | None = None,
                   ) -> tuple[int, int] | None:
    """Apply a stream's events after its checkpoint (and after version ``past``) up to the store's head, move
    the checkpoint to the last of them and lift its halt; return (events applied, the new checkpoint).
    ``keep_halted``: leave a halted stream as it is (its dead letter releases it) and return None.

    Takes the projection's lock shared, as every batch does, then the watermark lock, so the lag monitor
    never passes the released events unseen (see ``locks``).
    """
    await projection.attach(store, runtime)  # a reactor's follow-ups go to this store, a publication's messages out
    name = projection.name
    await locks.share(conn, locks.projection(store.schema, name))
    await locks.take(conn, locks.watermark(store.schema, name))
    head = await conn.fetchrow(SQL["lock_stream_checkpoint"], name, stream_id)
    assert head is not None
    if keep_halted and head["halted_version"] is not None:
        return None
    if head["halted_version"] is not None and head["halted_version"] < past:
        # Moving past ``past`` would drop the event the stream is halted at, unapplied and unrecorded.
        raise errors.NotRetryable(f"stream {stream_id} of {name} is halted at version {head['halted_version']}, "
                                  f"before {past}: retry or skip the dead letter of that version first")
    start = max(head["version"], past)
    events = await store.load(stream_id, start + 1, conn=conn)
    projection.begin(conn)
    await handlers.apply_each(conn, projection, events)
    await projection.before_commit(conn)
    last = events[-1].version if events else start
    await conn.execute(SQL["release_stream"], name, stream_id, last, len(events))
    return len(events), last


async def list_parked(pool: db.Pool, projection: str | None = None) -> list[dict[str, Any]]:
    """Parked dead letters, oldest first."""
    async with db.translate_errors():
        return [dict(r) for r in await pool.fetch(SQL["list_parked"], projection)]


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter as stored; ``stream_id`` is None for a message that could not be decoded at all."""

    id: int
    projection: str
    stream_id: str | None
    version: int | None
    event_type: str | None
    event_id: uuid.UUID | None
    global_position: int | None
    status: str
    attempts: int
    error: str
    traceback: str
    created_at: dt.datetime
    resolved_at: dt.datetime | None
    body_bytes: int | None  # the size of the raw message kept for an undecodable one


async def dead_letter(pool: db.Pool, dead_letter_id: int) -> DeadLetter:
    """The dead letter of this id, whatever its status; raise ``NoDeadLetter`` if there is none."""
    async with db.translate_errors():
        row = await pool.fetchrow(SQL["get_dead_letter"], dead_letter_id)
    if row is None:
        raise errors.NoDeadLetter(f"no dead letter {dead_letter_id}")
    return DeadLetter(**dict(row))
