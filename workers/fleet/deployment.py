"""A deployment of the fleet's own: migrated on entry, torn down on exit whatever happened in between.

Tearing down is ``eventfleet teardown --yes`` (``workers.admin.teardown``): the schema and its shadows, the
queues and exchanges of the prefix, the roles of ``migrate --roles``. A schema that never got migrated (the
migrate itself failed) leaves the broker names its projections would have had, which are deleted by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable

import tenacity
from aio_pika.abc import AbstractConnection

from projections import registry
from store import errors as store_errors
from store.partitions import DEFAULT_PARTITIONS
from workers import admin, broker, errors
from workers.admin import teardown
from workers.config import Settings
from workers.runtime import amqp, retry

logger = logging.getLogger(__name__)

#: How long removal waits for a broker, or a Postgres, that does not answer (a fault test may have stopped it a
#: moment ago).
BROKER_WITHIN = POSTGRES_WITHIN = 60.0


async def create(settings: Settings) -> None:
    """Migrate the settings' schema with their P (the store's default when unset)."""
    await admin.run_migrate(settings.database_url, settings.schema, partitions=settings.partitions)


async def remove(settings: Settings, projections: Iterable[str] = ()) -> None:
    """Drop the deployment as ``eventfleet teardown --yes`` does; ``projections`` are torn down besides the
    registered ones and those with a status row (the fleet's processes may load modules this one does not)."""
    # Not registry.load(settings.projection_modules): importing the processes' modules here would register
    # their projections in this process too (and its in-process relays would declare their queues).
    names = sorted({*registry.load(), *projections})
    connection = await _connect(settings)
    async with connection:
        try:
            # Postgres restarting (another test's fault) is back within seconds; one that is gone (a failover
            # test's primary) is not: then the broker half at least.
            async for attempt in tenacity.AsyncRetrying(
                    retry=tenacity.retry_if_exception_type(store_errors.TransientError),
                    wait=tenacity.wait_fixed(0.5), stop=tenacity.stop_after_delay(POSTGRES_WITHIN), reraise=True):
                with attempt:
                    found = await teardown.plan(settings.database_url, settings.schema, settings.prefix,
                                                connection, names, groups=_groups(settings))
                    # Its processes are gone (killed at worst: their registrations not yet expired).
                    await teardown.tear_down(settings.database_url, found, connection, force=True)
        except errors.TeardownRefused:  # never migrated, or dropped already: its broker names only
            await _delete_by_name(connection, settings, names)
        except store_errors.TransientError:
            await _delete_by_name(connection, settings, names)
            raise


async def _delete_by_name(connection: AbstractConnection, settings: Settings, projections: Iterable[str]) -> None:
    channel = await connection.channel()
    try:
        await broker.delete_topology(channel, broker.Names(settings.prefix), projections,
                                     settings.partitions or DEFAULT_PARTITIONS)
        for group in _groups(settings):
            await broker.delete_group(channel, broker.Names(settings.prefix), group,
                                      settings.partitions or DEFAULT_PARTITIONS)
    finally:
        await channel.close()


async def _connect(settings: Settings) -> AbstractConnection:
    deadline = time.monotonic() + BROKER_WITHIN
    while True:
        try:
            return await amqp.connect(settings.amqp_urls, name=f"eventfleet fleet teardown {settings.prefix}")
        except retry.OUTAGE_ERRORS:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def open_deployment(settings: Settings, projections: Iterable[str] = (), *,
                          migrate: bool = True) -> AsyncIterator[Settings]:
    """Migrate (unless ``migrate`` is false: the caller did), yield the settings, and always remove it. When
    the block failed, a failure to remove is logged, not raised: it would hide the block's own."""
    failed = False
    try:
        if migrate:
            await create(settings)
        yield settings
    except BaseException:
        failed = True
        raise
    finally:
        try:
            await remove(settings, projections)
        except Exception:
            if not failed:
                raise
            logger.exception("deployment not removed", extra={"schema": settings.schema, "prefix": settings.prefix})


def _groups(settings: Settings) -> tuple[str, ...]:
    """The worker group of the deployment's processes (EVENTFLEET_GROUP), if any."""
    return () if settings.group is None else (settings.group,)
