"""The faults, and the service commands behind them. Every fault leaves its service running when it returns
(or raises): restores are in ``finally`` blocks.

A fault is a coroutine ``inject(ctx) -> dict`` that returns its own details; the harness times it (the
fault "ends" when ``inject`` returns, with everything restarted or restored) and measures recovery from there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from domain import orders
from store import EventStore, Repository
from store.queries import load
from tests.chaos.fleet import PROJECTIONS, Fleet, Slot, tcp_ports
from tests.chaos.writer import advance, retrying
from workers import broker
from workers import load as load_mod

LEDGER = load("tests.chaos", "ledger.sql")

PG_CLUSTER = ("15", "main")
#: Consumer timeout for the freeze fault; the channel tick is lowered too, since RabbitMQ 3.10 checks the
#: timeout only on each channel's tick (channel_tick_interval, 60 s by default).
FREEZE_CONSUMER_TIMEOUT_MS = 5000
FREEZE_TICK_MS = 1000


class ServiceError(AssertionError):
    """A service command failed."""


async def run(*args: str, check: bool = True, limit: float = 120) -> str:
    """Run a command without blocking the loop; return its output."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), limit)
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise ServiceError(f"{' '.join(args)} exited {proc.returncode}: {text.strip()[-500:]}")
    return text


async def rabbitmqctl(*args: str, check: bool = True) -> str:
    return await run("rabbitmqctl", "--quiet", *args, check=check)


async def rabbit_env(key: str) -> int | None:
    """An integer setting of the rabbit application, or None when unset."""
    out = await rabbitmqctl("eval", f"application:get_env(rabbit, {key}).")
    found = re.search(r"\{ok,\s*(\d+)\}", out)
    return int(found.group(1)) if found else None


async def set_rabbit_env(key: str, value: int | None) -> None:
    if value is None:
        await rabbitmqctl("eval", f"application:unset_env(rabbit, {key}).")
    else:
        await rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {int(value)}).")


async def ensure_rabbit_running() -> None:
    """start_app is a no-op on a running node; then wait for it to accept work."""
    await rabbitmqctl("start_app", check=False)
    await rabbitmqctl("await_startup")


async def ensure_postgres_running(database_url: str, within: float = 60) -> None:
    """Start the cluster if it is down; wait until it accepts connections."""
    status = await run("pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "status", check=False)
    if "server is running" not in status:
        await run("pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "start", check=False)
    deadline = time.monotonic() + within
    while True:
        try:
            conn = await asyncpg.connect(database_url, timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        await conn.close()
        return


@dataclasses.dataclass
class Context:
    """What faults act on."""

    fleet: Fleet
    rng: random.Random
    database_url: str
    amqp_url: str
    vhost: str
    prefix: str
    writer_name: str  # application_name of the in-process writers' sessions
    store: EventStore
    cli: Callable[..., Awaitable[tuple[int, str]]]
    poisoned: list[str] = dataclasses.field(default_factory=list)


Fault = Callable[[Context], Awaitable[dict[str, Any]]]


async def kill_process(ctx: Context) -> dict[str, Any]:
    """SIGKILL a random relay or worker; restart it after a random delay."""
    slot = ctx.rng.choice(ctx.fleet.slots)
    delay = round(ctx.rng.uniform(0.5, 3.0), 2)
    slot.signal(signal.SIGKILL)
    await slot.wait_exit(10)
    await asyncio.sleep(delay)
    started = time.monotonic()
    await ctx.fleet.restart(slot)
    return {"target": slot.name, "restart_delay": delay, "ready_after": round(time.monotonic() - started, 1)}


async def close_connections(ctx: Context) -> dict[str, Any]:
    """rabbitmqctl close_all_connections, limited to the fleet's own vhost (other tests use '/')."""
    await rabbitmqctl("close_all_connections", "--vhost", ctx.vhost, "chaos: close_all_connections")
    return {"vhost": ctx.vhost}


async def broker_restart(ctx: Context) -> dict[str, Any]:
    """rabbitmqctl stop_app, a random pause, start_app."""
    pause = round(ctx.rng.uniform(1.0, 3.0), 2)
    try:
        await rabbitmqctl("stop_app")
        await asyncio.sleep(pause)
    finally:
        await ensure_rabbit_running()
    return {"down_seconds": pause}


async def terminate_backends(ctx: Context) -> dict[str, Any]:
    """pg_terminate_backend of the fleet's sessions only: those whose client port is a socket of a fleet
    process (workers all share application_name 'eventfleet', so the name alone would hit other tests)."""
    ports = tcp_ports(ctx.fleet.pids())
    conn = await asyncpg.connect(ctx.database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid, pg_terminate_backend(pid) AS done FROM pg_stat_activity "
            "WHERE ((client_port = ANY($1::int[]) AND client_addr IN ('127.0.0.1', '::1')) "
            "       OR application_name = $2) AND pid <> pg_backend_pid()",
            sorted(ports), ctx.writer_name)
    finally:
        await conn.close()
    return {"terminated": sum(1 for r in rows if r["done"])}


async def postgres_restart(ctx: Context) -> dict[str, Any]:
    """pg_ctlcluster restart (fast shutdown: every session of every client is cut)."""
    started = time.monotonic()
    try:
        await run("pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "restart")
    finally:
        await ensure_postgres_running(ctx.database_url)
    return {"restart_seconds": round(time.monotonic() - started, 2)}


async def freeze_worker(ctx: Context) -> dict[str, Any]:
    """SIGSTOP a worker beyond the broker's consumer timeout, then SIGCONT.

    RabbitMQ 3.10 copies consumer_timeout into each channel when the channel opens, so the lowered value is
    set only while the target worker restarts (SIGTERM, then a new process), and restored at once; it checks
    the timeout on each channel tick, so channel_tick_interval is lowered until the freeze is over.
    """
    slot = ctx.rng.choice(ctx.fleet.workers)
    old_timeout, old_tick = await rabbit_env("consumer_timeout"), await rabbit_env("channel_tick_interval")
    try:
        await set_rabbit_env("channel_tick_interval", FREEZE_TICK_MS)
        try:
            await set_rabbit_env("consumer_timeout", FREEZE_CONSUMER_TIMEOUT_MS)
            slot.signal(signal.SIGTERM)
            await slot.wait_exit(30)
            await ctx.fleet.restart(slot)
            await _consuming(slot)
        finally:
            await set_rabbit_env("consumer_timeout", old_timeout)
        before = await consumer_counts(ctx)
        slot.signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # Frozen until the broker has cancelled the frozen consumer of every projection queue (each
            # channel holds unacked deliveries, since the load goes on), or long after it should have.
            deadline = frozen_at + (FREEZE_CONSUMER_TIMEOUT_MS + 3 * FREEZE_TICK_MS) / 1000 + 10
            while (after := await consumer_counts(ctx)) != {q: n - 1 for q, n in before.items()}:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        finally:
            slot.signal(signal.SIGCONT)
    finally:
        await set_rabbit_env("channel_tick_interval", old_tick)
    timed_out = sum(1 for q, n in before.items() if after.get(q, n) < n)
    return {"target": slot.name, "consumer_timeout_ms": FREEZE_CONSUMER_TIMEOUT_MS,
            "frozen_seconds": round(time.monotonic() - frozen_at, 1), "queues_timed_out": timed_out}


async def consumer_counts(ctx: Context) -> dict[str, int]:
    """Consumers of each projection queue, as the broker sees them."""
    names = broker.Names(ctx.prefix)
    connection = await aio_pika.connect(ctx.amqp_url)
    async with connection:
        channel = await connection.channel()
        counts = {}
        for projection in PROJECTIONS:
            queue = await channel.declare_queue(names.queue(projection), passive=True)
            counts[projection] = queue.declaration_result.consumer_count or 0
        return counts


async def _consuming(slot: Slot, within: float = 30) -> None:
    """Until the restarted worker logs that it consumes (its channels exist, with the lowered timeout)."""
    if not await _logged(slot.log_path(len(slot.incarnations) - 1), "consuming", within):
        raise AssertionError(f"{slot.name} did not start consuming:\n{slot.log_tail()}")


async def _logged(path: Path, text: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if text in await asyncio.to_thread(path.read_text, errors="replace"):
            return True
        await asyncio.sleep(0.1)
    return False


async def poison(ctx: Context) -> dict[str, Any]:
    """A poison event mid-stream: the ledger parks it and halts its stream; later it is fixed and re-driven.

    A new order's stream gets placed (v0), paid (v1, poisoned) and shipped (v2, held behind v1). Once the
    dead letter is parked, the "fix" is deployed and ``eventfleet dead-letters retry ID`` re-drives it.
    """
    plan = next(p for p in load_mod.plan_orders(50, ctx.rng.getrandbits(32)) if len(p.steps) == 3)
    stream = orders.stream_id(plan.order_id)
    pool = ctx.store.pool
    await retrying(lambda: pool.execute(LEDGER["poison"], stream, 1))
    repository = Repository(ctx.store, orders.Order)
    for k in range(len(plan.steps)):  # v0 placed, v1 paid (the poison), v2 shipped or cancelled (held)
        await advance(repository, plan, k)
        await asyncio.sleep(0.2)  # mid-stream: the events arrive in different batches
    ctx.poisoned.append(stream)
    dead_letter = await _parked(ctx, stream)
    halted = await retrying(lambda: pool.fetchval(
        "SELECT halted_version FROM checkpoints WHERE projection = 'chaos_ledger' AND stream_id = $1", stream))
    assert halted == 1, f"stream {stream} not halted at the poison event (halted_version={halted})"
    await asyncio.sleep(ctx.rng.uniform(0.5, 2.0))  # the fix takes a while to deploy; the stream waits
    await retrying(lambda: pool.execute(LEDGER["fix"], stream))
    code, out = await ctx.cli("dead-letters", "retry", str(dead_letter))
    assert code == 0, out
    return {"stream": stream, "dead_letter": dead_letter, "halted_at": halted, "retry": out.strip()}


async def _parked(ctx: Context, stream: str, within: float = 60) -> int:
    deadline = time.monotonic() + within
    while True:
        found = await retrying(lambda: ctx.store.pool.fetchval(
            "SELECT id FROM dead_letters WHERE projection = 'chaos_ledger' AND stream_id = $1 AND version = 1 "
            "AND status = 'parked'", stream))
        if found is not None:
            return int(found)
        assert time.monotonic() < deadline, f"poison event of {stream} not parked within {within}s"
        await asyncio.sleep(0.1)


FAULTS: dict[str, Fault] = {
    "kill": kill_process,
    "close_connections": close_connections,
    "broker_restart": broker_restart,
    "terminate_backends": terminate_backends,
    "postgres_restart": postgres_restart,
    "freeze": freeze_worker,
    "poison": poison,
}
