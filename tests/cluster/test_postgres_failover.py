"""Postgres failover under load: the primary stopped hard mid-load, the standby promoted, the fleet on the
multi-host URL (``target_session_attrs=read-write``) carrying on with the new primary.

(a) Synchronous standby: nothing a writer saw acknowledged is lost, the relay and the worker resume on the new
primary, and the read models equal the fold of the surviving store (exactly once); the same when the primary's
host vanishes (no reset reaches anyone: ``vanish_primary``, iptables).
(b) Asynchronous standby, its replication stream held ``ASYNC_DELAY`` s behind (tests/cluster/postgres.py):
acknowledged appends the standby had not received are gone from the new primary, yet the relay may have
published some of them. The workers' checkpoint claim checks every delivered event against the store: the lost
ones are dropped as ghosts (recorded as resolved dead letters), never applied, and every surviving event is
applied exactly once, so ``eventfleet verify`` finds nothing to repair.

Every figure (written, acknowledged, applied, duplicates, gap fills, lost, doubled, time without progress,
time to recover) is printed as one ``failover:`` JSON line (``pytest -s``) and, when
``EVENTFLEET_FAILOVER_REPORT`` names a file, appended to it. The CI form loads for a few seconds on each side
of the failover; ``EVENTFLEET_FAILOVER_LOAD_SECONDS``, ``EVENTFLEET_FAILOVER_RATE`` (events/s) and
``EVENTFLEET_FAILOVER_ASYNC_DELAY`` (s; 0: the standby connects directly) make a longer run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from projections import registry
from store import NO_STREAM, EventStore, db
from store import errors as store_errors
from store.event_store import record_from_row
from store.records import NewEvent
from tests.applied import names_of
from tests.cluster.postgres import PostgresPair, can_vanish, postgres_pair
from tests.conftest import AMQP_URL, new_prefix, new_schema
from tests.unit.test_projection_fold import Models, fold, order_life, read_models
from workers.config import Settings
from workers.fleet import Fleet as Processes
from workers.fleet import open_fleet
from workers.projector.catchup import STALL_SECONDS
from workers.projector.lag import REFRESH_SECONDS

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PARTITIONS = 4
PROJECTIONS = ("customer_stats", "order_summary")
LOAD_SECONDS = float(os.environ.get("EVENTFLEET_FAILOVER_LOAD_SECONDS", "2"))
RATE = float(os.environ.get("EVENTFLEET_FAILOVER_RATE", "300"))
ASYNC_DELAY = float(os.environ.get("EVENTFLEET_FAILOVER_ASYNC_DELAY", "0.2"))
WRITERS = 6
EVENTS_PER_ORDER = 4
CUSTOMERS = 17
#: How long the primary stays down before the standby is promoted (an HA manager's detection time).
DOWN_SECONDS = 1.0
READY_WITHIN = 60.0
DRAIN_WITHIN = 60.0
#: A fleet that has not moved for this long with the outbox empty is done, whatever it left behind.
QUIET_SECONDS = STALL_SECONDS + 2 * REFRESH_SECONDS + 1  # the stall repair's wait, and its catch-up


# --- the writers' ledger --------------------------------------------------------------------------------


@dataclasses.dataclass
class Attempt:
    """One append of one event, as the writer sent it (retried with the same id after an outage)."""

    stream: str
    version: int
    event_id: uuid.UUID
    payload: Any
    acked_at: float | None = None


@dataclasses.dataclass
class Ledger:
    """Every event the writers tried to append, and when the store acknowledged each."""

    attempts: dict[uuid.UUID, Attempt] = dataclasses.field(default_factory=dict)
    conflicts: int = 0  # appends refused because the stream had lost its tail (streams then abandoned)
    retries: int = 0
    first_ack_after: dict[str, Attempt] = dataclasses.field(default_factory=dict)

    @property
    def acked(self) -> list[Attempt]:
        return [a for a in self.attempts.values() if a.acked_at is not None]

    def by_position(self) -> dict[tuple[str, int], list[Attempt]]:
        found: dict[tuple[str, int], list[Attempt]] = {}
        for a in self.attempts.values():
            found.setdefault((a.stream, a.version), []).append(a)
        return found


class Writers:
    """``WRITERS`` tasks appending order lives one event per append at ``RATE`` events/s in all, retrying an
    append through outages with the same event id and expected version (so a committed one is acknowledged
    once), and giving up a stream whose version moved backwards (its tail was lost)."""

    def __init__(self, store: EventStore, ledger: Ledger) -> None:
        self.store, self.ledger = store, ledger
        self.stopping = asyncio.Event()
        self.promoted_at: float | None = None
        self.killed_at: float | None = None

    async def run(self, writer: int) -> None:
        rng = random.Random(writer)
        pause = WRITERS / RATE
        order = 0
        while not self.stopping.is_set():
            stream = f"order-{writer}-{order}"
            life = order_life(stream, f"c{(writer * 7 + order) % CUSTOMERS}", EVENTS_PER_ORDER, rng)
            for version, payload in enumerate(life):
                if self.stopping.is_set() or not await self._append(stream, version, payload):
                    break
                await asyncio.sleep(pause)
            order += 1

    async def _append(self, stream: str, version: int, payload: Any) -> bool:
        attempt = Attempt(stream, version, uuid.uuid4(), payload)
        self.ledger.attempts[attempt.event_id] = attempt
        event = NewEvent(payload, event_id=attempt.event_id)
        while True:
            tried = time.monotonic()  # an append tried after the kill is acknowledged by the new primary
            try:
                await self.store.append(stream, [event], version - 1 if version else NO_STREAM)
            except store_errors.TransientError:
                self.ledger.retries += 1
                if self.stopping.is_set():
                    return False
                await asyncio.sleep(0.05)
                continue
            except store_errors.VersionConflict:
                self.ledger.conflicts += 1
                return False
            attempt.acked_at = time.monotonic()
            for name, since in (("kill", self.killed_at), ("promotion", self.promoted_at)):
                if since is not None and tried > since:
                    self.ledger.first_ack_after.setdefault(name, attempt)
            return True


# --- the fleet --------------------------------------------------------------------------------------------


class Fleet:
    """One relay and one worker process on the multi-host URL (a workers.fleet.Fleet, by role)."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.schema, self.logs = processes.settings.schema, processes.logs

    def alive(self) -> None:
        self.processes.check()

    async def stop(self, role: str) -> str:
        """SIGTERM; the process's stdout (a worker's last line is its totals per projection)."""
        [process] = [p for p in self.processes.processes if p.role == role and p.alive]
        code = await self.processes.stop(process)
        assert code == 0, (role, code, self.logs)
        return process.current.out.read_text()


@contextlib.asynccontextmanager
async def deployment(pair: PostgresPair, logs: Path) -> AsyncIterator[Fleet]:
    """A migrated schema on the pair, a relay and a worker on it; torn down after (workers.fleet)."""
    settings = Settings(database_url=pair.url, amqp_url=AMQP_URL, schema=new_schema(),
                        prefix=new_prefix(), partitions=PARTITIONS,
                        projection_modules=(registry.EXAMPLE,))
    async with open_fleet(settings, logs, env={"EVENTFLEET_RELAY_POLL_MS": "100"},
                          projections=PROJECTIONS) as processes:
        processes.add("relay").start()
        processes.add("worker").start()
        yield Fleet(processes)


# --- watching ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timeline:
    """Samples of the events order_summary has applied (sum of its checkpoints; when each was asked for), and
    when the first event acknowledged after the promotion was seen applied."""

    samples: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    recovered_at: float | None = None


async def watch(pool: db.Pool, writers: Writers, ledger: Ledger, timeline: Timeline, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):  # the outage: nothing to sample
            asked = time.monotonic()  # a sample asked after the kill comes from the new primary
            applied = await pool.fetchval("SELECT coalesce(sum(version + 1), 0) FROM checkpoints "
                                          "WHERE projection = 'order_summary'")
            timeline.samples.append((asked, applied))
            first = ledger.first_ack_after.get("promotion")
            if first is not None and timeline.recovered_at is None:
                version = await pool.fetchval("SELECT version FROM checkpoints WHERE projection = 'order_summary' "
                                              "AND stream_id = $1", first.stream)
                if version is not None and version >= first.version:
                    timeline.recovered_at = time.monotonic()
        await asyncio.sleep(0.05)


def applies_resumed(timeline: Timeline, killed_at: float) -> float | None:
    """When customer_stats applied something again after the kill (its sum grew past the last value seen)."""
    before = [n for t, n in timeline.samples if t <= killed_at]
    last = before[-1] if before else 0
    after = [(t, n) for t, n in timeline.samples if t > killed_at]
    for t, n in after:
        if n > last:
            return t
        last = n  # on the new primary the sum may start lower (async: applies lost with the primary)
    return None


async def progress(pool: db.Pool) -> tuple[int, int, int]:
    """(outbox rows, stream versions both projections are behind the store, their checkpoints' sum)."""
    # Each projection against its streams' last events of its types (customer_stats: not OrderShipped).
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM outbox) AS pending, coalesce(sum(greatest(s.v - coalesce(c.version, -1), 0)), 0) "
        "AS behind, coalesce(sum(c.version), 0) AS applied "
        "FROM unnest($1::text[], $2::text[]) AS p(projection, names) "
        "JOIN LATERAL (SELECT stream_id, max(version) AS v FROM events WHERE p.names IS NULL "
        "              OR split_part(event_type, '.v', 1) = ANY(string_to_array(p.names, ',')) GROUP BY stream_id) AS s "
        "    ON true "
        "LEFT JOIN checkpoints AS c ON c.projection = p.projection AND c.stream_id = s.stream_id", list(PROJECTIONS),
        [names_of(p) for p in PROJECTIONS])
    assert row is not None
    return row["pending"], row["behind"], row["applied"]


async def settle(pool: db.Pool, fleet: Fleet) -> tuple[bool, float]:
    """Until the outbox is empty and both projections reach every stream's last version (True), or until
    nothing has moved for ``QUIET_SECONDS`` with the outbox empty (False: streams left behind); the seconds."""
    began = time.monotonic()
    last, since = None, began
    while time.monotonic() - began < DRAIN_WITHIN:
        fleet.alive()
        with contextlib.suppress(Exception):
            now = await progress(pool)
            if now[0] == 0 and now[1] == 0:
                return True, time.monotonic() - began
            if now != last:
                last, since = now, time.monotonic()
            elif now[0] == 0 and time.monotonic() - since > QUIET_SECONDS:
                return False, since - began
        await asyncio.sleep(0.1)
    raise AssertionError(f"the fleet still moving or the outbox not empty after {DRAIN_WITHIN} s: {last}; "
                         f"logs in {fleet.logs}")


async def until(check: Any, within: float, fleet: Fleet, what: str) -> float:
    began = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if await check():
                return time.monotonic() - began
        fleet.alive()
        assert time.monotonic() - began < within, f"{what}: not within {within} s; logs in {fleet.logs}"
        await asyncio.sleep(0.1)


# --- the scenario -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What a failover run leaves to check: the surviving store, the read models, the writers' ledger."""

    mode: str
    fleet: Fleet
    pair: PostgresPair
    ledger: Ledger
    stored: list[Any]  # RecordedEvent, on the new primary
    models: Models
    checkpoints: dict[str, dict[str, int]]  # projection -> stream -> version
    dead_letters: dict[str, int]  # "projection: first line of the error" -> how many
    worker: dict[str, dict[str, int]]  # the worker's totals per projection (its stop line)
    figures: dict[str, Any]


@contextlib.asynccontextmanager
async def failover(pair: PostgresPair, logs: Path, mode: str, *, vanish: bool = False) -> AsyncIterator[Outcome]:
    """Load, stop the primary hard mid-load (``vanish``: its host is gone, no reset reaches anyone), promote
    the standby after ``DOWN_SECONDS``, load on; wait until the fleet has settled."""
    async with deployment(pair, logs) as fleet, \
            db.create_pool(pair.url, fleet.schema, min_size=1, max_size=WRITERS + 2) as pool, \
            db.create_pool(pair.url, fleet.schema, min_size=1, max_size=2) as watch_pool:
        store = EventStore(pool, schema=fleet.schema)
        ledger = Ledger()
        writers = Writers(store, ledger)
        # The pipeline works before the load starts: one order through both projections.
        probe = "order-probe"  # of customer "probe": not in the read models compared (customers "c%")
        await store.append(probe, [NewEvent(order_life(probe, "probe", 1, random.Random(0))[0])], NO_STREAM)
        ready = await until(lambda: _applied(pool, probe), READY_WITHIN, fleet, "the fleet applying a first event")
        timeline, watching = Timeline(), asyncio.Event()
        watcher = asyncio.create_task(watch(watch_pool, writers, ledger, timeline, watching))
        tasks = [asyncio.create_task(writers.run(w)) for w in range(WRITERS)]
        try:
            await asyncio.sleep(LOAD_SECONDS)
            fleet.alive()
            lag_bytes = await asyncio.to_thread(pair.replication_lag_bytes)
            writers.killed_at = await asyncio.to_thread(pair.vanish_primary if vanish else pair.stop_primary_hard)
            await asyncio.sleep(DOWN_SECONDS)
            writers.promoted_at = await asyncio.to_thread(pair.promote)
            # The load goes on until LOAD_SECONDS after the first write the new primary acknowledged.
            deadline = time.monotonic() + READY_WITHIN
            while "promotion" not in ledger.first_ack_after and time.monotonic() < deadline:
                fleet.alive()
                await asyncio.sleep(0.1)
            await asyncio.sleep(LOAD_SECONDS)
        finally:
            writers.stopping.set()
            await asyncio.gather(*tasks)
        killed_at, promoted_at = writers.killed_at, writers.promoted_at
        assert killed_at is not None
        assert promoted_at is not None
        complete, drain = await settle(pool, fleet)
        for _ in range(300):  # the watcher's next samples see the first write after the promotion applied
            if timeline.recovered_at is not None:
                break
            await asyncio.sleep(0.1)
        watching.set()
        await watcher
        worker = json.loads((await fleet.stop("worker")).strip().splitlines()[-1])["projections"]
        await fleet.stop("relay")
        rows = await pool.fetch("SELECT global_position, event_id, stream_id, version, event_type, data, metadata, "
                                "recorded_at, transaction_id FROM events ORDER BY global_position")
        stored = [record_from_row(r) for r in rows if r["stream_id"] != probe]
        async with pool.acquire() as conn:
            models = await read_models(conn, "c%")
        marks: dict[str, dict[str, int]] = {p: {} for p in PROJECTIONS}
        for r in await pool.fetch("SELECT projection, stream_id, version FROM checkpoints WHERE stream_id <> $1",
                                  probe):
            marks[r["projection"]][r["stream_id"]] = r["version"]
        dead = {f"{r['projection']}: {r['error'][:100]}": r["n"] for r in await pool.fetch(
            "SELECT projection, split_part(error, E'\\n', 1) AS error, count(*) AS n FROM dead_letters "
            "GROUP BY 1, 2 ORDER BY 1, 2")}
        resumed = applies_resumed(timeline, killed_at)
        first_write = ledger.first_ack_after.get("kill")
        assert timeline.recovered_at is not None
        figures = {
            "mode": mode, "load_seconds": LOAD_SECONDS, "rate": RATE, "writers": WRITERS,
            "replication_delay": pair.replication_delay, "replication_lag_bytes_at_kill": lag_bytes,
            "ready_seconds": round(ready, 1), "drained": complete, "drain_seconds": round(drain, 1),
            "written": len(ledger.attempts), "acknowledged": len(ledger.acked), "retries": ledger.retries,
            "conflicts": ledger.conflicts, "stored": len(stored),
            "applied": {p: worker[p]["applied"] for p in PROJECTIONS},
            "duplicates": {p: worker[p]["duplicates"] for p in PROJECTIONS},
            "gaps_filled": {p: worker[p]["gaps_filled"] for p in PROJECTIONS},
            "dead_letters": dead,
            "writes_blocked_seconds": round(first_write.acked_at - killed_at, 2)
            if first_write and first_write.acked_at else None,
            "promotion_seconds": round(promoted_at - killed_at, 2),
            "applies_resumed_seconds": round(resumed - killed_at, 2) if resumed else None,
            "recovered_seconds": round(timeline.recovered_at - killed_at, 2),
        }
        yield Outcome(mode, fleet, pair, ledger, stored, models, marks, dead, worker, figures)


async def _applied(pool: db.Pool, stream: str) -> bool:
    n: int = await pool.fetchval("SELECT count(*) FROM checkpoints WHERE stream_id = $1", stream)
    return n == len(PROJECTIONS)


def doubled(models: Models, expected: Models) -> int:
    """Placements and cancellations the read model counts more often than ``expected`` does."""
    extra = 0
    for customer, (p, c, _) in models.customer_stats.items():
        ep, ec, _ = expected.customer_stats.get(customer, (0, 0, Decimal(0)))
        extra += max(0, p - ep) + max(0, c - ec)
    return extra


def report(figures: dict[str, Any]) -> None:
    line = json.dumps(figures)
    print(f"failover: {line}")
    path = os.environ.get("EVENTFLEET_FAILOVER_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


async def verify_cli(url: str, schema: str, projection: str) -> tuple[int, dict[str, Any]]:
    """``eventfleet verify PROJECTION --json`` as a process on the multi-host URL."""
    env = {**os.environ, "EVENTFLEET_DATABASE_URL": url, "EVENTFLEET_SCHEMA": schema,
           "EVENTFLEET_PROJECTION_MODULES": registry.EXAMPLE}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "workers", "verify", projection, "--json",
                                                "--limit", "100000", env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode in (0, 1), err.decode()
    return proc.returncode, json.loads(out)


# --- the tests --------------------------------------------------------------------------------------------


def handles(projection: str, event_type: str) -> bool:
    """Whether the registered read model handles events of this type (its checkpoints stop at its own last one)."""
    cls = registry.REGISTRY.get(projection)
    return cls is None or cls().handles_type(event_type)


def check_nothing_lost_exactly_once(outcome: Outcome) -> None:
    """Every acknowledged append is in the new primary, nothing is stored twice, both read models equal the
    fold of the store, every checkpoint is at its stream's end, nothing dead-lettered."""
    stored_ids = {e.event_id for e in outcome.stored}
    lost = [a for a in outcome.ledger.acked if a.event_id not in stored_ids]
    expected = fold(e.event for e in outcome.stored)
    outcome.figures |= {"lost": len(lost), "doubled": doubled(outcome.models, expected),
                        "read_models_equal_fold": outcome.models == expected}
    report(outcome.figures)
    assert lost == []
    assert outcome.ledger.conflicts == 0  # no stream lost its tail
    # Nothing stored that no writer sent: a retried append was acknowledged once, never written twice.
    assert stored_ids <= set(outcome.ledger.attempts)
    assert len(stored_ids) == len(outcome.stored)
    assert outcome.models.customer_stats == expected.customer_stats
    assert outcome.models.order_summary == expected.order_summary
    for projection in PROJECTIONS:  # each at its stream's last event of its types (issue 25)
        versions: dict[str, int] = {}
        for e in outcome.stored:
            if handles(projection, e.event_type):
                versions[e.stream_id] = max(versions.get(e.stream_id, -1), e.version)
        assert outcome.checkpoints[projection] == versions
    assert outcome.dead_letters == {}
    assert outcome.figures["drained"]
    assert outcome.figures["applies_resumed_seconds"] is not None


async def test_synchronous_standby_loses_nothing_acknowledged_and_the_fleet_resumes_exactly_once(
        postgres_pair_factory, tmp_path):
    pair = postgres_pair_factory.enter_context(postgres_pair(synchronous=True))
    async with failover(pair, tmp_path, "synchronous") as outcome:
        check_nothing_lost_exactly_once(outcome)
        code, result = await verify_cli(pair.url, outcome.fleet.schema, "customer_stats")
        assert (code, result["ok"]) == (0, True)


async def test_a_primary_whose_host_vanishes_is_given_up_within_the_timeouts_and_nothing_is_lost(
        postgres_pair_factory, tmp_path):
    """No reset reaches the clients: pooled connections to the old primary fail by their TCP user timeout,
    new ones try it for ``store.db.HOST_TIMEOUT`` and then take the promoted standby."""
    reason = can_vanish()
    if reason is not None:
        pytest.skip(f"vanish_primary: {reason}")
    pair = postgres_pair_factory.enter_context(postgres_pair(synchronous=True))
    async with failover(pair, tmp_path, "synchronous, host vanished", vanish=True) as outcome:
        check_nothing_lost_exactly_once(outcome)
        bound = DOWN_SECONDS + db.USER_TIMEOUT_MS / 1000 + db.HOST_TIMEOUT + 10
        assert outcome.figures["recovered_seconds"] < bound


def applied_events(outcome: Outcome, projection: str) -> tuple[list[Any], list[Attempt]]:
    """The payloads a projection applied, in each stream's order, by its checkpoints: versions 0 to the
    checkpoint, from the store where it holds them, else the writers' append at that version (an event lost
    with the old primary that reached the worker through the broker); and those ghosts."""
    stored = {(e.stream_id, e.version): e.event for e in outcome.stored}
    stored_ids = {e.event_id for e in outcome.stored}
    tried = outcome.ledger.by_position()
    payloads: list[Any] = []
    ghosts: list[Attempt] = []
    for stream, last in sorted(outcome.checkpoints[projection].items()):
        for version in range(last + 1):
            if (stream, version) in stored:
                payloads.append(stored[(stream, version)])
            else:
                [ghost] = [a for a in tried[(stream, version)] if a.event_id not in stored_ids]
                ghosts.append(ghost)
                payloads.append(ghost.payload)
    return payloads, ghosts


async def test_asynchronous_standby_loses_acknowledged_appends_and_the_fleet_applies_every_survivor_and_no_ghost(
        postgres_pair_factory, tmp_path):
    """The relay published some of the lost events before the primary went: the workers receive them from the
    broker, find them nowhere in the new primary's store (checkpoints.claim_checkpoints) and drop them as ghosts,
    recorded as resolved dead letters; every surviving event is applied exactly once, verify finds nothing."""
    pair = postgres_pair_factory.enter_context(
        postgres_pair(synchronous=False, replication_delay=ASYNC_DELAY or None))
    async with failover(pair, tmp_path, "asynchronous") as outcome:
        stored_ids = {e.event_id for e in outcome.stored}
        lost = [a for a in outcome.ledger.acked if a.event_id not in stored_ids]
        survived = fold(e.event for e in outcome.stored)
        ghosts = {p: applied_events(outcome, p)[1] for p in PROJECTIONS}
        verified = {p: await verify_cli(pair.url, outcome.fleet.schema, p) for p in PROJECTIONS}
        behind = {p: sum(1 for e in outcome.stored if e.version > outcome.checkpoints[p].get(e.stream_id, -1)
                         and handles(p, e.event_type)) for p in PROJECTIONS}
        recorded = {key: n for key, n in outcome.dead_letters.items() if ": GhostEvent: " in key}
        outcome.figures |= {
            "lost": len(lost),
            "lost_streams": len({a.stream for a in lost}),
            "ghosts_applied": {p: len(ghosts[p]) for p in PROJECTIONS},
            "ghosts_recorded": recorded,
            "left_behind_events": behind,
            "doubled": doubled(outcome.models, survived),
            "read_models_equal_fold": outcome.models == survived,
            "verify_rows_differing": {p: verified[p][1]["tables"][0]["only_in_read_model"]
                                      + verified[p][1]["tables"][0]["only_in_replay"] for p in PROJECTIONS},
        }
        report(outcome.figures)
        assert ghosts == {p: [] for p in PROJECTIONS}
        assert outcome.models == survived
        assert behind == {p: 0 for p in PROJECTIONS}
        assert {p: code for p, (code, _) in verified.items()} == {p: 0 for p in PROJECTIONS}
        assert recorded == outcome.dead_letters  # nothing parked: only ghosts recorded, each resolved
        if ASYNC_DELAY:
            assert lost, "a standby held behind loses the acknowledged tail"


# --- store/db.py's multi-host connections, without the harness ------------------------------------------


def test_a_multi_host_url_is_split_into_one_url_per_host_and_anything_else_left_alone():
    url = "postgresql://app:p%40ss@db1:5432,db2:5433/prod?target_session_attrs=read-write&sslmode=require"
    assert db.split_hosts(url) == [
        "postgresql://app:p%40ss@db1:5432/prod?target_session_attrs=read-write&sslmode=require",
        "postgresql://app:p%40ss@db2:5433/prod?target_session_attrs=read-write&sslmode=require"]
    for single in ("postgresql://app@db1:5432/prod", "postgres://db1/prod", "postgresql:///prod?host=/run/pg",
                   "host=db1,db2 dbname=prod"):
        assert db.split_hosts(single) == [single]


async def test_a_host_that_never_answers_costs_the_stagger_not_the_timeout_and_the_next_host_is_kept(
        database_url):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts into its backlog and never answers
    try:
        port = silent.getsockname()[1]
        main = database_url.split("@", 1)[1].split("/", 1)[0]
        url = database_url.replace(main, f"127.0.0.1:{port},{main}", 1) + "?target_session_attrs=read-write"
        began = time.monotonic()
        conn = await db.connect(url, "public")
        first = time.monotonic() - began
        await conn.close()
        began = time.monotonic()
        conn = await db.connect(url, "public")  # the host that answered is tried first now
        again = time.monotonic() - began
        tcp = conn._transport.get_extra_info("socket")  # type: ignore[attr-defined]
        user_timeout = tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        await conn.close()
    finally:
        silent.close()
    assert db.HOST_STAGGER <= first < db.HOST_STAGGER + 5
    assert again < db.HOST_STAGGER
    assert user_timeout == db.USER_TIMEOUT_MS
