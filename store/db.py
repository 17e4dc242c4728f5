"""The asyncpg pool, the connection type and the translation of driver errors into store errors."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import os
import socket
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeAlias

import asyncpg
import asyncpg.pool

from store import errors, names, sqlstates

Conn: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"
Pool: TypeAlias = "asyncpg.Pool[Any]"

#: Errors of the driver and the socket that mean the connection (or the server) failed, whatever the
#: statement: retried. Errors the server reports are classified by SQLSTATE instead (``is_transient``).
TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.QueryCanceledError,  # 57014: statement_timeout, or a cancel
    # The session limits of ``Timeouts``: a lock held too long by another session (55P03), this session's
    # transaction ended by the server because its client paused (25P03; the connection is closed with it).
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # The client's protocol state is broken (e.g. its backend was terminated while it sat idle):
    # this connection is unusable, another one may work.
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)

#: Transactions Postgres aborted because of another one: retried, and no outage (the server is fine).
CONFLICTS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether a database call's error may pass when retried: the connection failed (``TRANSIENT``), or the
    server reported a condition of its environment or a conflict (``sqlstates.classify``)."""
    return isinstance(exc, TRANSIENT) or sqlstates.classify(exc) is not None


def transient_error(exc: BaseException) -> errors.TransientError:
    """The store's error for a retried database error: ``EnvironmentFailure`` (with its SQLSTATE and what to
    fix) for a condition an operator may have to fix, ``TransactionConflict`` for a conflict with another
    transaction (no outage), ``TransientError`` for an outage."""
    text = f"{type(exc).__name__}: {exc}"
    condition = sqlstates.classify(exc)
    if condition is not None and condition.kind == "environment":
        return errors.EnvironmentFailure(text, str(getattr(exc, "sqlstate", "")), condition.name, condition.remedy)
    if (condition is not None and condition.kind == "conflict") or isinstance(exc, CONFLICTS):
        return errors.TransactionConflict(text)
    return errors.TransientError(text)


class _Translate:
    """``with`` / ``async with`` block re-raising driver errors as store errors (a class: it sits on
    every statement's path, and a generator-based context manager costs several microseconds more)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, errors.EventFleetError):
            return
        if is_transient(exc):
            raise transient_error(exc) from exc
        if isinstance(exc, asyncpg.PostgresError):
            if getattr(exc, "sqlstate", None) == sqlstates.STREAM_CLOSED:
                raise errors.StreamIsClosed(str(getattr(exc, "detail", "") or "")) from exc
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


@dataclasses.dataclass(frozen=True, slots=True)
class Timeouts:
    """Server-side limits on a session, in seconds (0 = none): the server enforces them whatever its client
    does, even when the client is frozen (a GC pause, SIGSTOP, a hung node).

    ``idle_in_transaction``: a transaction whose client sends nothing for this long is ended by the server
    (the session is terminated, SQLSTATE 25P03), which releases its row and advisory locks and its
    transaction id, so a frozen process holds neither other processes' work nor the read horizon
    (``read_all`` reads below the oldest open transaction) for longer than this. ``lock``: a statement waiting
    this long for a lock fails (55P03). ``statement``: a statement running this long is cancelled (57014).
    All three errors are transient (``TRANSIENT``): the transaction is retried, nothing is parked.
    """

    idle_in_transaction: float = 0.0
    lock: float = 0.0
    statement: float = 0.0

    def server_settings(self) -> dict[str, str]:
        """The session parameters (milliseconds, as Postgres reads a bare number) of the limits that are set."""
        limits = {"idle_in_transaction_session_timeout": self.idle_in_transaction, "lock_timeout": self.lock,
                  "statement_timeout": self.statement}
        return {name: str(round(seconds * 1000)) for name, seconds in limits.items() if seconds > 0}


def connect_kwargs(schema: str, application_name: str = "eventfleet", timeouts: Timeouts | None = None,
                   settings: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Connection settings shared by pools and single connections: every name resolves in ``schema``, and
    the session gets ``timeouts`` (none by default: commands such as ``migrate`` and ``rebuild`` run long
    statements and transactions on purpose).

    The workers' own SQL and the projection handlers rely on it; the event store does not (it names its
    schema in every statement, so it works over any pool). ``settings``: more session parameters (the relay's).
    """
    server_settings = {"search_path": names.quote(schema), "application_name": application_name}
    if timeouts is not None:
        server_settings |= timeouts.server_settings()
    return {"server_settings": server_settings | dict(settings or {})}


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
async def committing(pool: Pool) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[Any]]:
    """A pooled connection inside a transaction, for a block that changes no session state (see ``clean_use``):
    once the transaction committed, the connection goes back without asyncpg's reset round trip; after an error
    (rolled back, perhaps mid-statement) the pool's full reset decides. The relay's claims and the projector's
    batches, one transaction each, many a second."""
    conn = await pool.acquire()
    committed = False
    try:
        async with conn.transaction():
            yield conn
        committed = True
    finally:
        if committed:
            with clean_use():
                await pool.release(conn)
        else:
            await pool.release(conn)


# --- several hosts, and hosts that vanish ---------------------------------------------------------------------

#: Seconds each host of a multi-host DSN gets to accept a connection before the next one is tried. asyncpg
#: applies its ``timeout`` (60 s) to all the hosts together, so a host that drops packets (its machine gone)
#: would use it all up, every attempt, and the next host (the promoted standby) would never be tried.
HOST_TIMEOUT = 10.0
#: A host that has not accepted within this long has the next host tried alongside it (see _connect_hosts).
HOST_STAGGER = 1.0
#: TCP keepalive on every connection, and how long sent data may go unacknowledged: a server whose host
#: vanished sends no reset, so without them a pooled connection to it waits for ever (an idle LISTEN, a
#: statement in flight). Peers that answer acknowledge within milliseconds; after about 10 s the socket
#: fails, the statement raises a connection error (TRANSIENT) and the pool reconnects.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 2, 2, 5
USER_TIMEOUT_MS = 10_000

#: Per multi-host DSN, the host that accepted the last connection: tried first next time, so a pool that
#: found the new primary does not wait on the dead one for each of its connections.
_PREFERRED: dict[str, int] = {}
#: Errors after which the next host is tried (asyncpg's own rule, plus its per-host timeout): anything else,
#: such as a refused password or a missing database, is the same on every host and raised at once.
_NEXT_HOST: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)


#: Whether asyncpg's pools take a ``connect`` function (0.30 and later); older ones connect as asyncpg does.
_POOL_CONNECT = "connect" in inspect.signature(asyncpg.create_pool).parameters


def split_hosts(dsn: str) -> list[str]:
    """The one-host DSNs of a URL naming several hosts (``postgresql://u@h1:p1,h2:p2/db?...``), in order, each
    with the URL's user, password, database and parameters; ``[dsn]`` for anything else, unchanged."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return [dsn]
    if parts.scheme not in ("postgresql", "postgres"):
        return [dsn]
    user, at, hosts = parts.netloc.rpartition("@")
    names_ = hosts.split(",")
    if len(names_) < 2 or not all(names_):
        return [dsn]
    return [urllib.parse.urlunsplit(parts._replace(netloc=f"{user}{at}{host}")) for host in names_]


def _keep_alive(conn: asyncpg.Connection[Any]) -> None:
    """TCP keepalive and user timeout on the connection's socket (Linux; elsewhere what the platform has)."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    with contextlib.suppress(OSError):
        for level, option, value in options:
            sock.setsockopt(level, option, value)


def endpoint(dsn: str) -> str:
    """``host:port`` of a DSN (``h1:p1,h2:p2`` for several hosts; libpq's PGHOST/PGPORT and defaults when it
    names none): how errors name the server. Never any part of the user info (the password is there)."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        hosts, query = parts.netloc.rpartition("@")[2], urllib.parse.parse_qs(parts.query)
    except ValueError:
        hosts, query = "", {}
    default_host = query.get("host", [os.environ.get("PGHOST", "localhost")])[0]
    default_port = query.get("port", [os.environ.get("PGPORT", "5432")])[0]
    found = []
    for host in (hosts.split(",") if hosts else [""]):
        name, colon, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if not colon:
            name, port = host, ""
        found.append(f"{name or default_host}:{port or default_port}")
    return ",".join(found)


async def _connect(dsn: str, **kwargs: Any) -> asyncpg.Connection[Any]:
    """``asyncpg.connect``, for a multi-host DSN host by host (``_connect_hosts``); then keepalive. A one-host
    DSN goes to asyncpg unchanged. A server that cannot be reached (refused, unknown name, timed out) raises
    ``DatabaseUnreachable`` naming its host and port: the driver's own errors name neither Postgres nor the
    host (``ConnectionRefusedError``, ``gaierror``)."""
    hosts = split_hosts(dsn)
    try:
        if len(hosts) == 1:
            conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, **kwargs)
        else:
            conn = await _connect_hosts(dsn, hosts, **kwargs)
    except (OSError, TimeoutError) as exc:
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__} (timed out)"
        raise errors.DatabaseUnreachable(f"PostgreSQL at {endpoint(dsn)} unreachable: {cause}") from exc
    _keep_alive(conn)
    return conn


async def _connect_hosts(dsn: str, hosts: list[str], **kwargs: Any) -> asyncpg.Connection[Any]:
    """The first host, in order (the one that last accepted first), that accepts a connection and passes
    ``target_session_attrs`` (asyncpg checks it per host). Each host gets ``HOST_TIMEOUT``; one that has not
    answered within ``HOST_STAGGER`` gets company: the next host is tried alongside it (with read-write only
    the primary can pass, so the race picks no other). A host's failure of the ``_NEXT_HOST`` kind moves on at
    once; any other failure is raised. All hosts failed: the last failure is raised."""
    timeout = min(float(kwargs.pop("timeout", HOST_TIMEOUT)), HOST_TIMEOUT)
    first = _PREFERRED.get(dsn, 0) % len(hosts)
    order = [*range(first, len(hosts)), *range(first)]
    attempts: dict[asyncio.Task[asyncpg.Connection[Any]], int] = {}
    failure: BaseException | None = None
    try:
        while True:
            if order and (not attempts or failure is not None):
                failure = None
                i = order.pop(0)
                attempts[asyncio.ensure_future(asyncpg.connect(hosts[i], timeout=timeout, **kwargs))] = i
            done, _ = await asyncio.wait(attempts, timeout=HOST_STAGGER if order else None,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:  # the hosts tried so far are slow: try the next one too
                failure = TimeoutError()
                continue
            for task in done:
                i = attempts.pop(task)
                exc = task.exception()
                if exc is None:
                    _PREFERRED[dsn] = i
                    return task.result()
                if not isinstance(exc, _NEXT_HOST):
                    raise exc
                failure = exc
            if not attempts and not order:
                assert failure is not None
                raise failure
    finally:
        for task in attempts:  # the slower hosts: abandoned, and closed if they got there meanwhile
            task.cancel()
        for late in await asyncio.gather(*attempts, return_exceptions=True):
            if isinstance(late, asyncpg.Connection):
                late.terminate()


@contextlib.asynccontextmanager
async def create_pool(dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10,
                      application_name: str = "eventfleet", timeouts: Timeouts | None = None,
                      settings: Mapping[str, str] | None = None, **kwargs: Any) -> AsyncIterator[Pool]:
    """Open a pool whose connections resolve unqualified names in ``schema`` (with ``timeouts``, if given,
    and ``settings`` on every session); close it on exit.

    A DSN naming several hosts (``?target_session_attrs=read-write`` for the primary) is tried host by host
    (``HOST_TIMEOUT`` each) whenever the pool opens a connection, so after a failover the pool's new
    connections reach the promoted server; connections to the old one fail (at once, or within about 10 s
    when its host vanished: ``USER_TIMEOUT_MS``) and the pool replaces them on their next acquire."""
    kwargs.setdefault("reset", _reset)
    if _POOL_CONNECT:
        kwargs.setdefault("connect", _connect)
    async with translate_errors():
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                         **connect_kwargs(schema, application_name, timeouts, settings), **kwargs)
    try:
        yield pool
    finally:
        await pool.close()


async def connect(dsn: str, schema: str, *, application_name: str = "eventfleet", timeouts: Timeouts | None = None,
                  **kwargs: Any) -> asyncpg.Connection[Any]:
    """Open a single connection (LISTEN, admin work) resolving names in ``schema`` (hosts and ``timeouts`` as
    ``create_pool``)."""
    async with translate_errors():
        conn = await _connect(dsn, **connect_kwargs(schema, application_name, timeouts), **kwargs)
    return conn
