"""The writers of a chaos run: order lives written at a steady rate, each step idempotent and outage-proof."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

from eventfleet.examples.orders import load as load_mod
from eventfleet.examples.orders import orders
from store import EventStore, Repository, db, errors

TRANSIENT: tuple[type[BaseException], ...] = (errors.TransientError, *db.TRANSIENT)
T = TypeVar("T")


async def retrying(step: Callable[[], Awaitable[T]], within: float = 60) -> T:
    """Await ``step()`` until it does not fail with a transient database error (the harness's own queries)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await step()
        except TRANSIENT:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Writer:
    """Writes order lives at a steady rate (events per second) from ``lanes`` concurrent tasks.

    Each step goes through ``Repository.execute`` and is idempotent: "advance the order to version k",
    so a step retried after a lost commit acknowledgement, or during an outage, never writes twice.
    """

    def __init__(self, store: EventStore, rate: float, seed: int, lanes: int = 16) -> None:
        self.repository = Repository(store, orders.Order)
        self.interval = 1.0 / rate
        self.rng = random.Random(seed)
        self.lanes = lanes
        self.steps = 0
        self.retries = 0
        self._next = 0.0
        self._plans = self._next_plans()

    async def run(self, stop: asyncio.Event) -> None:
        """Write until ``stop`` is set (each lane finishes its step in flight)."""
        self._next = asyncio.get_running_loop().time()
        async with asyncio.TaskGroup() as group:
            for _ in range(self.lanes):
                group.create_task(self._lane(stop))

    def _next_plans(self) -> Iterator[load_mod.Plan]:
        while True:  # the load's order lives, 400 at a time: about 100 customers share them
            yield from load_mod.plan_orders(400, self.rng.getrandbits(64))

    async def _lane(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            plan = next(self._plans)
            for k in range(len(plan.steps)):
                if stop.is_set():
                    return
                await self._pace()
                await advance(self.repository, plan, k, self)
                self.steps += 1

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        at = max(self._next, loop.time())
        self._next = at + self.interval
        await asyncio.sleep(at - loop.time())


async def advance(repository: Repository[orders.Order], plan: load_mod.Plan, k: int, writer: Writer | None = None,
                  within: float = 120) -> None:
    """Bring the order to version k with its k-th step, retrying through outages; a no-op if it is there."""
    stream = orders.stream_id(plan.order_id)

    def decide(order: orders.Order) -> Sequence[orders.OrderEvent]:
        if order.status == "cancelled":
            return []  # the payment timeout came first (a step held up by a fault): the rest is moot
        return plan.steps[k](order) if order.version == k - 1 else []

    deadline, pause = time.monotonic() + within, 0.05
    while True:
        try:
            await repository.execute(stream, decide)
            return
        except TRANSIENT:
            if time.monotonic() > deadline:
                raise
            if writer is not None:
                writer.retries += 1
            await asyncio.sleep(pause)
            pause = min(2.0, pause * 2)


