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
            raise group.exceptions[0] from None
        raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def open_pool(settings: Settings, *, min_size: int = 1, max_size: int = 2,
              application_name: str = "eventfleet") -> contextlib.AbstractAsyncContextManager[db.Pool]:
    """The process's one pool on the deployment's database and schema (closed on exit)."""
    return db.create_pool(settings.database_url, settings.schema, min_size=min_size, max_size=max_size,
                          application_name=application_name)


def open_store(pool: db.Pool, settings: Settings) -> EventStore:
    """The deployment's event store over ``pool``."""
    return EventStore(pool, schema=settings.schema, max_payload_bytes=settings.max_payload_bytes,
                      keks=settings.keks)
