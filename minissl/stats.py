"""Seed statistics of the leaderboard: mean ± std, the paired Student-t interval and its verdict.

A method and the supervised baseline trained with the same seed share the labeled cases, the initial
weights and the data order, so the per-seed difference ``d_s = dice(method, s) - dice(supervised, s)``
removes most of the between-seed spread. Over n paired seeds the 95 % interval of the mean
difference is

    mean(d) ± t_{0.975, n-1} · std(d, ddof=1) / sqrt(n)

(Student's t with n - 1 degrees of freedom). A method is "ahead" only when the whole interval lies
above 0, "behind" only when it lies below 0, and "inconclusive" otherwise. With fewer than two
seeds the spread, hence the interval, is undefined, and the verdict is "inconclusive".

Example:
    >>> mean, lower, upper = paired_interval([1.0, 2.0, 3.0, 2.0, 2.0])
    >>> round(mean, 2), round(lower, 2), round(upper, 2)
    (2.0, 1.12, 2.88)
    >>> verdict(lower, upper)
    'ahead'
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import numpy as np
from scipy.stats import t as student_t

Verdict = Literal["ahead", "behind", "inconclusive"]


def _as_values(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{what}: expected a non-empty list of numbers, got {list(np.ravel(x))!r}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: expected finite numbers, got {x.tolist()!r}")
    return x


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (ddof 1) over seeds.

    Args:
        values: one number per seed, at least one.

    Returns:
        ``(mean, std)``; ``std`` is None for a single value (the spread of one seed is undefined).

    Raises:
        ValueError: ``values`` is empty or holds a non-finite number.
    """
    x = _as_values(values, "mean_std")
    return float(x.mean()), (float(x.std(ddof=1)) if x.size >= 2 else None)


def paired_interval(diffs: Sequence[float], confidence: float = 0.95
                    ) -> tuple[float, Optional[float], Optional[float]]:
    """Mean of paired differences and its two-sided Student-t interval (n - 1 degrees of freedom).

    Args:
        diffs: per-seed differences (method minus baseline, same seed), at least one.
        confidence: coverage of the interval, in (0, 1).

    Returns:
        ``(mean, lower, upper)``. With one difference the interval is undefined and ``lower`` and
        ``upper`` are None. With zero spread (all differences equal) the interval has zero width,
        ``lower == upper == mean`` (the limit of the formula as the spread goes to 0).

    Raises:
        ValueError: ``diffs`` is empty or non-finite, or ``confidence`` is not in (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"paired_interval: confidence: expected a number in (0, 1), got {confidence!r}")
    d = _as_values(diffs, "paired_interval")
    mean = float(d.mean())
    if d.size < 2:
        return mean, None, None
    half = float(student_t.ppf(0.5 + confidence / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def verdict(lower: Optional[float], upper: Optional[float]) -> Verdict:
    """``"ahead"`` when the interval lies above 0, ``"behind"`` when below, else ``"inconclusive"``.

    Args:
        lower, upper: the interval of :func:`paired_interval`; None (undefined) gives "inconclusive".
            An interval that touches 0 does not exclude it.

    Raises:
        ValueError: ``lower > upper``.
    """
    if lower is None or upper is None:
        return "inconclusive"
    if lower > upper:
        raise ValueError(f"verdict: expected lower <= upper, got lower={lower!r}, upper={upper!r}")
    if lower > 0:
        return "ahead"
    if upper < 0:
        return "behind"
    return "inconclusive"


__all__ = ["Verdict", "mean_std", "paired_interval", "verdict"]
