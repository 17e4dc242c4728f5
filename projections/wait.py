"""Read-after-write: wait until a projection has applied a given version of a stream."""

from __future__ import annotations

import asyncio
import time

from store import db, errors, queries

SQL = queries.load("projections", "wait.sql")

_FIRST_PAUSE = 0.002
_MAX_PAUSE = 0.05


class WaitTimeout(errors.EventFleetError, TimeoutError):
    """The projection did not apply the awaited version in time."""


# The contract fixes the timeout argument: callers are APIs that want one call, not asyncio.timeout().
async def wait_for(pool: db.Pool, projection: str, stream_id: str, version: int,
                   timeout: float, *, schema: str = "eventfleet") -> int:  # noqa: ASYNC109
    """Return the projection's checkpoint of stream_id once it reaches version; raise WaitTimeout after timeout.

    An API that appended an event can call this with the AppendResult's last_version and then read the
    read model knowing it includes the write. The checkpoint commits with the read-model rows, so once it
    is visible so are they. A rebuild's swap only moves checkpoints forward, so this holds across it.
    ``schema`` is the store's (as in ``EventStore(pool, schema=...)``); the pool's search_path is not used.
    """
    checkpoint_version = queries.bind(SQL, schema)["checkpoint_version"]  # InvalidName for a bad schema
    deadline = time.monotonic() + timeout
    pause = _FIRST_PAUSE
    while True:
        async with db.translate_errors():
            current: int | None = await pool.fetchval(checkpoint_version, projection, stream_id)
        if current is not None and current >= version:
            return current
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"projection {projection!r} had applied {stream_id!r} up to version "
                              f"{-1 if current is None else current}, not {version}, after {timeout}s")
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, _MAX_PAUSE)
