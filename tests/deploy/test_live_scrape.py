"""A real Prometheus scrapes a real worker and relay during a small load, with deploy/'s rules loaded.

It sees the lag rise and return to 0 (per projection and per partition, the worker holding every
partition), finds every metric the alerts, the dashboard and the autoscaler
use, evaluates the rules without errors (the relay-down rule goes pending while no relay runs), and
runs every dashboard query.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aio_pika.abc import AbstractRobustConnection

from eventfleet.examples.orders.events import LineItem, OrderPaid, OrderPlaced
from projections import registry
from store.event_store import EventStore
from tests.conftest import PARTITIONS
from tests.deploy import test_dashboard
from tests.deploy.support import ALERTS, OVERLAY, ROOT, alert_rules, compose, metric_names
from workers import broker

pytestmark = pytest.mark.slow

T = TypeVar("T")
ORDERS = 40
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Processes:
    """Child processes with their output in files; stopped with SIGTERM (then SIGKILL) at the end."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with (self.directory / f"{name}.log").open("wb") as log:
            self.running[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def stop(self, name: str) -> int:
        process = self.running.pop(name)
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.directory.glob("*.log")))


@pytest.fixture
def processes(tmp_path: pathlib.Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    for name in list(procs.running):
        with contextlib.suppress(subprocess.TimeoutExpired):
            procs.stop(name)


@pytest.fixture
async def topology(prefix: str, amqp: AbstractRobustConnection) -> AsyncIterator[list[str]]:
    """The test's exchange and queues, declared before any process starts; deleted after."""
    projections = sorted(registry.load([registry.EXAMPLE]))
    names = broker.Names(prefix)
    channel = await amqp.channel()
    await broker.declare_topology(channel, names, projections, PARTITIONS)
    yield projections
    await broker.delete_topology(channel, names, projections, PARTITIONS)
    await channel.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


class Prometheus:
    """The HTTP API of the test's Prometheus server."""

    def __init__(self, session: aiohttp.ClientSession, port: int, procs: Processes) -> None:
        self.session, self.base, self.procs = session, f"http://127.0.0.1:{port}", procs

    async def get(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.base}{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    async def eventually(self, what: str, check: Callable[[], Awaitable[T | None]], within: float = 60) -> T:
        """Poll check until it returns something truthy; fail with the processes' logs at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                value = await check()
            except (aiohttp.ClientError, AssertionError):
                value = None
            if value:
                return value
            if loop.time() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{self.procs.logs()}")
            await asyncio.sleep(0.25)  # polling interval, not a wait for an outcome

    async def values(self, promql: str) -> dict[str, float]:
        """{projection (or ""): value} of an instant query."""
        return {r["metric"].get("projection", ""): float(r["value"][1]) for r in await self.query(promql)}


def prometheus_config(worker_port: int, relay_port: int) -> dict[str, Any]:
    """Like deploy/prometheus/prometheus.yml: job "eventfleet", a component label, the alert rules."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{
            "job_name": "eventfleet",
            "static_configs": [
                {"targets": [f"127.0.0.1:{worker_port}"], "labels": {"component": "worker"}},
                {"targets": [f"127.0.0.1:{relay_port}"], "labels": {"component": "relay"}},
            ],
        }],
    }


async def place_orders(event_store: EventStore, count: int) -> int:
    """Append count orders, placed then paid; return the number of events."""
    now = dt.datetime.now(dt.UTC)
    for _ in range(count):
        order_id, customer_id = uuid.uuid4().hex, f"c{uuid.uuid4().hex[:4]}"
        item = LineItem("p1", "Widget", "W-1", 2, Decimal("5.00"))
        await event_store.append(f"order-{order_id}", [
            OrderPlaced(order_id, customer_id, (item,), Decimal("10.00"), Decimal("1.00"), Decimal("11.00"), now),
            OrderPaid(order_id, customer_id, Decimal("11.00"), now),
        ], -1)
    return 2 * count


#: The series of subscribers this scrape does not run: no publication (its counter's series exist once a
#: publication publishes: tests/integration/test_publications.py counts it; its dashboard queries are parsed by
#: tests/deploy/test_dashboard.py).
NOT_RUN_HERE = ("eventfleet_publication_",)


def used_metric_names() -> dict[str, set[str]]:
    """Every metric name the alerts, the dashboard and the autoscaler query -> where it is used."""
    used: dict[str, set[str]] = {}
    exprs = [("alerts.yaml", r["expr"]) for r in alert_rules()]
    exprs += [("eventfleet.json", e) for e in test_dashboard.expressions()]
    exprs += [("ScaledObject", d["spec"]["triggers"][0]["metadata"]["query"])
              for d in compose(OVERLAY) if d["kind"] == "ScaledObject"]
    for where, expr in exprs:
        for name in metric_names(expr):
            if name.startswith(NOT_RUN_HERE):
                continue
            used.setdefault(name, set()).add(where)
    return used


async def test_prometheus_scrapes_the_lag_rising_and_returning_to_zero(
    schema: str, prefix: str, event_store: EventStore, topology: list[str], database_url: str, amqp_url: str,
    processes: Processes, http: aiohttp.ClientSession, tmp_path: pathlib.Path,
) -> None:
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        pytest.fail("prometheus not found: apt-get install prometheus (.ci/run does)")
    projections = topology
    worker_port, relay_port, prometheus_port = free_port(), free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(worker_port, relay_port)))
    processes.start("prometheus", [
        prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prometheus_port}",
        "--log.level=warn",
    ])
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": database_url, "EVENTFLEET_AMQP_URL": amqp_url,
           "EVENTFLEET_SCHEMA": schema, "EVENTFLEET_PREFIX": prefix, "EVENTFLEET_LOG_FORMAT": "json"}
    processes.start("worker", [sys.executable, "-m", "workers", "worker"],
                    {**env, "EVENTFLEET_HTTP_PORT": str(worker_port)})
    prom = Prometheus(http, prometheus_port, processes)
    lag = 'eventfleet_projection_lag_events{job="eventfleet"}'

    async def worker_reports_zero_lag() -> bool:
        values = await prom.values(lag)
        return sorted(values) == projections and set(values.values()) == {0.0}

    await prom.eventually("the worker's lag series, at 0", worker_reports_zero_lag)

    # No relay yet: its target is down, and the rule that watches for that evaluates to pending.
    async def relay_down_pending() -> list[dict[str, Any]]:
        return await prom.query('ALERTS{alertname="EventfleetRelayDown", alertstate="pending"}')

    await prom.eventually("EventfleetRelayDown pending while no relay runs", relay_down_pending)

    # Events committed but not relayed: the lag (measured against the store) rises.
    events = await place_orders(event_store, ORDERS)

    async def lag_risen() -> bool:
        values = await prom.values(lag)
        return sorted(values) == projections and all(v > 0 for v in values.values())

    await prom.eventually("the lag of every projection above 0", lag_risen)

    processes.start("relay", [sys.executable, "-m", "workers", "relay"], {**env, "EVENTFLEET_HTTP_PORT": str(relay_port)})

    async def caught_up() -> bool:
        applied = await prom.values('sum by (projection) (eventfleet_projection_applied_total{job="eventfleet"})')
        return await worker_reports_zero_lag() and sorted(applied) == projections and all(
            v >= events for v in applied.values())

    await prom.eventually(f"lag back to 0 with {events} events applied per projection", caught_up)
    peaks = await prom.values(f"max by (projection) (max_over_time({lag}[10m]))")
    assert all(v > 0 for v in peaks.values()), peaks
    assert sorted(peaks) == projections

    # The lone worker holds every partition of every projection, and each partition's lag is back to 0.
    async def partitions_held_and_current() -> bool:
        held = await prom.values('eventfleet_worker_partitions_held{job="eventfleet"}')
        lags = await prom.query('eventfleet_projection_partition_lag_events{job="eventfleet"}')
        series = {(r["metric"]["projection"], r["metric"]["partition"]): float(r["value"][1]) for r in lags}
        return held == dict.fromkeys(projections, float(PARTITIONS)) and series == {
            (p, str(n)): 0.0 for p in projections for n in range(PARTITIONS)}

    await prom.eventually("every partition held and at lag 0", partitions_held_and_current)

    async def relay_up_and_alert_cleared() -> bool:
        up = await prom.values('up{job="eventfleet", component="relay"}')
        return up == {"": 1.0} and not await prom.query('ALERTS{alertname="EventfleetRelayDown"}')

    await prom.eventually("the relay scraped and EventfleetRelayDown cleared", relay_up_and_alert_cleared)

    # Every metric the alerts, the dashboard and the autoscaler use exists in this scrape.
    used = used_metric_names()

    async def all_present() -> set[str]:
        scraped = set(await prom.get("/api/v1/label/__name__/values"))
        missing = set(used) - scraped
        assert not missing, f"never scraped: { {m: sorted(used[m]) for m in sorted(missing)} }"
        return scraped

    await prom.eventually("every used metric in the scrape", all_present, within=15)

    # The rules evaluate against real series without errors.
    async def rules_evaluated() -> list[dict[str, Any]]:
        groups = (await prom.get("/api/v1/rules"))["groups"]
        rules: list[dict[str, Any]] = [r for g in groups for r in g["rules"]]
        return rules if all(r["lastEvaluation"] > "2000" for r in rules) else []

    rules = await prom.eventually("every rule evaluated", rules_evaluated)
    assert len(rules) == len(alert_rules())
    assert {r["name"]: r["health"] for r in rules} == {r["alert"]: "ok" for r in alert_rules()}
    firing = await prom.query('ALERTS{alertstate="firing"}')
    assert firing == [], firing

    # Every dashboard query runs and returns series from this scrape (rates need a second sample).
    for expr in test_dashboard.expressions():
        if any(name.startswith(NOT_RUN_HERE) for name in metric_names(expr)):
            continue
        plain = test_dashboard.plain_promql(expr)
        await prom.eventually(f"data for the dashboard query {expr}", functools.partial(prom.query, plain), within=15)
    # So does the autoscaler's query, minus its namespace (there is no Kubernetes here).
    for doc in compose(OVERLAY):
        if doc["kind"] == "ScaledObject":
            query = re.sub(r'namespace="[^"]*",\s*', "", doc["spec"]["triggers"][0]["metadata"]["query"])
            scaled = set(re.findall(r'projection=~"([^"]*)"', query)[0].split("|"))
            if not scaled <= set(topology):  # the reactors' worker group: this scrape runs the read models only
                continue
            assert [float(r["value"][1]) for r in await prom.query(query)] == [0.0], query

    # A clean signal-driven shutdown exits 0 (docs/reference.md, exit statuses).
    assert processes.stop("relay") == 0, processes.logs()
    assert processes.stop("worker") == 0, processes.logs()
