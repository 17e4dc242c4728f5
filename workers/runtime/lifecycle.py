"""Process lifecycle: the one stop pattern (run jobs side by side until a signal or the first failure), and
the one way a command opens its pool and store from ``Settings``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from store import db
from store.event_store import EventStore
from workers.config import Settings

logger = logging.getLogger(__name__)

async def run_until_stopped(*jobs: Coroutine[Any, Any, None], stop: asyncio.Event | None = None) -> None:
    """Run jobs side by side; SIGTERM/SIGINT (or ``stop``) cancels them, the first failure propagates."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(job) for job in jobs]
            # If a job fails first, the group cancels this wait and re-raises the failure.
            await stop.wait()
            logger.info("stopping")
            for task in tasks:
                task.cancel()
    except BaseExceptionGroup as group:
        # One failing job is the common case: surface it as itself, not wrapped.
        if len(group.exceptions) == 1:
            failure = group.exceptions[0]
            raise failure from failure.__cause__  # keeps the failure's own cause, drops the group
        raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def open_pool(settings: Settings, *, min_size: int = 1, max_size: int = 2, application_name: str = "eventfleet",
              timeouts: db.Timeouts | None = None) -> contextlib.AbstractAsyncContextManager[db.Pool]:
    """The process's one pool on the deployment's database and schema (closed on exit); ``timeouts`` on
    every session (``session_timeouts`` for a worker, none for the one-off commands)."""
    return db.create_pool(settings.database_url, settings.schema, min_size=min_size, max_size=max_size,
                          application_name=application_name, timeouts=timeouts)


def session_timeouts(settings: Settings, *, busy_idle: float = 0.0) -> db.Timeouts:
    """The server-side limits of a worker's (or, with ``busy_idle``, a relay's) sessions.

    A worker frozen inside a transaction (a GC pause, SIGSTOP, a hung node) would otherwise hold its
    streams' checkpoint rows, the projection's ``projection_status`` row, the projection lock a rebuild's
    swap needs, the lease lock when frozen inside a tick, and a transaction id that holds ``read_all``'s
    horizon, for as long as it stays frozen. Its leases expire after ``lease_seconds`` and the others take its
    partitions then; so the server ends its transaction well before that: a third of the lease by default
    (``EVENTFLEET_TRANSACTION_IDLE_SECONDS``). A live worker's transaction idles only for the Python work
    between its statements (milliseconds). A statement waiting for a lock gives up after a third of the lease
    too (``EVENTFLEET_LOCK_TIMEOUT_SECONDS``): a tick that waited behind a frozen one still renews within half
    a lease (it waits at most a third, on top of the sixth between ticks), so no lease expires for another
    process's freeze. Both errors are transient: the transaction is retried, nothing is parked.

    ``busy_idle``: seconds a transaction idles on purpose on top of that (the relay's claim stays open
    while the broker confirms, bounded by its confirm timeout). No statement timeout: a frozen client runs
    no statement, and the worker's legitimate long statements (a backfill's table rewrite, a projection's
    own SQL) have no bound the runtime could know.
    """
    third = settings.lease_seconds / 3
    idle = third if settings.transaction_idle_seconds is None else settings.transaction_idle_seconds
    lock = third if settings.lock_timeout_seconds is None else settings.lock_timeout_seconds
    return db.Timeouts(idle_in_transaction=idle + busy_idle if idle else 0.0, lock=lock)


def open_store(pool: db.Pool, settings: Settings) -> EventStore:
    """The deployment's event store over ``pool``."""
    return EventStore(pool, schema=settings.schema, max_payload_bytes=settings.max_payload_bytes,
                      keks=settings.keks)
