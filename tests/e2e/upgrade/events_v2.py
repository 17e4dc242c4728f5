"""The events of the new release: ``Rated`` v2 carries a comment; v1 events are upcast with none."""

from __future__ import annotations

import dataclasses
from typing import Any

import eventfleet as ef
from tests.e2e.upgrade.events_v1 import Noted, RatedV1


@ef.event("Rated", version=2)
@dataclasses.dataclass(frozen=True, slots=True)
class Rated:
    """Someone gave an item stars, and said why."""

    item: str
    stars: int
    comment: str


@ef.upcaster("Rated", from_version=1)
def _rated_v1_to_v2(fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "comment": ""}


__all__ = ["Noted", "Rated", "RatedV1"]
