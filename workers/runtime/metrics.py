"""The Prometheus metrics of docs/reference.md: the one module-level global the project allows."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

registry: CollectorRegistry = REGISTRY


class BatchHistogram(Collector):
    """A histogram with one label, observed a batch of values at a time.

    ``prometheus_client.Histogram`` takes one value per call, with a lock each: at catch-up rates that cost
    more per event than planning its checkpoint. Its maintainers point bulk observations to a custom
    collector (client_python#733, #911), which this is: bucket counts and sums per label value, added
    under one lock per batch and exposed as a standard histogram family (``_bucket``/``_sum``/``_count``).
    """

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float],
                 registry: CollectorRegistry = REGISTRY) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self._bounds = tuple(sorted(float(b) for b in buckets if b != math.inf))
        # The le labels prometheus_client's own Histogram writes ("1.0", "+Inf").
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._series: dict[str, tuple[list[int], list[float]]] = {}  # label -> (counts per bucket, [sum])
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, label_value: str, values: Iterable[float]) -> None:
        """Observe every value (none may be NaN) under ``label_value``."""
        counts, total, bounds = [0] * len(self._les), 0.0, self._bounds
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value
            total += value
        with self._lock:
            series = self._series.get(label_value)
            if series is None:
                series = self._series[label_value] = ([0] * len(self._les), [0.0])
            for i, count in enumerate(counts):
                series[0][i] += count
            series[1][0] += total

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=[self.label])

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            snapshot = [(value, list(counts), total[0]) for value, (counts, total) in self._series.items()]
        for value, counts, total in snapshot:
            cumulative, running = [], 0
            for le, count in zip(self._les, counts, strict=True):
                running += count
                cumulative.append((le, float(running)))
            family.add_metric([value], cumulative, total)
        yield family

OUTBOX_PENDING = Gauge("eventfleet_outbox_pending", "Outbox rows not yet confirmed by the broker")
OUTBOX_OLDEST_AGE = Gauge("eventfleet_outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row")
RELAY_PUBLISHED = Counter("eventfleet_relay_published_total", "Events published and confirmed by the broker")
RELAY_MESSAGES = Counter("eventfleet_relay_messages_total",
                         "Batch messages published and confirmed (each up to EVENTFLEET_MESSAGE_EVENTS events)")
RELAY_UNDECODABLE = Counter("eventfleet_relay_undecodable_total",
                            "Events published flagged as undecodable (their stored metadata is not msgpack); "
                            "every projection dead-letters them")
RELAY_BLOCKED = Gauge("eventfleet_relay_blocked",
                      "1 while the broker blocks the relay's publishing (connection.blocked: a memory or disk alarm)")
RELAY_BATCH_SECONDS = Histogram("eventfleet_relay_publish_batch_seconds",
                                "Time to publish and confirm one outbox batch", buckets=_LATENCY_BUCKETS)

APPLIED = Counter("eventfleet_projection_applied_total", "Events applied to the read model", ["projection"])
DUPLICATES = Counter("eventfleet_projection_duplicates_total",
                     "Deliveries skipped because the checkpoint was already past them", ["projection"])
GAPS_FILLED = Counter("eventfleet_projection_gaps_filled_total",
                      "Events read from the store to fill a gap in delivery", ["projection"])
DEAD_LETTERED = Counter("eventfleet_projection_dead_lettered_total",
                        "Events or messages parked as dead letters", ["projection"])
CAUGHT_UP = Counter("eventfleet_projection_caught_up_total",
                    "Events read straight from the store by a catch-up (applied or already settled)", ["projection"])
LAG_EVENTS = Gauge("eventfleet_projection_lag_events", "Committed events not yet applied", ["projection"])
LAG_SECONDS = Gauge("eventfleet_projection_lag_seconds", "Age of the oldest unapplied event", ["projection"])
APPLY_SECONDS = Histogram("eventfleet_projection_apply_seconds", "Time to apply one batch in one transaction",
                          ["projection"], buckets=_LATENCY_BUCKETS)
END_TO_END_SECONDS = BatchHistogram("eventfleet_end_to_end_seconds",
                                    "From the event's recorded_at to the read-model commit", "projection",
                                    buckets=_LATENCY_BUCKETS)
PARTITION_LAG = Gauge("eventfleet_projection_partition_lag_events", "Committed events not yet applied, per partition",
                      ["projection", "partition"])
PARTITIONS_HELD = Gauge("eventfleet_worker_partitions_held", "Partitions this worker holds the lease of",
                        ["projection"])
REBALANCES = Counter("eventfleet_worker_rebalances_total",
                     "Partitions this worker acquired or gave up (shares dealt again, leases expired)", ["projection"])
PARTITIONS_HELD_FOR_NEWER_CODE = Gauge(
    "eventfleet_projection_partitions_held_for_newer_code",
    "Partitions this worker holds still, unacked, at an event of a newer type or version than its code "
    "(a rolling upgrade): a worker of the newer release applies them", ["projection"])
GHOSTS = Counter("eventfleet_projection_ghosts_total",
                 "Delivered events the store does not hold (lost with a primary, or from an older backup): "
                 "dropped, never applied", ["projection"])
UNHANDLED = Counter("eventfleet_projection_unhandled_total",
                    "Delivered events of types the read model does not handle: acked with their message, never "
                    "decoded, applied or checkpointed for it", ["projection"])
HANDOVER_DUPLICATES = Counter("eventfleet_projection_handover_duplicates_total",
                              "Duplicates a new owner of a partition skipped before its first new event "
                              "(the previous owner's committed, unacked batch)", ["projection"])
DEADLINES_PENDING = Gauge("eventfleet_reactor_deadlines_pending", "Deadlines scheduled and not yet fired or cancelled",
                          ["reactor"])
DEADLINES_FIRED = Counter("eventfleet_reactor_deadlines_fired_total", "Deadlines fired (their handler committed)",
                          ["reactor"])
DEADLINE_LATENESS = BatchHistogram("eventfleet_reactor_deadline_lateness_seconds",
                                   "From a deadline's due time to its firing", "reactor", buckets=_LATENCY_BUCKETS)
REACTOR_FOLLOW_UPS = Counter("eventfleet_reactor_follow_ups_total",
                             "Follow-up events a reactor appended (committed with its checkpoint)", ["reactor"])
REACTOR_REFUSALS = Counter("eventfleet_reactor_refusals_total",
                           "Commands of a reactor the domain refused (recorded in reactor_refusals)", ["reactor"])
HORIZON_AGE = Gauge("eventfleet_store_horizon_age_seconds",
                    "Age of the oldest open transaction holding back the read_all frontier")
PUBLISHED = Counter("eventfleet_publication_published_total",
                    "Integration messages a publication published, confirmed by the broker (a batch whose commit "
                    "then failed publishes its messages again: at least once)", ["publication"])
