"""A worker frozen inside a transaction (SIGSTOP: a GC pause, a hung node) must not stall the fleet.

Postgres ends the frozen worker's transaction after ``EVENTFLEET_TRANSACTION_IDLE_SECONDS`` (a third of the
lease), which releases its checkpoint rows, its locks and the transaction id holding ``read_all``'s horizon;
its leases expire and the others take its partitions; once the broker gives its silent connection up (AMQP
heartbeat) they receive its partitions' messages, its unacked batch among them. When it wakes it finds its
connection and its leases gone, rejoins, and nothing is lost or applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time

import pytest

from store import EventStore, db
from tests.conftest import AMQP_URL
from tests.e2e import test_partition_fleet as partition_fleet
from tests.e2e.test_partition_fleet import (
    LEASE_SECONDS,
    Fleet,
    Writer,
    all_applied,
    assert_exact,
    balanced,
    shares,
    streams_in,
    until,
)
from workers.projector import leases

pytestmark = pytest.mark.slow

# The partition fleet's fixtures: a migrated schema with the recorder, a prefix, torn down after.
fleet = partition_fleet.fleet
pool = partition_fleet.pool

#: Each recorder batch waits this long inside its transaction, so a worker is inside one most of the time.
RECORDER_PAUSE_SECONDS = 0.2
#: The workers' AMQP heartbeat: RabbitMQ gives a silent (frozen) connection up after about two missed ones,
#: and only then hands its partitions' messages (its unacked batch among them) to the new owners.
HEARTBEAT_SECONDS = 2
#: How long the victim stays frozen: three leases.
FROZEN_SECONDS = 3 * LEASE_SECONDS
#: From the freeze, the others hold the victim's partitions and have applied every event within the lease,
#: a tick and this much (the broker's heartbeat timeout overlaps the lease; the rest is applying the backlog).
APPLY_BOUND_SECONDS = LEASE_SECONDS + LEASE_SECONDS / leases.TICKS_PER_LEASE + 7
#: The frozen transaction ends within the idle limit (a third of the lease) and this much.
HORIZON_BOUND_SECONDS = LEASE_SECONDS / 3 + 3


def client_ports(pid: int) -> set[int]:
    """The local ports of a process's TCP sockets (Linux ``/proc``): how ``pg_stat_activity.client_port``
    names the sessions of that process."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


#: A session of the given client ports inside a transaction that holds a transaction id (writes, row locks),
#: with that id as xid8 (the in-progress one of the cluster's snapshot whose low 32 bits are backend_xid).
IN_TRANSACTION = """
SELECT a.pid, a.state, a.query, x.xid8
FROM pg_stat_activity AS a
JOIN pg_snapshot_xip(pg_current_snapshot()) AS x(xid8) ON (x.xid8::text::bigint % 4294967296)::text = a.backend_xid::text
WHERE a.client_port = ANY($1::integer[]) AND a.datname = current_database()
  AND a.state IN ('idle in transaction', 'active')
ORDER BY a.xact_start LIMIT 1
"""


async def freeze_inside_a_transaction(pool: db.Pool, pid: int) -> tuple[int, str, str, int]:
    """SIGSTOP the process at random moments until it is stopped inside a transaction holding an id; return
    that session's backend pid, state, last statement and transaction id (xid8)."""
    rng = random.Random(7)
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        row = await pool.fetchrow(IN_TRANSACTION, sorted(client_ports(pid)))
        if row is not None:
            return row["pid"], row["state"], row["query"], int(str(row["xid8"]))
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(rng.uniform(0.02, 0.2))
    raise AssertionError(f"worker {pid} was never stopped inside a transaction")


async def transaction_ended(pool: db.Pool, backend: int, xid8: int) -> bool:
    """The frozen session is gone and its transaction id no longer holds the horizon (not in progress)."""
    ended: bool = await pool.fetchval(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1) "
        "AND NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(pg_current_snapshot()) AS x "
        "                WHERE x::text::bigint = $2)", backend, xid8)
    return ended


async def held_by(pool: db.Pool, pid: int) -> dict[str, set[int]]:
    """The partitions the process holds live leases on, per projection."""
    held: dict[str, set[int]] = {}
    for lease in await leases.owners(pool):
        if lease.owner is not None and lease.live and lease.owner.split(":")[1] == str(pid):
            held.setdefault(lease.projection, set()).add(lease.partition)
    return held


async def test_a_worker_frozen_inside_a_transaction_for_three_leases_stalls_nothing_and_loses_or_doubles_nothing(
        fleet: Fleet, pool: db.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_RECORDER_PAUSE_SECONDS", str(RECORDER_PAUSE_SECONDS))
    monkeypatch.setattr(partition_fleet, "AMQP_URL", f"{AMQP_URL}?heartbeat={HEARTBEAT_SECONDS}")
    fleet.start_relay()
    pids = {fleet.start_worker() for _ in range(3)}
    await until(lambda: _balanced(pool, pids), 30, fleet, "fair shares")
    victim = min(pids)
    rest = pids - {victim}
    store = EventStore(pool, schema=fleet.schema)
    writer = Writer(store, "frozen")
    writing = asyncio.create_task(writer.run(per_second=100))
    try:
        await asyncio.sleep(2)
        backend, state, query, xid8 = await freeze_inside_a_transaction(pool, victim)
        frozen = time.monotonic()
        try:
            theirs = await held_by(pool, victim)
            print(f"worker {victim} frozen {state} (backend {backend}, xid {xid8}) after: {query.strip()[:80]}")
            await until(lambda: transaction_ended(pool, backend, xid8), HORIZON_BOUND_SECONDS, fleet,
                        "the frozen transaction ended")
            horizon = time.monotonic() - frozen
            await until(lambda: _balanced(pool, rest), APPLY_BOUND_SECONDS - (time.monotonic() - frozen), fleet,
                        "the frozen worker's partitions owned by the others")
            takeover = time.monotonic() - frozen
            await asyncio.sleep(max(0.0, LEASE_SECONDS - (time.monotonic() - frozen)))
            writer.stopping.set()
            await writing
            await until(lambda: all_applied(pool), APPLY_BOUND_SECONDS - (time.monotonic() - frozen), fleet,
                        "every event applied by the others")
            applied = time.monotonic() - frozen  # less than FROZEN_SECONDS: the victim is still frozen
            await asyncio.sleep(FROZEN_SECONDS - (time.monotonic() - frozen))
        finally:
            os.kill(victim, signal.SIGCONT)
    finally:
        writer.stopping.set()
        await writing
    resumed, resumed_at = time.monotonic(), await pool.fetchval("SELECT clock_timestamp()")
    await until(lambda: _balanced(pool, pids), 30, fleet, "the woken worker back in the fleet")
    rejoined = time.monotonic() - resumed
    after = Writer(store, "woken", streams_in((await held_by(pool, victim))["batch_recorder"], 20, "w"))
    await after.write(20)
    await until(lambda: all_applied(pool), 30, fleet, "every event applied after the wake")
    await assert_exact(pool)
    since_wake = await pool.fetchval("SELECT count(*) FROM batch_recorder WHERE pid = $1 AND started_at > $2",
                                     victim, resumed_at)
    assert since_wake > 0  # the woken worker applies again
    woken = fleet.stop(victim)  # SIGTERM: every worker, the woken one too, exits with 0
    fleet.stop_all()
    print(f"frozen {FROZEN_SECONDS} s holding {sum(len(p) for p in theirs.values())} partitions; transaction "
          f"ended after {horizon:.1f} s; partitions owned by the others after {takeover:.1f} s; everything "
          f"applied after {applied:.1f} s; rejoined {rejoined:.1f} s after the wake; "
          f"{writer.written + after.written} events, lost 0, doubled 0; "
          f"duplicates skipped by the checkpoints {fleet.total('duplicates')} "
          f"({sum(p['duplicates'] for p in woken.values())} by the woken worker)")


async def _balanced(pool: db.Pool, pids: set[int]) -> bool:
    return balanced(await shares(pool), pids)
