"""Read-after-write: wait until a projection has applied a given version of a stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import LiteralString, NoReturn

from projections import registry
from store import db, errors, queries

SQL = queries.load("projections", "wait.sql")

_FIRST_PAUSE = 0.002
_MAX_PAUSE = 0.05


class WaitFailed(errors.EventFleetError):
    """wait_for cannot return the awaited version: answer without the write."""


class WaitTimeout(WaitFailed, TimeoutError):
    """The projection did not apply the awaited version in time."""


class StreamHalted(WaitFailed):
    """The stream is halted at an event the projection parked: no wait helps until its dead letter is retried or
    skipped (``eventfleet dead-letters``)."""

    def __init__(self, projection: str, stream_id: str, version: int, dead_letter_id: int | None,
                 error: str | None) -> None:
        self.projection, self.stream_id, self.version = projection, stream_id, version
        self.dead_letter_id, self.error = dead_letter_id, error
        letter = "no parked dead letter" if dead_letter_id is None else f"dead letter {dead_letter_id}"
        super().__init__(f"stream {stream_id!r} of projection {projection!r} is halted at version {version} by "
                         f"{letter} ({error}): see `eventfleet dead-letters show {dead_letter_id}`, then retry "
                         "or skip it")


class UnknownProjection(errors.InvalidName):
    """wait_for was given a projection the deployment does not have."""

    def __init__(self, projection: str, known: Sequence[str]) -> None:
        self.projection, self.known = projection, tuple(known)
        names = ", ".join(self.known) or "none: run eventfleet migrate"
        super().__init__(f"no projection {projection!r} in this deployment; it has: {names}")


# The contract fixes the timeout argument: callers are APIs that want one call, not asyncio.timeout().
async def wait_for(pool: db.Pool, projection: str, stream_id: str, version: int,
                   timeout: float, *, schema: str = "eventfleet") -> int:  # noqa: ASYNC109
    """Return the projection's checkpoint of stream_id once it reaches version; raise WaitTimeout after timeout.

    An API that appended an event can call this with the AppendResult's last_version and then read the
    read model knowing it includes the write. The checkpoint commits with the read-model rows, so once it
    is visible so are they. A rebuild's swap only moves checkpoints forward, so this holds across it.
    ``schema`` is the store's (as in ``EventStore(pool, schema=...)``); the pool's search_path is not used.

    A read model that handles a few event types (``Projection.handled_names()``, looked up by name in this
    process's registry, else the types its workers record in ``read_model_types``) moves its checkpoint only over the events it handles: awaiting a version of another type
    returns ``version`` once every event of its types up to it is applied.

    It fails at once when waiting cannot succeed: ``UnknownProjection`` for a name the deployment does not have,
    ``StreamHalted`` when the stream is halted below ``version`` by a parked event.
    """
    sql = queries.bind(SQL, schema)  # InvalidName for a bad schema
    cls = registry.REGISTRY.get(projection)
    names: frozenset[str] | list[str] | None
    if isinstance(cls, type):
        names = cls.handled_names()
    else:  # a caller without the read model's code: the types its workers record
        async with db.translate_errors():
            names = await pool.fetchval(sql["recorded_types"], projection)
    deadline = time.monotonic() + timeout
    pause = _FIRST_PAUSE
    first = True
    while True:
        async with db.translate_errors():
            row = await pool.fetchrow(sql["checkpoint_version"], projection, stream_id)
        current: int | None = None if row is None else row["version"]
        if current is not None and current >= version:
            return current
        if names is not None:
            async with db.translate_errors():
                if await pool.fetchval(sql["settled_of"], projection, stream_id, version, sorted(names)):
                    return version
        if row is not None and row["halted_version"] is not None:
            await _halted(pool, sql["halting_dead_letter"], projection, stream_id, row["halted_version"])
        if row is None and first:  # a checkpoint row says the projection exists; none yet, so ask
            await _known(pool, sql["projections"], projection)
        first = False
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"projection {projection!r} had applied {stream_id!r} up to version "
                              f"{-1 if current is None else current}, not {version}, after {timeout}s")
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, _MAX_PAUSE)


async def _known(pool: db.Pool, query: LiteralString, projection: str) -> None:
    async with db.translate_errors():
        known = [r["projection"] for r in await pool.fetch(query)]
    if projection not in known:
        raise UnknownProjection(projection, known)


async def _halted(pool: db.Pool, query: LiteralString, projection: str, stream_id: str, version: int) -> NoReturn:
    async with db.translate_errors():
        row = await pool.fetchrow(query, projection, stream_id, version)
    raise StreamHalted(projection, stream_id, version, None if row is None else row["id"],
                       None if row is None else row["error"])
