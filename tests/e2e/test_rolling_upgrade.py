"""A rolling upgrade, writers first: old workers meet events of a version they do not know, then new workers
take over. Nothing is parked, the read model without a handler for the new type is never stopped, the held
partitions say why in ``status``, and once the new workers run every event is applied exactly once without
anyone re-driving anything (issue 23, point 3)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from store import NO_STREAM, EventStore, db
from tests.conftest import AMQP_URL, DATABASE_URL, new_prefix, new_schema
from tests.e2e.upgrade.events_v2 import Noted, Rated, RatedV1
from workers.config import Settings
from workers.fleet import Fleet, open_fleet
from workers.projector import lag

pytestmark = pytest.mark.slow

OLD, NEW = "tests.e2e.upgrade.old", "tests.e2e.upgrade.new"
PROJECTIONS = ("ratings", "notes")
PARTITIONS = 4
ITEMS = 24
WITHIN = 90.0
ENV = {"EVENTFLEET_LEASE_SECONDS": "6", "EVENTFLEET_RELAY_POLL_MS": "100", "EVENTFLEET_CATCHUP_THRESHOLD": "0"}


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=new_schema(), prefix=new_prefix(),
                        partitions=PARTITIONS, projection_modules=(OLD,))
    async with open_fleet(settings, tmp_path, env=ENV, projections=PROJECTIONS) as f:
        # In a process of its own: the old release's tables, its modules not imported here.
        migrate = await asyncio.create_subprocess_exec(sys.executable, "-m", "workers", "migrate", env=f.env,
                                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(migrate.communicate(), 60)
        assert migrate.returncode == 0, err.decode()
        yield f


async def status(f: Fleet) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "workers", "status", "--json", env=f.env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    document: dict[str, Any] = json.loads(out)
    return document


async def until(condition: Any, what: str, f: Fleet) -> None:
    async with asyncio.timeout(WITHIN):
        while not await condition():
            f.check()
            await asyncio.sleep(0.2)


async def test_old_workers_hold_a_newer_version_and_new_workers_apply_everything_with_nothing_parked(fleet: Fleet):
    f = fleet
    await f.start("relay")
    old = [await f.start("worker") for _ in range(2)]
    async with db.create_pool(DATABASE_URL, f.settings.schema, min_size=1, max_size=4) as pool:
        store = EventStore(pool, schema=f.settings.schema)
        # The old release's writers, then the new release's (writers are upgraded first).
        await store.append_batch([(f"item-{i}", [RatedV1(f"item-{i}", 3), Noted(f"item-{i}", "old")], NO_STREAM)
                                  for i in range(ITEMS)])
        await store.append_batch([(f"item-{i}", [Rated(f"item-{i}", 5, "great" if i % 2 else ""),
                                                 Noted(f"item-{i}", "new")], 1) for i in range(ITEMS)])

        async def notes_caught_up() -> bool:
            return (await lag.measure(pool, "notes")).lag_events == 0

        async def ratings_held() -> bool:
            document = await status(f)
            return sum(1 for p in document["partition_lags"] if p["projection"] == "ratings" and p["held"]) > 0

        await until(notes_caught_up, "the read model without a Rated handler applies everything", f)
        await until(ratings_held, "status says which partitions of ratings wait for a newer worker", f)
        held = [p for p in (await status(f))["partition_lags"] if p["held"]]
        assert {p["projection"] for p in held} == {"ratings"}
        assert all("Rated.v2, newer than this code" in p["held"] for p in held)
        assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0

        # The workers are upgraded: new ones join, the old ones leave.
        for _ in range(2):
            await f.start("worker", env={"EVENTFLEET_PROJECTION_MODULES": NEW})
        for worker in old:
            assert await f.stop(worker) == 0

        async def all_applied() -> bool:
            return all([(await lag.measure(pool, p)).lag_events == 0 for p in PROJECTIONS])

        await until(all_applied, "every event applied by the new workers", f)
        ratings = {r["item"]: (r["stars"], r["ratings"], r["comments"]) for r in await pool.fetch("SELECT * FROM ratings")}
        notes = {r["item"]: r["notes"] for r in await pool.fetch("SELECT * FROM notes")}
        assert ratings == {f"item-{i}": (8, 2, i % 2) for i in range(ITEMS)}
        assert notes == {f"item-{i}": 2 for i in range(ITEMS)}
        assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert [p for p in (await status(f))["partition_lags"] if p["held"]] == []
