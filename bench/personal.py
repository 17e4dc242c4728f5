"""Personal fields: what sealing costs at append and opening at read, and how long ``forget`` takes.

    python -m bench.personal [--seconds 2] [--rounds 3] [--writers 8] [--streams 1000] [--reads 20]

(``python -m bench.append`` runs it too, after its own figures, at ``--personal-writers``.)

- Append: ``EventStore.append`` of one event with two personal fields (``CustomerContacted``), every
  subject's key cached, against the same event class without ``Personal`` (``CustomerContactedPlain``),
  alternating (ABBA) at ``--writers`` writers. Target: >= 0.8 of plain.
- Read: ``load`` of a stream of 1,000 such events against a stream of 1,000 plain twins, alternating,
  ``--reads`` times each, keys cached. Target: >= 0.7 of plain. Then, for information (no target): the
  decoding alone of the two streams' rows, fetched once, in this process's CPU time (the fastest of
  ``--reads`` x ``--rounds`` x 2 each, alternating), which a busy machine disturbs far less than the
  wall-clock time of a load, its round trip to PostgreSQL included.
- Forget: ``forget`` of a subject with 10,000 events across 100 streams. Target: under a second.

A fresh schema, dropped at the end; the KEK is random. Database: ``EVENTFLEET_DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import time
import uuid
from typing import Annotated, Any

import asyncpg

from bench.append import Sample, Writers, alternate, timed, verdict
from store import ERASED, EventStore, KeyEncryptionKeys, Personal, codec, db
from store.records import record_from_row
from workers import admin
from workers.config import DEFAULT_DATABASE_URL

REG = codec.Registry()
KEKS = KeyEncryptionKeys({"bench": os.urandom(32)})
READ_EVENTS = 1000
FORGET_STREAMS, FORGET_PER_STREAM = 100, 100


@REG.event("CustomerContacted")
@dataclasses.dataclass(frozen=True, slots=True)
class CustomerContacted:
    customer_id: str
    email: Annotated[str, Personal(subject="customer_id")]
    phone: Annotated[str, Personal(subject="customer_id")]
    channel: str


@REG.event("CustomerContactedPlain")
@dataclasses.dataclass(frozen=True, slots=True)
class CustomerContactedPlain:
    customer_id: str
    email: str
    phone: str
    channel: str


def contacted(customer: str, *, personal: bool) -> CustomerContacted | CustomerContactedPlain:
    cls = CustomerContacted if personal else CustomerContactedPlain
    return cls(customer, f"{customer}@example.com", "+33 1 23 45 67 89", "email")


async def appends(store: EventStore, writers: int, streams: int, seconds: float, *, personal: bool) -> Sample:
    """``append`` of one event per call; writer w's streams are customers of their own (keys cached)."""
    ws = Writers(writers, streams)
    events = {s: contacted(s, personal=personal) for mine in ws.mine for s in mine}
    if personal:
        await store.keys.ensure(events)  # "subject key cached": created and unwrapped before the clock starts

    async def step(w: int, i: int) -> None:
        stream, version = ws.next(w, i)
        await store.append(stream, [events[stream]], version)
        ws.versions[stream] = version + 1

    return await timed(writers, seconds, 1, step)


async def loads(store: EventStore, stream: str, times: int) -> Sample:
    sample = Sample()
    for _ in range(times):
        started = time.perf_counter()
        events = await store.load(stream)
        sample.latencies.append(time.perf_counter() - started)
        sample.seconds += sample.latencies[-1]
        sample.events += len(events)
    return sample


async def bench_append(dsn: str, schema: str, args: argparse.Namespace) -> list[str]:
    async with db.create_pool(dsn, schema, min_size=args.writers + 1, max_size=args.writers + 1) as pool:
        store = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
        plain = functools.partial(appends, store, args.writers, args.streams, args.seconds, personal=False)
        sealed = functools.partial(appends, store, args.writers, args.streams, args.seconds, personal=True)
        await appends(store, args.writers, args.streams, 0.3, personal=False)  # warm-up: plans, caches
        await appends(store, args.writers, args.streams, 0.3, personal=True)
        base, mine = await alternate(args.rounds, plain, sealed)
        await store.notifier.flush()
    ratio = mine.rate / base.rate if base.rate else float("nan")
    return [(f"personal append x1, {args.writers} writers: plain {base.rate:8.0f} ev/s p50 {base.pct(0.5):6.3f} ms"
            f" | two personal fields {mine.rate:8.0f} ev/s p50 {mine.pct(0.5):6.3f} ms p99 {mine.pct(0.99):6.3f} ms"),
            (f"{verdict(ratio >= 0.8)}  append with two personal fields, key cached, {args.writers} writers"
            f" >= 0.8 of plain: {ratio:.2f}")]


async def bench_read(dsn: str, schema: str, args: argparse.Namespace) -> list[str]:
    async with db.create_pool(dsn, schema, min_size=2, max_size=2) as pool:
        store = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
        tag = uuid.uuid4().hex[:8]
        for personal in (False, True):
            stream = f"read-{tag}-{personal}"
            for start in range(0, READ_EVENTS, 100):
                await store.append(stream, [contacted(f"c-{tag}-{i % 10}", personal=personal)
                                            for i in range(start, start + 100)], start - 1)
        plain = functools.partial(loads, store, f"read-{tag}-False", args.reads)
        sealed = functools.partial(loads, store, f"read-{tag}-True", args.reads)
        await plain()
        await sealed()  # warm-up; the sealed side's keys are cached from here on
        base, mine = await alternate(args.rounds, plain, sealed)
        rows = [await fetch_stream(store, f"read-{tag}-{personal}") for personal in (False, True)]
        plain_cpu, sealed_cpu = decoding_cpu(store, rows, args.rounds * args.reads)
        await store.notifier.flush()
    ratio = mine.rate / base.rate if base.rate else float("nan")
    return [(f"personal read of {READ_EVENTS:,} events (load): plain {base.pct(0.5):6.2f} ms"
            f" | two personal fields {mine.pct(0.5):6.2f} ms (p50 of {len(mine.latencies)})"),
            (f"{verdict(ratio >= 0.7)}  read of {READ_EVENTS:,} events with two personal fields >= 0.7 of plain:"
            f" {ratio:.2f}"),
            (f"      decoding alone, CPU time (min of {args.rounds * args.reads}): plain {plain_cpu:6.2f} ms"
             f" | two personal fields {sealed_cpu:6.2f} ms: {plain_cpu / sealed_cpu:.2f}"
             f" ({(sealed_cpu - plain_cpu) / READ_EVENTS * 1000:.2f} us more per event)")]


async def fetch_stream(store: EventStore, stream: str) -> list[Any]:
    """A stream's rows as ``load`` fetches them, not decoded."""
    async with store.hot.use() as conn:
        return list(await conn.fetch(store.queries["load_stream"], stream, 0))


def decoding_cpu(store: EventStore, rows: list[list[Any]], times: int) -> tuple[float, float]:
    """The CPU time (ms) of decoding each list of rows as ``load`` does, the fastest of ``times``, alternating."""
    best = [float("inf")] * len(rows)
    for _ in range(times):
        for i, batch in enumerate(rows):
            started = time.process_time()
            [record_from_row(r, store.registry) for r in batch]
            best[i] = min(best[i], (time.process_time() - started) * 1000)
    return best[0], best[1]


async def bench_forget(dsn: str, schema: str) -> list[str]:
    async with db.create_pool(dsn, schema, min_size=2, max_size=2) as pool:
        store = EventStore(pool, schema=schema, registry=REG, keks=KEKS)
        subject = f"forget-{uuid.uuid4().hex[:8]}"
        event = contacted(subject, personal=True)
        for first in range(0, FORGET_STREAMS, 10):
            await store.append_batch([(f"{subject}-{s}", [event] * FORGET_PER_STREAM, -1)
                                      for s in range(first, first + 10)])
        started = time.perf_counter()
        await store.forget(subject)
        took = time.perf_counter() - started
        erased = (await store.load(f"{subject}-{FORGET_STREAMS - 1}", to_version=0))[0].event.email == ERASED
        await store.notifier.flush()
    return [(f"{verdict(took < 1.0 and erased)}  forget of a subject with {FORGET_STREAMS * FORGET_PER_STREAM:,}"
            f" events across {FORGET_STREAMS} streams under a second: {took * 1000:.1f} ms"
            f" (its events read as erased after: {erased})")]


async def run_all(dsn: str, schema: str, args: argparse.Namespace) -> list[str]:
    """Every personal-field figure, on an already migrated schema."""
    return [*await bench_append(dsn, schema, args), *await bench_read(dsn, schema, args),
            *await bench_forget(dsn, schema)]


async def run(dsn: str, args: argparse.Namespace) -> None:
    schema = f"bench_personal_{uuid.uuid4().hex[:8]}"
    await admin.run_migrate(dsn, schema)
    try:
        for line in await run_all(dsn, schema, args):
            print(line, flush=True)
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed append segment")
    parser.add_argument("--rounds", type=int, default=3, help="plain/personal pairs")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--reads", type=int, default=20, help="loads of 1,000 events per read segment")
    args = parser.parse_args()
    dsn = os.environ.get("EVENTFLEET_DATABASE_URL", DEFAULT_DATABASE_URL)
    print(f"bench.personal: {args.rounds} x {args.seconds}s per side, {args.writers} writers, {args.streams}"
          f" streams, load average {os.getloadavg()[0]:.2f}", flush=True)
    asyncio.run(run(dsn, args))


if __name__ == "__main__":
    main()
