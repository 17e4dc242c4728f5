"""Append throughput and latency: ``EventStore`` against a minimal hand-written baseline, alternating.

    python -m bench.append [--seconds 2] [--rounds 3] [--writers 1,8,32] [--streams 1000] [--without-check]
                           [--tracing-writers 8] [--personal-writers 8]

Baseline: one connection per writer (held for a whole segment), one statement per append (a data-modifying CTE that checks the
version, inserts the event and its outbox row), the payload encoded once up front. Store: ``append`` of
one event per transaction through a pool of writers + 1 connections (the extra one for its relay
wake-ups), encoding each event. Both write the same schema (a fresh one,
dropped at the end), each writer cycling over its own share of ``--streams`` streams so there are no
conflicts. Batches: ``append_batch`` of 100 events (10 streams x 10) against a plain ``unnest`` insert
of 100 event rows. Segments alternate (ABBA) so drift of this shared machine hits both sides alike.

The store checks each event against its class before encoding it (``Registry.encode_checked``); the
baseline does not. What that check costs is timed on its own first, per event, beside the encoding
(the bench's OrderPaid and the domain's fat OrderPlaced), and each append line then says what share of
the client's time it is at the store's measured rate. ``--without-check`` adds a third side to the
single-event appends, the same store encoding without the check, alternating with the other two
(A B C C B A).

Tracing: the store's appends at ``--tracing-writers`` writers with OpenTelemetry absent, off, on, and on
with a span per append (bench/tracing.py), alternating likewise; the figures above run with the API
installed and no tracer provider.

Personal fields (bench/personal.py): appends of an event with two personal fields against its plain twin
at ``--personal-writers``, a read of 1,000 of them against 1,000 plain ones, and ``forget`` of a subject
with 10,000 events. Database: ``EVENTFLEET_DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import os
import time
import timeit
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from decimal import Decimal
from typing import Any

import asyncpg

from bench import tracing
from eventfleet.examples.orders.events import LineItem, OrderPaid, OrderPlaced
from store import EventStore, codec, db
from workers import admin
from workers.config import DEFAULT_DATABASE_URL

BASELINE_APPEND = """
WITH head AS (SELECT coalesce(max(version), -1) AS v FROM events WHERE stream_id = $1),
ins AS (INSERT INTO events (event_id, stream_id, version, event_type, data, metadata)
        SELECT $3, $1, $2::bigint + 1, $4, $5, $6 FROM head WHERE head.v = $2::bigint
        RETURNING global_position)
INSERT INTO outbox (global_position) SELECT global_position FROM ins RETURNING global_position
"""
BASELINE_UNNEST = """
INSERT INTO events (event_id, stream_id, version, event_type, data, metadata)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::bytea[], $6::bytea[])
"""
BATCH_STREAMS, BATCH_PER_STREAM = 10, 10


@dataclasses.dataclass
class Sample:
    events: int = 0
    seconds: float = 0.0
    latencies: list[float] = dataclasses.field(default_factory=list)

    def add(self, other: Sample) -> None:
        self.events += other.events
        self.seconds += other.seconds
        self.latencies.extend(other.latencies)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def sample_event() -> OrderPaid:
    return OrderPaid("o-1", "c-1", Decimal("129.90"), dt.datetime.now(dt.UTC))


def fat_event() -> OrderPlaced:
    item = LineItem("p-1", "Widget", "SKU-1", 2, Decimal("19.95"))
    return OrderPlaced("o-1", "c-1", (item, item, item), Decimal("119.70"), Decimal("23.94"), Decimal("143.64"),
                       dt.datetime.now(dt.UTC))


@dataclasses.dataclass
class CheckCost:
    """Microseconds per event (best of several repeats) of ``Registry.encode`` and of ``codec.check``, which
    ``encode_checked`` runs before it."""

    label: str
    encode: float
    check: float

    def line(self) -> str:
        return (f"check at append, {self.label:<20} encode {self.encode:6.2f} us | check {self.check:5.2f} us"
                f" ({self.check / self.encode:.0%} of encoding)")


def check_cost(label: str, event: object, number: int = 20_000, repeat: int = 5) -> CheckCost:
    codec.REGISTRY.encode_checked(event)  # compile the class's predicate first

    def best(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6

    return CheckCost(label, best(lambda: codec.REGISTRY.encode(event)), best(lambda: codec.check(event)))


async def timed(writers: int, seconds: float, per_event: int,
                step: Callable[[int, int], Awaitable[None]]) -> Sample:
    """Run ``step(writer, i)`` in ``writers`` loops for ``seconds``; count per_event events per step."""
    sample = Sample()
    deadline = time.perf_counter() + seconds

    async def loop(w: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await step(w, i)
            sample.latencies.append(time.perf_counter() - t)
            sample.events += per_event
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(writers)))
    sample.seconds = time.perf_counter() - started
    return sample


class Writers:
    """Per-segment stream names and local versions: writer w owns streams w, w+W, ... of ``streams``."""

    def __init__(self, writers: int, streams: int) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.mine = [[f"{self.tag}-{s}" for s in range(w, streams, writers)] for w in range(writers)]
        self.versions: dict[str, int] = {}

    def next(self, w: int, i: int) -> tuple[str, int]:
        streams = self.mine[w]
        stream = streams[i % len(streams)]
        return stream, self.versions.get(stream, -1)


async def baseline_append(pool: db.Pool, writers: int, streams: int, seconds: float, data: bytes) -> Sample:
    """Each writer holds one connection for the whole segment (taken before the clock starts)."""
    ws = Writers(writers, streams)
    conns = [await pool.acquire() for _ in range(writers)]

    async def step(w: int, i: int) -> None:
        stream, version = ws.next(w, i)
        position = await conns[w].fetchval(BASELINE_APPEND, stream, version, uuid.uuid4(), "OrderPaid.v1",
                                           data, b"\x80")
        assert position is not None
        ws.versions[stream] = version + 1

    try:
        return await timed(writers, seconds, 1, step)
    finally:
        for conn in conns:
            await pool.release(conn)


class UncheckedRegistry(codec.Registry):
    """The registrations of ``base``, encoded without the check at append: the store as it was before the
    check, for ``--without-check`` only (it would store events that never decode)."""

    def __init__(self, base: codec.Registry) -> None:
        self.__dict__.update(base.__dict__)  # the very same tables, not copies: base's registrations

    def encode_checked(self, payload: object, origin: codec.Origin | None = None) -> tuple[str, bytes]:
        return self.encode(payload, origin)


async def store_append_without_check(store: EventStore, writers: int, streams: int, seconds: float) -> Sample:
    checked = store.registry
    store.registry = UncheckedRegistry(checked)
    try:
        return await store_append(store, writers, streams, seconds)
    finally:
        store.registry = checked


async def store_append(store: EventStore, writers: int, streams: int, seconds: float,
                       request: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> Sample:
    """``append`` of one event per call, each inside ``request()`` (the application's span, when traced)."""
    ws = Writers(writers, streams)
    event = sample_event()

    async def step(w: int, i: int) -> None:
        stream, version = ws.next(w, i)
        with request():
            await store.append(stream, [event], version)
        ws.versions[stream] = version + 1

    return await timed(writers, seconds, 1, step)


async def baseline_batch(conn: db.Conn, seconds: float, data: bytes) -> Sample:
    n = BATCH_STREAMS * BATCH_PER_STREAM

    async def step(w: int, i: int) -> None:
        tag = uuid.uuid4().hex[:8]
        streams = [f"{tag}-{s}" for s in range(BATCH_STREAMS) for _ in range(BATCH_PER_STREAM)]
        versions = [v for _ in range(BATCH_STREAMS) for v in range(BATCH_PER_STREAM)]
        await conn.execute(BASELINE_UNNEST, [uuid.uuid4() for _ in range(n)], streams, versions,
                           ["OrderPaid.v1"] * n, [data] * n, [b"\x80"] * n)

    return await timed(1, seconds, n, step)


async def store_batch(store: EventStore, seconds: float) -> Sample:
    event = sample_event()

    async def step(w: int, i: int) -> None:
        tag = uuid.uuid4().hex[:8]
        await store.append_batch([(f"{tag}-{s}", [event] * BATCH_PER_STREAM, -1) for s in range(BATCH_STREAMS)])

    return await timed(1, seconds, BATCH_STREAMS * BATCH_PER_STREAM, step)


def report(label: str, base: Sample, ours: Sample) -> str:
    return (f"{label:<28} baseline {base.rate:8.0f} ev/s p50 {base.pct(0.5):6.3f} ms p99 {base.pct(0.99):6.3f} ms"
            f" | store {ours.rate:8.0f} ev/s p50 {ours.pct(0.5):6.3f} ms p99 {ours.pct(0.99):6.3f} ms"
            f" | ratio {ours.rate / base.rate if base.rate else float('nan'):5.2f}")


async def alternate(rounds: int, *segments: Callable[[], Awaitable[Sample]]) -> list[Sample]:
    """Run each segment ``rounds`` times, in order then in reverse (ABBA for two, ABCCBA for three); return
    their merged samples."""
    totals = [Sample() for _ in segments]
    pairs = list(zip(totals, segments, strict=True))
    for r in range(rounds):
        for total, segment in pairs if r % 2 == 0 else pairs[::-1]:
            total.add(await segment())
    return totals


def check_share(check_us: float, sample: Sample) -> str:
    """The check's share of the client's time at the sample's rate (one event loop, one core at most)."""
    return f"{'':<28} check {check_us:.2f} us x {sample.rate:.0f} ev/s = {check_us * sample.rate / 1e4:.2f}% of a core"


async def bench_appends(dsn: str, schema: str, writers: int, args: argparse.Namespace, payload: bytes,
                        check_us: float) -> str:
    # One connection more than writers: the store's relay wake-ups (store/notify.py) need one. The
    # baseline takes its per-writer connections from the same pool for each of its segments.
    async with db.create_pool(dsn, schema, min_size=writers + 1, max_size=writers + 1) as pool:
        store = EventStore(pool, schema=schema)
        baseline = functools.partial(baseline_append, pool, writers, args.streams, args.seconds, payload)
        ours = functools.partial(store_append, store, writers, args.streams, args.seconds)
        segments = [baseline, ours]
        if args.without_check:
            segments.append(functools.partial(store_append_without_check, store, writers, args.streams,
                                              args.seconds))
        await baseline_append(pool, writers, args.streams, 0.3, payload)  # warm-up: plans, caches
        await store_append(store, writers, args.streams, 0.3)
        base, mine, *unchecked = await alternate(args.rounds, *segments)
        await store.notifier.flush()
    lines = [report(f"append x1, {writers} writers", base, mine), check_share(check_us, mine)]
    for other in unchecked:
        lines.append(f"{'':<28} without the check {other.rate:8.0f} ev/s p50 {other.pct(0.5):6.3f} ms"
                     f" p99 {other.pct(0.99):6.3f} ms | ratio {other.rate / base.rate if base.rate else float('nan'):5.2f}"
                     f" | with / without {mine.rate / other.rate if other.rate else float('nan'):5.2f}")
    return "\n".join(lines)


async def bench_batches(dsn: str, schema: str, args: argparse.Namespace, payload: bytes, check_us: float) -> str:
    conn = await db.connect(dsn, schema)
    try:
        async with db.create_pool(dsn, schema, min_size=2, max_size=2) as pool:
            store = EventStore(pool, schema=schema)
            await baseline_batch(conn, 0.3, payload)
            await store_batch(store, 0.3)
            base, mine = await alternate(args.rounds, functools.partial(baseline_batch, conn, args.seconds, payload),
                                         functools.partial(store_batch, store, args.seconds))
            await store.notifier.flush()
    finally:
        await conn.close()
    return f"{report('append_batch x100, 1 writer', base, mine)}\n{check_share(check_us, mine)}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def bench_tracing(dsn: str, schema: str, writers: int, args: argparse.Namespace) -> list[str]:
    """The store's appends in each tracing mode, in alternating order; the report's lines."""
    traced = tracing.Tracing()
    samples = {mode: Sample() for mode in tracing.MODES}
    rates: dict[str, list[float]] = {mode: [] for mode in tracing.MODES}  # of every segment
    async with db.create_pool(dsn, schema, min_size=writers + 1, max_size=writers + 1) as pool:
        store = EventStore(pool, schema=schema)

        async def segment(mode: str, seconds: float) -> Sample:
            with traced.running(mode):
                return await store_append(store, writers, args.streams, seconds, traced.request)

        for mode in tracing.MODES:
            await segment(mode, 0.3)  # warm-up
        spans_before, _ = traced.exported()
        for r in range(args.rounds):
            for mode in tracing.MODES if r % 2 == 0 else tracing.MODES[::-1]:
                sample = await segment(mode, args.seconds)
                samples[mode].add(sample)
                rates[mode].append(sample.rate)
        await store.notifier.flush()
    spans, _ = traced.exported()
    absent, off, on, per_append = (samples[m] for m in tracing.MODES)
    noise = tracing.noise(rates["absent"], rates["off"])
    return [
        f"tracing, append x1, {writers} writers: " + " | ".join(
            f"{m} {s.rate:8.0f} ev/s p50 {s.pct(0.5):6.3f} ms p99 {s.pct(0.99):6.3f} ms" for m, s in samples.items())
        + f" | {spans - spans_before} spans exported",
        (f"{verdict(abs(off.rate / absent.rate - 1) <= noise)}  tracing off: append at {writers} writers within"
         f" the noise of OpenTelemetry absent: {off.rate / absent.rate:.2f} (noise {noise:.0%}: {tracing.NOISE_IS})"),
        (f"{verdict(on.rate >= 0.9 * off.rate)}  tracing on: append at {writers} writers >= 0.9 of off:"
         f" {on.rate / off.rate:.2f} (with the application's own span per append: {per_append.rate / off.rate:.2f})"),
    ]


async def run(dsn: str, args: argparse.Namespace) -> None:
    schema = f"bench_append_{uuid.uuid4().hex[:8]}"
    await admin.run_migrate(dsn, schema)
    _, payload = codec.REGISTRY.encode(sample_event())
    costs = [check_cost("OrderPaid", sample_event()), check_cost("OrderPlaced, 3 lines", fat_event())]
    for cost in costs:
        print(cost.line(), flush=True)
    check_us = costs[0].check  # the appends below write the OrderPaid
    try:
        for writers in [int(w) for w in args.writers.split(",")]:
            print(await bench_appends(dsn, schema, writers, args, payload, check_us), flush=True)
        print(await bench_batches(dsn, schema, args, payload, check_us), flush=True)
        if args.tracing_writers:
            for line in await bench_tracing(dsn, schema, args.tracing_writers, args):
                print(line, flush=True)
        if args.personal_writers:
            from bench import personal  # imports this module: not at the top

            options = argparse.Namespace(seconds=args.seconds, rounds=args.rounds, writers=args.personal_writers,
                                         streams=args.streams, reads=20)
            for line in await personal.run_all(dsn, schema, options):
                print(line, flush=True)
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed segment")
    parser.add_argument("--rounds", type=int, default=3, help="baseline/store pairs per configuration")
    parser.add_argument("--writers", default="1,8,32", help="comma-separated writer counts")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--without-check", action="store_true",
                        help="also time single-event appends without the check at append (a third side)")
    parser.add_argument("--tracing-writers", type=int, default=8,
                        help="writers of the tracing comparison (absent, off, on); 0 skips it")
    parser.add_argument("--personal-writers", type=int, default=8,
                        help="writers of the personal-fields appends (bench/personal.py); 0 skips them")
    args = parser.parse_args()
    dsn = os.environ.get("EVENTFLEET_DATABASE_URL", DEFAULT_DATABASE_URL)
    print(f"bench.append: {args.rounds} x {args.seconds}s per side and configuration, {args.streams} streams,"
          f" load average {os.getloadavg()[0]:.2f}", flush=True)
    asyncio.run(run(dsn, args))


if __name__ == "__main__":
    main()
