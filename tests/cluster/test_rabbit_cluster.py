"""The fleet on a real 3-node RabbitMQ cluster (tests/cluster/rabbit.py): quorum queues spread over the nodes,
the relay's flow control under an alarm, readiness through node failures, and five fault scenarios under load,
each ending with read models equal to the fold of the store (tests/cluster/rabbit_fleet.py).

Each scenario's figures are printed as one JSON line (and appended to EVENTFLEET_CLUSTER_REPORT when set).
The CI runs short forms; ``make chaos-cluster`` sets EVENTFLEET_CLUSTER_SECONDS for longer faults and loads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from store import NO_STREAM, EventStore, db
from tests.cluster import rabbit_fleet
from tests.cluster.proxy import Proxy
from tests.cluster.rabbit import HarnessError, Node, RabbitCluster
from tests.cluster.rabbit_fleet import PARTITIONS, PROJECTIONS, Context, http_get, metric, scaled
from tests.conftest import DATABASE_URL
from tests.unit.test_projection_fold import order_life
from workers import broker, fleet, relay
from workers.runtime import health, metrics

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600 + 20 * rabbit_fleet.SECONDS)]


def partition_leaders(cluster: RabbitCluster, prefix: str) -> dict[str, str]:
    """Partition queue -> its leader's node, for a deployment's prefix."""
    pattern = re.compile(rf"{re.escape(prefix)}\.[a-z_]+\.\d+$")
    return {q: leader for q, leader in cluster.leaders(prefix).items() if pattern.match(q)}


# --- the topology on a cluster -------------------------------------------------------------------------------------


async def test_partition_queues_get_three_replicas_and_leaders_on_every_node(rabbit: RabbitCluster) -> None:
    prefix = "cl.leaders"
    connection = await aio_pika.connect(rabbit.nodes[0].direct_url)
    async with connection:
        channel = await connection.channel()
        await broker.declare_partitions(channel, broker.Names(prefix), ["customer_stats"], PARTITIONS)
        try:
            queues = {q["name"]: q for q in rabbit.queues() if q["name"].startswith(prefix)}
            partition_queues = [queues[f"{prefix}.customer_stats.{p}"] for p in range(PARTITIONS)]
            for queue in partition_queues:
                assert queue["type"] == "quorum"
                assert sorted(queue["members"]) == sorted(n.name for n in rabbit.nodes)  # 3 replicas, one per node
            leaders = collections.Counter(q["leader"] for q in partition_queues)
            assert set(leaders) == {n.name for n in rabbit.nodes}, leaders  # balanced: every node leads some
            assert max(leaders.values()) - min(leaders.values()) <= 1, leaders
        finally:
            await broker.delete_partitions(channel, broker.Names(prefix), ["customer_stats"], PARTITIONS)


# --- the relay under a blocking alarm, in process --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def in_process_relay(pool: db.Pool, schema: str, prefix: str, urls: list[str],
                           status: health.Health) -> AsyncIterator[asyncio.Task[None]]:
    config = relay.RelayConfig(database_url=DATABASE_URL, schema=schema, amqp_url=urls[0], amqp_urls=tuple(urls),
                               prefix=prefix, projections=PROJECTIONS, poll_interval=0.1, metrics_interval=0.5,
                               confirm_timeout=10)
    task = asyncio.create_task(relay.run_relay(pool, config, status))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: object, within: float, what: str) -> float:
    began = time.monotonic()
    while True:
        result = check() if callable(check) else check
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - began
        assert time.monotonic() - began < within, f"{what}: not within {within}s"
        await asyncio.sleep(0.05)


async def append_orders(store: EventStore, tag: str, count: int) -> int:
    import random
    rng = random.Random(3)
    for i in range(count):
        await store.append(f"order-{tag}-{i}", order_life(f"order-{tag}-{i}", f"c{i % 5}", 4, rng), NO_STREAM)
    return 4 * count


async def queued_event_ids(node: Node, prefix: str, projection: str) -> set[str]:
    """The event ids in a projection's partition queues (every message taken and acked)."""
    ids: set[str] = set()
    connection = await aio_pika.connect(node.direct_url)
    async with connection:
        channel = await connection.channel()
        for p in range(PARTITIONS):
            # A consumer (basic.get is refused on quorum queues with a single active consumer) until 1 s of quiet.
            queue = await channel.get_queue(broker.Names(prefix).partition_queue(projection, p), ensure=False)
            async with queue.iterator() as messages:
                with contextlib.suppress(TimeoutError):
                    while True:
                        message = await asyncio.wait_for(anext(messages), 1)
                        ids |= {str(e.event_id) for e in broker.from_batch_body(message.body).events}
                        await message.ack()
    return ids


async def test_a_disk_alarm_blocks_the_relay_which_keeps_its_rows_reports_it_and_resumes(
        rabbit: RabbitCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    status = health.Health()
    async with rabbit_fleet.deployment(rabbit, tmp_path) as (schema, prefix, pool):
        status.up("postgres")
        store = EventStore(pool, schema=schema)
        async with in_process_relay(pool, schema, prefix, rabbit.urls, status):
            written = await append_orders(store, "before", 10)
            await until(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"), 30, "published before the alarm")
            assert status.ready()
            rabbit.disk_alarm(rabbit.nodes[1])  # any node's alarm blocks publishing on every node
            try:
                await until(lambda: all(_alarmed(rabbit, n) for n in rabbit.nodes), 30, "the alarm known to every node")
                written += await append_orders(store, "during", 10)
                await until(lambda: status.blocked_reason is not None, 30, "the relay told it is blocked")
                assert not status.ready()
                assert "broker blocked publishing" in status.reason()
                assert metrics.registry.get_sample_value("eventfleet_relay_blocked") == 1
                await asyncio.sleep(2)
                pending = await pool.fetchval("SELECT count(*) FROM outbox")
                assert pending == 40, "every row written during the alarm waits in the outbox"
                assert await pool.fetchval("SELECT count(*) FROM events") == written
            finally:
                rabbit.clear_disk_alarm(rabbit.nodes[1])
            await until(lambda: status.ready(), 30, "unblocked")
            await until(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"), 30, "published after the alarm")
            assert metrics.registry.get_sample_value("eventfleet_relay_blocked") == 0
        # Every event reached the queues (at least once: the batch in flight at the block may come twice).
        stored = {str(r["event_id"]) for r in await pool.fetch("SELECT event_id FROM events")}
        assert await queued_event_ids(rabbit.nodes[0], prefix, "customer_stats") == stored
    messages = [r.getMessage() for r in caplog.records if r.name == "workers.runtime.health"]
    assert messages.count("broker blocked publishing") == 1
    assert messages.count("broker unblocked") == 1
    blocked = next(r for r in caplog.records if r.getMessage() == "broker blocked publishing")
    assert "disk" in blocked.__dict__["reason"]


def _alarmed(cluster: RabbitCluster, node: Node) -> bool:
    alarms = cluster.alarms(node)
    return bool(alarms.get("local") or alarms.get("global"))


# --- readiness follows the connection; reconnection moves to a node that answers --------------------------------------


async def test_readiness_is_down_while_no_node_answers_and_up_when_connected_again(
        rabbit: RabbitCluster, tmp_path: Path) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{fleet.free_port()}/"
    forwarder = Proxy(fleet.free_port(), rabbit.nodes[0].port)
    urls = [dead, f"amqp://guest:guest@127.0.0.1:{forwarder.listen}/?heartbeat=2"]
    status = health.Health()
    try:
        async with rabbit_fleet.deployment(rabbit, tmp_path) as (schema, prefix, pool):
            status.up("postgres")
            async with in_process_relay(pool, schema, prefix, urls, status):
                await until(status.ready, 30, "ready through the forwarder")
                assert status.broker == f"127.0.0.1:{forwarder.listen}"
                forwarder.cut()  # every connection closed, every new one refused: no node answers
                await until(lambda: not status.ready(), 30, "not ready once cut")
                await asyncio.sleep(2)
                assert not status.ready()
                assert status.reason().startswith("rabbitmq: "), status.reason()
                forwarder.restore()
                await until(status.ready, 30, "ready again")
                forwarder.blackhole()  # silent, sockets open: the heartbeat gives it up (2 s here)
                await until(lambda: not status.ready(), 30, "not ready once silent")
                forwarder.restore()
                await until(status.ready, 30, "ready again after silence")
    finally:
        forwarder.close()


# --- scenarios under load: a relay and two worker processes, writers appending through the fault ---------------------


async def test_a_sigkill_of_the_node_leading_most_partition_queues_then_its_restart(
        rabbit: RabbitCluster, tmp_path: Path) -> None:
    async def fault(ctx: Context) -> None:
        leaders = collections.Counter(partition_leaders(ctx.cluster, ctx.prefix).values())
        victim = ctx.cluster.node(leaders.most_common(1)[0][0])
        ctx.notes.update(leaders=dict(leaders), victim=victim.name)
        ctx.inject()
        await ctx.in_thread(ctx.cluster.kill, victim)
        await ctx.sleep(scaled(4, 0.3))
        await ctx.in_thread(ctx.cluster.start, victim)
        await ctx.in_thread(ctx.cluster.await_running, 3)
        ctx.repair()
        ctx.notes["leaders_after"] = dict(collections.Counter(partition_leaders(ctx.cluster, ctx.prefix).values()))

    await rabbit_fleet.run_scenario("a: SIGKILL of the leader-heaviest node, then restart", rabbit, tmp_path, fault)


async def test_two_of_three_nodes_down_publishing_waits_and_resumes_when_one_returns(
        rabbit: RabbitCluster, tmp_path: Path) -> None:
    async def fault(ctx: Context) -> None:
        leaders = collections.Counter(partition_leaders(ctx.cluster, ctx.prefix).values())
        down = [ctx.cluster.node(name) for name, _ in leaders.most_common(2)]
        ctx.notes["down"] = [n.name for n in down]
        ctx.inject()
        for node in down:
            await ctx.in_thread(ctx.cluster.kill, node)
        await ctx.sleep(scaled(6, 0.6))  # the long form outlasts the relay's 30 s confirm timeout
        ctx.notes["outbox_waiting_most"] = ctx.sampler.most_pending(ctx.injected, time.monotonic())
        ctx.notes["applied_while_down"] = _applied_between(ctx, ctx.injected + 3, time.monotonic())
        await ctx.in_thread(ctx.cluster.start, down[0])
        ctx.repair()  # quorum again: two of three
        await ctx.in_thread(ctx.cluster.start, down[1])
        await ctx.in_thread(ctx.cluster.await_running, 3)

    figures = await rabbit_fleet.run_scenario("b: two of three nodes down (no quorum)", rabbit, tmp_path, fault)
    assert figures.notes["outbox_waiting_most"] > 0, "publishing waited in the outbox while there was no quorum"


def _applied_between(ctx: Context, since: float, until: float) -> int:
    samples = [s for s in ctx.sampler.samples if since <= s.at <= until]
    return samples[-1].applied - samples[0].applied if len(samples) > 1 else 0


async def test_a_rolling_restart_of_all_three_nodes(rabbit: RabbitCluster, tmp_path: Path) -> None:
    async def fault(ctx: Context) -> None:
        ctx.inject()
        steps = ctx.notes.setdefault("steps", [])
        for i, node in enumerate(ctx.cluster.nodes):
            marks = [time.monotonic()]
            if i:  # the one before is back: wait until its replicas caught up (stopping this one keeps a majority)
                await ctx.in_thread(_wait_not_quorum_critical, ctx.cluster, node)
            marks.append(time.monotonic())
            await ctx.in_thread(ctx.cluster.stop, node)
            marks.append(time.monotonic())
            await ctx.in_thread(ctx.cluster.start, node)
            marks.append(time.monotonic())
            await ctx.in_thread(ctx.cluster.await_running, 3)
            marks.append(time.monotonic())
            steps.append({"node": node.short, **{k: round(b - a, 1) for k, a, b in
                                                 zip(("check", "stop", "start", "rejoin"), marks, marks[1:], strict=False)}})
        ctx.repair()

    await rabbit_fleet.run_scenario("c: rolling restart of all three nodes", rabbit, tmp_path, fault)


def _wait_not_quorum_critical(cluster: RabbitCluster, node: Node, within: float = 120) -> None:
    """Until stopping ``node`` would leave every quorum queue a majority (its members caught up)."""
    deadline = time.monotonic() + within
    while True:
        try:
            cluster.ctl(node, "check_if_node_is_quorum_critical", tool="rabbitmq-queues")  # exit status 0: not
            return
        except HarnessError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{node.name} still quorum critical after {within}s") from exc
        time.sleep(0.5)


async def test_a_node_blackholed_without_closing_its_connections(rabbit: RabbitCluster, tmp_path: Path) -> None:
    # The short form asks for 5 s heartbeats (a silent node is given up after ~18 s); the long one keeps the
    # default (10 s: ~33 s).
    query = "" if rabbit_fleet.SECONDS else "?heartbeat=5"
    urls = ",".join(f"{u}{query}" for u in rabbit.urls)

    async def fault(ctx: Context) -> None:
        name = f"eventfleet relay {ctx.prefix}"
        where = {c["name"]: c["node"] for c in await ctx.in_thread(ctx.cluster.connections)}
        victim = ctx.cluster.node(where[name])
        ctx.notes["victim"] = victim.name
        ctx.notes["nodes_before"] = dict(collections.Counter(where.values()))
        ctx.notes["workers_on_victim"] = sum(1 for n, node in where.items()
                                             if n.startswith("eventfleet worker") and node == victim.name)
        ctx.inject()
        ctx.notes["how"] = await ctx.in_thread(ctx.cluster.blackhole, victim)
        await ctx.sleep(scaled(25, 0.8))  # past the heartbeat's verdict: ~18 s at 5 s, ~33-38 s at 10 s
        ctx.notes["relay_moved_to"] = {c["name"]: c["node"] for c in await ctx.in_thread(ctx.cluster.connections)
                                       }.get(name)
        await ctx.in_thread(ctx.cluster.restore, victim)
        ctx.repair()

    figures = await rabbit_fleet.run_scenario("d: a node's connections blackholed", rabbit, tmp_path, fault,
                                              amqp_url=urls)
    assert figures.notes["relay_moved_to"] not in (None, figures.notes["victim"]), figures.notes


async def test_a_memory_alarm_blocks_the_relay_until_it_clears(rabbit: RabbitCluster, tmp_path: Path) -> None:
    async def fault(ctx: Context) -> None:
        relay_proc = ctx.fleet.relays[0]
        node = ctx.cluster.nodes[0]
        ctx.inject()
        await ctx.in_thread(ctx.cluster.memory_alarm, node)
        try:
            began = time.monotonic()
            while True:
                _, text = await http_get(relay_proc.port, "/metrics")
                if metric(text, "eventfleet_relay_blocked") == 1:
                    break
                assert time.monotonic() - began < 30, "the relay never reported the block"
                await ctx.sleep(0.2)
            ctx.notes["blocked_after"] = round(time.monotonic() - began, 2)
            status, body = await http_get(relay_proc.port, "/readyz")
            ctx.notes["readyz_while_blocked"] = [status, body.strip()]
            assert status == 503
            await ctx.sleep(scaled(5, 0.5))
            ctx.notes["outbox_waiting_most"] = ctx.sampler.most_pending(ctx.injected, time.monotonic())
        finally:
            await ctx.in_thread(ctx.cluster.clear_memory_alarm, node)
        ctx.repair()
        began = time.monotonic()
        while (await http_get(relay_proc.port, "/readyz"))[0] != 200:
            assert time.monotonic() - began < 30, "the relay never became ready again"
            await ctx.sleep(0.2)
        ctx.notes["ready_after_clear"] = round(time.monotonic() - began, 2)

    figures = await rabbit_fleet.run_scenario("e: memory alarm (publishers blocked)", rabbit, tmp_path, fault)
    assert figures.notes["outbox_waiting_most"] > 0
    log = [line["message"] for line in _relay_log(tmp_path)]
    assert log.count("broker blocked publishing") >= 1
    assert log.count("broker unblocked") >= 1


def _relay_log(logs: Path) -> list[dict[str, object]]:
    import json
    lines = []
    for path in logs.glob("relay-*.log"):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(line))
    return lines

