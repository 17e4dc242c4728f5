"""The README's "Quickstart" runs as written, as a new user runs it: the installed ``eventfleet`` command in the
directory holding ``notes.py`` (no PYTHONPATH), two workers and a relay on their default HTTP ports, and the
output it shows. Only the install line is skipped: this environment has eventfleet installed already."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, DATABASE_URL
from tests.e2e import readme

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def section() -> str:
    return readme.section('Quickstart')


def blocks(kind: str) -> list[tuple[str, str]]:
    """(info string, body) of the section's fenced blocks whose language is ``kind``."""
    return readme.blocks(section(), kind)


def test_the_quickstart_is_the_readmes_first_section() -> None:
    text = (ROOT / "README.md").read_text()
    assert text.index("\n## ") == text.index("\n## Quickstart\n")


@pytest.fixture
def service(tmp_path: Path) -> Path:
    ((info, body),) = blocks("python")
    assert info == "file=notes.py"
    (tmp_path / "notes.py").write_text(body)
    return tmp_path


def test_the_quickstart_type_checks_strictly(service: Path) -> None:
    done = subprocess.run([str(BIN / "mypy"), "--strict", "--no-incremental", "notes.py"], cwd=service,
                          env={**os.environ, "MYPYPATH": str(ROOT)},  # an editable install hides it from mypy
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stdout


@pytest.fixture
def env(service: Path) -> Iterator[dict[str, str]]:
    """A user's environment: the servers, a deployment of its own, the command on PATH; no PYTHONPATH and no
    EVENTFLEET_HTTP_PORT (the default ports, taken or not by other processes of this machine)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    values = {k: v for k, v in os.environ.items()
              if k not in ("PYTHONPATH", "EVENTFLEET_HTTP_PORT", "EVENTFLEET_PROJECTION_MODULES")}
    values |= {"EVENTFLEET_DATABASE_URL": DATABASE_URL, "EVENTFLEET_AMQP_URL": AMQP_URL, "EVENTFLEET_SCHEMA": name,
               "EVENTFLEET_PREFIX": name, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    yield values
    subprocess.run([str(BIN / "eventfleet"), "teardown", "--yes", "--force"], env=values, cwd=service,
                   capture_output=True, check=False, timeout=60)
    subprocess.run(["psql", DATABASE_URL, "-qc", f'DROP SCHEMA IF EXISTS "{name}" CASCADE'], capture_output=True,
                   check=False)


def test_the_quickstart_runs_and_prints_what_the_readme_shows(service: Path, env: dict[str, str]) -> None:
    (shell,) = [body for _, body in blocks("sh")]
    (expected,) = [body for _, body in blocks("text")]
    ran = readme.run_commands(shell, env, service)
    logs = dict(enumerate(ran.logs))
    assert ran.output == expected
    assert ran.codes == [0, 0, 0], logs
    # The two workers (and the relay) each served HTTP on a port of their own, without configuration.
    ports = [re.findall(r"http server listening port=(\d+)", logs[i]) for i in range(3)]
    assert all(len(p) == 1 for p in ports), logs
    assert len({p[0] for p in ports}) == 3
