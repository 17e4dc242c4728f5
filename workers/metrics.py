"""The Prometheus metrics of CONTRACT.md: the one module-level global the project allows."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

registry: CollectorRegistry = REGISTRY

OUTBOX_PENDING = Gauge("eventfleet_outbox_pending", "Outbox rows not yet confirmed by the broker")
OUTBOX_OLDEST_AGE = Gauge("eventfleet_outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row")
RELAY_PUBLISHED = Counter("eventfleet_relay_published_total", "Events published and confirmed by the broker")
RELAY_UNDECODABLE = Counter("eventfleet_relay_undecodable_total",
                            "Events published flagged as undecodable (their stored metadata is not msgpack); "
                            "every projection dead-letters them")
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
END_TO_END_SECONDS = Histogram("eventfleet_end_to_end_seconds",
                               "From the event's recorded_at to the read-model commit", ["projection"],
                               buckets=_LATENCY_BUCKETS)
HORIZON_AGE = Gauge("eventfleet_store_horizon_age_seconds",
                    "Age of the oldest open transaction holding back the read_all frontier")
