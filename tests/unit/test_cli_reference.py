"""What the command line tells a new user: its version, every environment variable, where projections come from."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from projections import registry
from store import errors
from workers import cli
from workers.config import ENVIRONMENT, Settings

ROOT = Path(__file__).resolve().parents[2]
NEEDS_REGISTRY = ["migrate", "relay", "worker", "status", "rebuild", "dead-letters", "demo", "teardown", "retire"]


def help_of(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-m", "workers", *argv, "--help"], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    return done.stdout


def test_version_is_the_distributions() -> None:
    done = subprocess.run([sys.executable, "-m", "workers", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout == "eventfleet 0.1.0\n"


def test_the_environment_table_names_exactly_the_variables_settings_read() -> None:
    source = (ROOT / "workers" / "config.py").read_text()
    read = set(re.findall(r'(?:get|_int)\((?:environ, )?"(EVENTFLEET_[A-Z_]+)"', source))
    assert {name for name, _, _ in ENVIRONMENT} == read


def test_help_lists_every_environment_variable_with_its_default() -> None:
    text = help_of()
    missing = [name for name, default, _ in ENVIRONMENT if not re.search(
        rf"^  {name} +.*\(default: {re.escape(default)}\)$", text, re.MULTILINE)]
    assert missing == []


@pytest.mark.parametrize("command", NEEDS_REGISTRY)
def test_every_command_that_needs_projections_offers_projection_module(command: str) -> None:
    text = help_of(command)
    assert "--projection-module M" in text
    assert "EVENTFLEET_PROJECTION_MODULES" in text


def test_settings_read_projection_modules_comma_separated() -> None:
    settings = Settings.from_env({"EVENTFLEET_PROJECTION_MODULES": " app.projections , other.read_models,"})
    assert settings.projection_modules == ("app.projections", "other.read_models")


def test_a_projection_module_that_is_no_module_name_is_a_configuration_error() -> None:
    with pytest.raises(errors.ConfigError, match=r"^EVENTFLEET_PROJECTION_MODULES: 'app/projections' is not"):
        Settings.from_env({"EVENTFLEET_PROJECTION_MODULES": "app/projections"})


def test_projection_module_options_add_to_the_variable_once_each() -> None:
    settings = Settings(projection_modules=("a",)).with_projection_modules("b", "a", "c")
    assert settings.projection_modules == ("a", "b", "c")


def test_relay_and_worker_have_their_own_default_ports() -> None:
    assert (Settings().port("worker"), Settings().port("relay")) == (9108, 9109)


def test_an_explicit_port_is_every_roles() -> None:
    settings = Settings.from_env({"EVENTFLEET_HTTP_PORT": "9200"})
    assert (settings.port("worker"), settings.port("relay")) == (9200, 9200)


def test_no_projection_named_says_where_projections_come_from() -> None:
    with pytest.raises(errors.InvalidName) as raised:
        registry.get("nowhere_to_be_found")
    assert str(raised.value).startswith(
        "no projection named 'nowhere_to_be_found': projections come from the modules named in "
        "EVENTFLEET_PROJECTION_MODULES (comma-separated) or by --projection-module M (modules loaded: ")


def test_a_missing_projection_module_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["status", "--projection-module", "app.not_installed_anywhere"],
                    environ={"EVENTFLEET_PROJECTION_MODULES": ""})
    assert (code, capsys.readouterr().err) == (1, (
        f"eventfleet status: projection module 'app.not_installed_anywhere' not found in {Path.cwd()} and the Python "
        "path (PYTHONPATH; --app-dir DIR looks in DIR); projections come from the modules named in "
        "EVENTFLEET_PROJECTION_MODULES (comma-separated) or by --projection-module M\n"))
