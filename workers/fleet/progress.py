"""Where a deployment's pipeline stands: written, published, applied by the slowest projection, and the lag;
and whether the workers' leases are dealt."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Sequence

from store import db, queries
from workers.projector import lag, leases

SQL = queries.load("workers", "ops.sql")


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """Counts from one database snapshot; ``lag_events`` is the gauges' figure (done when it is 0 everywhere)."""

    written: int
    published: int
    applied: int  # written, less the slowest projection's unapplied events of the types it handles
    lag_events: int
    lag_seconds: float

    @property
    def drained(self) -> bool:
        """Everything written is published and applied, and no projection lags."""
        return self.lag_events == 0 and self.written == self.published == self.applied


async def snapshot(pool: db.Pool, projections: list[str]) -> Snapshot:
    """Where the pipeline stands now."""
    lag_events, lag_seconds = 0, 0.0
    for name in projections:
        measured = await lag.measure(pool, name)
        lag_events, lag_seconds = max(lag_events, measured.lag_events), max(lag_seconds, measured.lag_seconds)
    async with db.translate_errors():
        row = await pool.fetchrow(SQL["pipeline_counts"])
    assert row is not None
    # A read model's checkpoints cover only the events of its types (issue 25): what it has applied is told by
    # its exact lag, not by how far its checkpoints reach.
    written = row["written"]
    return Snapshot(written, written - row["pending"], max(0, written - lag_events), lag_events, lag_seconds)


def show(s: Snapshot, final: bool = False) -> None:
    """A progress bar on stderr: one line rewritten on a terminal, a line per call otherwise."""
    width = 24
    done = min(width, int(width * s.applied / s.written)) if s.written else 0
    line = (f"[{'#' * done}{'.' * (width - done)}] written {s.written:,}  published {s.published:,}  "
            f"applied {s.applied:,}  lag {s.written - s.applied:,} events / {s.lag_seconds:.1f}s")
    if sys.stderr.isatty():
        print("\r" + line.ljust(110), end="\n" if final else "", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


async def dealt(pool: db.Pool, projections: Sequence[str], partitions: int, workers: int) -> bool:
    """Every projection's ``partitions`` are leased to ``min(workers, partitions)`` live workers whose shares
    differ by at most one: no handover is due."""
    held: dict[str, dict[str, int]] = {p: {} for p in projections}
    for lease in await leases.owners(pool):
        if lease.owner is not None and lease.live and lease.projection in held:
            held[lease.projection][lease.owner] = held[lease.projection].get(lease.owner, 0) + 1
    return all(len(shares) == min(workers, partitions) and sum(shares.values()) == partitions
               and max(shares.values()) - min(shares.values()) <= 1 for shares in held.values())


async def wait_dealt(pool: db.Pool, projections: Sequence[str], partitions: int, workers: int,
                     within: float) -> float | None:
    """Wait until the leases are ``dealt``; the seconds waited, or None if they were not within ``within``."""
    began = time.monotonic()
    while not await dealt(pool, projections, partitions, workers):
        if time.monotonic() - began > within:
            return None
        await asyncio.sleep(0.1)
    return time.monotonic() - began
