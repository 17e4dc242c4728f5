"""The ``subject_keys`` table as the ``KeyTable`` of ``store.subject_keys``, its blocking twin, and rewrapping.

Decoding is synchronous. The store's own reads load the keys a batch of rows needs before decoding it
(``EventStore``); a caller decoding on its own (a worker decoding a delivery with ``store.registry``, a
rebuild decoding rows) meets a key this process has not cached in the middle of a decode. Then
``fetch_blocking`` reads it on a connection of its own from a short-lived thread: the event loop waits for
one connect and one query, once per subject per ``SubjectKeys.ttl``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from typing import Any, LiteralString

from store import db, errors
from store.hot import HotConnections
from store.subject_keys import KeyEncryptionKeys, StoredKey


class PostgresKeyTable:
    """The wrapped data keys in the store's ``subject_keys`` table."""

    def __init__(self, hot: HotConnections, queries: Mapping[str, LiteralString]) -> None:
        self.hot = hot
        self.queries = queries

    async def fetch(self, subjects: list[str], conn: db.Conn | None = None) -> dict[str, StoredKey]:
        async with self.hot.use(conn) as c:
            rows = await c.fetch(self.queries["subject_keys"], subjects)
        return {r["subject"]: (r["kek_id"], r["wrapped_key"]) for r in rows}

    async def create(self, rows: list[tuple[str, str, bytes]], conn: db.Conn | None = None) -> None:
        async with self.hot.use(conn) as c:
            await c.execute(self.queries["create_subject_keys"], [r[0] for r in rows], [r[1] for r in rows],
                            [r[2] for r in rows])


async def rewrap(pool: db.Pool, queries: Mapping[str, LiteralString], keks: KeyEncryptionKeys, batch: int) -> int:
    """Wrap every live key that an older KEK wraps with the newest one, ``batch`` keys per transaction (rows
    locked, others skipped: runs beside writers and each other); the number rewrapped."""
    done = 0
    while True:
        async with db.translate_errors(), pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(queries["keys_to_rewrap"], keks.newest, batch)
            if not rows:
                return done
            wrapped = [keks.wrap(r["subject"], keks.unwrap(r["subject"], r["kek_id"], r["wrapped_key"])) for r in rows]
            await conn.execute(queries["rewrap_subject_keys"], [r["subject"] for r in rows],
                               [w[0] for w in wrapped], [w[1] for w in wrapped])
        done += len(rows)


def blocking_fetch(pool: db.Pool, queries: Mapping[str, LiteralString],
                   ) -> Callable[[list[str]], dict[str, StoredKey]]:
    """A synchronous fetch of subjects' keys on a connection made like the pool's (an asyncpg pool's
    connect function and arguments; SubjectKeyNotLoaded for a pool that does not have them)."""

    async def fetch(subjects: list[str]) -> dict[str, StoredKey]:
        connect: Any = getattr(pool, "_connect", None)
        args, kwargs = getattr(pool, "_connect_args", None), getattr(pool, "_connect_kwargs", None)
        if connect is None or args is None or kwargs is None:
            raise errors.SubjectKeyNotLoaded(frozenset(subjects))
        async with db.translate_errors():
            conn = await connect(*args, **kwargs)
            try:
                rows = await conn.fetch(queries["subject_keys"], subjects)
            finally:
                await conn.close()
        return {r["subject"]: (r["kek_id"], r["wrapped_key"]) for r in rows}

    def run(subjects: list[str]) -> dict[str, StoredKey]:
        result: dict[str, StoredKey] = {}
        failure: list[BaseException] = []

        def work() -> None:
            try:
                result.update(asyncio.run(fetch(subjects)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
                failure.append(exc)

        thread = threading.Thread(target=work, name="eventfleet-subject-keys", daemon=True)
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return result

    return run
