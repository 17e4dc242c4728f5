"""The orders workload through the ``eventsourcing`` library (PyPI) and its PostgreSQL backend.

Used by ``bench.pipeline`` (not run on its own). ``save``: one thread per writer schedule (the library
is synchronous), each saving its share of the orders as ``Order`` aggregates, one event per ``save`` (one
transaction: the library locks its events table, inserts, NOTIFYs, commits), in our writers' schedule.
``project``: two ``ProjectionRunner``s, one per read model, follow the application's notification log
into ``order_summary`` and ``customer_stats`` (the same tables and upserts as ours), each event in its own
transaction with the runner's tracking record, as the library does it. Everything lives in a schema of
its own (the library creates its tables there), created and dropped by the caller.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from eventsourcing.application import Application
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.projection import Projection, ProjectionRunner
from psycopg.sql import SQL, Composed, Identifier

from eventfleet.examples.orders.events import OrderCancelled, OrderPaid, OrderPlaced, OrderShipped

#: (stream id, step, our domain event): one writer's schedule, as bench.pipeline plans it.
Token = tuple[str, int, Any]


class Order(Aggregate):
    """An order, as the library's aggregates are written: an event class and a decorated method per event."""

    class Placed(Aggregate.Created):
        order_id: str
        customer_id: str
        items: list[dict[str, Any]]
        subtotal: Decimal
        tax: Decimal
        total: Decimal
        placed_at: dt.datetime

    class Paid(Aggregate.Event):
        order_id: str
        customer_id: str
        amount: Decimal
        paid_at: dt.datetime

    class Shipped(Aggregate.Event):
        order_id: str
        customer_id: str
        carrier: str
        shipped_at: dt.datetime

    class Cancelled(Aggregate.Event):
        order_id: str
        customer_id: str
        reason: str
        cancelled_at: dt.datetime

    @event(Placed)
    def __init__(self, order_id: str, customer_id: str, items: list[dict[str, Any]], subtotal: Decimal,
                 tax: Decimal, total: Decimal, placed_at: dt.datetime) -> None:
        self.order_id, self.customer_id, self.status = order_id, customer_id, "placed"
        self.item_count, self.total = sum(i["quantity"] for i in items), total

    @classmethod
    def create_id(cls, order_id: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"/orders/{order_id}")

    @event(Paid)
    def pay(self, order_id: str, customer_id: str, amount: Decimal, paid_at: dt.datetime) -> None:
        self.status = "paid"

    @event(Shipped)
    def ship(self, order_id: str, customer_id: str, carrier: str, shipped_at: dt.datetime) -> None:
        self.status = "shipped"

    @event(Cancelled)
    def cancel(self, order_id: str, customer_id: str, reason: str, cancelled_at: dt.datetime) -> None:
        self.status = "cancelled"


class Orders(Application[uuid.UUID]):
    """The write side: saves Order aggregates (table ``orders_events``)."""


def execute(orders: dict[str, Order], stream_id: str, payload: Any) -> Order:
    """Our domain event as the library's command on the order (created on OrderPlaced)."""
    match payload:
        case OrderPlaced():
            items = [{"product_id": i.product_id, "product_name": i.product_name, "sku": i.sku,
                      "quantity": i.quantity, "unit_price": i.unit_price} for i in payload.items]
            orders[stream_id] = Order(payload.order_id, payload.customer_id, items, payload.subtotal, payload.tax,
                                      payload.total, payload.placed_at)
        case OrderPaid():
            orders[stream_id].pay(payload.order_id, payload.customer_id, payload.amount, payload.paid_at)
        case OrderShipped():
            orders[stream_id].ship(payload.order_id, payload.customer_id, payload.carrier, payload.shipped_at)
        case OrderCancelled():
            orders[stream_id].cancel(payload.order_id, payload.customer_id, payload.reason, payload.cancelled_at)
    return orders[stream_id]


# --- the read models as the library's materialised views ------------------------------------------------


class _View(PostgresTrackingRecorder):
    """A tracking recorder whose writes go with the tracking record, in one transaction per event."""

    def _sql(self, text: str) -> Composed:
        return SQL(text).format(schema=Identifier(self.datastore.schema))

    def write(self, statement: Composed, params: Sequence[Any], tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as curs:
            self._insert_tracking(curs, tracking)
            curs.execute(statement, params, prepare=True)


class SummaryView(_View):
    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.placed = self._sql(
            "INSERT INTO {schema}.order_summary (order_id, customer_id, status, item_count, total, placed_at,"
            " updated_at) VALUES (%s, %s, 'placed', %s, %s, %s, %s) ON CONFLICT (order_id) DO UPDATE SET"
            " customer_id = EXCLUDED.customer_id, item_count = EXCLUDED.item_count, total = EXCLUDED.total,"
            " placed_at = EXCLUDED.placed_at")
        self.status = self._sql("UPDATE {schema}.order_summary SET status = %s, updated_at = %s WHERE order_id = %s")


class StatsView(_View):
    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.count = self._sql(
            "INSERT INTO {schema}.customer_stats AS c (customer_id, orders_placed, orders_cancelled, total_spent)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (customer_id) DO UPDATE SET"
            " orders_placed = c.orders_placed + EXCLUDED.orders_placed,"
            " orders_cancelled = c.orders_cancelled + EXCLUDED.orders_cancelled,"
            " total_spent = c.total_spent + EXCLUDED.total_spent")


class SummaryProjection(Projection[SummaryView]):
    name = "essummary"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.insert_tracking(tracking)

    @process_event.register(Order.Placed)
    def _placed(self, e: Any, tracking: Tracking) -> None:
        count = sum(i["quantity"] for i in e.items)
        self.view.write(self.view.placed, (e.order_id, e.customer_id, count, e.total, e.placed_at, e.placed_at),
                        tracking)

    @process_event.register(Order.Paid)
    def _paid(self, e: Any, tracking: Tracking) -> None:
        self.view.write(self.view.status, ("paid", e.paid_at, e.order_id), tracking)

    @process_event.register(Order.Shipped)
    def _shipped(self, e: Any, tracking: Tracking) -> None:
        self.view.write(self.view.status, ("shipped", e.shipped_at, e.order_id), tracking)

    @process_event.register(Order.Cancelled)
    def _cancelled(self, e: Any, tracking: Tracking) -> None:
        self.view.write(self.view.status, ("cancelled", e.cancelled_at, e.order_id), tracking)


class StatsProjection(Projection[StatsView]):
    name = "esstats"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.insert_tracking(tracking)  # OrderShipped: nothing to count, the position still moves

    @process_event.register(Order.Placed)
    def _placed(self, e: Any, tracking: Tracking) -> None:
        self.view.write(self.view.count, (e.customer_id, 1, 0, 0), tracking)

    @process_event.register(Order.Paid)
    def _paid(self, e: Any, tracking: Tracking) -> None:
        self.view.write(self.view.count, (e.customer_id, 0, 0, e.amount), tracking)

    @process_event.register(Order.Cancelled)
    def _cancelled(self, e: Any, tracking: Tracking) -> None:
        self.view.write(self.view.count, (e.customer_id, 0, 1, 0), tracking)


# --- the measurements ------------------------------------------------------------------------------------


def environment(dsn: str, schema: str, pool_size: int) -> dict[str, str]:
    """The library's configuration (its POSTGRES_* variables) for our DSN and a schema of its own."""
    url = urllib.parse.urlsplit(dsn)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": url.path.lstrip("/") or "postgres", "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432), "POSTGRES_USER": url.username or "postgres",
        "POSTGRES_PASSWORD": urllib.parse.unquote(url.password or ""), "POSTGRES_SCHEMA": schema,
        "POSTGRES_POOL_SIZE": str(pool_size), "POSTGRES_MAX_OVERFLOW": "0",
    }


def save_all(env: dict[str, str], schedules: Sequence[Sequence[Token]]) -> float:
    """Each schedule in its own thread, one save per event; return the seconds from first to last save."""
    app = Orders(env)
    try:
        def writer(schedule: Sequence[Token]) -> None:
            orders: dict[str, Order] = {}
            for stream_id, _, payload in schedule:
                app.save(execute(orders, stream_id, payload))

        with concurrent.futures.ThreadPoolExecutor(len(schedules)) as pool:
            started = time.perf_counter()
            for future in [pool.submit(writer, s) for s in schedules]:
                future.result()
            return time.perf_counter() - started
    finally:
        app.close()


def project_all(env: dict[str, str], timeout: float) -> float:
    """Run both ProjectionRunners until each has tracked the last notification; return the seconds
    (runner start-up included: it creates the tracking table and subscribes, a few milliseconds)."""
    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        runners: list[ProjectionRunner[Orders, Any]] = [
            stack.enter_context(ProjectionRunner(application_class=Orders, projection_class=projection,
                                                 view_class=view, env=env))
            for projection, view in ((SummaryProjection, SummaryView), (StatsProjection, StatsView))]
        last = runners[0].app.recorder.max_notification_id()
        for runner in runners:
            runner.wait(last, timeout=timeout)
        return time.perf_counter() - started


def save(dsn: str, schema: str, schedules: Sequence[Sequence[Token]]) -> float:
    """Save every order, one thread per schedule; the caller created ``schema``. Returns the seconds."""
    return save_all(environment(dsn, schema, pool_size=len(schedules)), schedules)


def project(dsn: str, schema: str, *, timeout: float = 300) -> float:
    """Project everything saved into the read models (created by the caller); return the seconds."""
    return project_all(environment(dsn, schema, pool_size=2), timeout)
