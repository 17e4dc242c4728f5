"""``make soak``: the fleet (2 relays, 3 workers) under a steady moderate load for 10 minutes, no faults.

Reports the RSS of every process at start (when ready), after the warm-up minute, at the end and its peak
(the kernel's high-water mark); the lag of every projection and the outbox backlog sampled throughout;
and, after the load, that every read model equals the fold of the store (nothing lost or doubled).
Exits 1 if anything was lost or doubled or the lag did not stay bounded. Not collected by pytest.

    EVENTFLEET_SOAK_SECONDS (600)  EVENTFLEET_SOAK_RATE (events/s, 60)  EVENTFLEET_SOAK_REPORT (JSON file)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

import domain.events  # noqa: F401 - registers the orders events
from store import EventStore, db
from tests.chaos import harness
from tests.chaos.fleet import Fleet, rss_kib
from tests.chaos.verify import verify
from tests.chaos.writer import Writer
from workers import commands

DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SECONDS = float(os.environ.get("EVENTFLEET_SOAK_SECONDS", "600"))
RATE = float(os.environ.get("EVENTFLEET_SOAK_RATE", "60"))
WARMUP = 60.0
#: The lag stays bounded if its worst sample is under this many seconds of the oldest unapplied event.
LAG_BOUND_SECONDS = 30.0


def rss_now(fleet: Fleet) -> dict[str, int]:
    return {s.name: rss_kib(s.pid)[0] for s in fleet.live()}


async def run_soak(logdir: Path) -> dict[str, Any]:
    deployment = harness.Deployment(DATABASE_URL, AMQP_URL, "/", f"soak_{uuid.uuid4().hex[:10]}",
                                    f"soak.{uuid.uuid4().hex[:10]}")
    await commands.run_migrate(DATABASE_URL, deployment.schema)
    try:
        return await _soak(deployment, logdir)
    finally:
        await harness.delete_topology(deployment)
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{deployment.schema}" CASCADE')
        finally:
            await conn.close()


async def _soak(deployment: harness.Deployment, logdir: Path) -> dict[str, Any]:
    await harness.prepare(deployment)
    async with db.create_pool(DATABASE_URL, deployment.schema, min_size=0, max_size=16) as writer_pool, \
            db.create_pool(DATABASE_URL, deployment.schema, min_size=0, max_size=2) as pool, \
            Fleet(deployment.env(), logdir) as fleet:
        await fleet.start()
        store = EventStore(writer_pool, schema=deployment.schema)
        t0 = time.monotonic()
        monitor = harness.LagMonitor(pool, t0, interval=5.0)
        writer = Writer(store, RATE, random.randrange(2**32))
        stop = asyncio.Event()
        rss: dict[str, dict[str, int]] = {"start": rss_now(fleet)}
        async with harness.background(monitor.run(), fleet.run_scraper(5.0)):
            writing = asyncio.create_task(writer.run(stop))
            try:
                last_print = 0.0
                while (elapsed := time.monotonic() - t0) < SECONDS:
                    await asyncio.wait({writing}, timeout=min(5.0, SECONDS - elapsed))
                    if writing.done():
                        writing.result()
                    fleet.check()
                    if "warm" not in rss and elapsed >= WARMUP:
                        rss["warm"] = rss_now(fleet)
                    if elapsed - last_print >= 60:
                        last_print = elapsed
                        latest = monitor.samples[-1] if monitor.samples else None
                        print(f"[soak] {elapsed:5.0f}s written={writer.steps} lag={latest and latest.lag} "
                              f"outbox={latest and latest.outbox} rss={rss_now(fleet)}", flush=True)
            finally:
                stop.set()
                await writing
            load_end = time.monotonic() - t0
            rss["end"] = rss_now(fleet)
            await fleet.scrape()
            drained = await monitor.wait_drained(fleet, 300)
        verdict = await verify(store)
        exit_codes = await fleet.stop()
    samples = [s for s in monitor.samples if s.t <= load_end and s.total is not None]
    half = len(samples) // 2
    lag_events = [s.total or 0 for s in samples]
    lag_seconds = [s.lag_seconds or 0.0 for s in samples]
    report: dict[str, Any] = {
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "seconds": round(load_end), "rate": RATE,
        "written": verdict.events, "achieved_rate": round(verdict.events / load_end, 1),
        "lost": verdict.lost, "doubled": verdict.doubled, "exact": verdict.exact,
        "drain_seconds": round(drained - load_end, 1), "exit_codes": exit_codes,
        "lag_events": {"max": max(lag_events, default=0), "max_first_half": max(lag_events[:half], default=0),
                       "max_second_half": max(lag_events[half:], default=0),
                       "mean": round(sum(lag_events) / max(1, len(lag_events)), 1), "samples": len(samples)},
        "lag_seconds_max": round(max(lag_seconds, default=0.0), 2),
        "outbox_max": max((s.outbox or 0 for s in samples), default=0),
        "rss_kib": {name: {"start": rss["start"].get(name), "after_1min": rss.get("warm", {}).get(name),
                           "end": rss["end"].get(name),
                           "peak": max(inc.rss_peak for inc in slot.incarnations)}
                    for slot in fleet.slots for name in [slot.name]},
        "totals": fleet.totals(), "writer_retries": writer.retries,
    }
    report["lag_bounded"] = report["lag_seconds_max"] < LAG_BOUND_SECONDS
    return report


def main() -> int:
    logdir = Path(tempfile.mkdtemp(prefix="eventfleet-soak-"))
    print(f"[soak] {SECONDS:.0f}s at {RATE:.0f} events/s; logs in {logdir}", flush=True)
    report = asyncio.run(run_soak(logdir))
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if path := os.environ.get("EVENTFLEET_SOAK_REPORT"):
        Path(path).write_text(text + "\n")
    ok = report["exact"] and report["lag_bounded"] and set(report["exit_codes"].values()) == {0}
    print(f"[soak] {'OK' if ok else 'FAILED'}: lost={report['lost']} doubled={report['doubled']} "
          f"lag_max={report['lag_events']['max']} events / {report['lag_seconds_max']}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
