"""The fleet under test: relays and workers as ``python -m workers`` processes (``workers.fleet``), watched
from outside.

Each process has a slot (``relay-0``, ``worker-2``) with a fixed HTTP port; a slot restarted after a kill
is a new incarnation. The fleet scrapes every live incarnation's ``/metrics`` about once a second, so a
SIGKILLed one still reports what it did up to its last scrape; one stopped with SIGTERM prints its exact
totals (workers) as its last stdout line. RSS comes from ``/proc``, and the TCP ports of each process's
sockets let faults pick out exactly the fleet's Postgres backends. Slots named in ``traced`` run under
``tests.chaos.memtrace`` (tracemalloc), for the soak's leak hunt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Self

from projections import registry
from workers import fleet
from workers.config import Settings
from workers.fleet import Process

ROOT = Path(__file__).resolve().parents[2]
LEDGER_MODULE = "tests.chaos.ledger"
#: The orders example's reactor runs in every scenario: its deadlines fire, and its follow-ups are checked.
REACTORS_MODULE = "eventfleet.examples.orders.reactors"
PAYMENT_TIMEOUT_SECONDS = 5
PROJECTIONS = ("order_summary", "customer_stats", "chaos_ledger", "chaos_shipments", "payment_timeout")
#: Counters summed over incarnations: worker counters per projection, and the relays' published total.
COUNTERS = {
    "eventfleet_projection_applied_total": "applied",
    "eventfleet_projection_duplicates_total": "duplicates",
    "eventfleet_projection_gaps_filled_total": "gaps_filled",
    "eventfleet_projection_dead_lettered_total": "dead_lettered",
    "eventfleet_relay_published_total": "published",
}
FINAL = ("applied", "duplicates", "gaps_filled", "dead_lettered")
Slot = Process


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc/PID/status; (0, 0) once it is gone."""
    values = {"VmRSS": 0, "VmHWM": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def tcp_ports(pids: list[int]) -> set[int]:
    """Local TCP ports of the sockets the given processes hold (their Postgres and AMQP client ends)."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@dataclasses.dataclass
class Rss:
    """One incarnation's resident memory (KiB): at ready, the peak and the last seen."""

    start: int = 0
    peak: int = 0
    last: int = 0


class Fleet(fleet.Fleet):
    """Two relays and three workers (by default) of one schema and prefix (``env``: their ``EVENTFLEET_*``),
    with their logs in ``logdir``."""

    def __init__(self, env: Mapping[str, str], logdir: Path, *, relays: int = 2, workers: int = 3,
                 traced: Collection[str] = ()) -> None:
        env = {"PYTHONPATH": str(ROOT),
               "EVENTFLEET_PROJECTION_MODULES": f"{registry.EXAMPLE},{LEDGER_MODULE},{REACTORS_MODULE}",
               "EVENTFLEET_EXAMPLE_PAYMENT_TIMEOUT_SECONDS": str(PAYMENT_TIMEOUT_SECONDS), **env}
        super().__init__(Settings.from_env(env), logdir, env)
        self.traced = set(traced)
        self.rss: dict[tuple[str, int], Rss] = {}
        verbose = bool(os.environ.get("EVENTFLEET_CHAOS_VERBOSE"))  # DEBUG logs, for digging
        for role, count in (("relay", relays), ("worker", workers)):
            for i in range(count):
                name = f"{role}-{i}"
                memtrace = {"EVENTFLEET_MEMTRACE_FILE": str(logdir / f"{name}.memtrace.jsonl")}
                slot = self.add(role, module="tests.chaos.memtrace" if name in self.traced else "workers",
                                env=memtrace if name in self.traced else None)
                slot.verbose = verbose

    @property
    def slots(self) -> list[Process]:
        return self.processes

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start_all(self, within: float = 120) -> None:
        """Start every slot and wait until each answers /readyz."""
        for slot in self.slots:
            slot.start()
        await self.wait_ready(None, within)

    async def restart(self, process: Process, within: float = 120) -> None:
        await super().restart(process, within)

    async def wait_ready(self, process: Process | None = None, within: float = 120) -> None:
        await super().wait_ready(process, within)
        for slot in [process] if process is not None else list(self.live()):
            self._rss(slot).start = rss_kib(slot.pid)[0]

    def _rss(self, slot: Process) -> Rss:
        return self.rss.setdefault((slot.name, len(slot.incarnations) - 1), Rss())

    async def scrape(self, process: Process) -> fleet.metrics.Samples | None:
        """The counters (kept per incarnation, the last good scrape) and RSS of a live, running process."""
        current, peak = rss_kib(process.pid)
        if current:
            rss = self._rss(process)
            rss.last, rss.peak = current, max(rss.peak, peak)
        return await super().scrape(process)

    async def stop_all(self, within: float = 30) -> dict[str, int]:
        """A last scrape, then SIGTERM every live process; the exit codes (0 = clean stop)."""
        await self.scrape_all(None)
        return await super().stop_all(within)

    def totals(self, projection: str | None = None) -> dict[str, int]:
        """Counters over all incarnations: exact totals where printed at a clean stop, else the last scrape."""
        out: dict[str, float] = {}
        for slot in self.slots:
            for inc in slot.incarnations:
                if inc.final is not None:
                    for stats in inc.final.values():
                        for key in FINAL:
                            out[key] = out.get(key, 0) + stats.get(key, 0)
                    continue
                for name, key in COUNTERS.items():
                    value = fleet.metrics.total(inc.samples.get(name))
                    out[key] = out.get(key, 0) + value
        return {k: int(v) for k, v in out.items()}

    def memory(self) -> list[dict[str, Any]]:
        """Per incarnation: RSS at ready, peak and last seen (KiB)."""
        return [{"process": f"{s.name}.{n}", "rss_start_kib": rss.start, "rss_end_kib": rss.last,
                 "rss_peak_kib": rss.peak}
                for s in self.slots for n in range(len(s.incarnations))
                for rss in [self.rss.get((s.name, n), Rss())]]
