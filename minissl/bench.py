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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .config import load_config
from .data.sources import open_data
from .data.store import CaseStore
from .report import bench_table
from .run import LAST, Run


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
    """Train (or read back, or resume) one run of the benchmark.

    Args:
        store: the suite's opened store, shared by every run of a benchmark (None: opened here).
    """
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
    if not ((run_dir / "config.json").is_file() and Run(run_dir).finished):
        cfg.resume = (run_dir / LAST).exists()
        train(cfg, store=store)
    m = Run(run_dir).metrics
    t = m["test"]
    return BenchRun(method, seed, cfg.budget, 100 * t["dice"]["mean"], t["hd95"]["mean"],
                    t["hc_error_mm"]["mean"] if "hc_error_mm" in t else None, m["seconds_per_iter"],
                    m.get("cpu_seconds_per_iter"))


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
    text = bench_table(runs)
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
