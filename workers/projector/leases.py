"""Leased ownership of partitions: each live worker holds its fair share of every projection it runs.

A worker registers in ``workers`` with a heartbeat and, every tick, in one transaction under the schema's
lease lock: renews its registration and its leases, counts the live workers of each of its projections,
computes its share (P // n, one more for the first P % n in start order: the shares add up to P and differ
by at most one), and claims free partitions (never leased, released, or expired) up to it. A worker over
its share is told which partitions to give up (``Tick.surplus``): it stops their consumers after the batch
in flight, then ``release``s them, and the others claim them on their next tick. On SIGTERM ``leave``
frees everything at once; a killed worker's leases expire after ``lease_seconds``.

Workers started together (a deployment, the demo) register a moment apart. A keeper made with
``wait_for_peers`` (the worker's) claims nothing on its first ticks until the live workers of a projection are
the same two ticks running (at most for a lease period): each then claims its share of the free partitions
once, instead of the first one claiming all of them and handing most back partition by partition while the
load is already flowing (each handover stops a consumer after its batch, returns its buffered deliveries to
the queue, and waits for the new owner's next tick).

Exactly-once never depends on a lease. A worker that lost one (a pause longer than the lease) may still
be applying a batch while the new owner starts; the per-stream checkpoints in both transactions decide,
so the overlap costs duplicates, never a double effect. RabbitMQ's single active consumer per partition
queue keeps even that to the batch in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence

from store import db, errors, names
from store.queries import load
from workers import locks

logger = logging.getLogger(__name__)

SQL = load("workers", "leases.sql")

#: How long a lease lives without renewal (EVENTFLEET_LEASE_SECONDS).
DEFAULT_LEASE_SECONDS = 15.0
#: Ticks per lease: a lease is renewed this many times before it could expire.
TICKS_PER_LEASE = 6
#: The tick while the shares are not yet dealt (a worker waits for partitions, or gave some up).
REBALANCE_TICK_SECONDS = 0.5


def fair_share(partitions: int, workers: int, index: int) -> int:
    """The share of the worker at ``index`` (in start order) among ``workers``: they add up to ``partitions``."""
    base, extra = divmod(partitions, workers)
    return base + (1 if index < extra else 0)


def worker_id() -> str:
    """A name unique to this process: host, pid and a random part (pids repeat across containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass(slots=True)
class Tick:
    """What one tick decided, per projection: partitions newly acquired, partitions to give up (over the
    share), partitions lost (the lease expired before renewal), and whether the shares are settled."""

    acquired: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    surplus: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    lost: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    settled: bool = True


class LeaseKeeper:
    """One worker process's registration and leases (``tick`` every ``interval`` seconds)."""

    def __init__(self, pool: db.Pool, schema: str, projections: Sequence[str], partitions: int, *,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, worker: str | None = None,
                 wait_for_peers: bool = False) -> None:
        self.pool, self.schema, self.partitions = pool, schema, partitions
        self.projections = list(projections)
        self.lease_seconds = lease_seconds
        self.worker_id = worker or worker_id()
        #: The partitions this worker holds now, per projection (as of the last tick).
        self.held: dict[str, set[int]] = {p: set() for p in self.projections}
        #: Projections whose first claim waits for the live workers to stay the same over a tick (see the
        #: module doc), with the live workers each saw at the last tick; and when the first tick was.
        self._joining: dict[str, tuple[str, ...] | None] = (
            dict.fromkeys(self.projections) if wait_for_peers else {})
        self._first_tick: float | None = None

    @property
    def interval(self) -> float:
        return self.lease_seconds / TICKS_PER_LEASE

    async def tick(self) -> Tick:
        """Heartbeat, renew, and claim up to the fair share; see the module doc."""
        result = Tick()
        now = time.monotonic()
        if self._first_tick is None:
            self._first_tick = now
        async with db.translate_errors(), self.pool.acquire() as conn, conn.transaction():
            await locks.take(conn, locks.leases(self.schema))
            await conn.execute(SQL["heartbeat"], self.worker_id, self.projections, self.lease_seconds)
            await conn.execute(SQL["forget_dead"], self.lease_seconds)
            for projection in self.projections:
                live = [r["worker_id"] for r in await conn.fetch(SQL["live_workers"], projection)]
                share = fair_share(self.partitions, len(live), live.index(self.worker_id))
                renewed = {r["partition"] for r in await conn.fetch(
                    SQL["renew"], self.worker_id, projection, self.lease_seconds)}
                before = self.held[projection]
                if lost := sorted(before - renewed):
                    result.lost[projection] = lost
                acquired: list[int] = []
                if self._still_joining(projection, tuple(live), now):
                    result.settled = False  # peers are still registering: claim with them next tick
                elif len(renewed) < share:
                    rows = await conn.fetch(SQL["claim"], self.worker_id, projection, self.lease_seconds,
                                            share - len(renewed), self.partitions)
                    acquired = sorted(r["partition"] for r in rows)
                    if len(renewed) + len(acquired) < share:
                        result.settled = False  # others still hold our share: they give it up soon
                elif len(renewed) > share:
                    # Give up the newest-numbered first: any choice is fair, a stable one moves less.
                    result.surplus[projection] = sorted(renewed)[share:]
                    result.settled = False
                if acquired:
                    result.acquired[projection] = acquired
                self.held[projection] = renewed | set(acquired)
        for projection, partitions in result.lost.items():
            logger.warning("leases lost (expired before renewal)", extra={
                "worker": self.worker_id, "projection": projection, "partitions": partitions})
        return result

    def _still_joining(self, projection: str, live: tuple[str, ...], now: float) -> bool:
        """Whether the first claim of ``projection`` waits: the live workers changed since the last tick (or
        this is the first), within a lease period of the first tick."""
        if projection not in self._joining:
            return False
        assert self._first_tick is not None
        if self._joining[projection] == live or now - self._first_tick >= self.lease_seconds:
            del self._joining[projection]
            return False
        self._joining[projection] = live
        return True

    async def release(self, projection: str, partitions: Sequence[int]) -> None:
        """Give up leases (their consumers have stopped): free for the other workers at once."""
        async with db.translate_errors():
            await self.pool.execute(SQL["release"], self.worker_id, projection, list(partitions))
        self.held[projection] -= set(partitions)

    async def note_hold(self, projection: str, partition: int, reason: str) -> None:
        """Record why this worker holds a partition still (``status`` shows it until the lease changes hands)."""
        async with db.translate_errors():
            await self.pool.execute(SQL["hold"], self.worker_id, projection, partition, reason)

    async def leave(self) -> None:
        """Free every lease and end the registration (a graceful stop, after the consumers stopped)."""
        async with db.translate_errors():
            await self.pool.execute(SQL["release_all"], self.worker_id)
        self.held = {p: set() for p in self.projections}


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """One lease as ``status`` shows it."""

    projection: str
    partition: int
    owner: str | None
    live: bool
    generation: int
    expires_in_seconds: float
    held: str | None = None


async def owners(conn: db.Conn | db.Pool) -> list[Lease]:
    """Every lease of the schema with its owner."""
    async with db.translate_errors():
        rows = await conn.fetch(SQL["owners"])
    return [Lease(r["projection"], r["partition"], r["owner"], r["live"], r["generation"],
                  r["expires_in_seconds"], r["held"]) for r in rows]


async def groups(conn: db.Conn | db.Pool) -> list[str]:
    """The worker groups whose partitions were leased (``EVENTFLEET_GROUP``), those whose names can name queues."""
    async with db.translate_errors():
        rows = await conn.fetch(SQL["groups"])
    found = []
    for row in rows:
        try:
            found.append(names.identifier(row["grp"], what="worker group"))
        except errors.InvalidName:  # not a name broker.group_lease wrote
            continue
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class Registration:
    """One registered worker as ``status`` shows it."""

    worker_id: str
    projections: tuple[str, ...]
    heartbeat_age_seconds: float
    live: bool


async def registered(conn: db.Conn | db.Pool) -> list[Registration]:
    """Every registered worker, oldest first."""
    async with db.translate_errors():
        rows = await conn.fetch(SQL["registered"])
    return [Registration(r["worker_id"], tuple(r["projections"]), r["heartbeat_age_seconds"], r["live"])
            for r in rows]
