"""``eventfleet migrate``: numbered migrations tracked in a table, idempotent, safe when ten pods run it at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from store import db, errors, migrate, queries
from tests.conftest import AMQP_URL, DATABASE_URL, new_schema
from workers import admin


@pytest.fixture
async def fresh_schema() -> AsyncIterator[str]:
    """A schema name nobody has migrated yet; dropped after the test."""
    name = new_schema("t_mig", 12)
    yield name
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def test_ten_concurrent_runs_apply_each_migration_exactly_once(fresh_schema):
    shipped = [m.version for m in migrate.store_migrations()]
    assert shipped == sorted(set(shipped))
    assert shipped[0] == 1
    applied = await asyncio.gather(*(admin.run_migrate(DATABASE_URL, fresh_schema) for _ in range(10)))
    assert sorted(v for run in applied for v in run) == shipped  # one run applied them, nine found them done
    assert sum(1 for run in applied if run) == 1
    conn = await db.connect(DATABASE_URL, fresh_schema)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == shipped
    finally:
        await conn.close()
    assert await admin.run_migrate(DATABASE_URL, fresh_schema) == []  # idempotent


async def test_every_named_query_prepares_against_the_migrated_schema(schema):
    conn = await db.connect(DATABASE_URL, schema)
    try:
        for name, sql in queries.bind(queries.TEMPLATES, schema).items():
            try:
                await conn.prepare(sql)
            except asyncpg.PostgresError as exc:
                pytest.fail(f"query {name}: {exc}")
    finally:
        await conn.close()


def run_cli(*args: str, schema: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_SCHEMA": schema}
    return subprocess.run([sys.executable, "-m", "workers", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.slow
def test_the_command_line_migrates_then_reports_up_to_date(fresh_schema):
    first = run_cli("migrate", schema=fresh_schema)
    assert first.returncode == 0, first.stderr
    assert "applied migrations 1, 2" in first.stdout
    second = run_cli("migrate", schema=fresh_schema)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout


async def test_a_schema_without_the_claim_function_is_behind_the_workers_code(pool: db.Pool, schema: str) -> None:
    await pool.execute("DROP FUNCTION claim_checkpoints")  # as a schema migrated by the previous release

    with pytest.raises(errors.SchemaBehind) as refused:
        await migrate.check_current(pool, schema)

    assert refused.value.missing == [15]
    assert str(refused.value) == (f"schema {schema!r} lacks migrations 15, which this release's workers need: "
                                  "run `eventfleet migrate` first")


async def test_a_migrated_schema_is_current(pool: db.Pool, schema: str) -> None:
    await migrate.check_current(pool, schema)


async def test_a_worker_refuses_to_start_on_a_schema_behind_its_code(pool: db.Pool, schema: str, prefix: str) -> None:
    await pool.execute("DROP FUNCTION claim_checkpoints")
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL,
           "EVENTFLEET_SCHEMA": schema, "EVENTFLEET_PREFIX": prefix, "EVENTFLEET_HTTP_PORT": "0"}
    worker = await asyncio.create_subprocess_exec(sys.executable, "-m", "workers", "worker", env=env,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(worker.communicate(), 60)

    assert worker.returncode == 1
    assert err.decode().splitlines()[-1].startswith(f"eventfleet worker: schema {schema!r} lacks migrations ")
