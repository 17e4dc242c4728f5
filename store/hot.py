"""Connections the event store keeps between its appends instead of handing each back to the pool at once.

asyncpg's acquire + release costs about as much client CPU as the append statement itself (a shielded
task, timers and queue operations per cycle); with 8 writers on 2 cores that CPU is taken from Postgres.
So the store keeps the connections it just used (most recent first) and hands one back to the pool once
it has been idle for ``linger`` seconds: a busy writer pays for the pool once, an idle one holds nothing.
Other users of the pool wait at most ``linger`` for a connection the store holds, and ``pool.close()``
waits as long. Only the store's one-statement calls run on these connections (see ``db.clean_use``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeAlias

import asyncpg
import asyncpg.pool

from store import db

logger = logging.getLogger(__name__)

LINGER = 0.05
Proxy: TypeAlias = "asyncpg.pool.PoolConnectionProxy[Any]"


class HotConnections:
    """A LIFO of pooled connections idle since a known time; old ones go back to the pool on a timer."""

    def __init__(self, pool: db.Pool, *, linger: float = LINGER) -> None:
        self.pool = pool
        self.linger = linger
        self._idle: list[tuple[Proxy, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    def use(self) -> _Use:
        """``async with hot.use() as conn``: a connection for one statement, errors translated."""
        return _Use(self)

    async def _take(self) -> Proxy:
        while self._idle:
            conn: Proxy = self._idle.pop()[0]
            if not conn.is_closed():
                return conn
            await self._drop(conn)  # its backend went away while it was kept
        async with db.translate_errors():
            fresh: Proxy = await self.pool.acquire()
        return fresh

    def _keep(self, conn: Proxy) -> None:
        loop = asyncio.get_running_loop()
        self._idle.append((conn, loop.time()))
        if self._timer is None:
            self._timer = loop.call_later(self.linger, self._trim)

    async def _drop(self, conn: Proxy) -> None:
        # The connection's state is uncertain: the pool resets it fully, or terminates it if that fails.
        try:
            await self.pool.release(conn)
        except Exception:  # the pool has terminated it; the caller's own error is the one to report
            logger.debug("dropping a kept connection failed", exc_info=True)

    def _trim(self) -> None:
        """Hand back the connections idle for ``linger``; look again later if some are still kept."""
        self._timer = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.linger
        stale = [conn for conn, since in self._idle if since <= cutoff]
        if stale:
            self._idle = self._idle[len(stale):]  # oldest first: the stale ones are a prefix
            task = loop.create_task(self._release(stale))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
        if self._idle:
            self._timer = loop.call_later(self.linger, self._trim)

    async def _release(self, conns: list[Proxy]) -> None:
        with db.clean_use():  # they ran only the store's statements: no session state to reset
            for conn in conns:
                await self.pool.release(conn)


class _Use:
    __slots__ = ("_conn", "_hot")

    def __init__(self, hot: HotConnections) -> None:
        self._hot = hot

    async def __aenter__(self) -> Proxy:
        self._conn = await self._hot._take()
        return self._conn

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        # Keep it after success or an error the server reported (the statement's implicit transaction
        # ended); after a lost connection, a cancellation or a timeout the pool must look at it.
        if exc is None or (isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, db.TRANSIENT)):
            self._hot._keep(self._conn)
        else:
            await self._hot._drop(self._conn)
        db.translate_errors().__exit__(exc_type, exc, tb)
