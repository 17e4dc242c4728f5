"""Hostile input against the real database: exact round trips or typed errors, never a crash or SQL text."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import aio_pika
import aiormq.exceptions
import asyncpg
import pytest

from eventfleet.examples.orders.events import OrderPaid
from store import db, errors, migrate
from store.event_store import NO_STREAM, EventStore
from tests.conftest import DATABASE_URL
from tests.contract.test_input import round_trip
from workers import admin
from workers.config import Settings

NOW = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
PAID = OrderPaid("o", "c", Decimal("1.25"), NOW)

HOSTILE_STREAM_IDS = [
    'order-"1"', "order-'1'", "o'; DROP TABLE events; --", 'o"; DROP TABLE events; --', "\\x00", "%s%n",
    "ordre-é", "日本語-ストリーム", "🎉-party", "e\u0301", "a b c", "$1",
    "x" * 255, "é" * 255, "\U0001d54f" * 255,
]


@pytest.mark.parametrize("stream_id", HOSTILE_STREAM_IDS)
async def test_unicode_and_quoted_stream_ids_round_trip_exactly(
        event_store: EventStore, pool: db.Pool, stream_id: str) -> None:
    await round_trip(event_store, stream_id)
    assert await pool.fetchval("SELECT stream_id FROM events") == stream_id


# --- injected names never reach SQL ------------------------------------------------------------------

INJECTED_SCHEMAS = ['x"; DROP TABLE canary; --', "public; DROP TABLE canary", 'canary_s"."canary', "x' OR 1=1"]


@pytest.fixture
async def canary(schema: str) -> str:
    """A table whose survival shows that no injected statement ran."""
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'CREATE TABLE "{schema}".canary (id int); INSERT INTO "{schema}".canary VALUES (1)')
    finally:
        await conn.close()
    return schema


async def _canary_alive(schema: str) -> bool:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        return bool(await conn.fetchval(f'SELECT count(*) = 1 FROM "{schema}".canary'))
    finally:
        await conn.close()


async def _statements_seen(marker: str) -> int:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
            marker))
    finally:
        await conn.close()


@pytest.mark.parametrize("evil", INJECTED_SCHEMAS)
async def test_injected_schema_names_are_refused_before_connecting(canary: str, evil: str) -> None:
    with pytest.raises(errors.ConfigError, match="EVENTFLEET_SCHEMA"):
        Settings.from_env({"EVENTFLEET_SCHEMA": evil})
    # The lower layers refuse it too, before opening any connection.
    with pytest.raises(errors.InvalidName):
        await admin.run_migrate(DATABASE_URL, evil)
    with pytest.raises(errors.InvalidName):
        async with db.create_pool(DATABASE_URL, evil):
            pass
    with pytest.raises(errors.InvalidName):
        await db.connect(DATABASE_URL, evil)
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        with pytest.raises(errors.InvalidName):
            await migrate.migrate(conn, evil)
        assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", evil) == 0
    finally:
        await conn.close()
    assert await _canary_alive(canary)


async def test_a_hostile_stream_id_is_a_parameter_not_sql(event_store: EventStore, canary: str) -> None:
    marker = uuid.uuid4().hex
    evil = f"o'; DROP TABLE canary; -- {marker}"
    await event_store.append(evil, [PAID], NO_STREAM)
    assert [e.stream_id for e in await event_store.load(evil)] == [evil]
    assert await _canary_alive(canary)
    assert await _statements_seen(marker) == 0


# --- URL options reach the drivers -------------------------------------------------------------------

async def test_sslmode_in_the_url_reaches_asyncpg() -> None:
    # This server has no TLS: require must fail where disable connects, so the option was honoured.
    plain = Settings.from_env({"EVENTFLEET_DATABASE_URL": f"{DATABASE_URL}?sslmode=disable"}).database_url
    conn = await db.connect(plain, "public")
    await conn.close()
    required = Settings.from_env({"EVENTFLEET_DATABASE_URL": f"{DATABASE_URL}?sslmode=require"}).database_url
    with pytest.raises(errors.TransientError, match="SSL"):
        await db.connect(required, "public")


async def test_amqps_in_the_url_reaches_aio_pika() -> None:
    # This broker port speaks plain AMQP: an amqps:// URL must attempt a TLS handshake there and fail.
    url = Settings.from_env({"EVENTFLEET_AMQP_URL": "amqps://guest:guest@127.0.0.1:5672/"}).amqp_url
    with pytest.raises(aiormq.exceptions.AMQPConnectionError, match="SSL"):
        await aio_pika.connect(url, timeout=10)
