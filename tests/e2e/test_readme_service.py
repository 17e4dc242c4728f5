"""The README's "Your own service" runs as written: its files, its commands, the output it shows."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, DATABASE_URL, new_schema

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Your own service\n")
    return text[start:text.index("\n## ", start + 1)]


def blocks(kind: str) -> list[tuple[str, str]]:
    """(info string, body) of the section's fenced blocks whose language is ``kind``."""
    return [(m[1].strip(), m[2]) for m in re.finditer(rf"^```{kind}([^\n]*)\n(.*?)^```$", section(), re.DOTALL | re.MULTILINE)]


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
    background: list[subprocess.Popen[str]] = []
    output = ""
    try:
        for line in shell.splitlines():
            command = line.split("#")[0].strip()
            if command.startswith("export "):
                key, _, value = command.removeprefix("export ").partition("=")
                env[key] = value
            elif command.endswith("&"):
                with (service / f"{len(background)}.log").open("w") as log:
                    background.append(subprocess.Popen(command.rstrip("&").split(), env=env, cwd=service, text=True,
                                                       stdout=subprocess.DEVNULL, stderr=log))
            elif command.startswith("python "):
                done = subprocess.run([sys.executable, *command.split()[1:]], env=env, cwd=service,
                                      capture_output=True, text=True, timeout=120, check=False)
                assert done.returncode == 0, done.stderr
                output = done.stdout
            elif command:
                done = subprocess.run(command.split(), env=env, cwd=service, capture_output=True, text=True,
                                      timeout=120, check=False)
                assert done.returncode == 0, done.stderr
    finally:
        for proc in background:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in background:
            proc.wait(max(1.0, deadline - time.monotonic()))
    assert output == expected
    assert [proc.returncode for proc in background] == [0, 0]
