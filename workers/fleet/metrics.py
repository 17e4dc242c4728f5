"""The fleet's processes' ``/metrics``, parsed: samples by name and label set, summed, and quantiles."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
#: Every sample of one scrape (or a sum of several): {sample name: {sorted labels: value}}.
Samples = dict[str, dict[Labels, float]]


def parse(text: str, prefix: str = "eventfleet_") -> Samples:
    """The samples of a Prometheus text page whose names start with ``prefix``; ValueError if it is cut off."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def merge(scrapes: Iterable[Samples]) -> Samples:
    """Several scrapes summed, sample by sample and label set by label set."""
    merged: Samples = {}
    for samples in scrapes:
        for name, series in samples.items():
            into = merged.setdefault(name, {})
            for labels, value in series.items():
                into[labels] = into.get(labels, 0.0) + value
    return merged


def total(series: Mapping[Labels, float] | None) -> float:
    """A sample summed over its label sets (0 when absent)."""
    return sum((series or {}).values())


def by_label(series: Mapping[Labels, float] | None, label: str) -> dict[str, float]:
    """A sample summed per value of one label (e.g. per projection)."""
    out: dict[str, float] = {}
    for labels, value in (series or {}).items():
        key = dict(labels).get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def quantile(q: float, buckets: Mapping[Labels, float] | None) -> float:
    """histogram_quantile over a histogram's ``_bucket`` samples, every label set merged (linear in a bucket)."""
    merged: dict[float, float] = {}
    for labels, value in (buckets or {}).items():
        le = float(dict(labels)["le"])
        merged[le] = merged.get(le, 0.0) + value
    ordered = sorted(merged.items())
    if not ordered or ordered[-1][1] == 0:
        return math.nan
    rank, lower, below = q * ordered[-1][1], 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = le, count
    return lower
