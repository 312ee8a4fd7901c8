"""The convergence check on made-up results: the paired interval of 2N - N, the late movement of the
validation curve, the gap to all labels, and the verdicts."""
import math

import pytest
from scipy.stats import t as student_t

from minissl.convergence import check, late_move, render
from minissl.results import ResultRow


def row(tmp_path, iters, seed, dice, curve=None, budget=4):
    folder = tmp_path / f"b{budget}-i{iters}" / f"seed{seed}"
    folder.mkdir(parents=True)
    curve = curve or [(iters // 2, 0.5), (iters, 0.6)]
    (folder / "val_curve.csv").write_text("step,val_dice\n" + "".join(f"{s},{v}\n" for s, v in curve))
    return ResultRow("cardiac", budget, iters, "shared", "supervised", seed, dice, 1.0, path=folder)


def flat(iters, level=0.7):  # validated every 10 %, flat over the last 20 %
    return [(iters * k // 10, level - (0.1 if k < 8 else 0.0)) for k in range(1, 11)]


def test_gain_interval_late_move_and_gap(tmp_path):
    d_n, d_2n = [70.0, 72.0, 68.0, 71.0, 69.0], [70.5, 72.5, 68.0, 71.0, 70.0]
    rows_n = [row(tmp_path, 100, s, d, flat(100)) for s, d in enumerate(d_n)]
    rows_2n = [row(tmp_path, 200, s, d) for s, d in enumerate(d_2n)]
    rows_all = [row(tmp_path, 100, s, d, budget=40) for s, d in enumerate([85.0, 84.0, 86.0, 85.0, 85.0])]
    c = check(rows_n, rows_2n, rows_all)
    diffs = [b - a for a, b in zip(d_n, d_2n)]  # 0.5, 0.5, 0, 0, 1.0
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    half = student_t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert c.gain == pytest.approx((mean, mean - half, mean + half))
    assert c.val_move == pytest.approx(0.0)  # the last 20 %: steps 80, 90, 100 all at 70 points
    assert c.gap == pytest.approx(85.0 - 70.0)
    assert c.converged
    text = render(c)
    assert "converged at N = 100: yes" in text and "gap 15.00; >= 10: yes" in text


def test_not_converged_when_doubling_helps_or_the_curve_still_rises(tmp_path):
    rising = [(10 * k, 0.5 + 0.01 * k) for k in range(1, 11)]  # +1 point per validation
    rows_n = [row(tmp_path, 100, s, 70.0 + s, rising) for s in range(3)]
    rows_2n = [row(tmp_path, 200, s, 70.0 + s + 0.1 * s) for s in range(3)]
    c = check(rows_n, rows_2n)
    assert c.val_move == pytest.approx(2.0)  # 78 -> 80 points over steps 80..100
    assert c.gain[2] < 2.0 and not c.converged
    rows_2n = [row(tmp_path / "b", 200, s, 75.0 + s) for s in range(3)]
    assert check([row(tmp_path / "c", 100, s, 70.0 + s, flat(100)) for s in range(3)], rows_2n).gain[0] == 5.0
    assert "NO" in render(check(rows_n, rows_2n))


def test_check_needs_matching_seeds_and_enough_late_points(tmp_path):
    with pytest.raises(ValueError, match=r"same seeds at N and 2N, got \[0, 1\] and \[0\]"):
        check([row(tmp_path, 100, s, 70.0) for s in (0, 1)], [row(tmp_path, 200, 0, 70.0)])
    sparse = [row(tmp_path / "s", 100, s, 70.0, [(50, 0.5), (100, 0.6)]) for s in (0, 1)]
    with pytest.raises(ValueError, match="at least 2 validation points in the last 20% of 100 iterations, got 1"):
        late_move(sparse, 100)
