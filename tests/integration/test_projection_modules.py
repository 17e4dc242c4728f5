"""Where a process's projections come from: only the modules it is told about, the orders example included."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from projections import registry
from tests.conftest import AMQP_URL, DATABASE_URL, new_schema

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bare_schema() -> Iterator[str]:
    """A schema name of its own, not migrated; dropped after the test."""
    name = new_schema()
    yield name
    subprocess.run(["psql", DATABASE_URL, "-qc", f'DROP SCHEMA IF EXISTS "{name}" CASCADE'], check=True,
                   capture_output=True)


def run(*argv: str, schema: str, prefix: str, cwd: Path = ROOT, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EVENTFLEET_PROJECTION_MODULES"}
    env |= {"EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL, "EVENTFLEET_SCHEMA": schema,
            "EVENTFLEET_PREFIX": prefix, "PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT)]), **extra}
    return subprocess.run([sys.executable, "-m", "workers", *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


async def tables(schema: str) -> set[str]:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


async def test_a_deployment_that_names_no_module_gets_no_example_tables(bare_schema: str, prefix: str) -> None:
    migrated = run("migrate", schema=bare_schema, prefix=prefix)
    assert migrated.returncode == 0, migrated.stderr
    assert not {"order_summary", "customer_stats"} & await tables(bare_schema)
    status = run("status", "--json", schema=bare_schema, prefix=prefix)
    assert (status.returncode, json.loads(status.stdout)["projections"]) == (0, [])


async def test_the_example_loads_when_named_by_the_option(bare_schema: str, prefix: str) -> None:
    migrated = run("migrate", "--projection-module", registry.EXAMPLE, schema=bare_schema, prefix=prefix)
    assert migrated.returncode == 0, migrated.stderr
    assert {"order_summary", "customer_stats"} <= await tables(bare_schema)


async def test_the_example_loads_when_named_by_the_variable(bare_schema: str, prefix: str) -> None:
    migrated = run("migrate", schema=bare_schema, prefix=prefix, EVENTFLEET_PROJECTION_MODULES=registry.EXAMPLE)
    assert migrated.returncode == 0, migrated.stderr
    assert {"order_summary", "customer_stats"} <= await tables(bare_schema)


def test_a_worker_for_an_unknown_projection_says_where_projections_come_from(schema: str, prefix: str) -> None:
    done = run("worker", "--projection", "order_summary", schema=schema, prefix=prefix)
    assert (done.returncode, done.stderr) == (1, (
        "eventfleet worker: no projection named 'order_summary': projections come from the modules named in "
        "EVENTFLEET_PROJECTION_MODULES (comma-separated) or by --projection-module M (modules loaded: none; "
        "projections known: none)\n"))


async def test_an_applications_own_domain_package_breaks_no_command(tmp_path: Path, bare_schema: str,
                                                                    prefix: str) -> None:
    (tmp_path / "domain").mkdir()
    (tmp_path / "domain" / "__init__.py").write_text('"""An application\'s own domain package."""\n')
    migrated = run("migrate", "--projection-module", registry.EXAMPLE, schema=bare_schema, prefix=prefix,
                   cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    status = run("status", "--projection-module", registry.EXAMPLE, "--json", schema=bare_schema, prefix=prefix,
                 cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert [p["name"] for p in json.loads(status.stdout)["projections"]] == ["customer_stats", "order_summary"]


def test_a_taken_http_port_names_the_variable(schema: str, prefix: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = run("relay", schema=schema, prefix=prefix, EVENTFLEET_HTTP_PORT=str(port))
    assert (done.returncode, done.stderr.splitlines()[-1]) == (1, (
        f"eventfleet relay: HTTP port {port} is already in use (another eventfleet process?): set "
        "EVENTFLEET_HTTP_PORT to a free port, or 0 to turn the HTTP server off"))


INVENTORY = '''"""An application's projection module, beside which the commands are run."""
import eventfleet as ef


@ef.register
class Stock(ef.Projection):
    name = "stock"
    tables = ("stock",)
    ddl = "CREATE TABLE IF NOT EXISTS stock (sku text PRIMARY KEY)"
'''


def command(*argv: str, schema: str, prefix: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``eventfleet`` command as a user runs it: no PYTHONPATH, in ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k not in ("EVENTFLEET_PROJECTION_MODULES", "PYTHONPATH")}
    env |= {"EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL, "EVENTFLEET_SCHEMA": schema,
            "EVENTFLEET_PREFIX": prefix}
    return subprocess.run([str(Path(sys.executable).parent / "eventfleet"), *argv], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


async def test_the_command_finds_a_projection_module_in_the_current_directory(tmp_path: Path, bare_schema: str,
                                                                               prefix: str) -> None:
    (tmp_path / "inventory.py").write_text(INVENTORY)

    migrated = command("migrate", "--projection-module", "inventory", schema=bare_schema, prefix=prefix, cwd=tmp_path)

    assert migrated.returncode == 0, migrated.stderr
    assert "stock" in await tables(bare_schema)


async def test_app_dir_names_where_the_projection_modules_are(tmp_path: Path, bare_schema: str, prefix: str) -> None:
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "inventory.py").write_text(INVENTORY)

    migrated = command("migrate", "--projection-module", "inventory", "--app-dir", "service", schema=bare_schema,
                       prefix=prefix, cwd=tmp_path)

    assert migrated.returncode == 0, migrated.stderr
    assert "stock" in await tables(bare_schema)


def test_a_module_not_found_says_where_it_was_looked_for(tmp_path: Path, bare_schema: str, prefix: str) -> None:
    done = command("migrate", "--projection-module", "inventory", schema=bare_schema, prefix=prefix, cwd=tmp_path)

    assert (done.returncode, done.stderr.splitlines()[-1]) == (1, (
        f"eventfleet migrate: projection module 'inventory' not found in {tmp_path} and the Python path (PYTHONPATH; "
        "--app-dir DIR looks in DIR); projections come from the modules named in EVENTFLEET_PROJECTION_MODULES "
        "(comma-separated) or by --projection-module M"))


def test_a_projection_module_named_like_an_eventfleet_package_says_to_rename_it(tmp_path: Path, bare_schema: str,
                                                                                 prefix: str) -> None:
    (tmp_path / "projections.py").write_text(INVENTORY)

    done = command("migrate", "--projection-module", "projections", schema=bare_schema, prefix=prefix, cwd=tmp_path)

    assert (done.returncode, done.stderr.splitlines()[-1]) == (1, (
        "eventfleet migrate: projection module 'projections': 'projections' is eventfleet's own package, so an "
        "application module of that name is never imported: rename your projections.py (or projections/), e.g. to "
        "app_projections.py"))
