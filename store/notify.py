"""Wake relays after appends commit: one ``pg_notify`` per burst of appends, sent outside their transactions.

Why not NOTIFY inside the append's transaction (a trigger on ``outbox``): Postgres serializes the commits
of every notifying transaction in the cluster on one lock held through the WAL flush (``PreCommit_Notify``
locks "database 0"), which turns concurrent appends into a single-file queue; measured here it halved
append throughput at 8 writers. So the append commits first and then pokes a ``Notifier``, which sends
at most one notification per ``min_interval`` (the first of a burst at once, one trailing notification
for the rest). A wake-up can be lost (the process dies between commit and notify, or the listener
reconnects): relays must also poll slowly, which the relay does anyway.
"""

from __future__ import annotations

import asyncio
import logging

from store import errors, hot, queries

logger = logging.getLogger(__name__)


def channel(schema: str) -> str:
    """The LISTEN channel relays of ``schema`` wait on."""
    return f"{schema}.outbox"


class Notifier:
    """Coalesces wake-ups of one schema's relays: at most one NOTIFY per ``min_interval`` seconds."""

    def __init__(self, connections: hot.HotConnections, schema: str, *, min_interval: float = 0.005) -> None:
        self.connections = connections
        self.channel = channel(schema)
        self._notify = queries.bind(queries.TEMPLATES, schema)["notify_outbox"]
        self.min_interval = min_interval
        #: False silences this store's wake-ups (tests of the relay's fallback poll).
        self.enabled = True
        self._busy = False  # a notify is being sent, or the interval after one has not passed
        self._pending = False  # appends committed since the last notify started
        self._tasks: set[asyncio.Task[None]] = set()

    def poke(self) -> None:
        """Note that rows were committed to the outbox; a notification follows within min_interval."""
        if not self.enabled:
            return
        if self._busy:
            self._pending = True
            return
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        self._pending = False
        try:
            async with self.connections.use() as conn:
                await conn.execute(self._notify, self.channel)
        except errors.StoreError as exc:
            # Only a wake-up: relays poll as well. Typical cause: the pool is closing.
            logger.debug("outbox notify failed", extra={"channel": self.channel, "error": str(exc)})
        asyncio.get_running_loop().call_later(self.min_interval, self._interval_passed)

    def _interval_passed(self) -> None:
        self._busy = False
        if self._pending:
            self.poke()

    async def flush(self) -> None:
        """Wait until the notifications already started have been sent (tests, orderly shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks)

