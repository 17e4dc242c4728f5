"""Which database errors are the environment's fault: the table of SQLSTATEs, the reference's copy of it, and
the classification of a handler's errors, checked against asyncpg's real exception classes."""

from __future__ import annotations

import asyncpg
import pytest

from store import db, sqlstates
from store import errors as store_errors
from tests.unit.test_reference import rows, section
from workers import errors, handlers


def test_the_reference_lists_every_retried_sqlstate_with_its_condition_and_kind():
    table = rows(section("### 3.7 Database errors: the environment's or the event's"))
    documented = {code.removesuffix(" (class)").strip("`"): (cells[1], cells[2])
                  for code, cells in table.items() if code != "SQLSTATE"}
    assert documented == {c.sqlstate: (c.name, c.kind) for c in sqlstates.CONDITIONS.values()}


@pytest.mark.parametrize(("exc", "condition"), [
    (asyncpg.exceptions.DiskFullError("could not extend file"), "disk_full"),
    (asyncpg.exceptions.OutOfMemoryError("out of memory"), "out_of_memory"),
    (asyncpg.exceptions.LockNotAvailableError("canceling statement due to lock timeout"), "lock_not_available"),
    (asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"), "query_canceled"),
    (asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute UPDATE"), "read_only_sql_transaction"),
    (asyncpg.exceptions.InsufficientPrivilegeError("permission denied for table deadlines"),
     "insufficient_privilege"),
    (asyncpg.exceptions.PostgresIOError("could not read block"), "io_error"),
    (asyncpg.exceptions.ConfigurationLimitExceededError("too many locks"), "configuration_limit_exceeded"),
])
def test_an_environment_condition_is_an_environment_failure_naming_its_sqlstate_and_remedy(exc, condition):
    translated = db.transient_error(exc)
    assert isinstance(translated, store_errors.EnvironmentFailure)
    assert (translated.sqlstate, translated.condition) == (exc.sqlstate, condition)
    assert f"SQLSTATE {exc.sqlstate}" in str(translated)


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
])
def test_an_outage_is_a_plain_transient_error(exc):
    translated = db.transient_error(exc)
    assert type(translated) is store_errors.TransientError


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions.SerializationError("could not serialize access"),
    asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
])
def test_a_conflict_is_a_transaction_conflict(exc):
    translated = db.transient_error(exc)
    assert type(translated) is store_errors.TransactionConflict


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions.UniqueViolationError("duplicate key"),
    asyncpg.exceptions.InvalidTextRepresentationError("invalid input syntax for type integer"),
    asyncpg.exceptions.UndefinedTableError("relation does not exist"),
    asyncpg.exceptions.RaiseError("raised by a handler's SQL"),
])
def test_a_data_or_handler_error_of_the_server_is_not_retried(exc):
    assert sqlstates.classify(exc) is None
    assert not db.is_transient(exc)
    assert not handlers.is_outage(exc)


class _Conn:
    def __init__(self, closed: bool) -> None:
        self.closed = closed

    def is_closed(self) -> bool:
        return self.closed


@pytest.mark.parametrize("exc", [FileNotFoundError("no such file"), PermissionError("denied"), ValueError("bad"),
                                 asyncpg.exceptions.DataError("invalid input for query argument $1")])
def test_a_handlers_own_error_is_its_failure_while_its_connection_is_open(exc):
    assert not handlers.is_outage(exc, _Conn(closed=False))
    assert handlers.is_outage(exc, _Conn(closed=True)), "raised on the way down with its connection"


@pytest.mark.parametrize("exc", [
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    TimeoutError(),
    asyncpg.exceptions.LockNotAvailableError("canceling statement due to lock timeout"),
    store_errors.TransientError("an append of a reactor's"),
])
def test_a_handler_error_from_the_connection_or_its_environment_is_an_outage(exc):
    assert handlers.is_outage(exc, _Conn(closed=False))


def test_a_handler_failure_is_never_an_outage():
    assert not handlers.is_outage(errors.HandlerFailed("p", None, ValueError()), _Conn(closed=True))
