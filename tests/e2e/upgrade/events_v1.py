"""The events of the old release: an item rated, an item noted."""

from __future__ import annotations

import dataclasses

import eventfleet as ef


@ef.event("Rated", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class RatedV1:
    """Someone gave an item stars."""

    item: str
    stars: int


@ef.event("Noted", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class Noted:
    """Someone wrote a note on an item."""

    item: str
    text: str
