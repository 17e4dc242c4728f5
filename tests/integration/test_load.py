"""``eventfleet load``: orders driven through their lives by concurrent writers that collide and retry."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest

from eventfleet.examples.orders import load, orders
from tests.conftest import DATABASE_URL

LIVES = {("OrderPlaced", "OrderPaid", "OrderShipped"), ("OrderPlaced", "OrderCancelled"),
         ("OrderPlaced", "OrderPaid", "OrderCancelled"),
         ("OrderPlaced",)}  # left unpaid: the payment_timeout reactor's to cancel


async def test_every_order_ends_exactly_at_the_end_of_its_planned_life(event_store, pool):
    report = await load.run_load(event_store, 40, concurrency=8, seed=7, run_id="r1")
    plans = load.plan_orders(40, seed=7, run_id="r1")
    assert report.orders == 40
    assert report.events == sum(len(p.steps) for p in plans)
    assert await pool.fetchval("SELECT count(*) FROM events") == report.events
    lives: collections.Counter[tuple[str, ...]] = collections.Counter()
    for plan in plans:
        events = await event_store.load(orders.stream_id(plan.order_id))
        life = tuple(e.event_type.partition(".")[0] for e in events)
        assert life in LIVES
        assert len(life) == len(plan.steps)
        lives[life] += 1
    assert len(lives) >= 2
    assert report.conflicts > 0  # tokens of one order ran at once and collided


def test_plans_are_reproducible_from_the_seed_with_fresh_order_ids() -> None:
    def shape(plans: list[load.Plan]) -> list[int]:
        return [len(p.steps) for p in plans]

    first, again = load.plan_orders(20, seed=3), load.plan_orders(20, seed=3)
    assert shape(first) == shape(again)
    assert shape(first) != shape(load.plan_orders(20, seed=4))
    assert not {p.order_id for p in first} & {p.order_id for p in again}  # a second run places new orders


async def test_the_same_seeded_load_runs_twice_on_one_store(event_store) -> None:
    first = await load.run_load(event_store, 5, concurrency=2, seed=1)
    second = await load.run_load(event_store, 5, concurrency=2, seed=1)
    assert first.events == second.events


@pytest.mark.slow
def test_the_command_prints_what_it_wrote(schema: str) -> None:
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_SCHEMA": schema}
    done = subprocess.run([sys.executable, "-m", "workers", "load", "--orders", "10", "--concurrency", "4",
                           "--seed", "1"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "wrote " in done.stdout
    assert "events/s" in done.stdout
    assert "version conflicts retried" in done.stdout
