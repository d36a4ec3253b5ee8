"""Argument validation in one place: every check names the bad value and what is allowed, and runs before any heavy
work. Pure Python (and torch for tensors), so the closed form may use it too."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strictly_above: float | None = None,
    maximum: float | None = None,
    hint: str = "",
) -> float:
    """A finite real number (not a bool) within the given bounds; returns it as a float.

    ``strictly_above=0``: "> 0"; ``minimum=0``: ">= 0"; ``maximum``: "<= maximum". ``hint`` is appended to the error.
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and strictly_above is not None:
        ok = value > strictly_above
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bounds = [
            f"{sign} {bound:g}"
            for sign, bound in ((">", strictly_above), (">=", minimum), ("<=", maximum))
            if bound is not None
        ]
        allowed = " and ".join(bounds)
        raise ValueError(
            f"{name}={value!r} is not allowed: it must be a finite number" + (f" {allowed}" if allowed else "") + hint
        )
    return float(value)


def check_positive(name: str, value: Any, hint: str = "") -> float:
    """A finite number > 0."""
    return check_number(name, value, strictly_above=0, hint=hint)


def check_non_negative(name: str, value: Any, hint: str = "") -> float:
    """A finite number >= 0."""
    return check_number(name, value, minimum=0, hint=hint)


def check_positive_int(name: str, value: Any) -> int:
    """An integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= 1")
    return value


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """One of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: choose one of {allowed}")
    return value


class NonFiniteError(FloatingPointError, ValueError):
    """Weights or a transform holding NaN or inf: a numerical failure (``FloatingPointError``) and a bad input
    (``ValueError``) at once, so that callers of either kind catch it."""


def all_finite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or inf: its min and max in one pass (NaN propagates through both), ~20x faster
    on CPUs than ``isfinite().all()``, which builds a mask the tensor's size (0.4 s for SDXL's 1.4 GB of K/V)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite_weights(weights: Mapping[str, Tensor], what: str) -> None:
    """Refuse tensors holding NaN or inf, naming the first that do; ``what`` says whose they are and what is refused
    (a non-finite export would score as perfect erasure)."""
    bad = [name for name, value in weights.items() if not all_finite(value)]
    if bad:
        raise NonFiniteError(f"{what}: {bad[:3]} hold NaN or inf values")
