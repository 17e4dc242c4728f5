"""``eventfleet status [--json]``: per projection state, applied, lag, parked failures, queue depth; per reactor its
deadlines (pending, the next due, fired) and refusals; the outbox.

Lag comes from ``workers.lag.measure``, the function behind the lag gauges, so the figures equal the
metrics. Queue depth is the sum of the ready message counts of the projection's P partition queues, by
passive declares (``None`` when none of them exists yet or RabbitMQ is unreachable; the rest is still
reported).

A projection run by a worker group (``EVENTFLEET_GROUP``) has no partition queues of its own: the group's P
queues feed every read model of the group, so its queue depth is theirs. Which group runs a projection is
recorded by no row of its own; it is read from the registered workers (``projection_groups`` in ops.sql: the
``group:<name>`` lease name a worker registered, joined with the read models its code registered). The groups
known are this process's ``EVENTFLEET_GROUP`` and those whose partitions were leased. A projection without
queues of its own whose group no registered worker tells shows the sum of every group whose queues exist
(``ProjectionStatus.queue_groups`` names them).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aio_pika.abc import AbstractConnection

from projections import registry
from projections.publication import Publication
from store import clock, db, errors, outbox, queries
from store import names as store_names
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
    #: The worker group whose registered workers run it (``EVENTFLEET_GROUP``; see the module doc); None: no
    #: registered worker of a group runs it, or workers of several groups do.
    group: str | None = None
    #: The worker groups whose queues feed it, ``queue_depth`` being their ready messages together: its group's,
    #: or, when no registered worker tells its group, every group whose queues exist; empty: its own partition
    #: queues (or none).
    queue_groups: tuple[str, ...] = ()

    @property
    def types_pending(self) -> bool:
        return self.types_added is None or bool(self.types_added)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "state": self.state, "applied": self.applied, "lag_events": self.lag_events,
                "lag_seconds": round(self.lag_seconds, 3), "parked": self.parked, "halted": self.halted,
                "queue_depth": self.queue_depth, "handled": _names_json(self.handled),
                "types_pending": self.types_pending,
                "types_added": _names_json(self.types_added) if self.types_pending else [],
                "in_code": self.in_code, "group": self.group, "queue_groups": list(self.queue_groups)}


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
    """What a deployment's topology costs its RabbitMQ node: a quorum queue per partition of every worker group
    and of every projection outside a group, and a dead-letter queue per projection. RabbitMQ has no AMQP way to
    tell its own limit, so this is compared with the Debian default's."""

    projections: int
    partitions: int
    #: The worker groups whose queues exist (``EVENTFLEET_GROUP``), and how many of the projections they feed:
    #: those have no partition queues of their own.
    groups: int = 0
    grouped: int = 0

    @property
    def quorum_queues(self) -> int:
        return (self.groups + self.projections - self.grouped) * self.partitions + self.projections

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
        if self.groups or self.grouped:
            outside = self.projections - self.grouped
            arithmetic = (f"{_count(self.groups, 'worker group')} x {self.partitions} partitions + "
                          f"{_count(self.projections, 'projection')} x 1 DLQ + "
                          f"{_count(outside, 'projection')} outside a group x {self.partitions} partitions")
        else:
            arithmetic = f"{self.projections} projections x ({self.partitions} partitions + 1 DLQ)"
        return (f"this deployment declares {self.quorum_queues:,} quorum queues ({arithmetic}), "
                f"~{self.file_handles:,} file handles of the broker; a node with the Debian default of 1,024 "
                f"descriptors has ~{DEFAULT_NODE_HANDLES:,}")

    def to_json(self) -> dict[str, Any]:
        return {"quorum_queues": self.quorum_queues, "file_handles": self.file_handles,
                "default_node_handles": DEFAULT_NODE_HANDLES, "warning": self.warning}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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
    #: The worker groups whose queues exist (every known one when RabbitMQ is unreachable).
    groups: tuple[str, ...] = ()

    @property
    def broker(self) -> BrokerNeeds:
        """What the deployment's queues cost its RabbitMQ node."""
        return BrokerNeeds(len(self.projections), self.partitions, len(self.groups),
                           sum(1 for p in self.projections if p.queue_groups))

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
                "broker": self.broker.to_json(),
                "groups": list(self.groups)}


async def projection_names(pool: db.Pool) -> list[str]:
    """Registered projections and any other with a status row or recorded types, sorted."""
    async with db.translate_errors():
        rows = await pool.fetch(SQL["known_projections"])
    return sorted(set(registry.load()) | {r["projection"] for r in rows})


@dataclasses.dataclass(frozen=True, slots=True)
class Queues:
    """What ``queue_depths`` found of the deployment's partition queues."""

    #: Per projection, the messages ready in the queues that feed it (None: none exists, or RabbitMQ is unreachable).
    depths: dict[str, int | None]
    #: Per projection, the worker groups whose queues feed it (``ProjectionStatus.queue_groups``).
    fed_by: dict[str, tuple[str, ...]]
    #: The worker groups whose queues exist (every one known when RabbitMQ is unreachable).
    groups: tuple[str, ...]


async def _ready(connection: AbstractConnection, queues: Iterable[str]) -> int | None:
    """Messages ready in these queues together, by passive declare; None when none of them exists."""
    total: int | None = None
    for queue in queues:
        declared = await broker.passive_queue(connection, queue)
        if declared is not None:
            total = (total or 0) + (declared.message_count or 0)
    return total


async def queue_depths(connection: AbstractConnection | None, prefix: str, projections: Sequence[str],
                       partitions: int, *, groups: Iterable[str] = (),
                       group_of: Mapping[str, tuple[str, ...]] | None = None) -> Queues:
    """Messages ready in each projection's partition queues, summed, by passive declare; for a projection with
    none of its own, those of the worker groups that feed it: its groups in ``group_of`` (as the registered
    workers tell), else every group of ``groups`` and ``group_of`` whose queues exist (see the module doc). None
    where no queue feeding it exists (or RabbitMQ is unreachable)."""
    group_of = group_of or {}
    known = sorted(g for g in {*groups, *(g for gs in group_of.values() for g in gs)} if _is_group(g))
    if connection is None:
        return Queues(dict.fromkeys(projections), {p: tuple(group_of.get(p, ())) for p in projections},
                      tuple(known))
    n = broker.Names(prefix)
    group_depths = {g: await _ready(connection, (n.group_queue(g, i) for i in range(partitions))) for g in known}
    existing = tuple(g for g in known if group_depths[g] is not None)
    depths: dict[str, int | None] = {}
    fed_by: dict[str, tuple[str, ...]] = {}
    for projection in projections:
        own = await _ready(connection, (n.partition_queue(projection, i) for i in range(partitions)))
        feeding = () if own is not None else tuple(g for g in group_of.get(projection, existing) if g in existing)
        depths[projection] = sum(group_depths[g] or 0 for g in feeding) if feeding else own
        fed_by[projection] = feeding
    return Queues(depths, fed_by, existing)


def _is_group(name: str) -> bool:
    """Whether a group name read from the leases can name queues (``broker.group_lease`` wrote it validated)."""
    try:
        store_names.identifier(name, what="worker group")
    except errors.InvalidName:
        return False
    return True


async def known_groups(pool: db.Pool) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """The worker groups whose partitions were leased, and per projection the groups whose registered workers run
    it (see the module doc)."""
    leased = await leases.groups(pool)
    async with db.translate_errors():
        rows = await pool.fetch(SQL["projection_groups"])
    group_of: dict[str, tuple[str, ...]] = {}
    for row in rows:
        group_of[row["projection"]] = (*group_of.get(row["projection"], ()), row["grp"])
    return leased, group_of


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
                  lease_seconds: float = leases.DEFAULT_LEASE_SECONDS, group: str | None = None) -> Report:
    """Measure everything the report shows; a store whose clock is behind the ids it holds is refused (its lag
    would read 0 while every new event waits: see store/clock.py). ``lease_seconds``: a worker silent longer
    is not counted among those whose code runs a read model. ``group``: this process's worker group
    (``EVENTFLEET_GROUP``), known even before any of its workers leased a partition."""
    async with pool.acquire() as conn:
        if (await clock.read(conn, schema)).behind:
            raise errors.ClockBehind()
    names = await projection_names(pool)
    partitions = await schema_partitions(pool)
    leased, group_of = await known_groups(pool)
    queues = await queue_depths(connection, prefix, names, partitions,
                                groups=[*leased, *([] if group is None else [group])], group_of=group_of)
    live = [lease for lease in await leases.owners(pool) if lease.live]
    owners = {(lease.projection, lease.partition): lease.owner for lease in live}
    holds = {(lease.projection, lease.partition): lease.held for lease in live}
    rows: list[ProjectionStatus] = []
    partition_lags: list[PartitionStatus] = []
    types = await typebook.recorded(pool, lease_seconds)
    for name in names:
        measured = await lag.measure(pool, name)
        runs = group_of.get(name, ())
        group_of_name = runs[0] if len(runs) == 1 else None
        # A projection of a group: its partitions are held under the group's lease.
        lease = name if group_of_name is None else broker.group_lease(group_of_name)
        partition_lags += [PartitionStatus(name, n, owners.get((name, n)) or owners.get((lease, n)),
                                           measured.partitions.get(n, 0), holds.get((name, n)) or holds.get((lease, n)))
                           for n in range(partitions)]
        async with db.translate_errors():
            row = await pool.fetchrow(SQL["projection_summary"], name)
            assert row is not None
            running = False
            if row["state"] != "live":
                running = await locks.is_held(pool, locks.rebuild(schema, name))
        rows.append(ProjectionStatus(name, row["state"], row["applied"], measured.lag_events, measured.lag_seconds,
                                     row["parked"], queues.depths[name], row["halted"], bool(running),
                                     *types_of(name, types.get(name)), kind_of(name), group_of_name,
                                     queues.fed_by[name]))
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
                  publications, queues.groups)
