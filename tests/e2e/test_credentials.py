"""No credential in any output: real ``python -m workers`` processes run with passwords in both URLs.

Postgres here trusts 127.0.0.1, so any password is accepted; RabbitMQ gets a throw-away user with a
password. Each password has characters that must be percent-encoded, and every output (stdout, stderr at
DEBUG, text and JSON logs, /metrics) is searched for both its written and its decoded form.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from store import roles
from tests.conftest import DATABASE_URL, new_schema
from tests.integration.test_relay_helpers import topology_names

pytestmark = pytest.mark.slow

PG_PASSWORD = f"Pg+S3cret@{uuid.uuid4().hex[:8]}"
MQ_PASSWORD = f"Mq+S3cret@{uuid.uuid4().hex[:8]}"
SECRETS = (PG_PASSWORD, MQ_PASSWORD, urllib.parse.quote(PG_PASSWORD, safe=""),
           urllib.parse.quote(MQ_PASSWORD, safe=""))
REPO = Path(__file__).resolve().parents[2]


def _with_password(url: str, user: str, password: str, *, port: int | None = None) -> str:
    parts = urllib.parse.urlsplit(url)
    host = f"{parts.hostname}:{port or parts.port}"
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_no_secret(*outputs: str) -> None:
    for output in outputs:
        for secret in SECRETS:
            assert secret not in output, f"credential leaked in: {output[-2000:]}"


@pytest.fixture(scope="module")
def mq_user() -> Iterator[str]:
    """A RabbitMQ user with a password (deleted after the module)."""
    name = new_schema("t_cred", 10)
    subprocess.run(["rabbitmqctl", "-q", "add_user", name, MQ_PASSWORD], check=True, capture_output=True)
    try:
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", "/", name, ".*", ".*", ".*"],
                       check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], check=False, capture_output=True)


@pytest.fixture
def env(schema: str, prefix: str, mq_user: str) -> dict[str, str]:
    """The environment of a deployment whose URLs both carry passwords."""
    amqp = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    return {
        **os.environ,
        "EVENTFLEET_DATABASE_URL": _with_password(DATABASE_URL, "postgres", PG_PASSWORD),
        "EVENTFLEET_AMQP_URL": _with_password(amqp, mq_user, MQ_PASSWORD),
        "EVENTFLEET_SCHEMA": schema,
        "EVENTFLEET_PREFIX": prefix,
        "EVENTFLEET_HTTP_PORT": "0",
    }


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers", "-v", *args], env=env, cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=120)


class Running:
    """A long-running command, its output in files, stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], tmp: Path, *args: str) -> None:
        self.out, self.err = tmp / f"{args[0]}.out", tmp / f"{args[0]}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "workers", "-v", *args], env=env, cwd=REPO,
                                         stdout=out, stderr=err, text=True)

    def wait_for(self, ready: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"exited early: {self.output()[-2000:]}"
            assert time.monotonic() < deadline, f"not ready in {timeout}s: {self.output()[-2000:]}"
            with pytest.raises(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()  # reaped here, not by a later test's garbage collection
            raise AssertionError(f"did not stop within 60 s of SIGTERM; its log ends: {self.output()[-4000:]}") from None

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


async def _drop_roles(schema: str) -> None:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        names = ", ".join(f'"{r}"' for r in roles.Roles(schema).all())
        if await conn.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[])",
                               list(roles.Roles(schema).all())):
            await conn.execute(f"DROP OWNED BY {names}")
            await conn.execute(f"DROP ROLE {names}")
    finally:
        await conn.close()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_migrate_and_status_print_no_credential(env: dict[str, str], schema: str, log_format: str) -> None:
    env = env | {"EVENTFLEET_LOG_FORMAT": log_format}
    try:
        done = run(env, "migrate", "--roles")
        assert done.returncode == 0, done.stderr
        assert f"schema {schema}" in done.stdout
        status = run(env, "status", "--json")  # whatever it prints (it may still be a placeholder)
        assert_no_secret(done.stdout, done.stderr, status.stdout, status.stderr)
    finally:
        await _drop_roles(schema)


@pytest.mark.parametrize("variable", ["EVENTFLEET_DATABASE_URL", "EVENTFLEET_AMQP_URL"])
def test_failed_connections_print_no_credential(env: dict[str, str], variable: str) -> None:
    url = env[variable]
    user = urllib.parse.urlsplit(url).username or ""
    bad = env | {variable: _with_password(url, user, PG_PASSWORD if "DATABASE" in variable else MQ_PASSWORD,
                                          port=_closed_port())}
    if variable == "EVENTFLEET_DATABASE_URL":
        done = run(bad, "migrate")
        assert done.returncode == 1
        assert "eventfleet migrate:" in done.stderr
        outputs = [done.stdout, done.stderr]
    else:
        outputs = []
    status = run(bad, "status", "--json")
    assert_no_secret(*outputs, status.stdout, status.stderr)


@pytest.mark.parametrize("url", ["postgresql://u:Pg+S3cret@x/@127.0.0.1/test",
                                 "postgresql://u:Pg+S3cret@x@[::1/test"])
def test_a_malformed_url_is_refused_without_echoing_it(env: dict[str, str], url: str) -> None:
    done = run(env | {"EVENTFLEET_DATABASE_URL": url}, "migrate")
    assert done.returncode == 2
    assert "EVENTFLEET_DATABASE_URL" in done.stderr
    assert "S3cret" not in done.stdout + done.stderr


async def test_relay_logs_and_metrics_hold_no_credential(
        env: dict[str, str], tmp_path: Path, prefix: str,
        delete_prefixed: Callable[[list[str], list[str]], None]) -> None:
    delete_prefixed(*topology_names(prefix))  # the relay declares every loaded projection's queues
    assert run(env, "migrate").returncode == 0
    port = _closed_port()
    relay = Running(env | {"EVENTFLEET_HTTP_PORT": str(port)}, tmp_path, "relay")
    try:
        relay.wait_for(lambda: "relay started" in relay.output() and _scrape(port) is not None)
        metrics = _scrape(port) or ""
        assert "eventfleet_relay_published_total" in metrics
    finally:
        code = relay.stop()
    assert code == 0, relay.output()
    assert_no_secret(relay.output(), metrics)


@pytest.mark.parametrize("broken", ["postgres", "rabbitmq"])
async def test_outage_logs_hold_no_credential(env: dict[str, str], tmp_path: Path, prefix: str, broken: str,
                                              delete_prefixed: Callable[[list[str], list[str]], None]) -> None:
    delete_prefixed(*topology_names(prefix))  # whatever the relay or the worker got to declare
    assert run(env, "migrate").returncode == 0
    variable = "EVENTFLEET_DATABASE_URL" if broken == "postgres" else "EVENTFLEET_AMQP_URL"
    url = env[variable]
    user = urllib.parse.urlsplit(url).username or ""
    password = PG_PASSWORD if broken == "postgres" else MQ_PASSWORD
    bad = env | {variable: _with_password(url, user, password, port=_closed_port()),
                 "EVENTFLEET_LOG_FORMAT": "json", "EVENTFLEET_STOP_TIMEOUT": "2"}
    processes = [Running(bad, tmp_path, "relay"), Running(bad, tmp_path, "worker")]
    try:
        for process in processes:
            # The first failure of an outage is logged once: wait for it, then stop.
            process.wait_for(lambda p=process: "outage" in p.output())  # type: ignore[misc]
    finally:
        codes = [p.stop() for p in processes]
    assert codes == [0, 0], [p.output()[-2000:] for p in processes]
    assert_no_secret(*(p.output() for p in processes))
