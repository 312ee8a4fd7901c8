"""``minissl demo``: a supervised baseline and a semi-supervised method, same budget, one table.

Both runs use the same suite, labeled cases, network, iterations, augmentation and seed; only the
method differs. The table gives test means over cases (Dice %, HD95 in the suite's units and, for
``fetal_head``, the head-circumference error in mm); the PNG report shows test cases with ground
truth and both predictions, and the learning curves.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from .config import load_config
from .report import format_table, report_figure, summary_row, table_columns
from .run import Run

# The semi-supervised method shown by default: BCP beat the baseline on fetal_head in every seed we
# ran, Mean Teacher did not (README, Results).
DEMO_METHOD = "bcp"
DEMO_ITERS = 600  # a few minutes on a laptop CPU; the leaderboard trains each suite for its converged length


def report(runs: Sequence[Run], path: str | Path, n_cases: int = 4) -> Path:
    """PNG report of finished runs on the same data: the first test cases with ground truth and each
    run's prediction (its best checkpoint), plus loss and validation-Dice curves."""
    from .data.sources import open_data
    from .inference import predict_case

    cfg = runs[0].config
    store = open_data(cfg.data_source)
    spec = store.spec
    cases = [store.read(i) for i in store.split("test")[:n_cases]]
    preds = {}
    for run in runs:
        method = run.load_method()
        preds[run.method_name] = [predict_case(method.predict, c.image, spec.spatial_dims, spec.patch_size,
                                                 zoom=spec.zoom) for c in cases]
    fig = report_figure(cases, preds, runs={run.method_name: run for run in runs}, class_names=spec.class_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def run_demo(suite: str = "fetal_head", method: Optional[str] = None, iters: Optional[int] = None,
             seed: int = 0, out: str = "runs/demo", progress: bool = True) -> list[dict]:
    """Train ``supervised`` and ``method`` on ``suite``; print the comparison; write ``report.png``.

    ``iters`` defaults to ``DEMO_ITERS`` (a short run, not the suite's converged leaderboard length).

    Returns:
        The table rows (one dict per method).
    """
    from .engine import train

    method = method or DEMO_METHOD
    t_start = time.perf_counter()
    runs = []
    for name in ("supervised", method):
        cfg = load_config(method=name, suite=suite, seed=seed, out_dir=out, progress=progress,
                          max_iters=iters or DEMO_ITERS)
        print(f"[demo] training {name} on {suite} ...", flush=True)
        runs.append(Run(train(cfg, overwrite=True).run_dir))
    rows = [summary_row(run.method_name, run) for run in runs]
    cfg = runs[0].config
    print(f"\nminissl demo: {suite}, {cfg.budget} labeled cases, {cfg.max_iters} iterations, seed {seed} "
          f"(test means over {runs[0].metrics['test']['dice']['n']} cases)")
    print(format_table(rows, table_columns(*runs)))
    path = report(runs, Path(out) / "report.png")
    print(f"report: {path}   ({time.perf_counter() - t_start:.0f} s in all)")
    return rows
