"""A RabbitMQ cluster of its own on this machine, beside the machine's default node, for the fleet's
cluster tests and for ``make cluster-up`` / ``make cluster-down``.

``RabbitCluster(size=3)`` (a context manager) starts ``size`` RabbitMQ nodes from the installed server
(``/usr/lib/rabbitmq/bin``) as this OS user, each with its own node name (``ef1@localhost``...), AMQP port
(5681...), distribution port (25681...), config file, data and log directories, all under one temporary
directory that also holds the cluster's Erlang cookie (``HOME`` of the nodes and of the CLI tools). Each node
gets one Erlang scheduler (``+S 1:1``) and the largest open-file limit the process may set (65536, or the
hard limit below it: a node with a few hundred quorum queues stops answering at the default 1024). The
second and later nodes join the first (``stop_app``, ``join_cluster``, ``start_app``); ``up()`` returns once
``cluster_status`` lists every node running. No plugin is enabled.

The machine's default node (``rabbit@localhost`` on 5672) is never touched: nothing here names it, joins it,
stops it or reads its configuration (``RABBITMQ_CONF_ENV_FILE`` points at an empty file of ours). The epmd
daemon is shared with it, and never signalled. On exit every node is stopped (``rabbitmqctl stop``, then
SIGKILL of whatever is left of its process group), every iptables rule the harness added is removed and the
directory is deleted.

Faults: ``kill(node)`` (SIGKILL of the node's processes), ``stop(node)`` (graceful), ``start(node)`` (the same
data directory: it rejoins), ``blackhole(node)`` (iptables DROP both ways on its AMQP port: established
connections go silent, new ones hang; falls back to ``proxy`` mode when iptables cannot work here),
``memory_alarm(node)`` / ``clear_memory_alarm(node)`` and ``disk_alarm(node)`` / ``clear_disk_alarm(node)``.

With ``proxy=True`` the processes under test reach each node through a user-space TCP forwarder of its own
(``node.client_port``); ``blackhole(node)`` then stops that forwarder passing bytes, in both directions, while
keeping every socket open: a true half-open connection, no FIN, no RST.

``python -m tests.cluster.rabbit up|down|status`` does the same from a shell, with the cluster's state in
``EVENTFLEET_CLUSTER_STATE`` (default ``$TMPDIR/eventfleet-rabbit-cluster.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import pytest

from tests.cluster.proxy import Proxy

BIN = Path(os.environ.get("EVENTFLEET_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
DEFAULT_AMQP_PORT = int(os.environ.get("EVENTFLEET_CLUSTER_AMQP_PORT", "5681"))
DEFAULT_DIST_PORT = int(os.environ.get("EVENTFLEET_CLUSTER_DIST_PORT", "25681"))
#: Where a proxied node's forwarder listens: AMQP port + this.
PROXY_OFFSET = 100
STATE_FILE = Path(os.environ.get("EVENTFLEET_CLUSTER_STATE",
                                 Path(tempfile.gettempdir()) / "eventfleet-rabbit-cluster.json"))
START_TIMEOUT = 120.0
CTL_TIMEOUT = 90.0
FD_LIMIT = 65536
#: Marks the iptables rules of this harness (``down`` removes every rule carrying it).
RULE_COMMENT = "eventfleet-rabbit-cluster"


class HarnessError(RuntimeError):
    """The harness could not do what it was asked (the message carries the tool's output)."""


def unavailable() -> str | None:
    """Why this machine cannot run the harness, or None."""
    for tool in ("rabbitmq-server", "rabbitmqctl", "rabbitmq-queues"):
        if not (BIN / tool).exists():
            return f"{BIN / tool} not found (RabbitMQ server)"
    if shutil.which("epmd") is None and not Path("/usr/lib/erlang/bin/epmd").exists():
        return "epmd not found (Erlang)"
    return None


@dataclasses.dataclass
class Node:
    """One node of the cluster."""

    index: int
    name: str  # Erlang node name, e.g. ef1@localhost
    port: int  # AMQP
    dist_port: int
    home: Path  # its own directory: config, data, logs
    pgid: int | None = None  # its process group (the server script, beam and their children)
    proxy_port: int | None = None  # where the processes under test reach it, when proxied

    @property
    def client_port(self) -> int:
        """The port processes under test connect to (the forwarder's when proxied)."""
        return self.proxy_port or self.port

    @property
    def url(self) -> str:
        """The AMQP URL processes under test use for this node."""
        return f"amqp://guest:guest@127.0.0.1:{self.client_port}/"

    @property
    def direct_url(self) -> str:
        """The node's own AMQP URL (never through the forwarder)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def short(self) -> str:
        return self.name.split("@")[0]


# --- the cluster ----------------------------------------------------------------------------------------------


class RabbitCluster:
    """``size`` RabbitMQ nodes clustered together in a directory of their own (see the module docstring)."""

    def __init__(self, size: int = 3, *, amqp_port: int = DEFAULT_AMQP_PORT, dist_port: int = DEFAULT_DIST_PORT,
                 prefix: str = "ef", proxy: bool = False, root: Path | None = None) -> None:
        self.size, self.prefix, self.proxy = size, prefix, proxy
        self.amqp_port, self.dist_port = amqp_port, dist_port
        self.root = root
        self.nodes: list[Node] = []
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._forwarders: dict[int, Proxy] = {}
        self._rules: list[list[str]] = []  # iptables rule specs (after -A/-D) this harness added
        self._blackhole_mode: dict[int, str] = {}
        self._alarms: set[tuple[int, str]] = set()  # (node, "memory" | "disk") raised by this harness

    # --- lifecycle --------------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.down()

    def up(self) -> None:
        """Create the directory, start every node, cluster them; returns once all are running together."""
        reason = unavailable()
        if reason:
            raise HarnessError(reason)
        self._check_free()
        self.root = Path(tempfile.mkdtemp(prefix="eventfleet-rabbit-"))
        cookie = self.root / ".erlang.cookie"
        cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)))
        cookie.chmod(0o400)
        (self.root / "rabbitmq-env.conf").write_text("# empty: the machine's /etc/rabbitmq/rabbitmq-env.conf is not ours\n")
        for i in range(self.size):
            home = self.root / f"{self.prefix}{i + 1}"
            node = Node(i, f"{self.prefix}{i + 1}@localhost", self.amqp_port + i, self.dist_port + i, home)
            for sub in ("mnesia", "log"):
                (home / sub).mkdir(parents=True)
            (home / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = 127.0.0.1:{node.port}\n"
                "loopback_users = none\n"
                "log.console = false\n"
                "log.file.level = info\n")
            (home / "enabled_plugins").write_text("[].\n")
            self.nodes.append(node)
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            self.await_startup(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        self.await_running(len(self.nodes))
        if self.proxy:
            for node in self.nodes:
                node.proxy_port = node.port + PROXY_OFFSET
                self._forwarders[node.index] = Proxy(node.proxy_port, node.port)

    def down(self) -> None:
        """Stop every node, remove the iptables rules and the forwarders, delete the directory."""
        for forwarder in self._forwarders.values():
            forwarder.close()
        self._forwarders.clear()
        self._remove_rules()
        for node in self.nodes:
            if self._alive(node):
                with contextlib.suppress(HarnessError, subprocess.TimeoutExpired):
                    self.ctl(node, "stop", timeout=30)
            self._kill_group(node)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self._procs.clear()
        if self.root is not None and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    # --- the state file (the shell script's up and down are two processes) ------------------------------------

    def save(self, path: Path = STATE_FILE) -> None:
        state = {"size": self.size, "prefix": self.prefix, "amqp_port": self.amqp_port, "dist_port": self.dist_port,
                 "root": str(self.root), "rules": self._rules,
                 "nodes": [{**dataclasses.asdict(n), "home": str(n.home)} for n in self.nodes]}
        path.write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, path: Path = STATE_FILE) -> RabbitCluster:
        state = json.loads(path.read_text())
        cluster = cls(state["size"], amqp_port=state["amqp_port"], dist_port=state["dist_port"],
                      prefix=state["prefix"], root=Path(state["root"]))
        cluster.nodes = [Node(**{**n, "home": Path(n["home"])}) for n in state["nodes"]]
        cluster._rules = state["rules"]
        return cluster

    # --- the nodes ----------------------------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Every node's URL for processes under test (through the forwarders when proxied)."""
        return [n.url for n in self.nodes]

    @property
    def amqp_url(self) -> str:
        """``EVENTFLEET_AMQP_URL`` of a process that should know every node."""
        return ",".join(self.urls)

    def node(self, name: str) -> Node:
        """The node of an Erlang name (``ef1@localhost``) or its short form (``ef1``)."""
        for node in self.nodes:
            if name in (node.name, node.short):
                return node
        raise KeyError(name)

    def _env(self, node: Node | None) -> dict[str, str]:
        assert self.root is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(self.root), RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
                   ERL_EPMD_ADDRESS="127.0.0.1", LC_ALL="C.UTF-8")
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name, RABBITMQ_NODE_PORT=str(node.port), RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_MNESIA_BASE=str(node.home / "mnesia"), RABBITMQ_LOG_BASE=str(node.home / "log"),
                RABBITMQ_CONFIG_FILE=str(node.home / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(node.home / "advanced.config"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(node.home / "enabled_plugins"),
                RABBITMQ_PID_FILE=str(node.home / "node.pid"),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 -kernel inet_dist_use_interface {127,0,0,1}")
        return env

    def _spawn(self, node: Node) -> None:
        raise_fd_limit()  # the node inherits it
        log = (node.home / "log" / "server.out").open("ab")
        try:
            proc = subprocess.Popen([str(BIN / "rabbitmq-server")], env=self._env(node), cwd=node.home,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()
        self._procs[node.index] = proc
        node.pgid = proc.pid

    def ctl(self, node: Node, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True,
            tool: str = "rabbitmqctl") -> str:
        """``rabbitmqctl -n <node> args`` (or another CLI tool); its stdout. A failure raises HarnessError."""
        cmd = [str(BIN / tool), "-n", node.name, *args]
        ran = subprocess.run(cmd, check=False, env=self._env(None), capture_output=True, text=True, timeout=timeout,
                             cwd=self.root)
        if check and ran.returncode != 0:
            raise HarnessError(f"{' '.join(cmd[1:])} exited {ran.returncode}:\n{ran.stdout}\n{ran.stderr}")
        return ran.stdout

    def await_startup(self, node: Node, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self._procs.get(node.index)
            if proc is not None and proc.poll() is not None:
                raise HarnessError(f"{node.name} exited {proc.returncode} while starting:\n{self.log_tail(node)}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"{node.name} not started within {timeout}s:\n{self.log_tail(node)}")
            try:
                self.ctl(node, "await_startup", "--timeout", str(int(min(left, 30)) or 1), timeout=left + 15)
                return
            except (HarnessError, subprocess.TimeoutExpired):
                time.sleep(0.5)

    def cluster_status(self, via: Node | None = None) -> dict[str, Any]:
        """``cluster_status --formatter json`` as seen from ``via`` (the first running node by default)."""
        for node in [via] if via else self.nodes:
            with contextlib.suppress(HarnessError, subprocess.TimeoutExpired, json.JSONDecodeError):
                result: dict[str, Any] = json.loads(self.ctl(node, "cluster_status", "--formatter", "json", timeout=30))
                return result
        raise HarnessError("no node answers cluster_status")

    def running(self) -> list[str]:
        """Names of the nodes running, as the cluster sees them."""
        return sorted(self.cluster_status().get("running_nodes", []))

    def await_running(self, count: int, timeout: float = START_TIMEOUT) -> None:
        """Until ``cluster_status`` lists ``count`` running nodes."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(HarnessError):
                seen = self.running()
                if len(seen) == count:
                    return
            time.sleep(0.5)
        raise HarnessError(f"cluster_status shows {seen} running, not {count} nodes, after {timeout}s")

    def log_tail(self, node: Node, lines: int = 40) -> str:
        texts = []
        for path in sorted((node.home / "log").glob("*")):
            with contextlib.suppress(OSError):
                texts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts)

    # --- faults ---------------------------------------------------------------------------------------------------

    def _alive(self, node: Node) -> bool:
        return node.pgid is not None and bool(self._group(node.pgid))

    @staticmethod
    def _group(pgid: int) -> list[int]:
        """The pids of a process group, never epmd (shared with the machine's default node)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if len(fields) > 2 and int(fields[2]) == pgid and comm != "epmd" and fields[0] != "Z":
                pids.append(int(entry.name))
        return pids

    def _kill_group(self, node: Node) -> None:
        if node.pgid is None:
            return
        for _ in range(50):
            pids = self._group(node.pgid)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc = self._procs.get(node.index)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.1)
            time.sleep(0.1)
        proc = self._procs.pop(node.index, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def kill(self, node: Node) -> None:
        """SIGKILL the node (its Erlang VM and the script around it): no goodbye to clients or peers."""
        self._kill_group(node)

    def stop(self, node: Node) -> None:
        """Stop the node gracefully (``rabbitmqctl stop``: connections closed, peers told)."""
        with contextlib.suppress(HarnessError):
            self.ctl(node, "stop", timeout=60)
        deadline = time.monotonic() + 30
        while self._alive(node) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._kill_group(node)

    def start(self, node: Node, *, wait: bool = True) -> None:
        """Start a stopped or killed node again on its own data: it rejoins the cluster."""
        if self._alive(node):
            raise HarnessError(f"{node.name} is running")
        self._spawn(node)
        if wait:
            self.await_startup(node)

    def memory_alarm(self, node: Node) -> None:
        """A memory alarm (cluster-wide): every publishing connection of the cluster is blocked."""
        self._alarms.add((node.index, "memory"))
        self.ctl(node, "set_vm_memory_high_watermark", "0.0000001")

    def clear_memory_alarm(self, node: Node) -> None:
        self.ctl(node, "set_vm_memory_high_watermark", "0.4")  # the default
        self._alarms.discard((node.index, "memory"))

    def disk_alarm(self, node: Node) -> None:
        """A free-disk alarm (cluster-wide) from a limit no disk meets."""
        self._alarms.add((node.index, "disk"))
        self.ctl(node, "set_disk_free_limit", str(10**18))  # bytes: the CLI reads "1TB" as nothing

    def clear_disk_alarm(self, node: Node) -> None:
        self.ctl(node, "set_disk_free_limit", "50MB")  # the default
        self._alarms.discard((node.index, "disk"))

    def heal(self) -> None:
        """Whole again: every blackholed node restored, every node down started, every alarm raised here cleared,
        all running together. Cheap when nothing was broken."""
        for index in list(self._blackhole_mode):
            self.restore(self.nodes[index])
        down = [n for n in self.nodes if not self._alive(n)]
        for node in down:
            self.start(node)
        for index, kind in sorted(self._alarms):
            node = self.nodes[index]
            self.clear_memory_alarm(node) if kind == "memory" else self.clear_disk_alarm(node)
        if down:
            self.await_running(len(self.nodes))

    def alarms(self, node: Node) -> dict[str, Any]:
        """The alarms in effect as the node sees them (``rabbitmq-diagnostics alarms``): ``alarms`` when it raised
        none itself, else ``local`` (its own) and ``global`` (every node's)."""
        out = self.ctl(node, "alarms", "--formatter", "json", tool="rabbitmq-diagnostics", timeout=30)
        result: dict[str, Any] = json.loads(out or "{}")
        return result

    # --- cutting a node off: iptables, or the forwarder -------------------------------------------------------------

    @staticmethod
    def iptables_works() -> bool:
        """Whether this process can add an iptables rule (the binary is there and NET_ADMIN is granted)."""
        if shutil.which("iptables") is None:
            return False
        return subprocess.run(["iptables", "-w", "-S", "INPUT"], check=False, capture_output=True).returncode == 0

    def _rule_specs(self, node: Node) -> list[list[str]]:
        tag = ["-m", "comment", "--comment", f"{RULE_COMMENT}:{node.short}"]
        return [["INPUT", "-p", "tcp", "-i", "lo", "--dport", str(node.port), *tag, "-j", "DROP"],
                ["INPUT", "-p", "tcp", "-i", "lo", "--sport", str(node.port), *tag, "-j", "DROP"]]

    def blackhole(self, node: Node) -> str:
        """Drop every packet to and from the node's AMQP port (established connections go silent without a FIN
        or RST, new ones hang); returns how: ``"iptables"`` or ``"proxy"`` (the forwarder stops moving bytes)."""
        if node.index in self._forwarders:
            self._forwarders[node.index].blackhole()
            self._blackhole_mode[node.index] = "proxy"
            return "proxy"
        if not self.iptables_works():
            raise HarnessError("iptables cannot work here: start the cluster with proxy=True")
        for spec in self._rule_specs(node):
            subprocess.run(["iptables", "-w", "-I", *spec], check=True, capture_output=True)
            self._rules.append(spec)
        self._blackhole_mode[node.index] = "iptables"
        return "iptables"

    def restore(self, node: Node) -> None:
        """Undo ``blackhole``."""
        if self._blackhole_mode.pop(node.index, None) == "proxy":
            self._forwarders[node.index].restore()
            return
        for spec in self._rule_specs(node):
            if spec in self._rules:
                subprocess.run(["iptables", "-w", "-D", *spec], check=False, capture_output=True)
                self._rules.remove(spec)

    def _remove_rules(self) -> None:
        for spec in self._rules:
            subprocess.run(["iptables", "-w", "-D", *spec], check=False, capture_output=True)
        self._rules.clear()
        if shutil.which("iptables") is None:
            return
        # Any rule of ours a crashed run left behind (its comment says so).
        listed = subprocess.run(["iptables", "-w", "-S", "INPUT"], check=False, capture_output=True, text=True)
        for line in listed.stdout.splitlines():
            if RULE_COMMENT in line and line.startswith("-A "):
                subprocess.run(["iptables", "-w", "-D", *_split_rule(line[3:])], check=False, capture_output=True)

    # --- queues ------------------------------------------------------------------------------------------------------

    def queues(self, via: Node | None = None) -> list[dict[str, Any]]:
        """Every queue with its type, leader, members and online members (``list_queues --formatter json``)."""
        candidates = [via] if via else [n for n in self.nodes if self._alive(n)]
        last: Exception | None = None
        for node in candidates:
            try:
                out = self.ctl(node, "list_queues", "name", "type", "leader", "members", "online", "messages",
                               "--formatter", "json", timeout=60)
                rows: list[dict[str, Any]] = json.loads(out or "[]")
                return rows
            except (HarnessError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                last = exc
        raise HarnessError(f"no node lists the queues: {last}")

    def leaders(self, prefix: str) -> dict[str, str]:
        """Queue name -> the node name of its leader, for the queues whose names start with ``prefix``."""
        return {q["name"]: q["leader"] for q in self.queues() if q["name"].startswith(prefix)}

    def connections(self) -> list[dict[str, Any]]:
        """Every client connection of the cluster: the node it is on (from its server port) and its client-given
        name (``connection_name``), else the broker's."""
        by_port = {n.port: n.name for n in self.nodes}
        for node in self.nodes:
            if not self._alive(node):
                continue
            try:
                out = self.ctl(node, "list_connections", "name", "client_properties", "state", "--formatter", "json",
                               timeout=30)
                rows = json.loads(out or "[]")
            except (HarnessError, subprocess.TimeoutExpired, json.JSONDecodeError):
                continue
            found = []
            for row in rows:
                props = row.get("client_properties") or []
                names = [p[2] for p in props if isinstance(p, list) and len(p) == 3 and p[0] == "connection_name"]
                port = int(str(row.get("name", "")).rpartition(":")[2] or 0)
                found.append({"node": by_port.get(port), "name": names[0] if names else row.get("name"),
                              "state": row.get("state")})
            return found
        raise HarnessError("no node lists the connections")

    def _check_free(self) -> None:
        """Refuse to start over another cluster (a previous run's, another test's) or a busy port."""
        names = subprocess.run(["epmd", "-names"], check=False, capture_output=True, text=True).stdout
        for i in range(self.size):
            short = f"{self.prefix}{i + 1}"
            if f"name {short} at port" in names:
                raise HarnessError(f"a node named {short} is already registered with epmd (a cluster left running? "
                                   "`make cluster-down`)")
            ports = [self.amqp_port + i, self.dist_port + i] + ([self.amqp_port + i + PROXY_OFFSET] if self.proxy else [])
            for port in ports:
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
                    try:
                        sock.bind(("127.0.0.1", port))
                    except OSError as exc:
                        raise HarnessError(f"port {port} is in use: {exc}") from None


def raise_fd_limit() -> int:
    """This process's open-file limit raised to FD_LIMIT, or to the hard limit when that is lower (a container
    without CAP_SYS_RESOURCE cannot raise the hard limit); returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT if hard == resource.RLIM_INFINITY else min(FD_LIMIT, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return max(soft, want)


def _split_rule(text: str) -> list[str]:
    import shlex
    return shlex.split(text)


# --- pytest -------------------------------------------------------------------------------------------------------
# tests/cluster/conftest.py imports these two fixtures.

@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """The 3-node cluster the RabbitMQ cluster tests share: started at the first test that asks, stopped and
    removed at the end of the session; skipped when RabbitMQ is not installed. Through forwarders when iptables
    cannot work here (``blackhole`` needs one or the other)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with RabbitCluster(3, proxy=not RabbitCluster.iptables_works()) as cluster:
        yield cluster


@pytest.fixture
def rabbit(rabbit_cluster: RabbitCluster) -> Iterator[RabbitCluster]:
    """The shared cluster, whole: every node running, no alarm, nothing cut off, before and after the test
    (whatever a test broke is repaired after it)."""
    rabbit_cluster.heal()
    yield rabbit_cluster
    rabbit_cluster.heal()


# --- the shell's up and down ---------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else "status"
    if command == "up":
        if STATE_FILE.exists():
            print(f"cluster: {STATE_FILE} exists: a cluster is up (`make cluster-down` first)", file=sys.stderr)
            return 1
        cluster = RabbitCluster(int(os.environ.get("EVENTFLEET_CLUSTER_SIZE", "3")))
        try:
            cluster.up()
        except BaseException:
            cluster.down()
            raise
        cluster.save()
        print(f"cluster: {len(cluster.nodes)} nodes running: {', '.join(n.name for n in cluster.nodes)}")
        print(f"EVENTFLEET_AMQP_URL={cluster.amqp_url}")
        return 0
    if command == "down":
        if not STATE_FILE.exists():
            print("cluster: none is up")
            return 0
        cluster = RabbitCluster.load()
        cluster.down()
        STATE_FILE.unlink()
        print("cluster: stopped and removed")
        return 0
    if command == "status":
        if not STATE_FILE.exists():
            print("cluster: none is up")
            return 1
        cluster = RabbitCluster.load()
        print(json.dumps(cluster.cluster_status(), indent=2))
        return 0
    print("usage: python -m tests.cluster.rabbit up|down|status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
