"""Read-model projections and the registry that finds them by name."""

from __future__ import annotations

from projections.base import Projection, handles
from projections.registry import REGISTRY, get, register
from projections.wait import StreamHalted, UnknownProjection, WaitFailed, WaitTimeout, wait_for

__all__ = ["REGISTRY", "Projection", "StreamHalted", "UnknownProjection", "WaitFailed", "WaitTimeout", "get", "handles",
           "register", "wait_for"]
