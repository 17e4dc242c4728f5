"""The batch-observed histogram: standard histogram samples, each value in the first bucket that holds it."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from workers.runtime.metrics import BatchHistogram


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_values_are_counted_in_cumulative_buckets_with_their_sum_and_count() -> None:
    registry = CollectorRegistry()
    histogram = BatchHistogram("x_seconds", "x", "projection", buckets=(0.1, 1.0, math.inf), registry=registry)

    histogram.observe_many("a", [0.0, 0.1, 0.5, 1.0, 7.0])
    histogram.observe_many("a", [0.05])

    found = samples(registry)
    bucket = {le: found[("x_seconds_bucket", (("le", le), ("projection", "a")))] for le in ("0.1", "1.0", "+Inf")}
    assert bucket == {"0.1": 3, "1.0": 5, "+Inf": 6}  # a value on a bound belongs to that bucket (le)
    assert found[("x_seconds_count", (("projection", "a"),))] == 6
    assert found[("x_seconds_sum", (("projection", "a"),))] == 8.65


def test_each_label_value_is_a_series_of_its_own() -> None:
    registry = CollectorRegistry()
    histogram = BatchHistogram("y_seconds", "y", "projection", buckets=(1.0,), registry=registry)

    histogram.observe_many("a", [0.5])
    histogram.observe_many("b", [2.0, 3.0])

    assert registry.get_sample_value("y_seconds_count", {"projection": "a"}) == 1
    assert registry.get_sample_value("y_seconds_count", {"projection": "b"}) == 2
    assert registry.get_sample_value("y_seconds_bucket", {"projection": "b", "le": "1.0"}) == 0

