"""``eventfleet load``: a writer load through the store API, with real version conflicts.

Every order gets a life decided by the seed: placed, then paid and shipped, or cancelled (before or
after payment). The load is a queue of "advance order X by one step" tokens; the tokens of ``2 x --concurrency`` orders
at a time are shuffled together, so the writers regularly work on the same order at once.
They then collide on its version, and the repository reloads and re-decides: each token still advances
its order by exactly one step, so every order ends exactly at the end of its life.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections.abc import Sequence
from decimal import Decimal

from eventfleet.examples.orders import orders
from store import EventStore, Repository

CARRIERS = ("dhl", "ups", "fedex", "postnl")
#: Orders at or above this fate are placed and left unpaid (5%).
ABANDONED = 0.95
REASONS = ("customer request", "out of stock", "payment declined", "address invalid")
PRODUCTS = tuple((f"p{n:03d}", f"Product {n}", f"SKU-{n:05d}", Decimal(n % 50 * 100 + 99) / 100)
                 for n in range(1, 201))


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """One order's life: the commands to run on it, in order."""

    order_id: str
    steps: tuple[orders.OrderCommand, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class LoadReport:
    """What a load wrote."""

    orders: int
    events: int
    conflicts: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def plan_orders(count: int, seed: int | None, run_id: str | None = None) -> list[Plan]:
    """The lives of ``count`` orders: customers, items and outcomes reproducible from ``seed``; the order
    ids carry ``run_id`` (random by default), so the same seeded load can run again on the same store."""
    rng = random.Random(seed)
    run = run_id or uuid.uuid4().hex[:8]
    customers = [f"c-{n:05d}" for n in range(max(1, count // 4))]
    plans = []
    for n in range(count):
        order_id = f"{run}-{n:06d}"
        items = [orders.LineItem(pid, name, sku, rng.randint(1, 4), price)
                 for pid, name, sku, price in rng.sample(PRODUCTS, rng.randint(1, 4))]
        steps: list[orders.OrderCommand] = [orders.place(order_id, rng.choice(customers), items)]
        fate = rng.random()
        if fate >= ABANDONED:
            pass  # placed and never paid: the payment_timeout reactor cancels it
        elif fate < 0.15:
            steps.append(orders.cancel(rng.choice(REASONS)))
        else:
            steps.append(orders.pay())
            steps.append(orders.cancel(rng.choice(REASONS)) if fate < 0.25 else orders.ship(rng.choice(CARRIERS)))
        plans.append(Plan(order_id, tuple(steps)))
    return plans


def tokens(plans: Sequence[Plan], group: int, seed: int | None) -> list[Plan]:
    """One token per step of every plan, shuffled within groups of ``group`` orders."""
    rng = random.Random(seed)
    queue: list[Plan] = []
    for start in range(0, len(plans), group):
        chunk = [plan for plan in plans[start:start + group] for _ in plan.steps]
        rng.shuffle(chunk)
        queue.extend(chunk)
    return queue


async def run_load(store: EventStore, count: int, *, concurrency: int = 8, seed: int | None = None,
                   run_id: str | None = None) -> LoadReport:
    """Drive ``count`` orders through their lives with ``concurrency`` tasks; return what was written."""
    repository = Repository(store, orders.Order, max_attempts=64)
    plans = plan_orders(count, seed, run_id)
    # Twice as many orders in play as writers: about one append in eight meets a conflict.
    queue = iter(tokens(plans, 2 * concurrency, seed))
    written = 0

    async def advance(plan: Plan) -> int:
        def next_step(order: orders.Order) -> Sequence[orders.OrderEvent]:
            if order.status == "cancelled":
                return []  # the payment timeout came first (an order whose next step was too slow)
            done = order.version + 1  # one event per step
            return plan.steps[done](order)

        executed = await repository.execute(orders.stream_id(plan.order_id), next_step)
        return 0 if executed.result is None else len(executed.result.global_positions)

    async def worker() -> None:
        nonlocal written
        for plan in queue:  # a shared iterator: each token is taken by exactly one task
            count = await advance(plan)  # not `written += await ...`: that reads `written` before awaiting
            written += count

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadReport(count, written, repository.conflicts, time.perf_counter() - started)


