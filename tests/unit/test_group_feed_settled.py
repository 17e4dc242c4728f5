"""A worker group's ack arithmetic (workers/projector/feed.py): what one read model settled, as multiple-acks and
single rejects in any order its consumer may send them, is the longest run of delivery tags from 1 that it settled,
checked against a plain model (hypothesis). The broker is acked up to the least of the read models' runs
(tests/integration/test_group_feed.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from workers.projector.feed import _Settled


def settled_run(tags: set[int]) -> int:
    """The model: the largest n such that 1..n are all settled."""
    n = 0
    while n + 1 in tags:
        n += 1
    return n


@st.composite
def settlements(draw: st.DrawFn) -> list[tuple[int, bool]]:
    """A consumer's settlements of deliveries 1..n in order: batches acked with one multiple-ack of their last tag,
    some deliveries rejected alone before their batch's ack (as ``Consumer.handle`` does)."""
    n = draw(st.integers(0, 40))
    out: list[tuple[int, bool]] = []
    tag = 1
    while tag <= n:
        size = draw(st.integers(1, 5))
        batch = list(range(tag, min(n, tag + size - 1) + 1))
        rejected = draw(st.sets(st.sampled_from(batch))) if batch else set()
        out += [(t, False) for t in sorted(rejected)]
        good = [t for t in batch if t not in rejected]
        if good:
            out.append((max(good), True))
        tag = batch[-1] + 1
    return out


@given(settlements())
def test_a_read_models_settled_run_is_the_model_s_whatever_it_acks_and_rejects(ops):
    settled, model = _Settled(), set[int]()
    for tag, multiple in ops:
        settled.settle(tag, multiple)
        model |= set(range(1, tag + 1)) if multiple else {tag}
        assert settled.upto == settled_run(model)


def test_a_reject_above_the_run_waits_until_the_tags_below_it_are_settled():
    settled = _Settled()
    settled.settle(3, False)
    assert settled.upto == 0
    settled.settle(2, True)
    assert settled.upto == 3
