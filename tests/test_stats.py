import doctest

import numpy as np
import pytest
from scipy import stats as sps

from minissl import stats
from minissl.stats import mean_std, paired_interval, verdict


@pytest.mark.parametrize("method, base", [
    ([71.2, 68.4, 70.9, 66.0, 72.5], [69.0, 69.3, 68.1, 67.2, 70.0]),  # n = 5, mixed signs
    ([80.0, 81.0, 79.5], [78.0, 78.5, 79.0]),  # n = 3
    ([60.0, 62.0], [61.0, 61.5]),  # n = 2: one degree of freedom
])
def test_paired_interval_matches_scipy_ttest_rel(method, base):
    mean, lower, upper = paired_interval(np.subtract(method, base))
    expected = sps.ttest_rel(method, base).confidence_interval(0.95)
    assert mean == pytest.approx(np.mean(method) - np.mean(base))
    assert (lower, upper) == pytest.approx((expected.low, expected.high), rel=1e-12)


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.99])
def test_paired_interval_matches_scipy_t_interval(confidence):
    diffs = [0.4, -1.3, 2.2, 0.9, 1.7, -0.2]
    _, lower, upper = paired_interval(diffs, confidence)
    expected = sps.t.interval(confidence, len(diffs) - 1, loc=np.mean(diffs), scale=sps.sem(diffs))
    assert (lower, upper) == pytest.approx(expected, rel=1e-12)


def test_ties_give_a_symmetric_inconclusive_interval():
    diffs = [0.0, 0.0, 1.0, -1.0, 0.0]  # three ties, mean 0
    mean, lower, upper = paired_interval(diffs)
    expected = sps.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert mean == 0.0 and (lower, upper) == pytest.approx((expected.low, expected.high))
    assert lower == pytest.approx(-upper) and verdict(lower, upper) == "inconclusive"


def test_zero_spread_gives_a_zero_width_interval():
    # scipy returns nan for a zero scale; the limit of the interval as the spread goes to 0 is [m, m]
    assert paired_interval([1.5] * 5) == (1.5, 1.5, 1.5)
    near = sps.t.interval(0.95, 4, loc=1.5, scale=1e-12)
    assert near == pytest.approx((1.5, 1.5))
    assert verdict(1.5, 1.5) == "ahead" and verdict(0.0, 0.0) == "inconclusive"


def test_one_seed_has_no_interval():
    assert paired_interval([2.5]) == (2.5, None, None)
    assert verdict(None, None) == "inconclusive"
    assert mean_std([3.0]) == (3.0, None)


def test_verdict_needs_the_interval_to_exclude_zero():
    assert verdict(0.1, 4.0) == "ahead"
    assert verdict(-4.0, -0.1) == "behind"
    assert verdict(-0.1, 4.0) == "inconclusive"
    assert verdict(0.0, 4.0) == "inconclusive"  # touching 0 does not exclude it
    assert verdict(-4.0, 0.0) == "inconclusive"
    with pytest.raises(ValueError, match="verdict: expected lower <= upper, got lower=2.0, upper=1.0"):
        verdict(2.0, 1.0)


def test_mean_std_uses_ddof_one():
    values = [64.0, 70.0, 67.0, 71.0, 69.0]
    mean, std = mean_std(values)
    assert mean == pytest.approx(68.2)
    assert std == pytest.approx(float(np.sqrt(np.sum((np.array(values) - 68.2) ** 2) / 4)))
    assert std == pytest.approx(sps.tstd(values))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="paired_interval: expected a non-empty list of numbers, got \\[\\]"):
        paired_interval([])
    with pytest.raises(ValueError, match="paired_interval: expected finite numbers, got \\[1.0, nan\\]"):
        paired_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence: expected a number in \\(0, 1\\), got 95"):
        paired_interval([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="mean_std: expected a non-empty list"):
        mean_std([])


def test_docstring_example_runs():
    result = doctest.testmod(stats)
    assert result.attempted > 0 and result.failed == 0
