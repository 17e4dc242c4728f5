"""Relays and workers as ``python -m workers`` processes of this one: started, ready, scraped, stopped.

Each process has a slot (``relay-0``, ``worker-2``) with an HTTP port of its own that it keeps across
restarts; a slot restarted after a kill is a new incarnation. A process's stderr goes to
``<logs>/<slot>.<n>.log`` and its stdout to ``<slot>.<n>.out``: a worker stopped with SIGTERM prints its
exact totals per projection there as its last line (``Incarnation.final``). ``Fleet.check`` raises if a
process exited that the fleet did not stop, which a fault test calls between its steps.
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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import aiohttp

from workers import errors
from workers.config import Settings
from workers.fleet import metrics

READY_WITHIN = 60.0
#: Seconds a SIGTERMed process has to exit before it is SIGKILLed.
STOP_WITHIN = 30.0


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
    raise errors.FleetFailed(f"no free port between 10000 and {low}")


def environment(settings: Settings) -> dict[str, str]:
    """The ``EVENTFLEET_*`` variables that point a process at the settings' deployment."""
    env = {"EVENTFLEET_DATABASE_URL": settings.database_url, "EVENTFLEET_AMQP_URL": ",".join(settings.amqp_urls),
           "EVENTFLEET_SCHEMA": settings.schema, "EVENTFLEET_PREFIX": settings.prefix,
           "EVENTFLEET_PROJECTION_MODULES": ",".join(settings.projection_modules)}
    if settings.partitions:
        env["EVENTFLEET_PARTITIONS"] = str(settings.partitions)
    if settings.group is not None:
        env["EVENTFLEET_GROUP"] = settings.group
    return env


@dataclasses.dataclass
class Incarnation:
    """One process of a slot, from its start to its exit."""

    proc: subprocess.Popen[bytes]
    started: float
    log: Path  # stderr
    out: Path  # stdout
    samples: metrics.Samples = dataclasses.field(default_factory=dict)  # its last good scrape
    final: dict[str, dict[str, int]] | None = None  # a worker's totals per projection, printed at a clean stop

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_final(self) -> None:
        lines = self.out.read_text(errors="replace").strip().splitlines()
        with contextlib.suppress(ValueError, IndexError, AttributeError):
            doc = json.loads(lines[-1])
            if isinstance(doc.get("projections"), dict):
                self.final = doc["projections"]


@dataclasses.dataclass
class Process:
    """A slot of the fleet (``relay-0``, ``worker-2``) and its incarnations, newest last."""

    role: str
    index: int
    port: int
    env: Mapping[str, str]
    logs: Path
    args: Sequence[str] = ()
    module: str = "workers"  # what ``python -m`` runs (a wrapper of ``workers``, e.g. a tracer)
    verbose: bool = False  # log at DEBUG (``-v``), for digging
    incarnations: list[Incarnation] = dataclasses.field(default_factory=list)
    frozen: bool = False  # SIGSTOPped
    stopping: bool = False  # the fleet sent SIGKILL or SIGTERM: an exit is expected

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def current(self) -> Incarnation:
        return self.incarnations[-1]

    @property
    def pid(self) -> int:
        return self.current.proc.pid

    @property
    def alive(self) -> bool:
        return bool(self.incarnations) and self.current.alive

    def start(self) -> Incarnation:
        """Start a new incarnation (the slot's previous one, if any, must have exited)."""
        n = len(self.incarnations)
        log, out = self.logs / f"{self.name}.{n}.log", self.logs / f"{self.name}.{n}.out"
        env = {**self.env, "EVENTFLEET_HTTP_PORT": str(self.port)}
        with log.open("wb") as stderr, out.open("wb") as stdout:
            proc = subprocess.Popen([sys.executable, "-m", self.module, *(["-v"] if self.verbose else []), self.role,
                                     *self.args], env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        incarnation = Incarnation(proc, time.monotonic(), log, out)
        self.incarnations.append(incarnation)
        self.stopping = self.frozen = False
        return incarnation

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the live incarnation; SIGKILL and SIGTERM mark the exit as expected."""
        self.stopping = self.stopping or sig in (signal.SIGKILL, signal.SIGTERM)
        if self.alive:
            self.current.proc.send_signal(sig)
        self.frozen = sig == signal.SIGSTOP or (self.frozen and sig not in (signal.SIGCONT, signal.SIGKILL))

    async def wait_exit(self, within: float) -> int:
        """The exit code, once the incarnation has exited; FleetFailed if it has not within ``within`` s."""
        deadline = time.monotonic() + within
        while (code := self.current.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise errors.FleetFailed(f"{self.name} did not exit within {within:.0f}s; its log:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        self.current.read_final()
        return code

    def log_tail(self, lines: int = 30) -> str:
        if not self.incarnations or not self.current.log.exists():
            return ""
        return "\n".join(f"    {line}" for line in self.current.log.read_text(errors="replace").splitlines()[-lines:])


class Fleet:
    """Relays and workers of one deployment (``settings``), with their logs in ``logs``; see the module doc.
    ``env`` adds to (and overrides) the environment every process gets."""

    def __init__(self, settings: Settings, logs: Path, env: Mapping[str, str] | None = None) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.settings, self.logs = settings, logs
        self.env: dict[str, str] = {**os.environ, **environment(settings), **(env or {})}
        self.processes: list[Process] = []
        self._http: aiohttp.ClientSession | None = None

    # --- the slots -----------------------------------------------------------------------------------------

    def add(self, role: str, *args: str, module: str = "workers", env: Mapping[str, str] | None = None) -> Process:
        """A new slot of ``role`` (``relay`` or ``worker``, with command-line ``args``), not started yet."""
        index = sum(1 for p in self.processes if p.role == role)
        process = Process(role, index, free_port(), {**self.env, **(env or {})}, self.logs, args, module)
        self.processes.append(process)
        return process

    async def start(self, role: str, *args: str, ready: bool = True, within: float = READY_WITHIN,
                    env: Mapping[str, str] | None = None) -> Process:
        """Add a slot and start it; with ``ready``, wait until its /readyz answers 200."""
        process = self.add(role, *args, env=env)
        process.start()
        if ready:
            await self.wait_ready(process, within)
        return process

    async def restart(self, process: Process, within: float = READY_WITHIN) -> None:
        """A new incarnation of an exited slot, ready."""
        process.start()
        await self.wait_ready(process, within)

    @property
    def relays(self) -> list[Process]:
        return [p for p in self.processes if p.role == "relay"]

    @property
    def workers(self) -> list[Process]:
        return [p for p in self.processes if p.role == "worker"]

    def live(self) -> Iterator[Process]:
        return (p for p in self.processes if p.alive)

    def pids(self) -> list[int]:
        return [p.pid for p in self.live()]

    def check(self) -> None:
        """Raise FleetFailed if a process exited that the fleet did not stop (a crash)."""
        for process in self.processes:
            if process.incarnations and not process.alive and not process.stopping:
                raise errors.FleetFailed(f"{process.name} exited with status {process.current.proc.returncode}; "
                                         f"its log ({process.current.log}):\n{process.log_tail()}")

    # --- HTTP: ready and metrics ---------------------------------------------------------------------------

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return self._http

    async def ready(self, process: Process) -> bool:
        """Whether the process's /readyz answers 200 now (Postgres and RabbitMQ connected)."""
        try:
            async with self.http.get(f"http://127.0.0.1:{process.port}/readyz") as response:
                return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def wait_ready(self, process: Process | None = None, within: float = READY_WITHIN) -> None:
        """Until the process (every started one, when None) answers /readyz; FleetFailed if one exits first or
        is not ready within ``within`` s."""
        waiting = [process] if process is not None else [p for p in self.processes if p.alive]
        deadline = time.monotonic() + within
        while waiting:
            waiting = [p for p, ok in zip(waiting, await asyncio.gather(*map(self.ready, waiting)), strict=True)
                       if not ok]
            if not waiting:
                return
            for p in waiting:
                if not p.alive:
                    raise errors.FleetFailed(f"{p.name} exited with status {p.current.proc.returncode} before it "
                                             f"was ready; its log ({p.current.log}):\n{p.log_tail()}")
            if time.monotonic() > deadline:
                raise errors.FleetFailed(f"{', '.join(p.name for p in waiting)} not ready after {within:.0f}s; "
                                         f"logs in {self.logs}")
            await asyncio.sleep(0.1)

    async def scrape(self, process: Process) -> metrics.Samples | None:
        """The process's ``eventfleet_*`` samples now (kept as its incarnation's last good scrape); None when it
        does not answer, or answers 503 or a cut-off page."""
        try:
            async with self.http.get(f"http://127.0.0.1:{process.port}/metrics") as response:
                if response.status != 200:  # e.g. the watchdog's 503 while a just-continued loop catches up
                    return None
                text = await response.text()
            samples = metrics.parse(text)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None
        process.current.samples = samples
        return samples

    async def scrape_all(self, role: str | None = "worker") -> metrics.Samples:
        """Every live, running process's samples (of ``role``; all roles when None), summed."""
        targets = [p for p in self.live() if not p.frozen and role in (None, p.role)]
        found = await asyncio.gather(*map(self.scrape, targets))
        return metrics.merge(s for s in found if s is not None)

    async def run_scraper(self, interval: float = 1.0) -> None:
        """Scrape every live process about every ``interval`` s until cancelled (a killed one keeps its last)."""
        while True:
            await self.scrape_all(None)
            await asyncio.sleep(interval)

    # --- signals -------------------------------------------------------------------------------------------

    def kill(self, process: Process) -> None:
        """SIGKILL, no goodbye (it leaves its leases to expire and its deliveries unacked)."""
        process.signal(signal.SIGCONT)
        process.signal(signal.SIGKILL)

    def pause(self, process: Process) -> None:
        """SIGSTOP: frozen wherever it is, its connections open."""
        process.signal(signal.SIGSTOP)

    def resume(self, process: Process) -> None:
        process.signal(signal.SIGCONT)

    async def stop(self, process: Process, within: float = STOP_WITHIN) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``within`` s; the exit code (0: a clean stop, after
        which a worker's totals are in ``process.current.final``)."""
        process.signal(signal.SIGCONT)
        process.signal(signal.SIGTERM)
        try:
            return await process.wait_exit(within)
        except errors.FleetFailed:
            process.signal(signal.SIGKILL)
            return await process.wait_exit(within)

    async def stop_all(self, within: float = STOP_WITHIN) -> dict[str, int]:
        """Stop the live workers, then the live relays (what they published is applied first); their exit codes
        by slot name."""
        codes: dict[str, int] = {}
        for group in (self.workers, self.relays):
            started = [p for p in group if p.alive]
            for p, code in zip(started, await asyncio.gather(*(self.stop(p, within) for p in started)), strict=True):
                codes[p.name] = code
        return codes

    async def close(self) -> None:
        """SIGKILL whatever still runs and wait for it; close the HTTP session."""
        for process in self.processes:
            if process.alive:
                self.kill(process)
                await asyncio.to_thread(process.current.proc.wait)
        if self._http is not None:
            await self._http.close()
            self._http = None

    def totals(self, projection: str | None = None) -> dict[str, int]:
        """The final totals of every worker incarnation stopped cleanly, summed over projections (or of one)."""
        out: dict[str, int] = {}
        for process in self.workers:
            for inc in process.incarnations:
                for name, stats in (inc.final or {}).items():
                    if projection in (None, name):
                        for key, value in stats.items():
                            if isinstance(value, int):
                                out[key] = out.get(key, 0) + value
        return out

