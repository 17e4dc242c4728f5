"""``eventfleet status [--json]``: per projection state, applied, lag, parked failures, queue depth; per reactor its
deadlines (pending, the next due, fired) and refusals; the outbox.

Lag comes from ``workers.lag.measure``, the function behind the lag gauges, so the figures equal the
metrics. Queue depth is the sum of the ready message counts of the projection's P partition queues, by
passive declares (``None`` when none of them exists yet or RabbitMQ is unreachable; the rest is still
reported).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from aio_pika.abc import AbstractConnection

from projections import registry
from projections.publication import Publication
from store import clock, db, errors, outbox, queries
from workers import broker, locks
from workers.projector import lag, leases
from workers.publication import outlet
from workers.rebuild import typebook

logger = logging.getLogger(__name__)

SQL = queries.load("workers", "ops.sql")
AMQP_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """One projection's row of the report; ``rebuild_running`` is for the table only (it qualifies the state)."""

    name: str
    state: str
    applied: int
    lag_events: int
    lag_seconds: float
    parked: int
    queue_depth: int | None
    halted: int = 0
    rebuild_running: bool = False
    #: The event types its tables and checkpoints were built with (None: every event).
    handled: typebook.Names = None
    #: The types the code of its live workers (or this process's) adds to those: a change waiting for a
    #: rebuild (workers/typebook.py); None: a code takes every event; empty: nothing pending.
    types_added: typebook.Names = frozenset()
    #: Whether this process's code or a live worker's runs it; False: removed from the code (``retire`` it).
    in_code: bool = True
    #: ``projection`` (a read model), ``reactor`` or ``publication``; ``projection`` for one this process did not
    #: load.
    kind: str = "projection"

    @property
    def types_pending(self) -> bool:
        return self.types_added is None or bool(self.types_added)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "state": self.state, "applied": self.applied, "lag_events": self.lag_events,
                "lag_seconds": round(self.lag_seconds, 3), "parked": self.parked, "halted": self.halted,
                "queue_depth": self.queue_depth, "handled": _names_json(self.handled),
                "types_pending": self.types_pending,
                "types_added": _names_json(self.types_added) if self.types_pending else [],
                "in_code": self.in_code}


def _names_json(names: typebook.Names) -> str | list[str]:
    return "all" if names is None else sorted(names)


@dataclasses.dataclass(frozen=True, slots=True)
class ReactorStatus:
    """One reactor's deadlines and refusals; ``next_due_seconds`` is negative when the next one is overdue."""

    name: str
    deadlines_pending: int
    next_due_at: dt.datetime | None
    next_due_seconds: float | None
    deadlines_fired: int
    refusals: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "deadlines_pending": self.deadlines_pending,
                "next_due_at": None if self.next_due_at is None else self.next_due_at.isoformat(),
                "next_due_seconds": None if self.next_due_seconds is None else round(self.next_due_seconds, 3),
                "deadlines_fired": self.deadlines_fired, "refusals": self.refusals}


@dataclasses.dataclass(frozen=True, slots=True)
class PublicationStatus:
    """One publication: the exchange it publishes to and the public types it may publish (its lag, parked
    events and queue depth are in its projection row)."""

    name: str
    exchange: str
    format: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "exchange": self.exchange, "format": self.format}


@dataclasses.dataclass(frozen=True, slots=True)
class PartitionStatus:
    """One partition of one projection: who holds its lease (None: nobody live), its lag, and why its owner
    holds it still (an event newer than the owner's code), if it does."""

    projection: str
    partition: int
    owner: str | None
    lag_events: int
    held: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"projection": self.projection, "partition": self.partition, "owner": self.owner,
                "lag_events": self.lag_events, "held": self.held}


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One registered worker and how many partitions of each projection it holds."""

    worker_id: str
    live: bool
    heartbeat_age_seconds: float
    held: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "live": self.live,
                "heartbeat_age_seconds": round(self.heartbeat_age_seconds, 3), "partitions": self.held}


#: File handles a quorum queue holds on its RabbitMQ node while it exists (measured on 3.10.8: 50 quorum queues
#: took a node from 3 to 153; docs/reference.md, "RabbitMQ versions and the broker's limits").
HANDLES_PER_QUORUM_QUEUE = 3
#: The file handles a node accounts for under the Debian default soft limit of 1,024 descriptors (RabbitMQ
#: keeps about a tenth back): past them it stops answering AMQP handshakes.
DEFAULT_NODE_HANDLES = 927


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerNeeds:
    """What a deployment's topology costs its RabbitMQ node: a quorum queue per partition of every projection,
    and a dead-letter queue each. RabbitMQ has no AMQP way to tell its own limit, so this is compared with the
    Debian default's."""

    projections: int
    partitions: int

    @property
    def quorum_queues(self) -> int:
        return self.projections * (self.partitions + 1)

    @property
    def file_handles(self) -> int:
        return self.quorum_queues * HANDLES_PER_QUORUM_QUEUE

    @property
    def warning(self) -> str | None:
        """Set when the deployment alone takes more than half of a default node's handles."""
        if self.file_handles * 2 <= DEFAULT_NODE_HANDLES:
            return None
        return (f"this deployment alone needs more than half of the file handles of a RabbitMQ node with the "
                f"default limit; past {DEFAULT_NODE_HANDLES:,} the node stops answering: raise its limit "
                "(docs/reference.md, \"RabbitMQ versions and the broker's limits\")")

    def describe(self) -> str:
        """The arithmetic, e.g. ``this deployment declares 170 quorum queues, ~510 file handles of the broker``."""
        return (f"this deployment declares {self.quorum_queues:,} quorum queues ({self.projections} projections x "
                f"({self.partitions} partitions + 1 DLQ)), ~{self.file_handles:,} file handles of the broker; a "
                f"node with the Debian default of 1,024 descriptors has ~{DEFAULT_NODE_HANDLES:,}")

    def to_json(self) -> dict[str, Any]:
        return {"quorum_queues": self.quorum_queues, "file_handles": self.file_handles,
                "default_node_handles": DEFAULT_NODE_HANDLES, "warning": self.warning}


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """What ``status`` prints."""

    projections: list[ProjectionStatus]
    outbox_pending: int
    outbox_oldest_age_seconds: float
    partitions: int = 0
    workers: list[WorkerStatus] = dataclasses.field(default_factory=list)
    #: Every partition of every projection, slowest (most lag) first.
    partition_lags: list[PartitionStatus] = dataclasses.field(default_factory=list)
    reactors: list[ReactorStatus] = dataclasses.field(default_factory=list)
    publications: list[PublicationStatus] = dataclasses.field(default_factory=list)

    @property
    def broker(self) -> BrokerNeeds:
        """What the deployment's queues cost its RabbitMQ node."""
        return BrokerNeeds(len(self.projections), self.partitions)

    def to_json(self) -> dict[str, Any]:
        """The contract's document."""
        return {"projections": [p.to_json() for p in self.projections],
                "outbox": {"pending": self.outbox_pending,
                           "oldest_age_seconds": round(self.outbox_oldest_age_seconds, 3)},
                "partitions": self.partitions,
                "workers": [w.to_json() for w in self.workers],
                "partition_lags": [p.to_json() for p in self.partition_lags],
                "reactors": [r.to_json() for r in self.reactors],
                "publications": [p.to_json() for p in self.publications],
                "broker": self.broker.to_json()}


async def projection_names(pool: db.Pool) -> list[str]:
    """Registered projections and any other with a status row or recorded types, sorted."""
    async with db.translate_errors():
        rows = await pool.fetch(SQL["known_projections"])
    return sorted(set(registry.load()) | {r["projection"] for r in rows})


async def queue_depths(connection: AbstractConnection | None, prefix: str, projections: Sequence[str],
                       partitions: int) -> dict[str, int | None]:
    """Messages ready in each projection's partition queues, summed, by passive declare; None where none
    of its queues exists (or RabbitMQ is unreachable)."""
    depths: dict[str, int | None] = dict.fromkeys(projections)
    if connection is None:
        return depths
    names = broker.Names(prefix)
    for projection in projections:
        for partition in range(partitions):
            declared = await broker.passive_queue(connection, names.partition_queue(projection, partition))
            if declared is not None:
                depths[projection] = (depths[projection] or 0) + (declared.message_count or 0)
    return depths


async def schema_partitions(pool: db.Pool) -> int:
    """P of the schema (0 if it records none yet: then no partition queue is asked about)."""
    async with db.translate_errors():
        count: int | None = await pool.fetchval(SQL["partitions"])
    return count or 0


async def reactor_status(pool: db.Pool, name: str) -> ReactorStatus:
    """One reactor's deadlines and refusals, from one snapshot."""
    async with db.translate_errors():
        row = await pool.fetchrow(SQL["reactor_summary"], name)
    assert row is not None
    return ReactorStatus(name, row["pending"], row["next_due_at"], row["next_due_seconds"], row["fired"],
                         row["refusals"])


def kind_of(name: str) -> str:
    """The kind of the subscriber of this name in the loaded code (``projection`` for one it does not know)."""
    cls = registry.REGISTRY.get(name)
    return cls.kind if isinstance(cls, type) else "projection"


def is_reactor(name: str) -> bool:
    """Whether the projection of this name is a reactor in the loaded code."""
    return kind_of(name) == "reactor"


def publication_status(name: str, prefix: str) -> PublicationStatus:
    """A loaded publication's exchange and format."""
    cls = registry.REGISTRY[name]
    assert issubclass(cls, Publication)
    return PublicationStatus(name, outlet.exchange_of(cls, prefix), cls.format)


def types_of(name: str, recorded: typebook.Recorded | None) -> tuple[typebook.Names, typebook.Names, bool]:
    """A read model's recorded types, the types its codes add (live workers' and this process's), and whether
    any of those codes runs it."""
    cls = registry.REGISTRY.get(name)
    codes = list(recorded.live_codes) if recorded is not None else []
    if cls is not None:
        codes.append(cls.handled_names())
    # Not registered since the types were first recorded: its code's, if known.
    code_built = cls.handled_names() if cls is not None else None
    built = recorded.handled if recorded is not None else code_built
    added: set[str] = set()
    for code in codes:
        if code is None and built is not None:
            return built, None, True
        if not typebook.covers(built, code):
            added |= (code or frozenset()) - (built or frozenset())
    return built, frozenset(added), bool(codes)


async def collect(pool: db.Pool, schema: str, prefix: str, connection: AbstractConnection | None, *,
                  lease_seconds: float = leases.DEFAULT_LEASE_SECONDS) -> Report:
    """Measure everything the report shows; a store whose clock is behind the ids it holds is refused (its lag
    would read 0 while every new event waits: see store/clock.py). ``lease_seconds``: a worker silent longer
    is not counted among those whose code runs a read model."""
    async with pool.acquire() as conn:
        if (await clock.read(conn, schema)).behind:
            raise errors.ClockBehind()
    names = await projection_names(pool)
    partitions = await schema_partitions(pool)
    depths = await queue_depths(connection, prefix, names, partitions)
    live = [lease for lease in await leases.owners(pool) if lease.live]
    owners = {(lease.projection, lease.partition): lease.owner for lease in live}
    holds = {(lease.projection, lease.partition): lease.held for lease in live}
    rows: list[ProjectionStatus] = []
    partition_lags: list[PartitionStatus] = []
    types = await typebook.recorded(pool, lease_seconds)
    for name in names:
        measured = await lag.measure(pool, name)
        partition_lags += [PartitionStatus(name, n, owners.get((name, n)), measured.partitions.get(n, 0),
                                           holds.get((name, n))) for n in range(partitions)]
        async with db.translate_errors():
            row = await pool.fetchrow(SQL["projection_summary"], name)
            assert row is not None
            running = False
            if row["state"] != "live":
                running = await locks.is_held(pool, locks.rebuild(schema, name))
        rows.append(ProjectionStatus(name, row["state"], row["applied"], measured.lag_events, measured.lag_seconds,
                                     row["parked"], depths[name], row["halted"], bool(running),
                                     *types_of(name, types.get(name)), kind_of(name)))
    held: dict[str, dict[str, int]] = {}
    for (projection, _), owner in owners.items():
        if owner is not None:
            counts = held.setdefault(owner, {})
            counts[projection] = counts.get(projection, 0) + 1
    workers = [WorkerStatus(r.worker_id, r.live, r.heartbeat_age_seconds, held.get(r.worker_id, {}))
               for r in await leases.registered(pool)]
    partition_lags.sort(key=lambda p: (p.held is None, -p.lag_events, p.projection, p.partition))
    reactors = [await reactor_status(pool, name) for name in names]
    # A reactor whose module this process did not load still shows by what it left behind.
    reactors = [r for r in reactors if is_reactor(r.name) or r.deadlines_pending or r.deadlines_fired or r.refusals]
    backlog = await outbox.backlog(pool)
    publications = [publication_status(name, prefix) for name in names if kind_of(name) == "publication"]
    return Report(rows, backlog.pending, backlog.oldest_age_seconds, partitions, workers, partition_lags, reactors,
                  publications)
