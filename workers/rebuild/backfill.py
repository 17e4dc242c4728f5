"""New projections: backfilled from the store with the rebuild's machinery before they go live.

The events published before a projection's queue existed never reach it, so they must come from the
store. A projection is registered by ``eventfleet migrate`` (the deploy step before relays and workers
start): it gets a status row, ``backfilling`` over a non-empty store, else ``live``. A worker that also
finds a projection with no status row and no queue yet (migrated by older code) claims it the same way
before its consumers can create that row. The worker then declares the queue, so every event published
from then on is delivered, and rebuilds into a shadow alongside the consumers; the swap reconciles both
(see ``workers.rebuild``) and sets the state ``live``. A stopped or killed backfill stays ``backfilling``
and the next worker to start resumes it; concurrent workers leave it to the one holding the rebuild lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from aio_pika.abc import AbstractConnection

from projections import registry
from projections.base import Projection
from store import db
from store.event_store import EventStore
from store.queries import load
from workers import broker, errors, rebuild
from workers.rebuild import reader, typechange
from workers.runtime import retry

logger = logging.getLogger(__name__)

SQL = load("workers", "backfill.sql")


async def register(conn: db.Conn | db.Pool, projections: Sequence[str]) -> list[str]:
    """Give each projection without a status row one (see the module doc); return those to backfill."""
    # Reactors and publications (not replayable) are live at once: they work the history off through their
    # queues and catch-up.
    live = [p for p in projections if isinstance(cls := registry.REGISTRY.get(p), type) and not cls.replayable]
    async with db.translate_errors():
        rows = await conn.fetch(SQL["register_projections"], list(projections), live)
    new = [r["projection"] for r in rows if r["state"] == "backfilling"]
    if new:
        logger.info("new projections will be backfilled by the workers", extra={"projections": new})
    return new


async def claim(pool: db.Pool, projection: str, *, queue_exists: bool) -> bool:
    """Whether the projection needs a backfill (or one is under way), claiming it if it is new."""
    async with db.translate_errors():
        state: str | None = await pool.fetchval(SQL["projection_state"], projection)
        if state is None and not queue_exists:
            await register(pool, [projection])
            state = await pool.fetchval(SQL["projection_state"], projection)
    return state == "backfilling"


async def backfill_if_new(pool: db.Pool, store: EventStore, projection: type[Projection], *,
                          queue_exists: bool = False, progress: rebuild.Progress | None = None,
                          batch_bytes: int = reader.READ_BYTES) -> rebuild.RebuildResult | None:
    """Backfill a projection seen for the first time, or finish a stopped backfill.

    Over an empty store the projection simply goes live. Returns None when there was nothing to do or
    another process is backfilling it now.
    """
    if not await claim(pool, projection.name, queue_exists=queue_exists):
        return None
    try:
        return await rebuild.rebuild(pool, store, projection, state="backfilling", progress=progress,
                                     batch_bytes=batch_bytes)
    except errors.RebuildRunning:
        return None


async def _queue_exists(connection: AbstractConnection, queue: str) -> bool:
    return await broker.passive_queue(connection, queue) is not None


async def claim_backfills(store: EventStore, connection: AbstractConnection, prefix: str,
                          projections: Sequence[Projection], partitions: int, *, group: str | None = None
                          ) -> list[Projection]:
    """The worker's start-up check: claim the new projections, then declare their queues (with ``group``, the
    worker group's, which feed them from now on); return them. A projection consumed before has its status row,
    or from before status rows its partition queues (or, from before partitions, a queue of its own)."""
    names, claimed = broker.Names(prefix), []
    for projection in projections:
        exists = (await _queue_exists(connection, names.partition_queue(projection.name, 0))
                  or await _queue_exists(connection, names.queue(projection.name)))
        if await claim(store.pool, projection.name, queue_exists=exists):
            claimed.append(projection)
    if claimed:
        channel = await connection.channel()
        async with channel:
            if group is None:
                await broker.declare_partitions(channel, names, [p.name for p in claimed], partitions)
            else:
                await broker.declare_group(channel, names, group, [p.name for p in claimed], partitions)
    return claimed


async def run_backfills(store: EventStore, projections: Sequence[Projection], stop: asyncio.Event, *,
                        batch_bytes: int = reader.READ_BYTES) -> None:
    """Backfill the claimed projections one by one, through database outages, until done or ``stop``; each
    read of the store is at most ``batch_bytes`` of events (the event reaching it included)."""
    work = asyncio.ensure_future(_backfill_all(store, projections, batch_bytes))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _backfill_all(store: EventStore, projections: Sequence[Projection], batch_bytes: int) -> None:
    for projection in projections:
        try:
            async for attempt in retry.retry_forever():
                with attempt:
                    result = await backfill_if_new(store.pool, store, type(projection), queue_exists=True,
                                                   batch_bytes=batch_bytes)
            if result is not None:
                logger.info("projection backfilled", extra={
                    "projection": projection.name, "events": result.events, "seconds": round(result.seconds, 3)})
        except Exception:
            # A broken backfill must not stop the live consumers; it stays 'backfilling' for the next start.
            logger.exception("backfill failed", extra={"projection": projection.name})


class Backfills:
    """The rebuild room's jobs a worker runs (``workers.projector.worker.Backfills``): ``claim_backfills``, then
    ``run_backfills`` beside the consumers; and the read models' types (``typechange``: recorded at start, a
    read model whose code adds types rebuilt)."""

    async def claim(self, store: EventStore, connection: AbstractConnection, prefix: str,
                    projections: Sequence[Projection], partitions: int, *, group: str | None = None
                    ) -> list[Projection]:
        return await claim_backfills(store, connection, prefix, projections, partitions, group=group)

    async def run(self, store: EventStore, projections: Sequence[Projection], stop: asyncio.Event, *,
                  batch_bytes: int) -> None:
        await run_backfills(store, projections, stop, batch_bytes=batch_bytes)

    async def register_types(self, pool: db.Pool, worker: str, projections: Sequence[Projection]) -> object:
        return await typechange.register(pool, worker, projections)

    async def watch_types(self, store: EventStore, worker: str, projections: Sequence[type[Projection]], *,
                          lease_seconds: float, batch_bytes: int) -> None:
        await typechange.watch(store, worker, projections, lease_seconds=lease_seconds, batch_bytes=batch_bytes)
