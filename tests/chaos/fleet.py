"""The fleet under test: relays and workers as ``python -m workers`` processes, watched from outside.

Each process has a slot (``relay-0``, ``worker-2``) with a fixed HTTP port; a slot restarted after a kill
is a new incarnation. The fleet scrapes every live incarnation's ``/metrics`` about once a second, so a
SIGKILLed one still reports what it did up to its last scrape; one stopped with SIGTERM prints its exact
totals (workers) as its last stdout line. RSS comes from ``/proc``, and the TCP ports of each process's
sockets let faults pick out exactly the fleet's Postgres backends. Slots named in ``traced`` run under
``tests.chaos.memtrace`` (tracemalloc), for the soak's leak hunt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from projections import registry

ROOT = Path(__file__).resolve().parents[2]
LEDGER_MODULE = "tests.chaos.ledger"
#: The orders example's reactor runs in every scenario: its deadlines fire, and its follow-ups are checked.
REACTORS_MODULE = "eventfleet.examples.orders.reactors"
PAYMENT_TIMEOUT_SECONDS = 5
PROJECTIONS = ("order_summary", "customer_stats", "chaos_ledger", "payment_timeout")
#: Counters summed over incarnations: worker counters per projection, and the relays' published total.
COUNTERS = {
    "eventfleet_projection_applied": "applied",
    "eventfleet_projection_duplicates": "duplicates",
    "eventfleet_projection_gaps_filled": "gaps_filled",
    "eventfleet_projection_dead_lettered": "dead_lettered",
    "eventfleet_relay_published": "published",
}


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A slot keeps its port across restarts, and while one
    incarnation is dead any outgoing connection may take an ephemeral port (a restarted worker then failed
    to bind its HTTP server: "Address already in use")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, max(low, 10_001))
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 10000 and {low}")


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
class Incarnation:
    """One process of a slot: from start to exit."""

    proc: subprocess.Popen[bytes]
    started: float
    stdout: Path
    counters: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    final: dict[str, Any] | None = None  # a worker's exact totals, printed at a clean stop
    rss_start: int = 0
    rss_peak: int = 0
    rss_last: int = 0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclasses.dataclass
class Slot:
    """A role in the fleet (relay or worker number n) and its incarnations, newest last."""

    role: str
    index: int
    port: int
    env: Mapping[str, str]
    logdir: Path
    incarnations: list[Incarnation] = dataclasses.field(default_factory=list)
    frozen: bool = False
    stopping: bool = False  # the harness sent SIGKILL or SIGTERM: an exit is expected
    traced: bool = False  # run under tests.chaos.memtrace (tracemalloc snapshots in the log dir)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def current(self) -> Incarnation:
        return self.incarnations[-1]

    @property
    def pid(self) -> int:
        return self.current.proc.pid

    def log_path(self, n: int) -> Path:
        return self.logdir / f"{self.name}.{n}.log"

    def start(self) -> Incarnation:
        n = len(self.incarnations)
        stdout = self.logdir / f"{self.name}.{n}.out"
        verbose = ["-v"] if os.environ.get("EVENTFLEET_CHAOS_VERBOSE") else []  # DEBUG logs, for digging
        module = "tests.chaos.memtrace" if self.traced else "workers"
        env = {**self.env, "EVENTFLEET_HTTP_PORT": str(self.port),
               "EVENTFLEET_MEMTRACE_FILE": str(self.logdir / f"{self.name}.{n}.memtrace.jsonl")}
        with self.log_path(n).open("wb") as err, stdout.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", module, *verbose, self.role], cwd=ROOT, env=env,
                                    stdout=out, stderr=err)
        inc = Incarnation(proc, time.monotonic(), stdout)
        self.incarnations.append(inc)
        self.stopping = False
        return inc

    def signal(self, sig: int) -> None:
        self.stopping = self.stopping or sig in (signal.SIGKILL, signal.SIGTERM)
        if self.current.alive:
            self.current.proc.send_signal(sig)
        self.frozen = sig == signal.SIGSTOP or (self.frozen and sig != signal.SIGCONT)

    async def wait_exit(self, within: float) -> int:
        deadline = time.monotonic() + within
        while (code := self.current.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not exit within {within}s")
            await asyncio.sleep(0.05)
        self._read_final()
        return code

    def _read_final(self) -> None:
        inc = self.current
        lines = inc.stdout.read_text(errors="replace").strip().splitlines()
        with contextlib.suppress(ValueError, IndexError):
            doc = json.loads(lines[-1])
            if isinstance(doc.get("projections"), dict):
                inc.final = doc["projections"]

    def log_tail(self, lines: int = 30) -> str:
        path = self.log_path(len(self.incarnations) - 1)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def totals(self) -> dict[str, float]:
        """Counters over all incarnations: exact totals where printed at a clean stop, else the last scrape."""
        out: dict[str, float] = {}
        for inc in self.incarnations:
            if inc.final is not None:
                for stats in inc.final.values():
                    for key in ("applied", "duplicates", "gaps_filled", "dead_lettered"):
                        out[key] = out.get(key, 0) + stats.get(key, 0)
                continue
            for (name, _label), value in inc.counters.items():
                out[name] = out.get(name, 0) + value
        return out


class Fleet:
    """Two relays and three workers (by default) of one schema and prefix, with their logs in ``logdir``."""

    def __init__(self, env: Mapping[str, str], logdir: Path, *, relays: int = 2, workers: int = 3,
                 traced: Collection[str] = ()) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(ROOT),
                    "EVENTFLEET_PROJECTION_MODULES": f"{registry.EXAMPLE},{LEDGER_MODULE},{REACTORS_MODULE}",
                    "EVENTFLEET_EXAMPLE_PAYMENT_TIMEOUT_SECONDS": str(PAYMENT_TIMEOUT_SECONDS), **env}
        logdir.mkdir(parents=True, exist_ok=True)
        self.slots = [Slot("relay", i, free_port(), self.env, logdir) for i in range(relays)]
        self.slots += [Slot("worker", i, free_port(), self.env, logdir) for i in range(workers)]
        for slot in self.slots:
            slot.traced = slot.name in traced
        self._http: aiohttp.ClientSession | None = None

    @property
    def relays(self) -> list[Slot]:
        return [s for s in self.slots if s.role == "relay"]

    @property
    def workers(self) -> list[Slot]:
        return [s for s in self.slots if s.role == "worker"]

    def live(self) -> Iterator[Slot]:
        return (s for s in self.slots if s.incarnations and s.current.alive)

    async def __aenter__(self) -> Self:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for slot in self.slots:
            if slot.incarnations and slot.current.alive:
                slot.signal(signal.SIGCONT)
                slot.signal(signal.SIGKILL)
                slot.current.proc.wait()
        if self._http is not None:
            await self._http.close()

    async def start(self, within: float = 120) -> None:
        for slot in self.slots:
            slot.start()
        await asyncio.gather(*(self.wait_ready(s, within) for s in self.slots))

    async def restart(self, slot: Slot, within: float = 120) -> None:
        slot.start()
        await self.wait_ready(slot, within)

    async def wait_ready(self, slot: Slot, within: float) -> None:
        """Until the slot's /readyz answers 200 (Postgres and RabbitMQ connected)."""
        deadline = time.monotonic() + within
        while not await self._get_ok(slot, "/readyz"):
            if not slot.current.alive:
                raise AssertionError(f"{slot.name} exited with {slot.current.proc.returncode}:\n{slot.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{slot.name} not ready within {within}s:\n{slot.log_tail()}")
            await asyncio.sleep(0.1)
        slot.current.rss_start = rss_kib(slot.pid)[0]

    async def _get_ok(self, slot: Slot, path: str) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(f"http://127.0.0.1:{slot.port}{path}") as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def scrape(self) -> None:
        """Read the counters and RSS of every live, running incarnation."""
        await asyncio.gather(*(self._scrape(s) for s in self.live() if not s.frozen))

    async def _scrape(self, slot: Slot) -> None:
        assert self._http is not None
        inc = slot.current
        current, peak = rss_kib(inc.proc.pid)
        if current:
            inc.rss_last, inc.rss_peak = current, max(inc.rss_peak, peak)
        try:
            async with self._http.get(f"http://127.0.0.1:{slot.port}/metrics") as response:
                if response.status != 200:  # e.g. the watchdog's 503 while a just-continued loop catches up
                    return
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return
        counters: dict[tuple[str, str], float] = {}
        try:
            for family in text_string_to_metric_families(text):
                key = COUNTERS.get(family.name)
                if key is None:
                    continue
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        counters[(key, sample.labels.get("projection", ""))] = sample.value
        except ValueError:  # a cut-off body (the process died mid-answer): keep the last good scrape
            return
        inc.counters.update(counters)

    async def run_scraper(self, interval: float = 1.0) -> None:
        """Scrape until cancelled."""
        while True:
            await self.scrape()
            await asyncio.sleep(interval)

    async def stop(self, within: float = 30) -> dict[str, int]:
        """SIGTERM every live process after a last scrape; return the exit codes (0 = clean stop)."""
        await self.scrape()
        for slot in self.live():
            slot.signal(signal.SIGCONT)
            slot.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(s.wait_exit(within) for s in self.slots if s.incarnations))
        return {s.name: c for s, c in zip([s for s in self.slots if s.incarnations], codes, strict=True)}

    def check(self) -> None:
        """Raise if a process exited that nobody stopped (a crash: the fleet must outlive every fault)."""
        for slot in self.slots:
            if slot.incarnations and not slot.current.alive and not slot.stopping:
                raise AssertionError(f"{slot.name} exited with {slot.current.proc.returncode} on its own:\n"
                                     f"{slot.log_tail()}")

    def pids(self) -> list[int]:
        return [s.pid for s in self.live()]

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for slot in self.slots:
            for key, value in slot.totals().items():
                out[key] = out.get(key, 0) + value
        return out

    def memory(self) -> list[dict[str, Any]]:
        """Per incarnation: RSS at ready, peak and last seen (KiB)."""
        return [{"process": f"{s.name}.{n}", "rss_start_kib": inc.rss_start, "rss_end_kib": inc.rss_last,
                 "rss_peak_kib": inc.rss_peak}
                for s in self.slots for n, inc in enumerate(s.incarnations)]
