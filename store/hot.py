"""Connections the event store keeps between its statements instead of handing each back to the pool at once.

asyncpg's acquire + release costs about as much client CPU as the append statement itself (a shielded
task, timers and queue operations per cycle); with 8 writers on 2 cores that CPU is taken from Postgres.
So the store keeps the connections it just used (most recent first) and hands one back to the pool once
it has been idle for ``linger`` seconds: a busy writer pays for the pool once, an idle one holds nothing.
While the pool is exhausted (someone may be waiting in ``acquire()``; the store's own kept connections
count as taken) the limit is ``short`` instead: a busy store takes a kept connection back within
microseconds, so little changes hands, and another user of the pool waits about ``short`` at most.
``pool.close()`` waits at most ``linger``. Only the store's one-statement calls run on these connections
(see ``db.clean_use``).
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
SHORT = 0.01
Proxy: TypeAlias = "asyncpg.pool.PoolConnectionProxy[Any]"


class HotConnections:
    """A LIFO of pooled connections idle since a known time; old ones go back to the pool on a timer."""

    def __init__(self, pool: db.Pool, *, linger: float = LINGER, short: float = SHORT) -> None:
        self.pool = pool
        self.linger, self.short = linger, short
        self._idle: list[tuple[Proxy, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    def use(self, conn: db.Conn | None = None) -> _Use:
        """``async with hot.use() as conn``: a connection for one statement, errors translated.

        With ``conn`` (a caller's connection, maybe inside its transaction) that one is used as it is.
        """
        return _Use(self, conn)

    def _has_room(self) -> bool:
        """Whether the pool could hand out a connection now without anyone waiting for one."""
        pool = self.pool
        return pool.get_idle_size() > 0 or pool.get_size() < pool.get_max_size()

    async def _take(self) -> Proxy:
        while self._idle:
            conn: Proxy = self._idle.pop()[0]
            try:
                if not conn.is_closed():
                    return conn
            except asyncpg.InterfaceError:
                continue  # its backend went away while it was kept, and asyncpg gave it back to the pool
            await self._give_back(conn, clean=False)
        async with db.translate_errors():
            fresh: Proxy = await self.pool.acquire()
        return fresh

    def _limit(self) -> float:
        """How long a connection may stay kept now: short while the pool has none to hand out."""
        return self.linger if self._has_room() else self.short

    def _keep(self, conn: Proxy) -> None:
        # O(1) on purpose: looking at the pool walks all its holders, so only the trim timer does that.
        loop = asyncio.get_running_loop()
        self._idle.append((conn, loop.time()))
        if self._timer is None:
            self._timer = loop.call_later(self.short, self._trim)

    async def _give_back(self, conn: Proxy, *, clean: bool) -> None:
        """Release to the pool; ``clean``: it ran only the store's statements, so skip the reset.

        Never raises: a release that fails has made the pool terminate the connection (or asyncpg had
        already taken it back when its backend died), and the caller's own error is the one to report.
        """
        try:
            if clean:
                with db.clean_use():
                    await self.pool.release(conn)
            else:  # state uncertain (an error mid-statement): the pool's full reset decides
                await self.pool.release(conn)
        except Exception:
            logger.debug("handing a connection back to the pool failed", exc_info=True)

    def _trim(self) -> None:
        """Hand back the connections kept past the limit; while some are kept, look every ``short``."""
        self._timer = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self._limit()
        stale = [conn for conn, since in self._idle if since <= cutoff]
        if stale:
            self._idle = self._idle[len(stale):]  # oldest first: the stale ones are a prefix
            task = loop.create_task(self._release(stale))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
        if self._idle:
            self._timer = loop.call_later(self.short, self._trim)

    async def _release(self, conns: list[Proxy]) -> None:
        for conn in conns:
            await self._give_back(conn, clean=True)


class _Use:
    __slots__ = ("_conn", "_hot", "_taken")

    def __init__(self, hot: HotConnections, conn: db.Conn | None) -> None:
        self._hot = hot
        self._conn: db.Conn | None = conn
        self._taken: Proxy | None = None

    async def __aenter__(self) -> db.Conn:
        if self._conn is not None:
            return self._conn
        self._taken = await self._hot._take()
        return self._taken

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        taken = self._taken
        if taken is not None:
            # Keep it after success or an error the server reported (the statement's implicit
            # transaction ended); after a lost connection, a cancellation or a timeout the pool decides.
            if exc is None or (isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, db.TRANSIENT)):
                self._hot._keep(taken)
            else:
                await self._hot._give_back(taken, clean=False)
        db.translate_errors().__exit__(exc_type, exc, tb)
