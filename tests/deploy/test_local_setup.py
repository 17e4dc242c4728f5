"""deploy/local/services.sh: the set-up that `make test`, `make demo` and .ci/run share on a fresh machine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "local" / "services.sh"


def dry_run(target: str) -> str:
    return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_test_does_the_set_up_with_tools() -> None:
    assert "bash deploy/local/services.sh --tools" in dry_run("test").splitlines()


def test_make_demo_starts_the_services() -> None:
    assert "bash deploy/local/services.sh" in dry_run("demo").splitlines()


def test_ci_run_only_wraps_make_test() -> None:
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[-1] == "make test"
    assert not [line for line in lines if "apt-get" in line or "pg_ctlcluster" in line or "rabbitmq" in line]


def test_set_up_reports_services_up() -> None:
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "services: PostgreSQL and RabbitMQ are up"


def test_set_up_names_the_package_when_promtool_is_missing_and_it_may_not_install() -> None:
    env = {**os.environ, "EVENTFLEET_PROMTOOL": "promtool-that-is-not-there", "EVENTFLEET_SETUP_NO_INSTALL": "1"}
    out = subprocess.run(["bash", str(SCRIPT), "--tools"], capture_output=True, text=True, check=True, env=env)
    assert out.stderr == (
        "services: promtool is missing: install the Debian package 'prometheus' (as root: apt-get install prometheus)\n")


def test_set_up_refuses_unknown_arguments() -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, check=False)
    assert (out.returncode, out.stderr) == (2, f"usage: {SCRIPT} [--tools]\n")
