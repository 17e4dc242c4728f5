"""Reactors: follow-ups exactly once with the checkpoint, conflicts rerun one cause, refusals recorded,
deadlines fired once in due order (the orders example's payment_timeout, and test reactors)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import aio_pika
import pytest
import tenacity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventfleet.examples.orders import orders
from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced
from eventfleet.examples.orders.reactors import REASON, PaymentTimeout
from projections import registry
from projections.base import handles
from projections.reactor import Deadline, Effects, Outcome, Reactor, deadline_id, follow_up_id
from store import NO_STREAM, EventStore, RecordedEvent, db
from store.aggregate import Repository
from store.partitions import partition_of
from tests.conftest import AMQP_URL, DATABASE_URL, PARTITIONS
from tests.unit.test_projection_fold import paid, placed
from workers import broker, projector, relay
from workers import errors as worker_errors
from workers.config import Settings
from workers.projector import checkpoints, deadlines, parking
from workers.rebuild import backfill
from workers.rebuild import shadow as rebuild
from workers.runtime import health

# Importing the reactors module registered payment_timeout in this process: unregistered at once, so that only
# this module's tests see it (every later test's relay and migrate would, otherwise).
registry.REGISTRY.pop(PaymentTimeout.name, None)


@pytest.fixture(autouse=True)
def reactors() -> Iterator[None]:
    """This module's reactors are registered while its tests run only (the registry is the process's)."""
    for cls in (PaymentTimeout,):
        registry.REGISTRY[cls.name] = cls
    yield
    for cls in (PaymentTimeout,):
        registry.REGISTRY.pop(cls.name, None)


async def bound(reactor: Reactor, event_store: EventStore) -> Reactor:
    reactor.bind(event_store, await event_store.partitions())
    return reactor


React = Callable[[EventStore, Reactor, list[RecordedEvent]], Awaitable[checkpoints.BatchResult]]


@pytest.fixture(params=["as-one-batch", "cause-by-cause"])
def react(request: pytest.FixtureRequest) -> React:
    """Apply events to a reactor as the worker does: the batch as one piece first, event by event after any
    error (``parking.apply_or_park``); or cause by cause from the start. Both must come to the same."""
    if request.param == "as-one-batch":
        return lambda store, reactor, events: parking.apply_or_park(store, reactor, events)
    return lambda store, reactor, events: checkpoints.apply_batch(store, reactor, events, set_based=False)


async def stream(event_store: EventStore, stream_id: str) -> list[RecordedEvent]:
    return await event_store.load(stream_id)


async def due_now(pool: db.Pool, key: str) -> None:
    """Make a pending deadline due (instead of waiting for it)."""
    await pool.execute("UPDATE deadlines SET due_at = clock_timestamp() - interval '1 second' WHERE key = $1", key)


async def fire(event_store: EventStore, reactor: Reactor, key: str) -> deadlines.Fired:
    return await deadlines.Firing(event_store, reactor, partition_of(key, PARTITIONS)).round()


async def test_a_placed_order_schedules_its_timeout_under_its_stream(pool, event_store, react):
    timeout = await bound(PaymentTimeout(), event_store)
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    (event,) = await stream(event_store, "order-1")
    await react(event_store, timeout, [event])
    row = await pool.fetchrow("SELECT key, partition, due_at, scheduled_by FROM deadlines")
    assert (row["key"], row["partition"], row["scheduled_by"]) == ("order-1", partition_of("order-1", PARTITIONS),
                                                                    event.event_id)
    assert row["due_at"] == event.recorded_at + PaymentTimeout.timeout


async def test_a_payment_cancels_the_timeout(pool, event_store, react):
    timeout = await bound(PaymentTimeout(), event_store)
    await event_store.append("order-1", [placed("1", "c"), paid("1", "c")], NO_STREAM)
    await react(event_store, timeout, await stream(event_store, "order-1"))
    assert await pool.fetchval("SELECT count(*) FROM deadlines") == 0


async def test_a_due_timeout_cancels_the_unpaid_order_with_its_causation_and_correlation(pool, event_store, react):
    timeout = await bound(PaymentTimeout(), event_store)
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM, correlation_id="checkout-7")
    await react(event_store, timeout, await stream(event_store, "order-1"))
    scheduled = await pool.fetchrow("SELECT deadline_id FROM deadlines")
    await due_now(pool, "order-1")
    fired = await fire(event_store, timeout, "order-1")
    assert (fired.fired, fired.causes) == (1, [scheduled["deadline_id"]])
    cancel = (await stream(event_store, "order-1"))[-1]
    assert isinstance(cancel.event, OrderCancelled)
    assert cancel.event.reason == REASON
    assert cancel.event_id == follow_up_id("payment_timeout", scheduled["deadline_id"], 0)
    assert (cancel.metadata["causation_id"], cancel.metadata["correlation_id"]) == (
        str(scheduled["deadline_id"]), "checkout-7")
    assert await pool.fetchval("SELECT count(*) FROM deadlines") == 0


async def test_a_deadline_fires_once_however_often_its_partition_is_looked_at(pool, event_store, react):
    timeout = await bound(PaymentTimeout(), event_store)
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    await react(event_store, timeout, await stream(event_store, "order-1"))
    await due_now(pool, "order-1")
    fired = await asyncio.gather(*(fire(event_store, timeout, "order-1") for _ in range(4)))
    assert sum(f.fired for f in fired) == 1
    assert len(await stream(event_store, "order-1")) == 2


async def test_a_cancelled_deadline_never_fires(pool, event_store, react):
    timeout = await bound(PaymentTimeout(), event_store)
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    await react(event_store, timeout, await stream(event_store, "order-1"))
    await due_now(pool, "order-1")
    await event_store.append("order-1", [paid("1", "c")], 0)
    await react(event_store, timeout, (await stream(event_store, "order-1"))[1:])
    assert (await fire(event_store, timeout, "order-1")).fired == 0
    assert [type(e.event) for e in await stream(event_store, "order-1")] == [OrderPlaced, OrderPaid]


async def test_a_payment_racing_the_timeout_wins_and_the_cancel_is_recorded_as_refused(pool, event_store, react):
    timeout = await bound(PaymentTimeout(), event_store)
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    await react(event_store, timeout, await stream(event_store, "order-1"))
    await event_store.append("order-1", [paid("1", "c")], 0)  # paid; the reactor has not seen it yet
    await due_now(pool, "order-1")
    fired = await fire(event_store, timeout, "order-1")
    assert fired.fired == 1  # fired, and refused: an outcome, not a failure
    assert [type(e.event) for e in await stream(event_store, "order-1")] == [OrderPlaced, OrderPaid]
    refusal = await pool.fetchrow("SELECT reactor, stream_id, error FROM reactor_refusals")
    assert (refusal["reactor"], refusal["stream_id"]) == ("payment_timeout", "order-1")
    assert refusal["error"].startswith("InvalidTransition: cannot cancel unpaid order 1: it is paid")


async def test_deadlines_fire_in_order_of_due_time(pool, event_store, react):
    fired: list[str] = []

    class Recorder(Reactor):
        name = "deadline_order"

        @handles(OrderPlaced)
        async def placed(self, fx: Effects, event: RecordedEvent) -> None:
            minutes = int(event.event.order_id)
            await fx.schedule(dt.datetime(2020, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=minutes), "k" + str(minutes))

        async def on_deadline(self, fx: Effects, deadline: Deadline) -> None:
            fired.append(deadline.key)

    reactor = await bound(Recorder(), event_store)
    keys = {m: f"k{m}" for m in (5, 1, 9, 3, 7, 2)}
    same = [m for m in keys if partition_of(keys[m], PARTITIONS) == partition_of("k5", PARTITIONS)]
    for m in keys:
        await event_store.append(f"order-{m}", [placed(str(m), "c")], NO_STREAM)
    await react(event_store, reactor, [e for m in keys for e in await stream(event_store, f"order-{m}")])
    await deadlines.Firing(event_store, reactor, partition_of("k5", PARTITIONS)).round()
    assert fired == [keys[m] for m in sorted(same)]


async def test_a_failing_deadline_is_parked_after_its_attempts_and_the_others_fire(pool, event_store, react):
    fired: list[str] = []

    class Flaky(Reactor):
        name = "flaky_deadlines"

        @handles(OrderPlaced)
        async def placed(self, fx: Effects, event: RecordedEvent) -> None:
            await fx.schedule(dt.datetime(2020, 1, 1, tzinfo=dt.UTC), "same-partition-" + event.event.order_id)

        async def on_deadline(self, fx: Effects, deadline: Deadline) -> None:
            if deadline.key.endswith("-bad"):
                raise RuntimeError("this deadline's handler is broken")
            fired.append(deadline.key)

    reactor = await bound(Flaky(), event_store)
    keys = [k for k in (f"same-partition-{i}" for i in range(60))
            if partition_of(k, PARTITIONS) == partition_of("same-partition-bad", PARTITIONS)][:2]
    for key in [*keys, "same-partition-bad"]:
        order = key.removeprefix("same-partition-")
        await event_store.append(f"order-{order}", [placed(order, "c")], NO_STREAM)
        await react(event_store, reactor, await stream(event_store, f"order-{order}"))
    firing = deadlines.Firing(event_store, reactor, partition_of("same-partition-bad", PARTITIONS))
    rounds = [await firing.round() for _ in range(deadlines.ATTEMPTS)]
    assert set(fired) == set(keys)  # a list outside the transaction: the first try of the batch ran them too
    assert [r.parked for r in rounds] == [0] * (deadlines.ATTEMPTS - 1) + [1]
    parked = await pool.fetchrow("SELECT stream_id, event_type, error, attempts FROM dead_letters")
    assert dict(parked) == {"stream_id": "deadline:same-partition-bad", "event_type": "deadline",
                            "error": "RuntimeError: this deadline's handler is broken", "attempts": deadlines.ATTEMPTS}
    assert await pool.fetchval("SELECT count(*) FROM deadlines") == 0


async def test_a_replayed_cause_appends_nothing_twice(pool, event_store, react):
    class Echo(Reactor):
        name = "echo"

        @handles(OrderPlaced)
        async def placed(self, fx: Effects, event: RecordedEvent) -> None:
            await fx.append(f"echo-{event.stream_id}", [event.event, event.event], NO_STREAM)

    reactor = await bound(Echo(), event_store)
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    events = await stream(event_store, "order-1")
    await react(event_store, reactor, events)
    await pool.execute("DELETE FROM checkpoints WHERE projection = 'echo'")  # as if the reactor started over
    await react(event_store, reactor, events)
    echoed = await stream(event_store, "echo-order-1")
    assert [e.event_id for e in echoed] == [follow_up_id("echo", events[0].event_id, i) for i in (0, 1)]


async def test_a_version_conflict_reruns_only_that_causes_handler_on_a_fresh_load(pool, event_store):
    runs: list[str] = []
    meddled = asyncio.Event()

    class Tally(Reactor):
        name = "tally"

        @handles(OrderPlaced)
        async def placed(self, fx: Effects, event: RecordedEvent) -> None:
            runs.append(event.stream_id)
            target = f"tally-{event.event.customer_id}"
            version = await event_store.stream_version(target, conn=fx.conn)
            if event.stream_id == "order-2" and not meddled.is_set():
                meddled.set()  # a user writes to the follow-up stream meanwhile, and commits
                await event_store.append(target, [event.event], version)
            await fx.append(target, [event.event], version)

    reactor = await bound(Tally(), event_store)
    for i, customer in ((1, "a"), (2, "b"), (3, "c")):
        await event_store.append(f"order-{i}", [placed(str(i), customer)], NO_STREAM)
    events = [e for i in (1, 2, 3) for e in await stream(event_store, f"order-{i}")]
    result = await checkpoints.apply_batch(event_store, reactor, events, set_based=False)  # cause by cause
    assert runs == ["order-1", "order-2", "order-2", "order-3"]
    assert len(result.applied) == 3
    assert [e.metadata.get("causation_id") for e in await stream(event_store, "tally-b")] == [
        None, str(events[1].event_id)]
    assert [len(await stream(event_store, f"tally-{c}")) for c in "ac"] == [1, 1]
    assert result.reacted == Outcome(follow_ups=3, conflicts=1)


async def test_follow_up_and_deadline_ids_are_fixed_functions_of_their_cause():
    cause = uuid.UUID("00000000-0000-0000-0000-000000000001")
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert follow_up_id("r", cause, 0) == follow_up_id("r", cause, 0) != follow_up_id("r", cause, 1)
    assert follow_up_id("r", cause, 0) != follow_up_id("s", cause, 0)
    assert deadline_id("r", "k", cause, at) == deadline_id("r", "k", cause, at) != deadline_id("r", "k", cause, at
                                                                                               + dt.timedelta(1))
    # Pinned: a change of the derivation would make every replay append new ids.
    assert follow_up_id("r", cause, 0) == uuid.uuid5(uuid.UUID("5b0b2c7e-8f44-4d0c-9a55-0c3e7f1d2a61"), f"r/{cause}/0")


async def test_an_unbound_reactor_says_so(event_store):
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    with pytest.raises(worker_errors.HandlerFailed, match="not bound to a store"):
        await checkpoints.apply_batch(event_store, PaymentTimeout(), await stream(event_store, "order-1"),
                                      set_based=False)


Step = tuple[int, str]


def _model(steps: list[Step], orders_: int) -> dict[int, str]:
    """The sequential domain: each order paid if its payment came before its timeout fired, else cancelled."""
    state = dict.fromkeys(range(orders_), "placed")
    for order, action in steps:
        if action == "pay" and state[order] == "placed":
            state[order] = "paid"
        elif action == "fire" and state[order] == "placed":
            state[order] = "cancelled"
    return state


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_interleavings_of_payments_and_timeouts_give_the_follow_ups_of_the_sequential_model(
        pool, event_store, data, react):
    orders_ = 3
    run = uuid.uuid4().hex[:8]
    steps: list[Step] = data.draw(st.lists(st.tuples(st.integers(0, orders_ - 1),
                                                     st.sampled_from(["pay", "react", "fire"])), max_size=14))
    timeout = await bound(PaymentTimeout(), event_store)
    sid = {i: f"order-{run}{i}" for i in range(orders_)}
    for i in range(orders_):
        await event_store.append(sid[i], [placed(f"{run}{i}", "c")], NO_STREAM)
    repository = Repository(event_store, orders.Order)
    seen = dict.fromkeys(range(orders_), 0)  # events the reactor has handled, per order
    effective: list[Step] = []

    async def react_to(i: int) -> None:
        events = (await stream(event_store, sid[i]))[seen[i]:]
        if events:
            await react(event_store, timeout, events)
            seen[i] += len(events)

    for i, action in steps:
        if action == "react":
            await react_to(i)
        elif action == "pay":
            try:
                await repository.execute(sid[i], orders.pay())
                effective.append((i, "pay"))
            except orders.InvalidTransition:
                pass  # cancelled by the timeout already, or paid before
        elif await pool.fetchval("SELECT count(*) FROM deadlines WHERE key = $1", sid[i]):
            # fire: only a timeout the reactor has scheduled (it saw the placement, not yet a payment)
            await due_now(pool, sid[i])
            await fire(event_store, timeout, sid[i])
            effective.append((i, "fire"))
    expected = _model(effective, orders_)
    for i in range(orders_):
        types = [type(e.event) for e in await stream(event_store, sid[i])]
        status = {OrderPaid: "paid", OrderCancelled: "cancelled"}.get(types[-1], "placed")
        assert status == expected[i], (steps, effective)
        assert types.count(OrderCancelled) <= 1
        cancels = [e for e in await stream(event_store, sid[i]) if isinstance(e.event, OrderCancelled)]
        assert all(e.event.reason == REASON for e in cancels)


async def test_rebuild_of_a_reactor_is_refused_with_the_reason(pool, event_store):
    with pytest.raises(worker_errors.ReactorNotRebuildable, match="payment_timeout is a reactor"):
        await rebuild.rebuild(pool, event_store, PaymentTimeout)


async def test_migrate_makes_a_new_reactor_live_over_a_store_with_events(pool, event_store):
    await event_store.append("order-1", [placed("1", "c")], NO_STREAM)
    assert await backfill.register(pool, ["payment_timeout", "some_new_projection"]) == ["some_new_projection"]
    assert await pool.fetchval("SELECT state FROM projection_status WHERE projection = 'payment_timeout'") == "live"


async def test_a_worker_cancels_the_unpaid_orders_once_their_timeout_is_due(pool, event_store, schema, prefix):
    connection = await aio_pika.connect(AMQP_URL)
    names = broker.Names(prefix)
    targets = await broker.declare_topology(await connection.channel(publisher_confirms=True, on_return_raises=True),
                                            names, ["payment_timeout"], PARTITIONS)
    timeout = PaymentTimeout()
    timeout.timeout = dt.timedelta(seconds=1)
    settings = Settings(database_url=DATABASE_URL, amqp_url=AMQP_URL, schema=schema, prefix=prefix, http_port=0,
                        lease_seconds=3)
    stop = asyncio.Event()
    worker = asyncio.create_task(projector.run_worker(settings, [timeout], health.Health(), stop, pool=pool))
    try:
        for i in range(6):
            await event_store.append(f"order-{i}", [placed(str(i), "c")], NO_STREAM)
        for i in range(3):  # paid in time: their timeouts are cancelled
            await event_store.append(f"order-{i}", [paid(str(i), "c")], 0)
        deadline = time.monotonic() + 30
        while True:
            await relay.relay_until_idle(pool, targets)  # the placements, and the cancels as they come
            last = [type((await stream(event_store, f"order-{i}"))[-1].event) for i in range(6)]
            if last == [OrderPaid] * 3 + [OrderCancelled] * 3 and not await pool.fetchval(
                    "SELECT count(*) FROM deadlines"):
                break
            assert time.monotonic() < deadline, last
            assert not worker.done(), worker
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
        await broker.delete_topology(await connection.channel(), names, ["payment_timeout"], PARTITIONS)
        await connection.close()
    assert await pool.fetchval("SELECT count(*) FROM reactor_refusals") == 0
    cancels = [e for i in range(6) for e in await stream(event_store, f"order-{i}") if isinstance(e.event, OrderCancelled)]
    assert [e.event.reason for e in cancels] == [REASON] * 3


async def test_a_parked_reactor_event_is_re_driven_once_fixed_and_its_follow_up_appended_once(pool, event_store):
    broken = {"yes": True}

    class Receipts(Reactor):
        name = "receipts"

        @handles(OrderPaid)
        async def receipt(self, fx: Effects, event: RecordedEvent) -> None:
            if broken["yes"]:
                raise RuntimeError("the receipt service is down")
            await fx.append(f"receipt-{event.stream_id}", [event.event], NO_STREAM)

    registry.REGISTRY[Receipts.name] = Receipts
    try:
        reactor = await bound(Receipts(), event_store)
        await event_store.append("order-1", [placed("1", "c"), paid("1", "c")], NO_STREAM)
        result = await parking.apply_or_park(event_store, reactor, await stream(event_store, "order-1"),
                                             wait=tenacity.wait_none())
        (parked,) = result.parked
        assert await stream(event_store, "receipt-order-1") == []
        broken["yes"] = False
        redriven = await parking.retry(event_store, parked.dead_letter_id)  # a fresh, unbound instance
        assert redriven.applied == 1
        receipts = await stream(event_store, "receipt-order-1")
        assert [e.event_id for e in receipts] == [follow_up_id("receipts", parked.event.event_id, 0)]
    finally:
        registry.REGISTRY.pop(Receipts.name, None)
