"""Fault injection against a real fleet: each fault alone, then all of them in one mixed run.

Every scenario runs two relays and three workers under a steady write load (those marked ``grouped`` in a worker
group: EVENTFLEET_GROUP, one queue per partition for every read model; the others with P queues per read model), injects its faults on a seeded
schedule, waits for lag 0 and proves every read model equal to the fold of the store: nothing lost, nothing
doubled. Short in CI; ``make chaos`` lengthens the load (EVENTFLEET_CHAOS_SECONDS) and repeats the faults
(EVENTFLEET_CHAOS_REPEAT). EVENTFLEET_CHAOS_SEED replays a schedule.
"""

from __future__ import annotations

import os
import random
import zlib

import pytest

from tests.chaos import harness
from tests.chaos.faults import FAULTS

pytestmark = pytest.mark.slow


def seed_of(name: str) -> int:
    return int(os.environ.get("EVENTFLEET_CHAOS_SEED", zlib.crc32(name.encode())))


async def chaos(name: str, kinds: list[str], deployment: harness.Deployment, tmp_path) -> harness.Report:
    report = await harness.run_scenario(name, kinds, deployment, tmp_path / "logs", seed=seed_of(name))
    assert report.lost == 0
    assert report.doubled == 0
    assert report.exact
    assert report.written > 0
    read_models = ("order_summary", "customer_stats", "chaos_ledger", "chaos_shipments")
    assert {p: report.applied.get(p) for p in read_models} == {p: report.handled[p] for p in read_models}
    assert report.handled["chaos_ledger"] == report.written
    assert set(report.exit_codes.values()) == {0}, report.exit_codes  # every process stops cleanly at the end
    return report


@pytest.mark.grouped  # a worker group's fleet (one queue per partition feeds every read model)
async def test_sigkill_of_a_random_relay_or_worker(deployment, tmp_path):
    await chaos("kill", ["kill"] * harness.REPEAT, deployment, tmp_path)


async def test_rabbitmq_closes_all_connections(deployment, tmp_path):
    await chaos("close_connections", ["close_connections"] * harness.REPEAT, deployment, tmp_path)


@pytest.mark.grouped  # a worker group's fleet (one queue per partition feeds every read model)
async def test_rabbitmq_stop_app_start_app(deployment, tmp_path):
    await chaos("broker_restart", ["broker_restart"] * harness.REPEAT, deployment, tmp_path)


async def test_postgres_terminates_the_fleets_backends(deployment, tmp_path):
    report = await chaos("terminate_backends", ["terminate_backends"] * harness.REPEAT, deployment, tmp_path)
    assert all(i.details["terminated"] > 0 for i in report.injections)


async def test_postgres_restart(deployment, tmp_path):
    await chaos("postgres_restart", ["postgres_restart"] * harness.REPEAT, deployment, tmp_path)


async def test_worker_frozen_beyond_the_consumer_timeout(deployment, tmp_path):
    report = await chaos("freeze", ["freeze"] * harness.REPEAT, deployment, tmp_path)
    assert all(i.details["channels_timed_out"] > 0 for i in report.injections), "the broker never timed out"


@pytest.mark.grouped  # a worker group's fleet (one queue per partition feeds every read model)
async def test_poison_event_mid_stream_halts_then_is_retried(deployment, tmp_path):
    report = await chaos("poison", ["poison"] * harness.REPEAT, deployment, tmp_path)
    assert report.dead_lettered >= harness.REPEAT  # parked by a worker, re-driven by `dead-letters retry`


@pytest.mark.grouped  # a worker group's fleet (one queue per partition feeds every read model)
async def test_rebalance_storm_of_workers_killed_and_started(deployment, tmp_path):
    report = await chaos("rebalance_storm", ["rebalance_storm"] * harness.REPEAT, deployment, tmp_path)
    assert report.timeouts > 0  # payment_timeout's deadlines fired through it, each once (verify)


@pytest.mark.timeout(1800)  # every fault in a row: longer than one scenario
async def test_mixed_run_with_every_fault(deployment, tmp_path):
    kinds = list(FAULTS) * harness.REPEAT
    random.Random(seed_of("mixed")).shuffle(kinds)
    await chaos("mixed", kinds, deployment, tmp_path)
