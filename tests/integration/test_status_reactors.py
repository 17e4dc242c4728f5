"""``eventfleet status`` shows each reactor's deadlines (pending, the next due, fired) and refusals."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from eventfleet.examples.orders.reactors import PaymentTimeout
from projections import registry
from store import NO_STREAM
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.unit.test_projection_fold import paid, placed
from workers.projector import deadlines, parking

pytestmark = pytest.mark.slow

# Importing the reactors module registered payment_timeout in this process: only this module's tests see it.
registry.REGISTRY.pop(PaymentTimeout.name, None)

REACTORS = "eventfleet.examples.orders.projections,eventfleet.examples.orders.reactors"
NEXT_DUE = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def reactors() -> Iterator[None]:
    registry.REGISTRY[PaymentTimeout.name] = PaymentTimeout
    yield
    registry.REGISTRY.pop(PaymentTimeout.name, None)


async def status(schema: str, prefix: str, modules: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL,
           "EVENTFLEET_SCHEMA": schema, "EVENTFLEET_PREFIX": prefix, "EVENTFLEET_PROJECTION_MODULES": modules}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "workers", "status", *args, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def fired_two(pool, event_store) -> None:
    """Three orders placed; order-2 paid before its timeout fired (refused); order-1's and order-2's timeouts
    fired; order-3's pending, due at NEXT_DUE."""
    timeout = PaymentTimeout()
    timeout.bind(event_store, PARTITIONS)
    for i in (1, 2, 3):
        await event_store.append(f"order-{i}", [placed(str(i), "c")], NO_STREAM)
    await parking.apply_or_park(event_store, timeout, [e for i in (1, 2, 3)
                                                       for e in await event_store.load(f"order-{i}")])
    await event_store.append("order-2", [paid("2", "c")], 0)  # the reactor has not seen it
    await pool.execute("UPDATE deadlines SET due_at = clock_timestamp() - interval '1 second' "
                       "WHERE key IN ('order-1', 'order-2')")
    await pool.execute("UPDATE deadlines SET due_at = $1 WHERE key = 'order-3'", NEXT_DUE)
    fired = [await deadlines.Firing(event_store, timeout, p).round() for p in range(PARTITIONS)]
    assert (sum(f.fired for f in fired), sum(f.reacted.refusals for f in fired)) == (2, 1)


async def test_json_has_each_reactors_pending_and_next_deadline_fired_and_refusals(schema, prefix, fired_two):
    doc = json.loads((await status(schema, prefix, REACTORS, "--json")).stdout)
    (reactor,) = doc["reactors"]
    assert 0 < reactor.pop("next_due_seconds") <= (NEXT_DUE - dt.datetime.now(dt.UTC)).total_seconds() + 1
    assert reactor == {"name": "payment_timeout", "deadlines_pending": 1, "next_due_at": NEXT_DUE.isoformat(),
                       "deadlines_fired": 2, "refusals": 1}


async def test_the_table_has_a_row_per_reactor(schema, prefix, fired_two):
    lines = (await status(schema, prefix, REACTORS)).stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("REACTOR"))
    row = lines[header + 1].split()
    assert (row[:3], row[4:]) == (["payment_timeout", "1", "in"], ["2", "1"])
    assert row[3].endswith("s")


async def test_a_reactor_whose_module_is_not_loaded_shows_by_what_it_left(schema, prefix, fired_two):
    doc = json.loads((await status(schema, prefix, "eventfleet.examples.orders.projections", "--json")).stdout)
    assert [(r["name"], r["deadlines_pending"], r["deadlines_fired"], r["refusals"]) for r in doc["reactors"]] == [
        ("payment_timeout", 1, 2, 1)]


async def test_no_reactor_no_reactors_table(schema, prefix):
    result = await status(schema, prefix, "eventfleet.examples.orders.projections")
    assert not [line for line in result.stdout.splitlines() if line.startswith("REACTOR")]
    assert json.loads((await status(schema, prefix, "eventfleet.examples.orders.projections", "--json")).stdout)[
        "reactors"] == []
