"""``eventfleet worker``: run projections until SIGTERM/SIGINT, then stop gracefully."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal

from workers.config import Settings
from workers.projector.worker import resolve, run_worker
from workers.rebuild.backfill import Backfills
from workers.runtime import health, http

logger = logging.getLogger(__name__)


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """``eventfleet worker [--projection NAME ...]``: run until SIGTERM/SIGINT, then stop gracefully."""
    projections = resolve(args.projection)
    health_, stop = health.Health(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with http.serve(settings.port("worker"), health_.ready, reason=health_.reason, next_free=settings.free_ports):
        worker = asyncio.create_task(run_worker(settings, projections, health_, stop, backfills=Backfills()))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({worker, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not worker.done():
            logger.info("stopping", extra={"timeout": settings.stop_timeout})
            # Leave a margin for closing connections; whatever is unacked at a cancel comes back later.
            done, _ = await asyncio.wait({worker}, timeout=max(0.5, settings.stop_timeout - 1.5))
            if not done:
                logger.warning("batch in flight did not finish in time; its deliveries will be redelivered")
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
                print(json.dumps({"worker": "stopped", "timeout": True}), flush=True)
                return 0
        stats = worker.result()
    report = {name: dataclasses.asdict(s) for name, s in stats.items()}
    logger.info("worker stopped", extra={"stats": report})
    print(json.dumps({"worker": "stopped", "pid": os.getpid(), "projections": report}), flush=True)
    return 0
