"""The README's "Your own service" runs as written: its files, its commands, the output it shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, DATABASE_URL, new_schema
from tests.e2e import readme

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def section() -> str:
    return readme.section('Your own service')


def blocks(kind: str) -> list[tuple[str, str]]:
    """(info string, body) of the section's fenced blocks whose language is ``kind``."""
    return readme.blocks(section(), kind)


@pytest.fixture
def service(tmp_path: Path) -> Path:
    for info, body in blocks("python"):
        name = re.fullmatch(r"file=(\S+)", info)
        assert name, f"a python block without file=: {info!r}"
        (tmp_path / name[1]).write_text(body)
    return tmp_path


@pytest.fixture
def env(service: Path) -> Iterator[dict[str, str]]:
    name = new_schema()
    values = {**os.environ, "EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL,
              "EVENTFLEET_SCHEMA": name, "EVENTFLEET_PREFIX": name, "EVENTFLEET_HTTP_PORT": "0",
              "PYTHONPATH": str(service), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    values.pop("EVENTFLEET_PROJECTION_MODULES", None)  # the README's export sets it
    yield values
    subprocess.run([str(BIN / "eventfleet"), "teardown", "--yes", "--force"], env=values, cwd=service, capture_output=True,
                   check=False, timeout=60)
    subprocess.run(["psql", DATABASE_URL, "-qc", f'DROP SCHEMA IF EXISTS "{name}" CASCADE'], capture_output=True,
                   check=False)


def test_the_readme_names_its_two_files() -> None:
    assert [info for info, _ in blocks("python")] == ["file=bank.py", "file=app.py"]


def test_the_service_type_checks_strictly(service: Path) -> None:
    done = subprocess.run([str(BIN / "mypy"), "--strict", "--no-incremental", "bank.py", "app.py"], cwd=service,
                          env={**os.environ, "MYPYPATH": str(ROOT)},  # an editable install hides it from mypy
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stdout


def test_the_commands_run_the_service_and_print_what_the_readme_shows(service: Path, env: dict[str, str]) -> None:
    (shell,) = [body for _, body in blocks("sh")]
    (expected,) = [body for _, body in blocks("text")]
    ran = readme.run_commands(shell, env, service)
    assert ran.output == expected
    assert ran.codes == [0, 0]
