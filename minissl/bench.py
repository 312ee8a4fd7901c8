"""``minissl bench methods``: the leaderboard under one protocol, resumable.

Every method runs on the same suite with the same labeled budget, iterations, augmentation, network
and seeds; only the method differs. Each run lives in ``<out>/<suite>/<method>-b<budget>-s<seed>``:
a finished run (``metrics.json``) is read back, an interrupted one (``last.pt``) is resumed, so the
command can be stopped and started again at no cost. The table gives mean ± std over seeds of the
per-run test means (Dice %, HD95, HC error for fetal_head, CPU seconds per iteration) and, per method,
the Dice gain over ``supervised`` paired by seed (same labeled cases, initial weights and data order).

Example::

    minissl bench methods --suite cardiac --methods supervised,mean_teacher --seeds 0,1,2
    minissl bench methods --suite fetal_head --methods supervised --budget all   # the upper bound
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import load_config
from .data.sources import open_data
from .data.store import CaseStore


@dataclass
class BenchRun:
    method: str
    seed: int
    budget: int
    dice: float  # test mean over cases, %
    hd95: float
    hc_error_mm: Optional[float]
    s_per_iter: float  # wall seconds per iteration (inflated when other jobs share the CPU)
    cpu_s_per_iter: Optional[float] = None  # process CPU seconds per iteration (None: run older than the field)


def run_one(suite: str, method: str, seed: int, budget: Optional[int], iters: Optional[int], out: Path,
            data_root: Optional[str] = None, overrides: Sequence[str] = (), progress: bool = False,
            store: Optional[CaseStore] = None) -> BenchRun:
    """Train (or read back, or resume) one run of the benchmark (``store``: the data, if already open)."""
    from .engine import resolve, train

    kw = dict(method=method, suite=suite, seed=seed, out_dir=str(out / suite), progress=progress)
    if data_root:
        kw["data_root"] = data_root
    if iters:
        kw["max_iters"] = iters
    if budget:
        kw["budget"] = budget
    cfg = load_config(overrides=list(overrides), **kw)
    store = store if store is not None else open_data(cfg.data_root or cfg.suite)
    cfg = resolve(cfg, store)
    run_dir = Path(cfg.out_dir) / f"{method}-b{cfg.budget}-s{seed}"
    cfg.run_name = run_dir.name
    if not (run_dir / "metrics.json").exists():
        cfg.resume = (run_dir / "last.pt").exists()
        train(cfg, store=store)
    m = json.loads((run_dir / "metrics.json").read_text())
    t = m["test"]
    return BenchRun(method, seed, cfg.budget, 100 * t["dice"]["mean"], t["hd95"]["mean"],
                    t["hc_error_mm"]["mean"] if "hc_error_mm" in t else None, m["seconds_per_iter"],
                    m.get("cpu_seconds_per_iter"))


def paired_gain(rs: list[BenchRun], baseline: dict[int, BenchRun]) -> Optional[str]:
    """Dice gain over the baseline run of the same seed: ``mean ± std (wins/n)``, or None if no seed pairs.

    The seed fixes the labeled subset, the initial weights and the data order, so per-seed differences
    remove most of the between-seed spread that dominates a few-label benchmark.
    """
    diffs = [r.dice - baseline[r.seed].dice for r in rs if r.seed in baseline]
    if not diffs:
        return None
    wins = sum(d > 0 for d in diffs)
    return f"{np.mean(diffs):+.2f} ± {np.std(diffs):.2f} ({wins}/{len(diffs)})"


def table(runs: list[BenchRun], baseline: str = "supervised") -> str:
    """Markdown table: one row per (method, budget), mean ± std over seeds.

    The "Δ Dice" column is ``paired_gain`` against the ``baseline`` method's run with the same budget
    and seed (the number of seeds where the method is ahead in brackets); "-" when there is none.
    """
    groups: dict[tuple[str, int], list[BenchRun]] = {}
    for r in runs:
        groups.setdefault((r.method, r.budget), []).append(r)
    has_hc = any(r.hc_error_mm is not None for r in runs)
    cpu = all(r.cpu_s_per_iter is not None for r in runs)  # else wall time, which other jobs inflate
    head = (f"| method | labeled | seeds | Dice % | Δ Dice vs {baseline} (wins) | HD95 |"
            + (" HC err mm |" if has_hc else "") + (" CPU s/iter |" if cpu else " wall s/iter |"))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ms(xs: list[float], digits: int = 2) -> str:
        return f"{np.mean(xs):.{digits}f} ± {np.std(xs):.{digits}f}"

    for (method, budget), rs in groups.items():
        base = {r.seed: r for r in groups.get((baseline, budget), [])}
        gain = paired_gain(rs, base) if method != baseline else None
        row = f"| {method} | {budget} | {len(rs)} | {ms([r.dice for r in rs])} | {gain or '-'} | {ms([r.hd95 for r in rs])} |"
        if has_hc:
            row += f" {ms([r.hc_error_mm for r in rs])} |"
        secs = [r.cpu_s_per_iter if cpu else r.s_per_iter for r in rs]
        lines.append(row + f" {np.mean(secs):.3f} |")
    return "\n".join(lines)


def bench_methods(suite: str, methods: Sequence[str], seeds: Sequence[int], budget: Optional[str] = None,
                  iters: Optional[int] = None, out: str = "runs/bench", data_root: Optional[str] = None,
                  overrides: Sequence[str] = ()) -> str:
    """Run every (method, seed) and return (and write) the markdown table.

    Args:
        budget: labeled cases, ``"all"`` for every training case, or None for the suite default.
    """
    out_path = Path(out)
    store = open_data(data_root or suite)
    if budget == "all":
        n_budget = len(set(store.patients(store.split("train"))))
    else:
        n_budget = int(budget) if budget else None
    runs = []
    for method in methods:
        for seed in seeds:
            print(f"[bench] {suite} {method} seed {seed}", flush=True)
            runs.append(run_one(suite, method, seed, n_budget, iters, out_path, data_root, overrides, store=store))
    text = table(runs)
    tag = f"{suite}-b{budget or 'default'}"
    (out_path / f"{tag}.md").write_text(text + "\n")
    print(text)
    return text


def main(tokens: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="minissl bench methods", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="cardiac")
    p.add_argument("--methods", default="supervised,mean_teacher", help="comma-separated registry names")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", default=None, help="labeled cases, or 'all'")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--data_root", default=None)
    args, rest = p.parse_known_args(tokens)
    bench_methods(args.suite, args.methods.split(","), [int(s) for s in args.seeds.split(",")], args.budget,
                  args.iters, args.out, args.data_root, rest)
    return 0
