"""A counter aggregate with its own registry: the test domain of the contract's repository tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Self

from store import Aggregate, codec

REG = codec.Registry()


@REG.event("Incremented", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class Incremented:
    writer: int
    count: int  # the count this event makes: proves each decision saw every earlier event


@REG.event("CounterState", version=1)
@dataclasses.dataclass(frozen=True, slots=True)
class CounterState:
    count: int


class Counter(Aggregate):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def apply(self, event: Any) -> None:
        assert isinstance(event, Incremented)
        self.count += 1

    def to_snapshot(self) -> CounterState:
        return CounterState(self.count)

    @classmethod
    def from_snapshot(cls, state: Any, version: int) -> Self:
        counter = cls()
        counter.count, counter.version = state.count, version
        return counter


def increment(writer: int) -> Any:
    def decide(counter: Counter) -> Sequence[Incremented]:
        return [Incremented(writer, counter.count + 1)]

    return decide
