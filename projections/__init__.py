"""Read-model projections and the registry that finds them by name."""

from __future__ import annotations

from projections.base import Projection, handles
from projections.registry import REGISTRY, get, register

__all__ = ["REGISTRY", "Projection", "get", "handles", "register"]
