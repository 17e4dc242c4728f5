"""The arithmetic of read-model types (workers/rebuild/typebook.py): None stands for every event."""

from __future__ import annotations

from workers.rebuild.typebook import Change, covers, describe, narrowed

A, B, AB = frozenset({"A"}), frozenset({"B"}), frozenset({"A", "B"})


def test_a_read_model_built_with_every_event_covers_any_code() -> None:
    assert (covers(None, AB), covers(None, None)) == (True, True)


def test_a_read_model_built_with_some_types_covers_code_handling_no_more() -> None:
    assert (covers(AB, A), covers(A, AB), covers(AB, None)) == (True, False, False)


def test_narrowing_keeps_the_types_both_handle() -> None:
    assert (narrowed(None, A), narrowed(AB, None), narrowed(AB, B), narrowed(A, B)) == (A, AB, B, frozenset())


def test_a_change_is_pending_with_the_types_the_code_adds() -> None:
    assert (Change("p", A, AB).pending, Change("p", A, AB).added) == (True, B)
    assert (Change("p", A, None).pending, Change("p", A, None).added) == (True, None)
    assert (Change("p", AB, A).pending, Change("p", None, None).pending) == (False, False)


def test_types_are_described_sorted_or_as_all() -> None:
    assert (describe(None), describe(frozenset({"B", "A"})), describe(frozenset())) == ("all", "A, B", "none")
