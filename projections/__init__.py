"""Read-model projections and the registry that finds them by name."""

from __future__ import annotations

from projections.base import Projection, handles
from projections.registry import REGISTRY, get, register
from projections.wait import WaitTimeout, wait_for

__all__ = ["REGISTRY", "Projection", "WaitTimeout", "get", "handles", "register", "wait_for"]
