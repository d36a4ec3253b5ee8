"""How sure a rate measured on a few prompts is: the Wilson score interval (pure Python, no Lightning or diffusers).

Attack success rates and concept rates here come from tens of prompts, where the normal approximation's interval
leaves [0, 1] and collapses to a point at 0 of n; Wilson's (1927) stays inside and says, for 0 of 24, that the true
rate is at most 13.8 % at 95 %.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``successes / trials`` at ``confidence``."""
    if isinstance(successes, bool) or isinstance(trials, bool) or trials < 1 or not 0 <= successes <= trials:
        raise ValueError(
            f"successes={successes!r} of trials={trials!r} is not allowed: need 0 <= successes <= trials, trials >= 1"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} is not allowed: it lies in (0, 1)")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(successes: int, trials: int) -> list[float] | None:
    """The 95 % Wilson interval of ``successes / trials`` as a list for JSON reports (None without trials)."""
    return list(wilson_interval(int(successes), int(trials))) if trials else None


def rate_with_interval(successes: int, trials: int, confidence: float = 0.95) -> dict[str, float | int | list[float]]:
    """``{"rate", "successes", "trials", "ci95"}``: a rate with its Wilson interval, for JSON reports."""
    low, high = wilson_interval(int(successes), int(trials), confidence)
    return {"rate": successes / trials, "successes": int(successes), "trials": int(trials), "ci95": [low, high]}
