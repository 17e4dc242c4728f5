"""``eventfleet rebuild`` killed with SIGKILL mid-way resumes where it stopped when run again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import asyncpg
import pytest

from store import names
from tests.conftest import DATABASE_URL
from tests.integration.test_rebuild_helpers import drop_shadows, expected, read_models, write_orders
from workers import rebuild

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures(drop_shadows.__name__)]


def start_rebuild(schema: str) -> subprocess.Popen[str]:
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_SCHEMA": schema}
    return subprocess.Popen([sys.executable, "-m", "workers", "rebuild", "order_summary"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


async def test_a_sigkilled_rebuild_resumes_from_its_last_batch(pool, event_store, schema):
    total = await write_orders(event_store, 12_000, random.Random(9), chunk=500)
    assert total > 3 * rebuild.BATCH_SIZE
    cursor = f"SELECT events FROM {names.quote(rebuild.shadow_schema(schema, 'order_summary'))}.rebuild_cursor"
    proc = start_rebuild(schema)
    try:
        deadline = time.monotonic() + 120
        done = 0
        while done < rebuild.BATCH_SIZE:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no batch committed"
            with contextlib.suppress(asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
                done = await pool.fetchval(cursor) or 0
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)  # reaps it and closes its pipes
    assert await pool.fetchval("SELECT state FROM projection_status WHERE projection = 'order_summary'") == \
        "rebuilding"

    returncode, out, err = finish(start_rebuild(schema))
    assert returncode == 0, err
    assert ", resumed;" in out
    resumed = int(out.split(": ", 1)[1].split(" events", 1)[0].replace(",", ""))
    assert 0 < resumed < total
    assert "ETA" in err
    assert (await read_models(pool)).order_summary == (await expected(event_store)).order_summary
    assert await pool.fetchval("SELECT state FROM projection_status WHERE projection = 'order_summary'") == "live"
