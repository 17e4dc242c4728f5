"""The faults, and the service commands behind them. Every fault leaves its service running when it returns
(or raises): restores are in ``finally`` blocks.

A fault is a coroutine ``inject(ctx) -> dict`` that returns its own details; the harness times it (the
fault "ends" when ``inject`` returns, with everything restarted or restored) and measures recovery from there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from eventfleet.examples.orders import load as load_mod
from eventfleet.examples.orders import orders
from store import EventStore, Repository
from store.queries import load
from tests.chaos.fleet import PROJECTIONS, Fleet, Slot, tcp_ports
from tests.chaos.writer import advance, retrying

LEDGER = load("tests.chaos", "ledger.sql")

PG_CLUSTER = ("15", "main")
#: Consumer timeout for the freeze fault; the channel tick is lowered too, since RabbitMQ 3.10 checks the
#: timeout only on each channel's tick (channel_tick_interval, 60 s by default).
FREEZE_CONSUMER_TIMEOUT_MS = 5000
FREEZE_TICK_MS = 500


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
    """rabbitmqctl; a command that needs the app waits for it first if another test has stopped it."""
    for _ in range(3):
        try:
            return await run("rabbitmqctl", "--quiet", *args, check=check)
        except ServiceError as exc:
            if "requires the 'rabbit' app to be running" not in str(exc):
                raise
            await run("rabbitmqctl", "--quiet", "await_startup", "--timeout", "120", check=False)
    return await run("rabbitmqctl", "--quiet", *args, check=check)


async def rabbit_env(*keys: str) -> list[int | None]:
    """Integer settings of the rabbit application (None when unset), read in one rabbitmqctl call."""
    out = await rabbitmqctl("eval", "{" + ", ".join(f"application:get_env(rabbit, {k})" for k in keys) + "}.")
    found = re.findall(r"\{ok,\s*(\d+)\}|undefined", out)
    assert len(found) == len(keys), f"cannot read {keys} from {out!r}"
    return [int(v) if v else None for v in found]


async def set_rabbit_env(**values: int | None) -> None:
    """Set (or unset, for None) settings of the rabbit application in one rabbitmqctl call."""
    calls = [f"application:set_env(rabbit, {k}, {int(v)})" if v is not None else f"application:unset_env(rabbit, {k})"
             for k, v in values.items()]
    await rabbitmqctl("eval", ", ".join(calls) + ".")


async def ensure_rabbit_running() -> None:
    """start_app is a no-op on a running node; then wait for it to accept work."""
    await rabbitmqctl("start_app", check=False)
    await rabbitmqctl("await_startup")


async def ensure_postgres_running(database_url: str, within: float = 60) -> None:
    """Start the cluster if it is down; wait until it accepts connections."""
    status = await run("pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "status", check=False)
    if "server is running" not in status:
        await run("pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "start", check=False)
    await wait_postgres(database_url, within)


async def wait_postgres(database_url: str, within: float = 60) -> None:
    """Until Postgres accepts connections (raise after ``within`` seconds)."""
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
    vhost: str
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
    started = time.monotonic()
    try:
        await rabbitmqctl("stop_app")
        await asyncio.sleep(pause)
    finally:
        await ensure_rabbit_running()
    return {"pause": pause, "outage_seconds": round(time.monotonic() - started, 1)}


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
    set only while the target worker reconnects (the broker closes its connection), and restored at once;
    it checks the timeout on each channel tick, so channel_tick_interval is lowered until the freeze is over.
    """
    slot = ctx.rng.choice(ctx.fleet.workers)
    old_timeout, old_tick = await rabbit_env("consumer_timeout", "channel_tick_interval")
    try:
        try:
            sessions = await _count_logged(slot, "consuming")
            closed = await _lower_timeout_and_reconnect(slot.pid)
            assert closed == 1, f"closed {closed} connections of {slot.name}"
            await _wait_logged(slot, "consuming", sessions + 1)
        finally:
            await set_rabbit_env(consumer_timeout=old_timeout)
        log = rabbit_log()
        offset = log.stat().st_size
        slot.signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # Frozen until the broker has timed out the consumer of every projection (each channel holds
            # unacked deliveries, since the load goes on), or long after it should have.
            deadline = frozen_at + (FREEZE_CONSUMER_TIMEOUT_MS + 3 * FREEZE_TICK_MS) / 1000 + 10
            while len(timed_out := await _timeouts_logged(log, offset)) < len(PROJECTIONS):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        finally:
            slot.signal(signal.SIGCONT)
    finally:
        await set_rabbit_env(channel_tick_interval=old_tick)
    return {"target": slot.name, "consumer_timeout_ms": FREEZE_CONSUMER_TIMEOUT_MS,
            "frozen_seconds": round(time.monotonic() - frozen_at, 1), "channels_timed_out": len(timed_out)}


def rabbit_log() -> Path:
    """The broker's log file (EVENTFLEET_RABBIT_LOG, else the node's log under /var/log/rabbitmq)."""
    configured = os.environ.get("EVENTFLEET_RABBIT_LOG")
    if configured:
        return Path(configured)
    logs = [p for p in Path("/var/log/rabbitmq").glob("rabbit@*.log") if "_upgrade" not in p.name]
    assert len(logs) == 1, f"cannot tell the RabbitMQ log among {logs}; set EVENTFLEET_RABBIT_LOG"
    return logs[0]


_TIMEOUT_LINE = re.compile(rf"on channel (\d+) has timed out waiting for delivery acknowledgement\. "
                           rf"Timeout used: {FREEZE_CONSUMER_TIMEOUT_MS} ms")


async def _timeouts_logged(log: Path, offset: int) -> set[int]:
    """Channels the broker timed out with the freeze's timeout since ``offset`` of its log.

    In RabbitMQ 3.10 a timed-out channel only sends channel.close and keeps the frozen consumer's
    deliveries (quorum queues) until the client answers, so the log is where the timeout shows at once.
    """
    def read() -> str:
        with log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    return {int(m.group(1)) for m in _TIMEOUT_LINE.finditer(await asyncio.to_thread(read))}


async def _lower_timeout_and_reconnect(pid: int) -> int:
    """In one rabbitmqctl call (each boots an Erlang VM): lower the channel tick and consumer timeout, then
    close the AMQP connection the worker process ``pid`` named after itself; return how many were closed."""
    name = f"eventfleet worker {socket.gethostname()}:{pid}"
    out = await rabbitmqctl("eval", (
        f"application:set_env(rabbit, channel_tick_interval, {FREEZE_TICK_MS}), "
        f"application:set_env(rabbit, consumer_timeout, {FREEZE_CONSUMER_TIMEOUT_MS}), "
        # Everything inside the try: a connection closing meanwhile (or half open) must not crash the eval.
        "Named = fun(P) -> try lists:keyfind(<<\"connection_name\">>, 1, proplists:get_value(client_properties, "
        "rabbit_networking:connection_info(P, [client_properties]), [])) =:= "
        f"{{<<\"connection_name\">>, longstr, <<\"{name}\">>}} catch _:_ -> false end end, "
        "length([rabbit_networking:close_connection(P, \"chaos: reconnect with a short consumer timeout\") "
        "|| P <- rabbit_networking:connections(), Named(P)])."))
    return int(out.strip())


async def _count_logged(slot: Slot, text: str) -> int:
    log = slot.current.log
    return (await asyncio.to_thread(log.read_text, errors="replace")).count(text)


async def _wait_logged(slot: Slot, text: str, times: int, within: float = 30) -> None:
    """Until the slot's current log holds ``text`` at least ``times`` times."""
    deadline = time.monotonic() + within
    while await _count_logged(slot, text) < times:
        assert time.monotonic() < deadline, f"{slot.name} did not log {text!r} in time:\n{slot.log_tail()}"
        await asyncio.sleep(0.1)


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
    await asyncio.sleep(ctx.rng.uniform(0.2, 1.0))  # the fix takes a while to deploy; the stream waits
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


async def rebalance_storm(ctx: Context) -> dict[str, Any]:
    """Workers killed and started every second or two for a while: the leases are dealt again and again,
    partitions change hands mid-batch (killed owners) and by handover (a new worker's share)."""
    workers = [s for s in ctx.fleet.slots if s.role == "worker"]
    rounds = 4
    for _ in range(rounds):
        slot = ctx.rng.choice(workers)
        slot.signal(signal.SIGKILL)
        await slot.wait_exit(10)
        await asyncio.sleep(round(ctx.rng.uniform(0.2, 1.0), 2))
        await ctx.fleet.restart(slot)  # a new worker joins: the others give it its share
        await asyncio.sleep(round(ctx.rng.uniform(0.5, 1.5), 2))
    return {"rounds": rounds}


FAULTS: dict[str, Fault] = {
    "kill": kill_process,
    "close_connections": close_connections,
    "broker_restart": broker_restart,
    "terminate_backends": terminate_backends,
    "postgres_restart": postgres_restart,
    "freeze": freeze_worker,
    "poison": poison,
    "rebalance_storm": rebalance_storm,
}
