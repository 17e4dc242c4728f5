"""The event store's promises that are PostgreSQL's own: the outbox, races between real connections,
immutability, crashes mid-append, the relay wake-up and kept connections. What every store promises
(versions, conflicts, idempotency, batches, input checks) is in tests/contract."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from eventfleet.examples.orders.events import OrderPaid
from store import (
    NO_STREAM,
    EventStore,
    StoreError,
    TransientError,
    VersionConflict,
    db,
    notify,
)
from store.partitions import DEFAULT_PARTITIONS, partition_of
from tests.conftest import DATABASE_URL

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def paid(n: int = 1) -> OrderPaid:
    return OrderPaid(f"o{n}", "c1", Decimal(n), NOW)


async def counts(pool: db.Pool) -> tuple[int, int]:
    row = await pool.fetchrow("SELECT (SELECT count(*) FROM events) AS e, (SELECT count(*) FROM outbox) AS o")
    assert row is not None
    return row["e"], row["o"]


async def wait_until_blocked_by(pool: db.Pool, blocker_pid: int, within: float = 30) -> int:
    """The pid of a backend waiting on a lock held by ``blocker_pid``; poll until there is one."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        pid = await pool.fetchval("SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                                  blocker_pid)
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.01)
    raise AssertionError("no backend got blocked")


async def test_append_writes_one_outbox_row_per_event(event_store, pool):
    first = await event_store.append("order-1", [paid(1), paid(2)], NO_STREAM)
    second = await event_store.append("order-1", [paid(3)], 1)
    positions = [*first.global_positions, *second.global_positions]
    assert await pool.fetchval("SELECT array_agg(global_position ORDER BY 1) FROM outbox") == positions


async def test_a_racing_transaction_surfaces_as_version_conflict_not_a_driver_error(event_store, pool, schema):
    """Both writers pass the version check; the loser meets the unique index and must get VersionConflict."""
    rival = await db.connect(DATABASE_URL, schema)
    try:
        async with rival.transaction():
            await rival.fetchrow(event_store.queries["append_event"], "s", NO_STREAM, uuid.uuid4(), "OrderPaid.v1",
                                 b"\x80", b"\x80", partition_of("s", DEFAULT_PARTITIONS))
            loser = asyncio.create_task(event_store.append("s", [paid()], NO_STREAM))
            await wait_until_blocked_by(pool, rival.get_server_pid())  # it passed the check, waits on the index
        with pytest.raises(VersionConflict) as info:
            await loser
    finally:
        await rival.close()
    assert (info.value.expected, info.value.actual) == (NO_STREAM, 0)
    assert isinstance(info.value.__cause__, StoreError)
    assert isinstance(info.value.__cause__.__cause__, asyncpg.UniqueViolationError)
    assert await counts(pool) == (1, 1)


async def test_concurrent_appends_at_one_version_let_exactly_one_win(event_store, pool):
    results = await asyncio.gather(*(event_store.append("s", [paid(n)], NO_STREAM) for n in range(8)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, VersionConflict) for r in results if isinstance(r, BaseException))
    assert await counts(pool) == (1, 1)


@pytest.mark.parametrize("statement", ["UPDATE events SET event_type = 'x'", "DELETE FROM events",
                                       "TRUNCATE events", "TRUNCATE events CASCADE"])
async def test_the_database_refuses_to_change_events(event_store, pool, statement):
    await event_store.append("s", [paid()], NO_STREAM)
    with pytest.raises(asyncpg.RestrictViolationError, match="events are immutable"):
        await pool.execute(statement)
    assert [e.event for e in await event_store.load("s")] == [paid()]


async def test_a_crash_between_append_and_commit_leaves_neither_event_nor_outbox_row(event_store, pool, schema):
    """The append's backend dies after inserting its event, while its outbox insert waits: nothing stays."""
    sequence = await pool.fetchval("SELECT pg_get_serial_sequence('events', 'global_position')")
    next_position = await pool.fetchval("SELECT nextval($1::regclass)", sequence) + 1
    blocker = await db.connect(DATABASE_URL, schema)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("INSERT INTO outbox (global_position) VALUES ($1)", next_position)
        append = asyncio.create_task(event_store.append("s", [paid()], NO_STREAM))
        victim = await wait_until_blocked_by(pool, blocker.get_server_pid())  # its event is inserted
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", victim)
        with pytest.raises(TransientError):
            await append
        await transaction.rollback()
    finally:
        await blocker.close()
    assert await counts(pool) == (0, 0)
    assert await event_store.load("s") == []


async def test_an_outbox_failure_rolls_the_event_back(event_store, pool):
    """Events and outbox rows are written by one statement: when the outbox insert fails, no event stays."""
    sequence = await pool.fetchval("SELECT pg_get_serial_sequence('events', 'global_position')")
    next_position = await pool.fetchval("SELECT nextval($1::regclass)", sequence) + 1
    await pool.execute("INSERT INTO outbox (global_position) VALUES ($1)", next_position)
    with pytest.raises(StoreError, match="outbox_pkey") as info:
        await event_store.append("s", [paid()], NO_STREAM)
    assert not isinstance(info.value, VersionConflict)
    assert await counts(pool) == (0, 1)


async def test_an_append_wakes_listening_relays_after_commit(event_store, schema):
    listener = await db.connect(DATABASE_URL, schema)
    woken: asyncio.Queue[Any] = asyncio.Queue()
    try:
        await listener.add_listener(notify.channel(schema), lambda *args: woken.put_nowait(args))
        await event_store.append("s", [paid()], NO_STREAM)
        await asyncio.wait_for(woken.get(), 30)
        # A burst of appends is coalesced into fewer notifications, and still wakes the relay.
        await asyncio.gather(*(event_store.append(f"b{n}", [paid()], NO_STREAM) for n in range(20)))
        await event_store.notifier.flush()
        await asyncio.wait_for(woken.get(), 30)
    finally:
        await listener.close()


async def test_pooled_connections_skip_the_reset_only_under_clean_use(schema):
    async with db.create_pool(DATABASE_URL, schema, min_size=1, max_size=1) as one:
        async with one.acquire() as conn:
            await conn.execute("SET statement_timeout = 12345")
        assert await one.fetchval("SHOW statement_timeout") == "0"  # reset on release, as asyncpg does
        with db.clean_use():
            async with one.acquire() as conn:
                await conn.execute("SET statement_timeout = 777")  # breaking the promise, to observe it
        assert await one.fetchval("SHOW statement_timeout") == "777ms"  # no reset round trip was made
        assert await one.fetchval("SHOW statement_timeout") == "0"


async def wait_for(condition: Any, within: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_the_store_keeps_a_connection_between_statements_while_the_pool_has_room(schema):
    async with db.create_pool(DATABASE_URL, schema, min_size=1, max_size=2) as two:
        store = EventStore(two, schema=schema)
        store.notifier.enabled = False
        await store.append("s", [paid(1)], NO_STREAM)
        ((kept, _),) = store.hot._idle  # kept for the next statement, not returned to the pool
        assert two.get_idle_size() == 0
        await store.append("s", [paid(2)], 0)
        assert [c for c, _ in store.hot._idle] == [kept]  # the same connection again
        await wait_for(lambda: two.get_idle_size() == 1)  # handed back once idle for the linger time


async def test_the_store_never_sits_on_a_connection_the_pool_lacks(schema):
    async with db.create_pool(DATABASE_URL, schema, min_size=1, max_size=2) as two:
        store = EventStore(two, schema=schema)
        store.notifier.enabled = False
        async with two.acquire() as other:  # someone else holds the second connection: the pool is full
            await store.append("s", [paid(1)], NO_STREAM)
            # A third user may be waiting: the store hands it back after the short limit, not the linger.
            waiter = asyncio.create_task(two.fetchval("SELECT 1"))
            assert await asyncio.wait_for(waiter, 30) == 1
            assert store.hot._idle == []
            await store.append("s", [paid(2)], 0)
            assert await other.fetchval("SELECT count(*) FROM events") == 2


def gone(conn: Any) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # asyncpg already gave it back to the pool
        return True


async def test_a_kept_connection_whose_backend_died_is_skipped(event_store, pool):
    await event_store.append("s", [paid(1)], NO_STREAM)
    ((kept, _),) = event_store.hot._idle
    await pool.fetchval("SELECT pg_terminate_backend($1)", kept.get_server_pid())
    await wait_for(lambda: gone(kept))
    await event_store.append("s", [paid(2)], 0)  # on another connection, no error
    assert [e.version for e in await event_store.load("s")] == [0, 1]


async def test_after_all_kept_connections_die_appends_recover_without_stray_errors(event_store, pool):
    loop = asyncio.get_running_loop()
    stray: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: stray.append(context))
    try:
        await asyncio.gather(*(event_store.append(f"s{n}", [paid(n)], NO_STREAM) for n in range(6)))
        pids = [conn.get_server_pid() for conn, _ in event_store.hot._idle]
        assert len(pids) > 1
        await pool.fetchval("SELECT count(pg_terminate_backend(pid)) FROM unnest($1::int[]) AS pid", pids)
        written, failures = 0, 0
        while written < 6:  # each dead connection costs at most one TransientError, then it is gone
            try:
                await event_store.append(f"s{written}", [paid(written)], 0)
                written += 1
            except TransientError:
                failures += 1
                assert failures <= len(pids)
        hot = event_store.hot
        await wait_for(lambda: not hot._idle and hot._timer is None and not hot._releasing)  # all handed back
    finally:
        loop.set_exception_handler(None)
    assert stray == []
    assert await counts(pool) == (12, 12)
