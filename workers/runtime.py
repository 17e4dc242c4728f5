"""Process lifecycle: run jobs side by side until a signal or the first failure."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

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
