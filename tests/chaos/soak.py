"""``make soak``: the fleet (2 relays, 3 workers) under a steady moderate load for 10 minutes, no faults.

Reports the RSS of every process sampled every 30 s from start (when ready) to the end of the load, and
its peak (the kernel's high-water mark); the lag of every projection and the outbox backlog sampled
throughout; and, after the load, that every read model equals the fold of the store (nothing lost or
doubled). Not collected by pytest.

Memory is judged flat by a plateau rule, per process: the first half of the load is warm-up (caches
filling: a worker's decode cache holds 4096 events, about 7 MB; statement caches, histograms, the
allocator's pools), and over the second half the least-squares line through the RSS samples may rise by
at most ``PLATEAU_MIB`` (2 MiB; over a 10-minute run that is a trend under 0.4 MiB/min, over 30 minutes
under 0.14 MiB/min). A line rather than end minus start, so that one allocator step (a dict resized, a
reconnect) does not decide alone; a bound in MiB rather than a percentage, because a leak is a number of
bytes per event, not a share of the process. Processes run under tracemalloc (``EVENTFLEET_SOAK_TRACE``,
see ``tests.chaos.memtrace``) are reported but not judged: tracemalloc's own tables grow with them.

Exits 1 if anything was lost or doubled, the lag did not stay bounded, a process did not stop cleanly, or
memory was not flat.

    EVENTFLEET_SOAK_SECONDS (600)  EVENTFLEET_SOAK_RATE (events/s, 60)  EVENTFLEET_SOAK_REPORT (JSON file)
    EVENTFLEET_SOAK_TRACE (slot names, e.g. worker-0,relay-0: run them under tracemalloc; none by default)
    EVENTFLEET_SOAK_PARTITIONS (P of its schema, 16)
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

import eventfleet.examples.orders.events  # noqa: F401 - registers the orders events
from projections import registry
from store import EventStore, db
from store.partitions import DEFAULT_PARTITIONS
from tests.chaos import harness
from tests.chaos.fleet import PROJECTIONS, REACTORS_MODULE, Fleet, rss_kib
from tests.chaos.verify import verify
from tests.chaos.writer import Writer
from workers import fleet as fleet_mod

DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SECONDS = float(os.environ.get("EVENTFLEET_SOAK_SECONDS", "600"))
RATE = float(os.environ.get("EVENTFLEET_SOAK_RATE", "60"))
WARMUP = 60.0
#: Processes run under tracemalloc (``tests.chaos.memtrace``), e.g. ``worker-0,relay-0``; none by default.
TRACED = [name for name in os.environ.get("EVENTFLEET_SOAK_TRACE", "").split(",") if name]
RSS_EVERY = 30.0
#: The most the fitted RSS line of a process may rise over the second half of the load (see above).
PLATEAU_MIB = 2.0
#: P of the soak's schema: a deployment's default (its queues live only for the run).
PARTITIONS = int(os.environ.get("EVENTFLEET_SOAK_PARTITIONS", DEFAULT_PARTITIONS))
#: The lag stays bounded if its worst sample is under this many seconds of the oldest unapplied event.
LAG_BOUND_SECONDS = 30.0


def rss_now(fleet: Fleet) -> dict[str, int]:
    return {s.name: rss_kib(s.pid)[0] for s in fleet.live()}


def plateau_rise_kib(series: list[tuple[float, int]], load_seconds: float) -> float | None:
    """How much the least-squares line through the (t, RSS KiB) samples of the load's second half rises
    across that half; None with fewer than three samples there."""
    half = [(t, kib) for t, kib in series if load_seconds / 2 <= t <= load_seconds]
    if len(half) < 3:
        return None
    n = len(half)
    mean_t, mean_kib = sum(t for t, _ in half) / n, sum(kib for _, kib in half) / n
    slope = (sum((t - mean_t) * (kib - mean_kib) for t, kib in half)
             / sum((t - mean_t) ** 2 for t, _ in half))
    return slope * (load_seconds / 2)


def memory_verdict(series: list[tuple[float, dict[str, int]]], load_seconds: float,
                   judged: list[str]) -> dict[str, Any]:
    """Per process: the second half's fitted rise (KiB) and trend (MiB/h); flat if every judged one rises
    by at most PLATEAU_MIB."""
    rises = {name: plateau_rise_kib([(t, values[name]) for t, values in series if name in values], load_seconds)
             for name in sorted({name for _, values in series for name in values})}
    per_hour = 3600 / (load_seconds / 2) / 1024
    flat = all((rise := rises[name]) is not None and rise <= PLATEAU_MIB * 1024 for name in judged)
    return {"rule": f"fitted RSS rise over the second half <= {PLATEAU_MIB} MiB", "flat": flat, "judged": judged,
            "second_half_rise_kib": {n: None if r is None else round(r) for n, r in rises.items()},
            "second_half_trend_mib_per_hour": {n: None if r is None else round(r * per_hour, 1)
                                               for n, r in rises.items()}}


async def run_soak(logdir: Path) -> dict[str, Any]:
    deployment = harness.Deployment(DATABASE_URL, AMQP_URL, "/", f"soak_{uuid.uuid4().hex[:10]}",
                                    f"soak.{uuid.uuid4().hex[:10]}", PARTITIONS)
    # The read models' tables are migrated for the projections registered here: the fleet's own.
    registry.load([registry.EXAMPLE, REACTORS_MODULE])
    async with fleet_mod.open_deployment(deployment.settings(), PROJECTIONS):
        return await _soak(deployment, logdir)


async def _soak(deployment: harness.Deployment, logdir: Path) -> dict[str, Any]:
    await harness.prepare(deployment)
    async with db.create_pool(DATABASE_URL, deployment.schema, min_size=0, max_size=16) as writer_pool, \
            db.create_pool(DATABASE_URL, deployment.schema, min_size=0, max_size=2) as pool, \
            Fleet(deployment.env(), logdir, traced=TRACED) as fleet:
        await fleet.start_all()
        store = EventStore(writer_pool, schema=deployment.schema)
        t0 = time.monotonic()
        monitor = harness.LagMonitor(pool, t0, interval=5.0)
        writer = Writer(store, RATE, random.randrange(2**32))
        stop = asyncio.Event()
        rss: dict[str, dict[str, int]] = {"start": rss_now(fleet)}
        series: list[tuple[float, dict[str, int]]] = [(0.0, rss["start"])]
        async with harness.background(monitor.run(), fleet.run_scraper(5.0)):
            writing = asyncio.create_task(writer.run(stop))
            try:
                last_print = 0.0
                while (elapsed := time.monotonic() - t0) < SECONDS:
                    await asyncio.wait({writing}, timeout=min(5.0, SECONDS - elapsed))
                    if writing.done():
                        writing.result()
                    fleet.check()
                    if elapsed - series[-1][0] >= RSS_EVERY:
                        series.append((round(elapsed), rss_now(fleet)))
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
            series.append((round(load_end), rss["end"]))
            await fleet.scrape_all(None)
            drained = await monitor.wait_drained(fleet, 300)
        verdict = await verify(store)
        exit_codes = await fleet.stop_all()
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
                           "peak": max(m["rss_peak_kib"] for m in fleet.memory()
                                       if m["process"].startswith(f"{name}."))}
                    for slot in fleet.slots for name in [slot.name]},
        "totals": fleet.totals(), "writer_retries": writer.retries,
        "rss_series_kib": [[t, values] for t, values in series], "traced": TRACED,
    }
    report["lag_bounded"] = report["lag_seconds_max"] < LAG_BOUND_SECONDS
    report["memory"] = memory_verdict(series, load_end, [s.name for s in fleet.slots if s.name not in fleet.traced])
    return report


def rss_table(series: list[list[Any]]) -> str:
    """RSS (MiB) per process at the start and every minute of the load, and at its end, as a Markdown table."""
    names = sorted({name for _, values in series for name in values})
    rows = [(t, values) for t, values in series if t % 60 < RSS_EVERY or t == series[-1][0]]
    lines = ["| t (s) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {t:.0f} | " + " | ".join(f"{values[n] / 1024:.1f}" if n in values else "-" for n in names) + " |"
              for t, values in rows]
    return "\n".join(lines)


def main() -> int:
    logdir = Path(tempfile.mkdtemp(prefix="eventfleet-soak-"))
    print(f"[soak] {SECONDS:.0f}s at {RATE:.0f} events/s; logs in {logdir}", flush=True)
    report = asyncio.run(run_soak(logdir))
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if path := os.environ.get("EVENTFLEET_SOAK_REPORT"):
        Path(path).write_text(text + "\n")
    memory = report["memory"]
    ok = (report["exact"] and report["lag_bounded"] and set(report["exit_codes"].values()) == {0}
          and memory["flat"])
    print(rss_table(report["rss_series_kib"]))
    print(f"[soak] {'OK' if ok else 'FAILED'}: lost={report['lost']} doubled={report['doubled']} "
          f"lag_max={report['lag_events']['max']} events / {report['lag_seconds_max']}s "
          f"memory {'flat' if memory['flat'] else 'NOT flat'} (second-half rise KiB: "
          f"{memory['second_half_rise_kib']})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
