"""``import eventfleet``: the one import an application needs, and its refusal to run on shadowed packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import eventfleet as ef
import projections
import store
import workers.projector.worker
import workers.relay

ROOT = Path(__file__).resolve().parents[2]


def test_the_facade_is_the_api_of_the_packages_it_comes_from() -> None:
    assert (ef.EventStore, ef.Repository, ef.Aggregate, ef.NewEvent, ef.VersionConflict, ef.EventFleetError) == (
        store.EventStore, store.Repository, store.Aggregate, store.NewEvent, store.VersionConflict,
        store.EventFleetError)
    assert (ef.Projection, ef.handles, ef.register, ef.wait_for) == (
        projections.Projection, projections.handles, projections.register, projections.wait_for)
    assert (ef.consume_until_idle, ef.run_relay) == (workers.projector.worker.consume_until_idle,
                                                      workers.relay.run_relay)


def test_every_name_in_all_is_importable() -> None:
    assert [name for name in ef.__all__ if not hasattr(ef, name)] == []


def _shadow(tmp_path: Path, package: str) -> dict[str, str]:
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    return {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}


def _message(tmp_path: Path, package: str) -> str:
    return (f"eventfleet: the package {package!r} resolves to {tmp_path / package / '__init__.py'}, not eventfleet's "
            f"own {ROOT / package / '__init__.py'}: your {tmp_path / package} shadows it: rename it (e.g. to "
            f"app_{package}/) and its imports, or put it after eventfleet on sys.path (modules named store.py, "
            "workers.py or projections.py all do this)")


def test_an_application_module_file_that_shadows_a_package_is_named_with_what_to_rename_it_to(tmp_path: Path) -> None:
    (tmp_path / "store.py").write_text("")  # the common case: a module, not a package
    (tmp_path / "app.py").write_text("import eventfleet\n")
    done = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=False)
    assert done.stderr.splitlines()[-1] == (
        f"eventfleet._guard.ShadowedPackage: eventfleet: the package 'store' resolves to {tmp_path / 'store.py'}, "
        f"not eventfleet's own {ROOT / 'store' / '__init__.py'}: your {tmp_path / 'store.py'} shadows it: rename it "
        "(e.g. to app_store.py) and its imports, or put it after eventfleet on sys.path (modules named store.py, "
        "workers.py or projections.py all do this)")


@pytest.mark.parametrize("package", ["store", "workers", "projections"])
def test_importing_eventfleet_under_a_shadowing_package_names_its_path(tmp_path: Path, package: str) -> None:
    done = subprocess.run([sys.executable, "-c", "import eventfleet"], cwd=tmp_path, env=_shadow(tmp_path, package),
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stderr.splitlines()[-1]) == (
        1, f"eventfleet._guard.ShadowedPackage: {_message(tmp_path, package)}")


@pytest.mark.parametrize("package", ["store", "workers", "projections"])
def test_the_command_under_a_shadowing_package_fails_with_one_line(tmp_path: Path, package: str) -> None:
    command = Path(sys.executable).parent / "eventfleet"
    done = subprocess.run([str(command), "status"], cwd=tmp_path, env=_shadow(tmp_path, package),
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", _message(tmp_path, package) + "\n")


def test_python_m_workers_under_a_shadowing_store_fails_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "workers", "status"], cwd=tmp_path, env=_shadow(tmp_path, "store"),
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", _message(tmp_path, "store") + "\n")
