"""The asyncpg pool, the connection type and the translation of driver errors into store errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import asyncpg
import asyncpg.pool

from store import errors, names

Conn: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"
Pool: TypeAlias = "asyncpg.Pool[Any]"

TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    ConnectionError,
    OSError,
    TimeoutError,
)


@contextlib.asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    """Re-raise driver errors as store errors, keeping the original as __cause__."""
    try:
        yield
    except TRANSIENT as exc:
        raise errors.TransientError(f"{type(exc).__name__}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise errors.StoreError(f"{type(exc).__name__}: {exc}") from exc


def connect_kwargs(schema: str, application_name: str = "eventfleet") -> dict[str, Any]:
    """Connection settings shared by pools and single connections: every name resolves in ``schema``."""
    return {"server_settings": {"search_path": names.quote(schema), "application_name": application_name}}


@contextlib.asynccontextmanager
async def create_pool(dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10,
                      application_name: str = "eventfleet", **kwargs: Any) -> AsyncIterator[Pool]:
    """Open a pool whose connections resolve unqualified names in ``schema``; close it on exit."""
    async with translate_errors():
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                         **connect_kwargs(schema, application_name), **kwargs)
    try:
        yield pool
    finally:
        await pool.close()


async def connect(dsn: str, schema: str, *, application_name: str = "eventfleet",
                  **kwargs: Any) -> asyncpg.Connection[Any]:
    """Open a single connection (LISTEN, admin work) resolving names in ``schema``."""
    async with translate_errors():
        conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, **connect_kwargs(schema, application_name),
                                                              **kwargs)
    return conn
