"""The Wilson interval against an independent solve of its defining equation, and its refusals."""

from __future__ import annotations

import math

import pytest

from rece_lightning.evaluation.statistics import rate_with_interval, wilson_interval

Z95 = 1.959963984540054


def _bisect(f, low: float, high: float) -> float:
    for _ in range(200):
        middle = (low + high) / 2
        if (f(low) > 0) == (f(middle) > 0):
            low = middle
        else:
            high = middle
    return (low + high) / 2


@pytest.mark.parametrize(("k", "n"), [(0, 24), (1, 24), (12, 24), (23, 24), (24, 24), (3, 10), (7, 142)])
def test_the_interval_is_where_the_score_test_stops_rejecting(k, n):
    """Wilson's bounds are the two p with |k/n - p| = z * sqrt(p (1 - p) / n), found here by bisection."""
    observed = k / n

    def score(p: float) -> float:
        return abs(observed - p) - Z95 * math.sqrt(p * (1 - p) / n)

    low = 0.0 if k == 0 else _bisect(score, 1e-12, observed)
    high = 1.0 if k == n else _bisect(score, observed, 1 - 1e-12)
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-9)
    assert got[0] <= observed <= got[1]


def test_known_values_and_the_report_entry():
    assert wilson_interval(0, 24)[1] == pytest.approx(0.1380, abs=1e-4)  # "0 of 24: at most 13.8 % at 95 %"
    entry = rate_with_interval(6, 24)
    assert entry["rate"] == 0.25 and entry["successes"] == 6 and entry["trials"] == 24
    assert entry["ci95"] == pytest.approx(list(wilson_interval(6, 24)))


@pytest.mark.parametrize(("k", "n", "bad"), [(5, 4, "successes=5"), (0, 0, "trials=0"), (-1, 3, "successes=-1")])
def test_impossible_counts_are_refused_with_the_values(k, n, bad):
    with pytest.raises(ValueError, match=bad):
        wilson_interval(k, n)
    with pytest.raises(ValueError, match="confidence=1"):
        wilson_interval(1, 2, confidence=1)
