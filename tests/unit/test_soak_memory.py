"""The soak's plateau rule: warm-up growth is allowed, a steady trend after it is not."""

from __future__ import annotations

from tests.chaos import soak


def _series(rss: list[int]) -> list[tuple[float, dict[str, int]]]:
    return [(30.0 * i, {"worker-0": kib}) for i, kib in enumerate(rss)]


def test_growth_during_warm_up_then_a_plateau_is_flat() -> None:
    rss = [50_000 + 3_000 * i for i in range(10)] + [80_000] * 11  # +30 MB in 5 minutes, then level

    verdict = soak.memory_verdict(_series(rss), 600, ["worker-0"])

    assert verdict["flat"] is True
    assert verdict["second_half_rise_kib"] == {"worker-0": 0}


def test_a_steady_trend_after_warm_up_is_not_flat() -> None:
    rss = [50_000 + 600 * i for i in range(21)]  # 1.2 MiB/min from start to end: 6 MiB over the second half

    verdict = soak.memory_verdict(_series(rss), 600, ["worker-0"])

    assert verdict["flat"] is False
    assert verdict["second_half_rise_kib"] == {"worker-0": 6000}


def test_a_process_not_judged_does_not_decide() -> None:
    rss = [50_000 + 600 * i for i in range(21)]

    verdict = soak.memory_verdict(_series(rss), 600, [])

    assert verdict["flat"] is True
