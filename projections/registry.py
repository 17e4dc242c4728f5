"""Projections by name. Registering a projection is the only step to make it known everywhere.

A process knows the projections of the modules it imported: the ones named in its settings
(``EVENTFLEET_PROJECTION_MODULES``, comma-separated, and ``--projection-module M`` on the command line),
loaded with ``load``. Nothing is loaded by default: the orders example (``EXAMPLE``) too must be named.
The commands import them from the current directory (or ``--app-dir DIR``: ``add_app_dir``), then the
Python path.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from projections.base import Projection
from store import errors, names

P = TypeVar("P", bound=type[Projection])

REGISTRY: dict[str, type[Projection]] = {}

#: The module of the orders example's projections (``order_summary``, ``customer_stats``).
EXAMPLE = "eventfleet.examples.orders.projections"

#: Where a process's projections come from: said in every "no projection named ..." error.
SOURCES = "the modules named in EVENTFLEET_PROJECTION_MODULES (comma-separated) or by --projection-module M"

#: eventfleet's own top-level packages: an application module of one of these names is never imported (the
#: package is already), so its projections would silently be missing.
OWN_PACKAGES = ("store", "workers", "projections")

_loaded: list[str] = []
_app_dir: list[str] = []  # the directory of add_app_dir, if any (a list: set in place)


def add_app_dir(directory: str) -> None:
    """Import projection modules from ``directory`` first (put on ``sys.path``, as uvicorn's ``--app-dir`` and
    celery do with the current directory): a command run beside its modules finds them with no PYTHONPATH.
    eventfleet's own packages are imported by then, so a module of the same name cannot replace them."""
    path = os.path.abspath(directory)
    if path not in sys.path:
        sys.path.insert(0, path)
        importlib.invalidate_caches()
    _app_dir[:] = [path]


class ProjectionModuleNotFound(errors.ConfigError):
    """A module named as a source of projections cannot be imported."""


def register(cls: P) -> P:
    """Class decorator: make a projection known by its name."""
    names.identifier(cls.name, what="projection")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise errors.InvalidName(f"projection {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls
    return cls


def load(modules: Iterable[str] = ()) -> dict[str, type[Projection]]:
    """Import ``modules`` (their ``@register`` decorators run) and return every projection registered in
    this process, by name. Importing a module twice does nothing."""
    for module in modules:
        top = module.partition(".")[0]
        if module in OWN_PACKAGES:
            raise ProjectionModuleNotFound(f"projection module {module!r}: {_shadowed(top)}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module == exc.name or module.startswith(f"{exc.name}.")):
                raise  # the module exists; something it imports does not
            where = f"{_app_dir[0]} and the Python path" if _app_dir else "the Python path"
            hint = f"; {_shadowed(top)}" if top in OWN_PACKAGES else ""
            raise ProjectionModuleNotFound(
                f"projection module {module!r} not found in {where} (PYTHONPATH; --app-dir DIR looks in DIR); "
                f"projections come from {SOURCES}{hint}") from exc
        if module not in _loaded:
            _loaded.append(module)
    return dict(REGISTRY)


def _shadowed(top: str) -> str:
    return (f"{top!r} is eventfleet's own package, so an application module of that name is never imported: "
            f"rename your {top}.py (or {top}/), e.g. to app_{top}.py")


def get(name: str) -> type[Projection]:
    """The projection registered under name; InvalidName, saying where projections come from, if none is."""
    names.identifier(name, what="projection")
    try:
        return REGISTRY[name]
    except KeyError:
        loaded = ", ".join(_loaded) or "none"
        raise errors.InvalidName(
            f"no projection named {name!r}: projections come from {SOURCES} "
            f"(modules loaded: {loaded}; projections known: {', '.join(sorted(REGISTRY)) or 'none'})") from None
