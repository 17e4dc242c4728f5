"""Reactors: projections that act. Their handlers append follow-up events, run commands on aggregates and
schedule deadlines, all inside the transaction that moves their checkpoint: the follow-up commits with the
checkpoint or not at all.

A reactor is declared and registered like a projection (a name, ``@handles`` per event class, optional state
tables and their ``ddl``), but its handlers take an ``Effects`` instead of a connection::

    @register
    class PaymentTimeout(Reactor):
        name = "payment_timeout"

        @handles(OrderPlaced)
        async def placed(self, fx: Effects, event: RecordedEvent) -> None:
            await fx.schedule(event.recorded_at + TIMEOUT, event.stream_id)

        async def on_deadline(self, fx: Effects, deadline: Deadline) -> None:
            await fx.execute(deadline.key, Order, orders.cancel("payment timeout"))

Exactly once. Follow-up event ids are derived from the reactor's name, the cause's id (the event handled, or
the deadline fired) and the follow-up's index among the cause's follow-ups; each follow-up's metadata
carries ``causation_id`` = the cause's id and the cause's ``correlation_id``. A replay of the same cause
appends the same ids at the same versions, which the store recognises as a retry of the committed append,
so nothing is ever appended twice, and the checkpoint in the same transaction keeps replays from happening
in the first place.

Speed. A batch first runs as one piece (``apply_batch``): no savepoints, the histories of the batch's streams
read in one query for the repository's loads, every ``schedule`` and ``cancel`` written at the end in two
statements, and its follow-ups in one ``append_batch`` (so inside such a batch ``fx.append`` returns no
positions, and a handler reading a stream's version itself does not see the batch's own follow-ups yet: the
conflict that follows reruns it cause by cause). If anything in it raises (a conflict, a refusal, a failing
handler), the worker rolls the whole transaction back and runs the batch again event by event, each cause as
below: the outcome is the same. So
a handler may run more than once for one event: whatever it does outside ``fx`` (a call to another system, a
list in memory) is at least once, not exactly once.

Conflicts and refusals. Each cause runs in a savepoint of the batch's transaction. A version conflict on a
follow-up stream (a user wrote to it meanwhile) rolls that savepoint back and runs the cause's handler again
on fresh loads, up to ``CONFLICT_ATTEMPTS`` times, without redoing the rest of the batch. A command the
domain refuses (``store.errors.DomainError``) is an outcome, not a failure: its savepoint is rolled back, the
refusal is recorded in ``reactor_refusals`` and the reactor moves on. Anything else fails like a projection's
handler: retried, then parked per ``policy``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, LiteralString

from projections.base import Projection, Runtime
from store import codec, correlation_ids, db, errors, names, queries
from store.aggregate import Command, Executed, Repository
from store.event_store import EventStore
from store.interface import Store
from store.partitions import partition_of
from store.records import AppendResult, Horizon, NewEvent, Position, RecordedEvent, Snapshot

SQL = queries.load("projections", "reactor.sql")

#: The namespace of follow-up and deadline ids (uuid5): fixed, or replays would append new ids.
NAMESPACE = uuid.UUID("5b0b2c7e-8f44-4d0c-9a55-0c3e7f1d2a61")
#: Runs of one cause's handler when its follow-ups keep meeting version conflicts.
CONFLICT_ATTEMPTS = 5


def follow_up_id(reactor: str, cause: uuid.UUID, index: int) -> uuid.UUID:
    """The id of a cause's ``index``-th follow-up event (0-based, in the order the handler appends them)."""
    return uuid.uuid5(NAMESPACE, f"{reactor}/{cause}/{index}")


def deadline_id(reactor: str, key: str, scheduled_by: uuid.UUID, due_at: dt.datetime) -> uuid.UUID:
    """The id of a deadline: the cause of its handler's follow-ups."""
    return uuid.uuid5(NAMESPACE, f"{reactor}/deadline/{key}/{scheduled_by}/{due_at.isoformat()}")


@dataclasses.dataclass(frozen=True, slots=True)
class Deadline:
    """A deadline being fired: what was scheduled, and when it was due."""

    reactor: str
    key: str
    due_at: dt.datetime
    payload: Any
    deadline_id: uuid.UUID
    correlation_id: str | None
    scheduled_by: uuid.UUID | None


@dataclasses.dataclass(slots=True)
class Outcome:
    """What the last run of one cause's handler did (a rerun replaces it: only what commits is counted)."""

    follow_ups: int = 0
    refusals: int = 0
    conflicts: int = 0

    def add(self, other: Outcome) -> None:
        self.follow_ups += other.follow_ups
        self.refusals += other.refusals
        self.conflicts += other.conflicts


class Outcomes:
    """What reactors' runs did inside one ``recording()`` block, per cause (a rerun of a cause replaces its
    outcome); the caller sums those whose transaction committed."""

    def __init__(self) -> None:
        self.by_cause: dict[uuid.UUID, Outcome] = {}

    def committed(self, causes: Iterable[uuid.UUID]) -> Outcome:
        """The summed outcomes of these causes (those that committed; runs of the others are ignored)."""
        total = Outcome()
        for cause in causes:
            found = self.by_cause.get(cause)
            if found is not None:
                total.add(found)
        return total


# One reactor object serves every partition a worker holds, and their deadline firings, side by side: what its
# runs do is kept per block of the running task, never on the object, or one partition's count would take or
# clear another's.
_RECORDING: contextvars.ContextVar[Outcomes | None] = contextvars.ContextVar("reactor_outcomes", default=None)


@contextlib.contextmanager
def recording() -> Iterator[Outcomes]:
    """Record what reactors run inside this block do (in this task), per cause; nothing outside it."""
    outcomes = Outcomes()
    token = _RECORDING.set(outcomes)
    try:
        yield outcomes
    finally:
        _RECORDING.reset(token)


def _record(cause: uuid.UUID, outcome: Outcome) -> None:
    outcomes = _RECORDING.get()
    if outcomes is not None:
        outcomes.by_cause[cause] = outcome


#: One cause of a batch run as one piece: its id, its correlation id, and its handler's call.
_Cause = tuple[uuid.UUID, str | None, Callable[["Effects"], Awaitable[None]]]


def _correlation(event: RecordedEvent) -> str | None:
    value = event.metadata.get(correlation_ids.CORRELATION_ID)
    return value if isinstance(value, str) else None


def _is_stream_id(key: str) -> bool:
    try:
        names.stream_id(key)
    except errors.InvalidInput:
        return False
    return True


class _InTransaction(Store):
    """The store seen from inside the reactor's transaction: reads and appends on its connection, and every
    appended event given its deterministic id and the cause's ids (the ``Repository`` appends through it)."""

    def __init__(self, fx: Effects) -> None:
        self.fx = fx

    @property
    def registry(self) -> codec.Registry:
        return self.fx.store.registry

    async def append(self, stream_id: str, events: Sequence[Any], expected_version: int, *,
                     correlation_id: str | None = None, causation_id: str | None = None) -> AppendResult:
        return await self.fx.append(stream_id, events, expected_version)

    async def append_batch(self, batch: Sequence[tuple[str, Sequence[Any], int]], *,
                           correlation_id: str | None = None, causation_id: str | None = None,
                           ) -> list[AppendResult]:
        return [await self.fx.append(s, events, expected) for s, events, expected in batch]

    async def stream_version(self, stream_id: str) -> int:
        return await self.fx.store.stream_version(stream_id, conn=self.fx.conn)

    async def load(self, stream_id: str, from_version: int = 0, to_version: int | None = None) -> list[RecordedEvent]:
        batch = self.fx.batch
        if batch is None:
            return await self.fx.store.load(stream_id, from_version, to_version, conn=self.fx.conn)
        if stream_id in batch.histories:  # read with the batch's other streams
            stored = batch.histories[stream_id]
        else:
            stored = await self.fx.store.load(stream_id, conn=self.fx.conn)
        return [e for e in (*stored, *batch.pending.get(stream_id, ()))  # and what the batch will append
                if e.version >= from_version and (to_version is None or e.version <= to_version)]

    async def version_at(self, stream_id: str, as_of: dt.datetime) -> int:
        return await self.fx.store.version_at(stream_id, as_of, conn=self.fx.conn)

    async def read_all(self, after: Position = Position.START, limit: int = 1000) -> list[RecordedEvent]:
        return await self.fx.store.read_all(after, limit, conn=self.fx.conn)

    async def horizon(self) -> Horizon:
        return await self.fx.store.horizon()

    async def save_snapshot(self, stream_id: str, version: int, state: Any) -> bool:
        return False  # a snapshot is a cache: none from inside a reactor's transaction

    async def load_snapshot(self, stream_id: str, *, at_or_before: int | None = None) -> Snapshot | None:
        return None

    async def forget(self, subject: str) -> bool:
        # In a transaction of its own, not the reactor's: forgetting is idempotent, so a rerun repeats it harmlessly.
        return await self.fx.store.forget(subject)


class _Batch:
    """A batch run as one piece: the prefetched histories of its streams, and its deferred schedules and cancels
    (the last one of each key wins)."""

    def __init__(self, histories: dict[str, list[RecordedEvent]]) -> None:
        self.histories = histories
        self.deadlines: dict[str, tuple[Any, ...] | None] = {}  # key -> schedule's row, None: cancelled
        #: Follow-ups to append at the end, per stream: (the version expected before them, the events), and
        #: stand-ins of them for the loads that come after them in the batch.
        self.appends: dict[str, tuple[int, list[NewEvent]]] = {}
        self.pending: dict[str, list[RecordedEvent]] = {}

    def append(self, stream_id: str, events: list[NewEvent], expected: int, payloads: list[Any]) -> AppendResult:
        """Defer an append; raises ``VersionConflict`` when it does not follow the stream's earlier ones."""
        before = self.appends.get(stream_id)
        if before is not None:
            first, queued = before
            if expected != first + len(queued):
                raise errors.VersionConflict(stream_id, expected, first + len(queued))
            queued.extend(events)
        else:
            self.appends[stream_id] = (expected, list(events))
        now = dt.datetime.now(dt.UTC)
        stand_ins = self.pending.setdefault(stream_id, [])
        for offset, (event, payload) in enumerate(zip(events, payloads, strict=True), start=1):
            assert event.event_id is not None
            stand_ins.append(RecordedEvent(
                event_id=event.event_id, stream_id=stream_id, version=expected + offset, global_position=0,
                position=Position.START, event_type="", event=payload, data=b"", metadata={}, recorded_at=now))
        return AppendResult(stream_id, expected + 1, expected + len(events), ())

    async def flush(self, conn: db.Conn, reactor: str, store: EventStore) -> None:
        if self.appends:
            await store.append_batch([(s, events, expected) for s, (expected, events) in self.appends.items()],
                                     conn=conn, savepoint=False)
        scheduled = [(key, *row) for key, row in self.deadlines.items() if row is not None]
        cancelled = [key for key, row in self.deadlines.items() if row is None]
        if cancelled:
            await conn.execute(SQL["cancel_many"], reactor, cancelled)
        if scheduled:
            columns = list(zip(*scheduled, strict=True))
            await conn.execute(SQL["schedule_many"], reactor, *(list(c) for c in columns))


class Effects:
    """What a reactor's handler may do, every bit of it in the transaction that moves its checkpoint (or, for a
    deadline, the one that deletes it)."""

    def __init__(self, reactor: Reactor, store: EventStore, conn: db.Conn, cause_id: uuid.UUID,
                 correlation_id: str | None, partitions: int, batch: _Batch | None = None) -> None:
        self.reactor, self.store, self.conn, self.batch = reactor, store, conn, batch
        self.cause_id, self.correlation_id, self.partitions = cause_id, correlation_id, partitions
        self._index = 0
        self.streams: list[str] = []  # follow-up streams, in the order first written
        self.outcome = Outcome()

    async def append(self, stream_id: str, events: Sequence[Any], expected_version: int) -> AppendResult:
        """Append follow-ups after ``expected_version`` (raises ``VersionConflict``, which runs the handler
        again on fresh loads). Ids and metadata as in the module doc."""
        new = []
        for event in events:
            payload = event.payload if isinstance(event, NewEvent) else event
            metadata = event.metadata if isinstance(event, NewEvent) else None
            new.append(NewEvent(payload, follow_up_id(self.reactor.name, self.cause_id, self._index), metadata))
            self._index += 1
        if stream_id not in self.streams:
            self.streams.append(stream_id)
        if self.batch is not None:  # appended with the batch's others at its end (no positions until then)
            ids = {correlation_ids.CAUSATION_ID: str(self.cause_id)}
            if self.correlation_id is not None:
                ids[correlation_ids.CORRELATION_ID] = self.correlation_id
            tagged = [NewEvent(e.payload, e.event_id, {**(e.metadata or {}), **ids}) for e in new]
            result = self.batch.append(stream_id, tagged, expected_version, [e.payload for e in new])
            self.outcome.follow_ups += len(new)
            return result
        result = await self.store.append(stream_id, new, expected_version, conn=self.conn,
                                         correlation_id=self.correlation_id, causation_id=str(self.cause_id))
        self.outcome.follow_ups += len(new)
        return result

    def repository(self, factory: type[Any]) -> Repository[Any]:
        """A repository of ``factory`` aggregates inside this transaction (its appends are follow-ups)."""
        return Repository(_InTransaction(self), factory, max_attempts=CONFLICT_ATTEMPTS, max_wait=0.05)

    async def execute(self, stream_id: str, factory: type[Any], command: Command[Any]) -> Executed[Any]:
        """Run ``command`` on the aggregate of ``stream_id`` (load, decide, append; conflicts reload). A
        ``DomainError`` it raises is a refusal: recorded by the reactor, which moves on."""
        if stream_id not in self.streams:
            self.streams.append(stream_id)
        if self.batch is None:
            return await self.repository(factory).execute(stream_id, command)
        # A batch run as one piece: any conflict reruns it cause by cause, so no retry loop here.
        aggregate = factory.from_events(await _InTransaction(self).load(stream_id))
        new = list(command(aggregate))
        if not new:
            return Executed(aggregate, None, 1)
        result = await self.append(stream_id, new, aggregate.version)
        for event in new:
            aggregate.apply(event.payload if isinstance(event, NewEvent) else event)
        aggregate.version = result.last_version
        return Executed(aggregate, result, 1)

    async def schedule(self, at: dt.datetime, key: str, payload: Any = None) -> None:
        """Schedule the reactor's ``on_deadline`` for ``at`` under ``key`` (scheduling a key again moves it).
        ``payload``: any value the store's codec encodes (maps, scalars, registered classes)."""
        if at.tzinfo is None:
            raise errors.InvalidInput("a deadline's time must be timezone-aware")
        row = (partition_of(key, self.partitions), at, deadline_id(self.reactor.name, key, self.cause_id, at),
               codec.packb(payload), self.correlation_id, self.cause_id)
        if self.batch is not None:
            self.batch.deadlines[key] = row
            return
        await self.conn.execute(SQL["schedule"], self.reactor.name, key, *row)

    async def cancel(self, key: str) -> None:
        """Cancel the deadline of ``key``, if one is pending (a fired one is gone already)."""
        if self.batch is not None:
            self.batch.deadlines[key] = None
            return
        await self.conn.execute(SQL["cancel"], self.reactor.name, key)


class Reactor(Projection):
    """Base class of reactors: handlers ``async def h(self, fx: Effects, event: RecordedEvent)``, and
    ``on_deadline`` for the deadlines they schedule. State tables are optional."""

    tables: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if cls.personal:  # the default erasure runs SQL on a connection; a reactor's handlers get Effects
            raise TypeError(f"{cls.__name__}: a reactor cannot declare personal columns; erase its state tables "
                            f"in a @handles(SubjectForgotten) handler of its own (fx.conn)")
        super().__init_subclass__(**kwargs)

    #: Read the histories of a batch's streams in one query for the repository's loads (a reactor that acts
    #: on other streams than its events', or on long streams, may turn it off).
    prefetch: ClassVar[bool] = True
    ddl: ClassVar[LiteralString] = "SELECT 1"  # no state tables unless a reactor declares them

    def __init__(self) -> None:
        self._store: EventStore | None = None
        self._partitions = 0

    kind: ClassVar[str] = "reactor"
    replayable: ClassVar[bool] = False
    appends: ClassVar[bool] = True
    fires_deadlines: ClassVar[bool] = True

    async def attach(self, store: EventStore, runtime: Runtime | None) -> None:
        """Bound to the store its follow-ups go to."""
        self.bind(store, await store.partitions())

    def bind(self, store: EventStore, partitions: int) -> None:
        """The store the follow-ups go to (the worker's, with P of its schema)."""
        self._store, self._partitions = store, partitions

    async def apply(self, conn: db.Conn, event: RecordedEvent) -> None:
        handler = self._handlers.get(type(event.event))
        if handler is None:
            return
        react: Callable[[Any, Effects, RecordedEvent], Awaitable[None]] = handler  # type: ignore[assignment]
        await self._run(conn, event.event_id, _correlation(event), lambda fx: react(self, fx, event))

    async def apply_batch(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> None:
        """The batch as one piece (the module doc's "Speed"): any error makes the worker run it again event
        by event through ``apply``."""
        react = [e for e in events if type(e.event) in self._handlers]
        if not react:
            return
        batch = _Batch(await self._histories(conn, events) if self.prefetch else {})

        def cause(event: RecordedEvent) -> _Cause:
            handler: Callable[[Any, Effects, RecordedEvent], Awaitable[None]] = (
                self._handlers[type(event.event)])  # type: ignore[assignment]
            return event.event_id, _correlation(event), lambda fx: handler(self, fx, event)

        await self._run_as_one(conn, batch, [cause(e) for e in react])

    async def _histories(self, conn: db.Conn, events: Sequence[RecordedEvent]) -> dict[str, list[RecordedEvent]]:
        """The histories of the batch's streams: a stream whose events here start at version 0 without a gap is
        its own history (a later event of it in the store makes the append conflict, and the batch rerun); the
        others are read in one query."""
        store = self._bound()
        by_stream: dict[str, list[RecordedEvent]] = {}
        for event in events:
            by_stream.setdefault(event.stream_id, []).append(event)
        histories = {sid: evs for sid, evs in by_stream.items()
                     if [e.version for e in evs] == list(range(len(evs)))}
        missing = sorted(by_stream.keys() - histories.keys())
        if missing:
            histories.update(await store.load_streams(missing, conn=conn))
        return histories

    async def fire(self, conn: db.Conn, deadline: Deadline) -> None:
        """Run ``on_deadline`` for a due deadline inside the transaction that deletes it (in a savepoint)."""
        await self._run(conn, deadline.deadline_id, deadline.correlation_id, lambda fx: self.on_deadline(fx, deadline))

    async def fire_all(self, conn: db.Conn, deadlines: Sequence[Deadline]) -> None:
        """Run ``on_deadline`` for several due deadlines as one piece (no savepoints, their keys' streams read
        in one query, appends and schedules written at the end): the caller reruns them one by one with
        ``fire`` on any error."""
        batch = _Batch(await self._bound().load_streams(sorted({d.key for d in deadlines}), conn=conn)
                       if self.prefetch and all(_is_stream_id(d.key) for d in deadlines) else {})

        def cause(deadline: Deadline) -> _Cause:
            return deadline.deadline_id, deadline.correlation_id, lambda fx: self.on_deadline(fx, deadline)

        await self._run_as_one(conn, batch, [cause(d) for d in deadlines])

    async def _run_as_one(self, conn: db.Conn, batch: _Batch, causes: Sequence[_Cause]) -> None:
        """Run the causes' handlers on one batch, without savepoints, then write what they deferred."""
        store = self._bound()
        for cause_id, correlation_id, body in causes:
            fx = Effects(self, store, conn, cause_id, correlation_id, self._partitions, batch)
            _record(cause_id, fx.outcome)
            await body(fx)
        await batch.flush(conn, self.name, store)

    def _bound(self) -> EventStore:
        if self._store is None:
            raise errors.ConfigError(f"reactor {self.name} is not bound to a store (Reactor.bind)")
        return self._store

    async def on_deadline(self, fx: Effects, deadline: Deadline) -> None:
        """What a due deadline does; a reactor that schedules deadlines overrides it."""
        raise NotImplementedError(f"reactor {self.name} scheduled a deadline but has no on_deadline")

    async def _run(self, conn: db.Conn, cause_id: uuid.UUID, correlation_id: str | None,
                   body: Callable[[Effects], Awaitable[None]]) -> None:
        store = self._bound()
        conflicts = 0
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            fx = Effects(self, store, conn, cause_id, correlation_id, self._partitions)
            fx.outcome.conflicts = conflicts
            _record(cause_id, fx.outcome)
            try:
                async with conn.transaction():  # a savepoint: a conflict or refusal undoes this cause only
                    await body(fx)
                return
            except errors.VersionConflict:
                conflicts += 1
                if attempt == CONFLICT_ATTEMPTS:
                    raise
            except errors.DomainError as refused:
                await conn.execute(SQL["refused"], self.name, cause_id, fx.streams[0] if fx.streams else "",
                                   f"{type(refused).__name__}: {refused}")
                fx.outcome = Outcome(refusals=1, conflicts=conflicts)
                _record(cause_id, fx.outcome)
                return
