"""Errors that name the service and the fix, as a user meets them: ``python -m workers`` as real processes.

A schema never migrated says to run ``eventfleet migrate``, whatever the command; an unreachable Postgres or
RabbitMQ is named with its host and port (never the password), for the one-shot commands in their one stderr
line and for the long-running ones in their outage log line, while they keep retrying.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, DATABASE_URL

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PASSWORD = f"pw{uuid.uuid4().hex[:10]}"
#: The threads reading each started process's stderr, by pid: joined before the pipe is closed.
READERS: dict[int, list[threading.Thread]] = {}
WORKER = ("worker", "--projection-module", "eventfleet.examples.orders.projections")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _at(url: str, host: str, port: int) -> str:
    """``url`` pointing at host:port, with PASSWORD as its password."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:{PASSWORD}@{host}:{port}"))


def _env(schema: str, prefix: str, **overrides: str) -> dict[str, str]:
    return {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL,
            "EVENTFLEET_SCHEMA": schema, "EVENTFLEET_PREFIX": prefix, "EVENTFLEET_HTTP_PORT": "0", **overrides}


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture
def unmigrated() -> str:
    """A schema name nothing created."""
    return f"t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Long-running processes a test starts: stopped (SIGTERM, then SIGKILL) after it."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for reader in READERS.pop(process.pid, ()):
            reader.join(10)  # at the pipe's end, now the process is gone
        if process.stderr is not None:
            process.stderr.close()


def line_with(process: subprocess.Popen[str], needle: str, seconds: float = 30) -> str:
    """The first line of the process's stderr containing ``needle`` (all of stderr read so far on failure)."""
    assert process.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    def read() -> None:
        for line in process.stderr or ():
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    READERS.setdefault(process.pid, []).append(reader)
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} in:\n{''.join(seen)}")


def start(started: list[subprocess.Popen[str]], *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-m", "workers", *args], env=env, cwd=REPO, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started.append(process)
    return process


@pytest.mark.parametrize("command", [("relay",), WORKER, ("status",), ("dead-letters", "list")],
                         ids=["relay", "worker", "status", "dead-letters"])
def test_a_command_on_a_schema_never_migrated_says_to_run_migrate(command, unmigrated, prefix):
    ran = run(*command, env=_env(unmigrated, prefix))

    assert ran.returncode == 1
    assert last_line(ran.stderr) == (
        f"eventfleet {command[0]}: schema '{unmigrated}' is not migrated: run `eventfleet migrate`")


@pytest.mark.parametrize("command", [("status",), ("migrate",), ("dead-letters", "list")])
def test_a_command_with_postgres_refusing_names_postgres_and_its_host_not_the_password(command, schema, prefix):
    port = _closed_port()
    ran = run(*command, env=_env(schema, prefix, EVENTFLEET_DATABASE_URL=_at(DATABASE_URL, "127.0.0.1", port)))

    assert ran.returncode == 1
    assert last_line(ran.stderr).startswith(
        f"eventfleet {command[0]}: PostgreSQL at 127.0.0.1:{port} unreachable: ConnectionRefusedError: ")
    assert PASSWORD not in ran.stderr


def test_a_command_with_an_unknown_postgres_host_names_postgres_and_the_host(schema, prefix):
    host = f"no-such-host-{uuid.uuid4().hex[:8]}.invalid"
    ran = run("status", env=_env(schema, prefix, EVENTFLEET_DATABASE_URL=_at(DATABASE_URL, host, 5432)))

    assert ran.returncode == 1
    assert last_line(ran.stderr).startswith(f"eventfleet status: PostgreSQL at {host}:5432 unreachable: gaierror: ")


@pytest.mark.parametrize("command", [("relay",), WORKER], ids=["relay", "worker"])
def test_a_long_running_command_logs_postgres_unreachable_with_its_host_and_keeps_trying(command, schema, prefix,
                                                                                          started):
    port = _closed_port()
    env = _env(schema, prefix, EVENTFLEET_DATABASE_URL=_at(DATABASE_URL, "127.0.0.1", port))
    process = start(started, *command, env=env)

    line = line_with(process, "outage")
    assert f"service=postgres cause=DatabaseUnreachable: PostgreSQL at 127.0.0.1:{port} unreachable: " in line
    assert PASSWORD not in line
    assert process.poll() is None  # still retrying


def test_status_with_rabbitmq_refusing_names_rabbitmq_and_its_node(schema, prefix):
    port = _closed_port()
    ran = run("status", env=_env(schema, prefix, EVENTFLEET_AMQP_URL=_at(AMQP_URL, "127.0.0.1", port)))

    assert ran.returncode == 0
    assert f"eventfleet status: RabbitMQ at 127.0.0.1:{port} unreachable: AMQPConnectionError: " in ran.stderr
    assert PASSWORD not in ran.stderr


def test_the_relay_logs_rabbitmq_unreachable_with_its_node_and_keeps_trying(schema, prefix, started):
    port = _closed_port()
    process = start(started, "relay", env=_env(schema, prefix, EVENTFLEET_AMQP_URL=_at(AMQP_URL, "127.0.0.1", port)))

    line = line_with(process, "outage")
    assert f"service=rabbitmq cause=BrokerUnavailable: RabbitMQ at 127.0.0.1:{port} unreachable: " in line
    assert PASSWORD not in line
    assert process.poll() is None


def test_status_with_a_wrong_rabbitmq_password_says_the_login_was_refused(schema, prefix):
    broker = urllib.parse.urlsplit(AMQP_URL)
    host, port = broker.hostname or "127.0.0.1", broker.port or 5672
    ran = run("status", env=_env(schema, prefix, EVENTFLEET_AMQP_URL=_at(AMQP_URL, host, port)))

    assert ran.returncode == 0
    assert (f"eventfleet status: RabbitMQ at {host}:{port} refused the login (check the user and password of "
            "EVENTFLEET_AMQP_URL): ProbableAuthenticationError: ") in ran.stderr
    assert PASSWORD not in ran.stderr
