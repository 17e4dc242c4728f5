"""Refuse to run on top of another distribution's ``store``, ``workers`` or ``projections``.

eventfleet installs three generic top-level packages beside ``eventfleet`` (the project's fixed layout and
the contract's imports). An application's own package of one of those names that comes first on
``sys.path`` would be imported instead, and fail far from the cause; this says so in one line first.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACKAGES = ("store", "workers", "projections")


class ShadowedPackage(ImportError):
    """A package eventfleet needs resolves to another distribution's module of the same name."""


def _origin(name: str) -> Path | None:
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = spec.origin if spec is not None else None
    return Path(origin).resolve() if origin else None


def check() -> None:
    """Raise ShadowedPackage (one line, naming the shadowing path) unless every package is eventfleet's own."""
    home = Path(__file__).resolve().parent.parent
    for name in PACKAGES:
        expected = home / name / "__init__.py"
        found = _origin(name)
        if found != expected:
            raise ShadowedPackage(_shadowed(name, found, expected))


def _shadowed(name: str, found: Path | None, expected: Path) -> str:
    """The one line of ShadowedPackage: what shadows the package, and what to rename it to."""
    if found is None:
        return f"eventfleet: the package {name!r} resolves to nowhere, not eventfleet's own {expected}: reinstall eventfleet"
    culprit, renamed = (found.parent, f"app_{name}/") if found.name == "__init__.py" else (found, f"app_{name}.py")
    return (f"eventfleet: the package {name!r} resolves to {found}, not eventfleet's own {expected}: your "
            f"{culprit} shadows it: rename it (e.g. to {renamed}) and its imports, or put it after eventfleet "
            "on sys.path (modules named store.py, workers.py or projections.py all do this)")


def _running_a_command() -> bool:
    """Whether this process is the ``eventfleet`` command (or ``python -m workers``), not an application."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    return program == "eventfleet" or sys.argv[0].endswith(os.path.join("workers", "__main__.py"))


def check_on_import() -> None:
    """``check()`` for ``import eventfleet``: an application gets the ImportError; the command prints its
    one line and exits 2 (it would otherwise die in a traceback before it could say why)."""
    try:
        check()
    except ShadowedPackage as exc:
        if _running_a_command():
            print(exc, file=sys.stderr)
            raise SystemExit(2) from None
        raise
