"""The asyncpg pool, the connection type and the translation of driver errors into store errors."""

from __future__ import annotations

import contextlib
import contextvars
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
    # The client's protocol state is broken (e.g. its backend was terminated while it sat idle):
    # this connection is unusable, another one may work.
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)


class _Translate:
    """``with`` / ``async with`` block re-raising driver errors as store errors (a class: it sits on
    every statement's path, and a generator-based context manager costs several microseconds more)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, TRANSIENT):
            raise errors.TransientError(f"{type(exc).__name__}: {exc}") from exc
        if isinstance(exc, asyncpg.PostgresError):
            raise errors.StoreError(f"{type(exc).__name__}: {exc}") from exc

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        self.__exit__(exc_type, exc, tb)


_TRANSLATE = _Translate()


def translate_errors() -> _Translate:
    """Re-raise driver errors as store errors, keeping the original as __cause__."""
    return _TRANSLATE


def connect_kwargs(schema: str, application_name: str = "eventfleet") -> dict[str, Any]:
    """Connection settings shared by pools and single connections: every name resolves in ``schema``.

    The workers' own SQL and the projection handlers rely on it; the event store does not (it names its
    schema in every statement, so it works over any pool).
    """
    return {"server_settings": {"search_path": names.quote(schema), "application_name": application_name}}


_CLEAN_USE: contextvars.ContextVar[bool] = contextvars.ContextVar("eventfleet_clean_use", default=False)


class clean_use:
    """Declare that pooled connections used in this block change no session state (no SET, LISTEN,
    session advisory lock, cursor), so releasing them may skip the reset round trip.

    The event store's one-statement appends pay a second round trip for asyncpg's reset otherwise.
    """

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _CLEAN_USE.set(True)

    def __exit__(self, *exc_info: object) -> None:
        _CLEAN_USE.reset(self._token)


async def _reset(conn: asyncpg.Connection[Any]) -> None:
    """asyncpg's session reset on release, unless the connection was used under clean_use()."""
    # The pool has already rolled back any open transaction before calling this.
    if not _CLEAN_USE.get():
        query = conn.get_reset_query()
        if query:
            await conn.execute(query)


@contextlib.asynccontextmanager
async def create_pool(dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10,
                      application_name: str = "eventfleet", **kwargs: Any) -> AsyncIterator[Pool]:
    """Open a pool whose connections resolve unqualified names in ``schema``; close it on exit."""
    kwargs.setdefault("reset", _reset)
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
