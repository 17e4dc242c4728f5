"""A PostgreSQL 15 primary and streaming standby of their own, for failover tests.

``postgres_pair()`` (a context manager) creates both in a temporary directory: ``initdb`` for the primary,
``pg_basebackup -R`` for the standby, each on its own port (5441 and 5442 when free) and its own socket
directory, trust authentication on 127.0.0.1 only, ``wal_level=replica``, ``hot_standby=on``. By default
the standby is synchronous (``synchronous_standby_names`` names it, ``synchronous_commit=on``): a commit
returns once the standby has flushed it. ``synchronous=False`` makes it asynchronous.
``replication_delay=S`` puts a TCP relay between them that holds the primary's replication stream for S
seconds (a slow link or a busy standby); ``stop_primary_hard()`` cuts it first, so what the standby had
not received is lost with the primary, as when the primary's host dies.

``promote()`` is ``pg_ctl promote`` on the standby; ``stop_primary_hard()`` is ``pg_ctl stop -m
immediate`` on the primary (no checkpoint, no goodbye to clients or standby: their sockets are reset);
``kill_primary()`` is SIGKILL of its postmaster alone; ``vanish_primary()`` makes its host vanish: iptables
rules (root only, see ``can_vanish()``) drop every packet to and from its port, then it is stopped, so its
clients hear nothing at all, as when a machine loses power. The standby's own
``synchronous_standby_names`` is empty: promoted, it has no standby, and naming one would block every
commit. On exit both servers are stopped, the iptables rules removed and every file deleted. The machine's own clusters are never
touched: the servers run as the ``postgres`` OS user (through ``runuser`` when this process is root) from
``/usr/lib/postgresql/15/bin`` with nothing but their own directories and ports.

``url`` is the multi-host URL every process should use (``target_session_attrs=read-write``: the driver
connects to whichever of the two is the primary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.proxy import Proxy

BIN = Path(os.environ.get("EVENTFLEET_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"
DEFAULT_PORTS = (5441, 5442)
STANDBY_NAME = "standby"
START_TIMEOUT = 30.0


class HarnessError(RuntimeError):
    """The harness could not set the servers up (the message carries the tool's output)."""


def unavailable() -> str | None:
    """Why this machine cannot run the harness, or None."""
    for tool in ("initdb", "pg_ctl", "pg_basebackup"):
        if not (BIN / tool).exists():
            return f"{BIN / tool} not found (PostgreSQL 15 server binaries)"
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        return f"no {OS_USER!r} OS user"
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != OS_USER:
        return f"needs root (to run the servers as {OS_USER!r}) or to run as {OS_USER!r}"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runuser not found"
    return None


def _as_postgres(*argv: str | Path) -> list[str]:
    args = [str(a) for a in argv]
    return ["runuser", "-u", OS_USER, "--", *args] if os.geteuid() == 0 else args


def _run(*argv: str | Path, timeout: float = 60.0) -> str:
    proc = subprocess.run(_as_postgres(*argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int, preferred: tuple[int, ...] = DEFAULT_PORTS) -> list[int]:
    """``preferred`` when free (all of them), else free ports from 5443 on (another pair may be running)."""
    ruled = _ruled_ports()
    if len(preferred) >= count and all(_port_free(p) and p not in ruled for p in preferred[:count]):
        return list(preferred[:count])
    found: list[int] = []
    port = max(preferred) + 1
    while len(found) < count and port < 65000:
        if _port_free(port) and port not in ruled:
            found.append(port)
        port += 1
    return found


@dataclasses.dataclass
class Node:
    """One server: its name, port, data directory and log."""

    name: str
    port: int
    data: Path
    log: Path
    socket_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str, timeout: float = START_TIMEOUT + 10) -> str:
        return _run(BIN / "pg_ctl", "-D", self.data, *args, timeout=timeout)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def psql_value(self, sql: str) -> str:
        """One value by psql over the socket (no driver in the harness process's event loop)."""
        return _run(BIN / "psql" if (BIN / "psql").exists() else "psql", "-X", "-A", "-t", "-q",
                    "-h", self.socket_dir, "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c", sql,
                    timeout=30).strip()


RULE_COMMENT = "eventfleet-pg-harness"


def _drop_rules(port: int) -> list[list[str]]:
    """The INPUT rules dropping every TCP packet to and from ``port`` on 127.0.0.1 (both directions)."""
    common = ["INPUT", "-p", "tcp", "-s", "127.0.0.1", "-d", "127.0.0.1"]
    tail = ["-m", "comment", "--comment", f"{RULE_COMMENT} {port}", "-j", "DROP"]
    return [[*common, "--dport", str(port), *tail], [*common, "--sport", str(port), *tail]]


def can_vanish() -> str | None:
    """Why ``vanish_primary()`` cannot run here (it needs iptables and root), or None."""
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        return "needs root and iptables"
    probe = subprocess.run(["iptables", "-w", "-S", "INPUT"], check=False, capture_output=True, timeout=30)
    return None if probe.returncode == 0 else "iptables cannot list INPUT"


def _ruled_ports() -> set[int]:
    """Ports some pair's ``vanish_primary()`` drops packets of now (this run's, another's, a crashed one's)."""
    if can_vanish() is not None:
        return set()
    listed = subprocess.run(["iptables", "-w", "-S", "INPUT"], check=False, capture_output=True, text=True,
                            timeout=30)
    found = set()
    for line in listed.stdout.splitlines():
        words = shlex.split(line)
        if RULE_COMMENT in line and "--comment" in words:
            found.add(int(words[words.index("--comment") + 1].split()[-1]))
    return found


def remove_stale_rules() -> None:
    """Drop every rule of this harness (a crashed run's; not while another pair is running): by hand."""
    if can_vanish() is not None:
        return
    listed = subprocess.run(["iptables", "-w", "-S", "INPUT"], check=False, capture_output=True, text=True,
                            timeout=30)
    for line in listed.stdout.splitlines():
        if RULE_COMMENT in line and line.startswith("-A INPUT "):
            subprocess.run(["iptables", "-w", "-D", *shlex.split(line)[1:]], check=False, capture_output=True,
                           timeout=30)


def _configure(node: Node, fsync: bool, extra: dict[str, str]) -> None:
    """Write a node's settings: its port and socket on loopback, small buffers, replication allowed."""
    settings = {
        "port": str(node.port),
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": f"'{node.socket_dir}'",
        "wal_level": "replica",
        "hot_standby": "on",
        "max_wal_senders": "5",
        "max_replication_slots": "5",
        "max_connections": "100",
        "shared_buffers": "32MB",
        "fsync": "on" if fsync else "off",
        "wal_receiver_status_interval": "1s",
        "wal_retrieve_retry_interval": "1s",
        "log_line_prefix": "'%m [%p] %a '",
        "cluster_name": f"'{node.name}'",
        **extra,
    }
    with (node.data / "postgresql.auto.conf").open("a") as conf:
        conf.write("".join(f"{k} = {v}\n" for k, v in settings.items()))


def _initdb(node: Node) -> None:
    """A new cluster in the node's data directory: trust on loopback and its socket, replication allowed."""
    _run(BIN / "initdb", "-D", node.data, "-U", "postgres", "-A", "trust", "--no-sync",
         "--no-instructions", "-E", "UTF8", "--locale=C")
    (node.data / "pg_hba.conf").write_text(
        "local all all trust\n"
        "host all all 127.0.0.1/32 trust\n"
        "host replication all 127.0.0.1/32 trust\n")


def _stop(node: Node) -> None:
    """Stop a node at once (SIGKILL if it will not), whatever state it is in."""
    if node.running():
        with contextlib.suppress(HarnessError, subprocess.TimeoutExpired):
            node.pg_ctl("-m", "immediate", "-w", "-t", "10", "stop", timeout=20)
    pid = node.postmaster_pid()
    if pid is not None and node.running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _new_root(root: Path | None) -> tuple[Path, bool]:
    """The harness's directory (a new temporary one, which the servers' user can reach, unless given)."""
    reason = unavailable()
    if reason is not None:
        raise HarnessError(reason)
    if root is not None:
        return root, False
    base = Path(tempfile.mkdtemp(prefix="eventfleet-pg-"))
    base.chmod(0o711)  # the servers' user must reach its directories inside
    return base, True


@contextlib.contextmanager
def postgres_alone(*, root: Path | None = None) -> Iterator[Node]:
    """One new cluster of its own (``initdb``, started on a free port): a server a store can be moved to.
    Stopped and removed on exit."""
    base, made = _new_root(root)
    (port,) = _free_ports(1, preferred=(5445,))
    node = Node("alone", port, base / "alone", base / "alone.log", base / "alone-socket")
    try:
        node.socket_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OS_USER)
            for path in (base, node.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        _initdb(node)
        _configure(node, False, {})
        node.pg_ctl("-l", str(node.log), "-w", "-t", str(int(START_TIMEOUT)), "start")
        yield node
    finally:
        _stop(node)
        shutil.rmtree(base if made else node.data, ignore_errors=True)


class PostgresPair:
    """A primary and a streaming standby (see the module docstring); use ``postgres_pair()``."""

    def __init__(self, root: Path, *, synchronous: bool = True, replication_delay: float | None = None,
                 fsync: bool = True) -> None:
        self.root, self.synchronous, self.replication_delay, self.fsync = root, synchronous, replication_delay, fsync
        ports = _free_ports(3 if replication_delay else 2)
        if len(ports) < (3 if replication_delay else 2):
            raise HarnessError("no free ports for the pair")
        self.primary = self._node("primary", ports[0])
        self.standby = self._node("standby", ports[1])
        self.relay_port = ports[2] if replication_delay else None
        self.relay: Proxy | None = None
        self.promoted_at: float | None = None
        self.stopped_at: float | None = None
        self._dropped: list[int] = []  # ports whose packets vanish_primary() drops

    def _node(self, name: str, port: int) -> Node:
        sockets = self.root / f"{name}-socket"
        return Node(name, port, self.root / name, self.root / f"{name}.log", sockets)

    # --- the URLs ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Both hosts, primary first; the driver takes the one that accepts writes."""
        return (f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}/postgres"
                "?target_session_attrs=read-write")

    # --- life -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for node in (self.primary, self.standby):
            node.socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OS_USER)
            for path in (self.root, self.primary.socket_dir, self.standby.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        _initdb(self.primary)
        self._configure(self.primary, {
            "synchronous_standby_names": f"'{STANDBY_NAME}'" if self.synchronous else "''",
            "synchronous_commit": "on",
        })
        self.primary.pg_ctl("-l", str(self.primary.log), "-w", "-t", str(int(START_TIMEOUT)), "start")
        _run(BIN / "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
             "-D", self.standby.data, "-R", "-X", "stream", "-c", "fast", "--no-sync")
        upstream = self.primary.port
        if self.replication_delay:
            assert self.relay_port is not None
            self.relay = Proxy(self.relay_port, self.primary.port, delay=self.replication_delay)
            upstream = self.relay_port
        self._configure(self.standby, {
            "synchronous_standby_names": "''",  # promoted, it has no standby to wait for
            "primary_conninfo": f"'host=127.0.0.1 port={upstream} user=postgres application_name={STANDBY_NAME}'",
        })
        self.standby.pg_ctl("-l", str(self.standby.log), "-w", "-t", str(int(START_TIMEOUT)), "start")
        self.wait_streaming()

    def _configure(self, node: Node, extra: dict[str, str]) -> None:
        _configure(node, self.fsync, extra)

    def wait_streaming(self, timeout: float = START_TIMEOUT) -> None:
        """Until the primary sees the standby streaming (and as its synchronous standby when synchronous)."""
        want = "sync" if self.synchronous else "async"
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.primary.psql_value(
                f"SELECT state || '/' || sync_state FROM pg_stat_replication WHERE application_name = '{STANDBY_NAME}'")
            if state == f"streaming/{want}":
                return
            time.sleep(0.1)
        raise HarnessError(f"standby not streaming ({state or 'not connected'}) after {timeout:.0f}s; "
                           f"see {self.standby.log}")

    def stop_primary_hard(self) -> float:
        """Cut the replication link (if delayed) and stop the primary with ``-m immediate``; when it was gone."""
        if self.relay is not None:
            self.relay.cut(reset=True)
        self.primary.pg_ctl("-m", "immediate", "-w", "stop")
        self.stopped_at = time.monotonic()  # gone now: whatever answers from here on is the standby
        return self.stopped_at

    def vanish_primary(self) -> float:
        """The primary's host vanishes: every packet to and from its port is dropped (iptables, removed on
        exit), then the server is stopped; its clients get no reset, only silence. When it happened."""
        if self.relay is not None:
            self.relay.cut(reset=True)
        for rule in _drop_rules(self.primary.port):
            subprocess.run(["iptables", "-w", "-I", *rule], check=True, capture_output=True, timeout=30)
        self._dropped.append(self.primary.port)
        self.stopped_at = time.monotonic()
        self.primary.pg_ctl("-m", "immediate", "-w", "stop")
        return self.stopped_at

    def kill_primary(self) -> float:
        """SIGKILL of the primary's postmaster only (its backends notice and exit); when it happened."""
        if self.relay is not None:
            self.relay.cut(reset=True)
        pid = self.primary.postmaster_pid()
        self.stopped_at = time.monotonic()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        return self.stopped_at

    def promote(self) -> float:
        """``pg_ctl promote -w`` on the standby; returns when it accepts writes (monotonic time)."""
        self.standby.pg_ctl("-w", "-t", str(int(START_TIMEOUT)), "promote")
        self.promoted_at = time.monotonic()
        return self.promoted_at

    def replication_lag_bytes(self) -> int | None:
        """How far the standby's replay is behind the primary's WAL (None when either is gone)."""
        try:
            value = self.primary.psql_value(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint FROM pg_stat_replication "
                f"WHERE application_name = '{STANDBY_NAME}'")
        except HarnessError:
            return None
        return int(value) if value else None

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()
        for port in self._dropped:
            for rule in _drop_rules(port):
                subprocess.run(["iptables", "-w", "-D", *rule], check=False, capture_output=True, timeout=30)
        self._dropped.clear()
        for node in (self.primary, self.standby):
            _stop(node)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_pair(*, synchronous: bool = True, replication_delay: float | None = None, fsync: bool = True,
                  root: Path | None = None) -> Iterator[PostgresPair]:
    """A started primary and standby; both stopped and removed on exit (see the module docstring).

    ``root``: a directory the ``postgres`` user can traverse (default: a new temporary one)."""
    base, made = _new_root(root)
    pair = PostgresPair(base / "cluster", synchronous=synchronous, replication_delay=replication_delay, fsync=fsync)
    try:
        pair.start()
        yield pair
    finally:
        pair.close()
        if made:
            shutil.rmtree(base, ignore_errors=True)


# --- pytest fixtures (imported by tests/cluster/conftest.py) ----------------------------------------------


@pytest.fixture
def postgres_pair_factory() -> Iterator[contextlib.ExitStack]:
    """An ExitStack to enter ``postgres_pair(...)`` in with the options a test needs; everything goes at the end.

    ``pair = stack.enter_context(postgres_pair(synchronous=False))``; skips when the machine cannot run it.
    """
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"postgres harness: {reason}")
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def sync_pair(postgres_pair_factory: contextlib.ExitStack) -> PostgresPair:
    """A primary with a synchronous standby."""
    return postgres_pair_factory.enter_context(postgres_pair(synchronous=True))


@pytest.fixture
def async_pair(postgres_pair_factory: contextlib.ExitStack) -> PostgresPair:
    """A primary with an asynchronous standby, right behind it (no added delay)."""
    return postgres_pair_factory.enter_context(postgres_pair(synchronous=False))
