"""One process fleet for the demo, the tests and the benchmarks: a deployment of its own, its relays and
workers as processes (started, ready, scraped, stopped, killed or paused one by one), and the deployment
removed on the way out, whatever happened: no schema, queue, exchange or role outlives its user.

    async with fleet.open_fleet(settings, logs, env={"EVENTFLEET_LEASE_SECONDS": "6"}) as f:
        await f.start("relay")
        worker = await f.start("worker")
        ...
        f.kill(worker)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

from workers.config import Settings
from workers.fleet import metrics
from workers.fleet.deployment import create, open_deployment, remove
from workers.fleet.processes import Fleet, Incarnation, Process, environment, free_port


@contextlib.asynccontextmanager
async def open_fleet(settings: Settings, logs: Path, *, env: Mapping[str, str] | None = None,
                     projections: Iterable[str] = (), migrate: bool = True) -> AsyncIterator[Fleet]:
    """The deployment of ``settings`` (migrated unless ``migrate`` is false) and an empty fleet on it; on exit
    every process still running is killed, then the deployment is torn down (``projections`` besides the
    registered ones: those the processes load and this one does not)."""
    async with open_deployment(settings, projections, migrate=migrate):
        fleet = Fleet(settings, logs, env)
        try:
            yield fleet
        finally:
            await fleet.close()


__all__ = ["Fleet", "Incarnation", "Process", "create", "environment", "free_port", "metrics", "open_deployment",
           "open_fleet", "remove"]
