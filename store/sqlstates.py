"""Which database errors are the environment's fault, not the event's: the one table of SQLSTATEs.

Postgres names every error with a five-character SQLSTATE (asyncpg's exceptions carry it as ``.sqlstate``);
the first two characters are its class. The conditions below say nothing about the statement or the event
it applies: the server is out of disk, memory or connections, a lock or a statement timeout struck, the
database is read-only, a privilege is missing, the connection went, or two transactions collided. Each of
them is retried (``errors.TransientError``; ``EnvironmentFailure`` when an operator has something to fix)
and never parks an event: parking would take a stream out of service for a fault of the machine, and the
events would be lost to the read model until someone re-drove them one by one.

Everything else a statement raises (data exceptions 22, integrity violations 23, syntax or undefined objects
42 other than 42501, a handler's own ``RAISE`` P0001, ...) fails the same way on every try: it is the
event's or the handler's failure, retried a few times and then parked per the projection's policy.

A missing privilege (42501) is retried too, for ever: it does not heal by itself, but a GRANT heals it, and
a worker that parked every event meanwhile would leave the read model short of all of them. It reports
the outage (``health``: not ready, the SQLSTATE and the remedy in the reason and the log) instead.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Kind = Literal["outage", "conflict", "environment"]


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    """A retried database condition: its SQLSTATE (or class), name, kind and what an operator should do."""

    sqlstate: str
    name: str
    kind: Kind
    remedy: str


_CONNECTION = "the connection to Postgres failed: the pool reconnects; check the server and the network"
_CONFLICT = "two transactions collided: retried at once, nothing to fix unless it never stops"
_SHUTDOWN = "the server is shutting down, restarting or not accepting connections yet: it is retried until it is back"
_SYSTEM = "the database server's file system or operating system failed: check its disks and its log"

#: The retried conditions, by SQLSTATE; a code not listed is looked up by its class (its first two characters).
CONDITIONS: dict[str, Condition] = {c.sqlstate: c for c in (
    Condition("08", "connection_exception", "outage", _CONNECTION),
    Condition("53", "insufficient_resources", "environment",
              "the database server is short of a resource: see its log"),
    Condition("53100", "disk_full", "environment",
              "the database server's disk is full: free space or grow the volume"),
    Condition("53200", "out_of_memory", "environment",
              "the database server is out of memory: give it more, or lower work_mem or the connections"),
    Condition("53300", "too_many_connections", "environment",
              "the server refuses more connections: raise max_connections or lower the pool sizes"),
    Condition("53400", "configuration_limit_exceeded", "environment",
              "a server limit was reached (e.g. max_locks_per_transaction): raise it"),
    Condition("55P03", "lock_not_available", "environment",
              "a lock was held longer than lock_timeout: find the blocking session in pg_stat_activity"),
    Condition("57014", "query_canceled", "environment",
              "a statement ran past statement_timeout or was cancelled: find what slows or blocks it"),
    Condition("57P01", "admin_shutdown", "outage", _SHUTDOWN),
    Condition("57P02", "crash_shutdown", "outage", _SHUTDOWN),
    Condition("57P03", "cannot_connect_now", "outage", _SHUTDOWN),
    Condition("57P04", "database_dropped", "outage", "the database was dropped: restore it or fix the URL"),
    Condition("57P05", "idle_session_timeout", "outage", _CONNECTION),
    Condition("25006", "read_only_sql_transaction", "environment",
              "the database is read-only (a standby, or default_transaction_read_only is on for the role or the "
              "database): point the URL at the primary (target_session_attrs=read-write) or turn it off"),
    Condition("25P03", "idle_in_transaction_session_timeout", "outage", _CONNECTION),
    Condition("42501", "insufficient_privilege", "environment",
              "the role lacks a privilege: GRANT it (eventfleet migrate --roles grants the documented set)"),
    Condition("40001", "serialization_failure", "conflict", _CONFLICT),
    Condition("40P01", "deadlock_detected", "conflict", _CONFLICT),
    Condition("40003", "statement_completion_unknown", "conflict", _CONFLICT),
    Condition("58", "system_error", "environment", _SYSTEM),
    Condition("58030", "io_error", "environment", _SYSTEM),
)}


def classify(exc: BaseException) -> Condition | None:
    """The retried condition ``exc`` reports (by its ``sqlstate``), or None: not the environment's fault."""
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str) or len(sqlstate) != 5:
        return None
    return CONDITIONS.get(sqlstate) or CONDITIONS.get(sqlstate[:2])


#: Raised by the events trigger on an insert into a closed stream (migration 0013): ``errors.StreamIsClosed``.
STREAM_CLOSED = "EF001"
