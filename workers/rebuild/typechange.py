"""A worker's side of read models whose types changed (the rule: ``workers/typebook.py``).

``register`` runs once as the worker starts, before it consumes: its code's types are recorded. ``watch`` runs
beside the consumers: every few seconds it says the worker still runs its read models, and for each read model
its code adds types to, once no worker of other code runs it, rebuilds it from the store (under the rebuild
lock: one worker does it, the others find it running and look again later) and records the code's types.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from projections.base import Projection
from store import db
from store.event_store import EventStore
from workers import errors
from workers.rebuild import reader, shadow, typebook
from workers.runtime import retry

logger = logging.getLogger(__name__)

#: Looks per lease: how often a worker says it runs its read models, and looks at the pending ones.
LOOKS_PER_LEASE = 3
#: The longest wait before trying again a rebuild that failed (doubling from a look's pause).
LONGEST_RETRY_SECONDS = 300.0


async def register(pool: db.Pool, worker: str, projections: Sequence[Projection]) -> list[type[Projection]]:
    """Record the types of the worker's read models and that it runs them; return those pending a rebuild."""
    async with pool.acquire() as conn:
        changes = await typebook.register(conn, [type(p) for p in projections], worker=worker)
    return [type(p) for p in projections if changes[p.name].pending]


async def settle_once(store: EventStore, projection: type[Projection], *, lease_seconds: float,
                      batch_bytes: int = reader.READ_BYTES) -> bool:
    """If no worker of other code runs ``projection``: rebuild it and record its code's types. Returns whether
    its types are recorded now (False: other code runs it, another process rebuilds it, or other code ran
    during the rebuild)."""
    code = typebook.code_of(projection)
    started = await typebook.since(store.pool, lease_seconds)
    if others := await typebook.other_code(store.pool, projection.name, code, started):
        logger.info("read model with new types waits for the workers of other code to stop", extra={
            "projection": projection.name, "workers": [str(o) for o in others]})
        return False
    try:
        result = await shadow.rebuild(store.pool, store, projection, batch_bytes=batch_bytes)
    except errors.RebuildRunning:
        return False
    logger.info("read model rebuilt for its new types", extra={
        "projection": projection.name, "events": result.events, "seconds": round(result.seconds, 3)})
    async with store.pool.acquire() as conn:
        return not await typebook.settle(conn, projection, started)


async def watch(store: EventStore, worker: str, projections: Sequence[type[Projection]], *,
                lease_seconds: float, batch_bytes: int = reader.READ_BYTES) -> None:
    """Until cancelled: refresh the worker's rows, and settle those of its read models that are pending now (a
    worker of older code started after a settlement makes one pending again; another worker's settlement ends
    it). See the module doc."""
    pause = lease_seconds / LOOKS_PER_LEASE
    loop = asyncio.get_running_loop()
    next_try = {p.name: 0.0 for p in projections}  # loop time; pushed back after each failed rebuild
    failures = dict.fromkeys(next_try, 0)
    while True:
        try:
            await typebook.refresh(store.pool, worker, lease_seconds)
            waiting = await typebook.pending(store.pool, projections)
        except retry.OUTAGE_ERRORS as exc:
            logger.warning("read-model types: database unavailable; looking again later",
                           extra={"error": f"{type(exc).__name__}: {exc}"})
            waiting = []
        for projection in [p for p in waiting if next_try[p.name] <= loop.time()]:
            try:
                await settle_once(store, projection, lease_seconds=lease_seconds, batch_bytes=batch_bytes)
            except retry.OUTAGE_ERRORS as exc:
                logger.warning("read-model types: database unavailable; looking again later",
                               extra={"error": f"{type(exc).__name__}: {exc}"})
            except Exception:
                # A rebuild that fails (a handler's bug, no right to create its shadow schema) must not stop the
                # live consumers: the read model stays pending (status says so) and is tried again later.
                failures[projection.name] += 1
                wait = min(pause * 2 ** failures[projection.name], LONGEST_RETRY_SECONDS)
                next_try[projection.name] = loop.time() + wait
                logger.exception("rebuild of a read model with new types failed; it stays pending", extra={
                    "projection": projection.name, "retry_in_seconds": round(wait, 1)})
            else:
                failures[projection.name] = 0
        await asyncio.sleep(pause)
