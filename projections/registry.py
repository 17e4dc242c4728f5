"""Projections by name. Registering a projection is the only step to make it known everywhere."""

from __future__ import annotations

import importlib
import os
from typing import TypeVar

from projections.base import Projection
from store import errors, names

P = TypeVar("P", bound=type[Projection])

REGISTRY: dict[str, type[Projection]] = {}

# Modules imported on first use so that their @register decorators run.
_BUILTIN_MODULES = ("eventfleet.examples.orders.projections",)


def register(cls: P) -> P:
    """Class decorator: make a projection known by its name."""
    names.identifier(cls.name, what="projection")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise errors.InvalidName(f"projection {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls
    return cls


def load_builtin() -> dict[str, type[Projection]]:
    """Import the shipped projections, then the modules named in EVENTFLEET_PROJECTION_MODULES
    (comma-separated; how test and plug-in projections reach worker processes); return the registry."""
    extra = [m.strip() for m in os.environ.get("EVENTFLEET_PROJECTION_MODULES", "").split(",") if m.strip()]
    for module in (*_BUILTIN_MODULES, *extra):
        importlib.import_module(module)
    return REGISTRY


def get(name: str) -> type[Projection]:
    """The projection registered under name; raises InvalidName / KeyError-like errors clearly."""
    load_builtin()
    names.identifier(name, what="projection")
    try:
        return REGISTRY[name]
    except KeyError:
        raise errors.InvalidName(f"no projection named {name!r}; known: {sorted(REGISTRY)}") from None
