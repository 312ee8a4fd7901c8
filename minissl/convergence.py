"""``minissl bench converge``: has the supervised baseline converged at N iterations?

A leaderboard at a length where the baseline is still improving ranks how fast a method fits its
labeled images, not what unlabeled images add. The check, per suite and labeled budget, over the same
seeds (each seed fixes the labeled cases, the initial weights and the data order, so runs pair):

1. **doubling does not help**: the upper end of the paired Student-t 95 % interval of
   ``test Dice(2N) - test Dice(N)`` is below ``max_gain`` (2 points);
2. **the validation curve is flat at the end**: over the validation points in the last 20 % of the
   N-iteration runs (``0.8 N <= step <= N``), the seed-mean validation Dice moves (max - min) by less
   than ``max_move`` (0.5 points);
3. **room for semi-supervision**: the gap between every training case labeled and the budget, both at
   N iterations, is reported; it must stay at least ``min_gap`` (10 points) for the suite to measure
   semi-supervision (the suite is not changed when it does not: the check says so).

Every number is read from ``results/`` (:mod:`minissl.results`): the command trains only the runs that
are missing, so a check continues where it stopped.

Example::

    minissl bench converge --suite cardiac --iters 2400          # N = 2400 against 2N = 4800
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .data.sources import open_data
from .results import ResultRow, load, val_curve
from .stats import mean_std, paired_interval

MAX_GAIN, MAX_MOVE, MIN_GAP = 2.0, 0.5, 10.0  # Dice points


@dataclass(frozen=True)
class Convergence:
    """The three numbers of the check and their verdicts (Dice points)."""

    suite: str
    iters: int  # N
    seeds: tuple[int, ...]
    dice_n: tuple[float, Optional[float]]  # mean, std over seeds at N
    dice_2n: tuple[float, Optional[float]]  # the same at 2N
    gain: tuple[float, Optional[float], Optional[float]]  # mean, lower, upper of Dice(2N) - Dice(N)
    val_move: float  # max - min of the seed-mean validation Dice over the last 20 % of the N runs
    dice_all: Optional[tuple[float, Optional[float]]]  # every case labeled, at N (None: not run)

    @property
    def gap(self) -> Optional[float]:
        """Dice with every case labeled minus Dice at the budget, both at N."""
        return None if self.dice_all is None else self.dice_all[0] - self.dice_n[0]

    @property
    def converged(self) -> bool:
        """Criteria 1 and 2 both hold."""
        upper = self.gain[2]
        return upper is not None and upper < MAX_GAIN and self.val_move < MAX_MOVE


def late_move(rows: Sequence[ResultRow], iters: int, tail: float = 0.2) -> float:
    """Max - min of the seed-mean validation Dice over the steps in ``[(1 - tail) iters, iters]``.

    Raises:
        ValueError: the runs were validated at different steps, or fewer than two steps fall in the tail.
    """
    curves = [val_curve(r) for r in rows]
    steps = curves[0][0]
    if any(len(s) != len(steps) or (s != steps).any() for s, _ in curves):
        raise ValueError("late_move: expected every seed validated at the same steps, got different steps")
    keep = steps >= (1 - tail) * iters
    if keep.sum() < 2:
        raise ValueError(f"late_move: expected at least 2 validation points in the last {tail:.0%} of "
                         f"{iters} iterations, got {int(keep.sum())} (validate more often: --val_every)")
    mean = np.mean([v[keep] for _, v in curves], axis=0)
    return float(mean.max() - mean.min())


def check(rows_n: Sequence[ResultRow], rows_2n: Sequence[ResultRow],
          rows_all: Sequence[ResultRow] = ()) -> Convergence:
    """The convergence check from the runs at N, at 2N (same seeds) and, optionally, all labels at N.

    Raises:
        ValueError: the seeds of the N and 2N runs differ.
    """
    by_n, by_2n = {r.seed: r for r in rows_n}, {r.seed: r for r in rows_2n}
    if not by_n or set(by_n) != set(by_2n):
        raise ValueError(f"convergence: expected the same seeds at N and 2N, got {sorted(by_n)} and {sorted(by_2n)}")
    seeds = tuple(sorted(by_n))
    n = rows_n[0]
    return Convergence(
        suite=n.suite, iters=n.iters, seeds=seeds,
        dice_n=mean_std([by_n[s].dice for s in seeds]), dice_2n=mean_std([by_2n[s].dice for s in seeds]),
        gain=paired_interval([by_2n[s].dice - by_n[s].dice for s in seeds]),
        val_move=late_move([by_n[s] for s in seeds], n.iters),
        dice_all=mean_std([r.dice for r in rows_all]) if rows_all else None)


def render(c: Convergence) -> str:
    """A markdown summary of the check, one line per criterion with its verdict."""
    def pm(m: tuple[float, Optional[float]]) -> str:
        return f"{m[0]:.2f}" + ("" if m[1] is None else f" ± {m[1]:.2f}")

    mean, lo, up = c.gain
    interval = "undefined (one seed)" if up is None else f"[{lo:+.2f}, {up:+.2f}]"

    def ok(flag: bool) -> str:
        return "yes" if flag else "NO"

    lines = [f"{c.suite}: supervised, N = {c.iters}, seeds {','.join(map(str, c.seeds))}",
             f"- test Dice at N {pm(c.dice_n)}, at 2N {pm(c.dice_2n)}; 2N - N {mean:+.2f}, 95 % interval "
             f"{interval}; upper < {MAX_GAIN:g}: {ok(up is not None and up < MAX_GAIN)}",
             f"- validation Dice (seed mean) moves {c.val_move:.2f} over the last 20 % of N; "
             f"< {MAX_MOVE:g}: {ok(c.val_move < MAX_MOVE)}"]
    if c.dice_all is not None:
        lines.append(f"- all labels at N {pm(c.dice_all)}: gap {c.gap:.2f}; >= {MIN_GAP:g}: {ok(c.gap >= MIN_GAP)}")
    lines.append(f"- converged at N = {c.iters}: {ok(c.converged)}")
    return "\n".join(lines)


def runs(results: str | Path, suite: str, iters: int, budget: int, seeds: Sequence[int],
         method: str = "supervised", recipe: str = "shared") -> list[ResultRow]:
    """The recorded runs of ``method`` on ``suite`` at ``iters`` iterations and ``budget`` labeled cases."""
    return [r for r in load(results) if (r.suite, r.method, r.recipe, r.iters, r.budget) ==
            (suite, method, recipe, iters, budget) and r.seed in seeds]


def converge(suite: str, iters: int, seeds: Sequence[int] = (0, 1, 2, 3, 4), all_labels: bool = True,
             out: str = "runs/bench", results: str = "results", data_root: Optional[str] = None,
             overrides: Sequence[str] = ()) -> tuple[Convergence, dict[str, list[ResultRow]]]:
    """Train the missing supervised runs (N and 2N at the suite's default budget, all labels at N) and check.

    Args:
        suite: the suite (its name in the results; ``data_root`` opens another folder under that name).
        iters: N.
        overrides: further ``--key value`` options of every run.

    Returns:
        The check and its runs, ``{"budget, N": rows, "budget, 2N": rows, "all labels, N": rows}``.
    """
    from .bench import all_labels_budget, bench_methods

    store = open_data(data_root or suite)
    budget, full = int(store.spec.default_budget), all_labels_budget(store)
    plan = {f"{budget} labeled, N={iters}": (iters, None, budget),
            f"{budget} labeled, 2N={2 * iters}": (2 * iters, None, budget)}
    if all_labels:
        plan[f"all {full} labeled, N={iters}"] = (iters, "all", full)
    groups = {}
    for label, (n_iters, budget_arg, n_labeled) in plan.items():
        bench_methods(suite, ["supervised"], seeds, budget_arg, n_iters, out, data_root, overrides, results)
        groups[label] = runs(results, store.spec.name, n_iters, n_labeled, seeds)
    rows = list(groups.values())
    return check(rows[0], rows[1], rows[2] if all_labels else ()), groups


def main(tokens: Sequence[str]) -> int:
    """``minissl bench converge``: train what is missing, print the check; 1 when not converged."""
    p = argparse.ArgumentParser(prog="minissl bench converge", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="cardiac")
    p.add_argument("--iters", type=int, required=True, help="N: compared with 2N")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--no_all", action="store_true", help="skip the all-labels runs (the gap)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--results", default="results")
    args, rest = p.parse_known_args(tokens)
    c, _ = converge(args.suite, args.iters, [int(s) for s in args.seeds.split(",")], not args.no_all, args.out,
                    args.results, overrides=rest)
    print(render(c))
    return 0 if c.converged else 1
