"""Projections by name. Registering a projection is the only step to make it known everywhere.

A process knows the projections of the modules it imported: the ones named in its settings
(``EVENTFLEET_PROJECTION_MODULES``, comma-separated, and ``--projection-module M`` on the command line),
loaded with ``load``. Nothing is loaded by default: the orders example (``EXAMPLE``) too must be named.
"""

from __future__ import annotations

import importlib
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

_loaded: list[str] = []


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
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module == exc.name or module.startswith(f"{exc.name}.")):
                raise  # the module exists; something it imports does not
            raise ProjectionModuleNotFound(f"projection module {module!r} not found; projections come from {SOURCES}") from exc
        if module not in _loaded:
            _loaded.append(module)
    return dict(REGISTRY)


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
