"""Where a deployment's pipeline stands: written, published, applied by the slowest projection, and the lag."""

from __future__ import annotations

import dataclasses
import sys

from store import db, queries
from workers.projector import lag

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
