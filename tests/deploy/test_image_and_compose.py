"""deploy/Dockerfile and deploy/compose.yaml, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from typing import Any

import yaml

from projections import registry
from tests.deploy.support import BASE, DEPLOY, ROOT, load_docs
from workers import cli
from workers.config import Settings

BUILD_TOOLS = ("gcc", "build-essential", "make", "g++", "libpq-dev", "python3-dev")


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages as lists of (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*(#[^\n]*\n\s*)*", " ", (DEPLOY / "Dockerfile").read_text("utf-8"))
    result: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            result.append([])
        if result:
            result[-1].append((instruction.upper(), args.strip()))
    return result


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))


def test_image_is_multi_stage_non_root_with_the_cli_as_entrypoint() -> None:
    builder, final = stages()
    assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim-\w+ AS builder", builder[0][1])
    assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim-\w+", final[0][1])
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final
    (user,) = [args for instruction, args in final if instruction == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    pod = load_docs(BASE / "relay.yaml")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert final[-2:] == [("ENTRYPOINT", '["eventfleet"]'), ("CMD", '["--help"]')]
    assert "eventfleet" in pyproject()["project"]["scripts"]
    final_runs = " ".join(args for instruction, args in final if instruction == "RUN")
    for tool in BUILD_TOOLS:
        assert not re.search(rf"\b{re.escape(tool)}\b", final_runs), tool
    assert "pip install ." in " ".join(args for instruction, args in builder if instruction == "RUN")


def test_image_python_satisfies_the_package() -> None:
    (arg,) = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("ARG PYTHON")]
    version = tuple(int(p) for p in arg.partition("=")[2].split("."))
    minimum = tuple(int(p) for p in pyproject()["project"]["requires-python"].removeprefix(">=").split("."))
    assert version >= minimum


def test_image_copies_everything_pip_install_needs() -> None:
    builder, _ = stages()
    copied = {src for instruction, args in builder if instruction == "COPY" for src in args.split()[:-1]}
    project = pyproject()
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"pyproject.toml", project["project"]["readme"], *packages}
    assert needed <= copied
    # ...and the build context sends them (BuildKit reads deploy/Dockerfile.dockerignore for this file).
    patterns = [p for p in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if p and not p.startswith("#")]
    for path in needed:
        included = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            if fnmatch.fnmatch(path, pattern.lstrip("!").rstrip("/")):
                included = negated
        assert included, path


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text("utf-8"))
    return doc


def eventfleet_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if s.get("image") == "eventfleet:dev"}


def test_compose_has_the_whole_stack() -> None:
    services = compose()["services"]
    assert {"postgres", "rabbitmq", "migrate", "relay", "prometheus", "grafana"} <= set(services)
    assert "management" in services["rabbitmq"]["image"]
    ours = eventfleet_services()
    assert ours["migrate"]["command"] == ["migrate"]
    for name, service in ours.items():
        assert (ROOT / "deploy" / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        if name != "migrate":
            condition = service["depends_on"]["migrate"]["condition"]
            assert condition == "service_completed_successfully", name


def test_compose_runs_every_projection_with_a_valid_configuration() -> None:
    parser = cli.build_parser()
    projections: list[str] = []
    for name, service in eventfleet_services().items():
        Settings.from_env(service["environment"])
        argv = [*service.get("entrypoint", ["eventfleet"])[1:], *service["command"]]
        args = parser.parse_args(argv)
        if args.command == "worker":
            assert args.projection, name
            projections += args.projection
    assert sorted(projections) == sorted(registry.load([registry.EXAMPLE]))


def test_each_compose_worker_is_the_worker_group_of_its_name_and_the_relay_declares_one() -> None:
    services = eventfleet_services()
    groups = {name: service["environment"].get("EVENTFLEET_GROUP") for name, service in services.items()
              if service["command"][0] == "worker"}
    assert groups == {name: name.removeprefix("worker-") for name in groups}
    assert services["relay"]["environment"]["EVENTFLEET_GROUP"] in groups.values()
    assert "EVENTFLEET_GROUP" not in compose()["x-eventfleet"]["environment"]


def test_compose_mounts_existing_files() -> None:
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
