"""The README's reactor ("Reactors: workers that act") runs as written: its file type-checks, and a worker running
it cancels an unpaid order when its deadline is due and leaves a paid one alone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced
from store import NO_STREAM, EventStore, db
from tests.conftest import AMQP_URL, DATABASE_URL
from tests.e2e import readme
from tests.unit.test_projection_fold import paid, placed

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def section() -> str:
    return readme.section('Reactors: workers that act')


def blocks(kind: str) -> list[tuple[str, str]]:
    """(info string, body) of the section's fenced blocks whose language is ``kind``."""
    return readme.blocks(section(), kind)


@pytest.fixture
def service(tmp_path: Path) -> Path:
    (block,) = blocks("python")
    assert block[0] == "file=timeouts.py"
    (tmp_path / "timeouts.py").write_text(block[1])
    return tmp_path


@pytest.fixture
def env(service: Path) -> Iterator[dict[str, str]]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    values = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL,
              "EVENTFLEET_SCHEMA": name, "EVENTFLEET_PREFIX": f"test.{name}", "EVENTFLEET_HTTP_PORT": "0",
              "EVENTFLEET_PROJECTION_MODULES": "timeouts", "EVENTFLEET_RELAY_POLL_MS": "100",
              "PYTHONPATH": str(service), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    yield values
    subprocess.run([str(BIN / "eventfleet"), "teardown", "--yes"], env=values, cwd=service, capture_output=True,
                   check=False, timeout=60)
    subprocess.run(["psql", DATABASE_URL, "-qc", f'DROP SCHEMA IF EXISTS "{name}" CASCADE'], capture_output=True,
                   check=False)


@pytest.fixture
def fleet(service: Path, env: dict[str, str]) -> Iterator[list[subprocess.Popen[str]]]:
    """The README's commands: migrate, then a relay and a worker in the background (stopped with SIGTERM)."""
    subprocess.run([str(BIN / "eventfleet"), "migrate"], env=env, cwd=service, check=True, capture_output=True,
                   timeout=120)
    procs: list[subprocess.Popen[str]] = []
    try:
        for role in ("relay", "worker"):
            with (service / f"{role}.log").open("w") as log:
                procs.append(subprocess.Popen([str(BIN / "eventfleet"), role], env=env, cwd=service, text=True,
                                              stdout=subprocess.DEVNULL, stderr=log))
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)


def test_the_reactor_type_checks_strictly(service: Path) -> None:
    done = subprocess.run([str(BIN / "mypy"), "--strict", "--no-incremental", "timeouts.py"], cwd=service,
                          env={**os.environ, "MYPYPATH": str(ROOT)},  # an editable install hides it from mypy
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stdout


async def until(pool: db.Pool, query: str, expected: object, procs: list[subprocess.Popen[str]], logs: Path) -> None:
    deadline = time.monotonic() + 60
    while (found := await pool.fetchval(query)) != expected:
        assert time.monotonic() < deadline, f"{query}: {found}, not {expected}; logs in {logs}"
        assert all(p.poll() is None for p in procs), f"a process ended; logs in {logs}"
        await asyncio.sleep(0.1)


async def test_a_worker_running_the_readme_reactor_cancels_the_unpaid_order_when_due(
        service: Path, env: dict[str, str], fleet: list[subprocess.Popen[str]]) -> None:
    async with db.create_pool(DATABASE_URL, env["EVENTFLEET_SCHEMA"], min_size=1, max_size=2) as pool:
        store = EventStore(pool, schema=env["EVENTFLEET_SCHEMA"])
        await store.append("order-1", [placed("1", "c")], NO_STREAM)
        await store.append("order-2", [placed("2", "c")], NO_STREAM)
        await until(pool, "SELECT count(*) FROM deadlines", 2, fleet, service)  # one timeout per order
        await store.append("order-2", [paid("2", "c")], 0)
        await until(pool, "SELECT string_agg(key, ',') FROM deadlines", "order-1", fleet, service)
        # Due now, rather than in the README's 15 minutes.
        await pool.execute("UPDATE deadlines SET due_at = clock_timestamp() - interval '1 second'")
        await until(pool, "SELECT count(*) FROM deadlines", 0, fleet, service)
        one, two = await store.load("order-1"), await store.load("order-2")
    assert [type(e.event) for e in one] == [OrderPlaced, OrderCancelled]
    assert one[-1].event.reason == "payment timeout"
    assert [type(e.event) for e in two] == [OrderPlaced, OrderPaid]
