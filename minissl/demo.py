"""``minissl demo``: a supervised baseline and a semi-supervised method, same budget, one table.

Both runs use the same suite, labeled cases, network, iterations, augmentation and seed; only the
method differs. The table gives test means over cases (Dice %, HD95 in the suite's units and, for
``fetal_head``, the head-circumference error in mm); the PNG report shows test cases with ground
truth and both predictions, and the learning curves.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional, Sequence

from .cli import format_table, summary_row, table_columns
from .config import load_config

# The semi-supervised method shown by default: BCP beat the baseline on fetal_head in every seed we
# ran, Mean Teacher did not (README, Results).
DEMO_METHOD = "bcp"


def read_curves(run_dir: Path) -> dict:
    """``{"step", "loss", "val_step", "val_dice"}`` lists from a run's log.csv (for report_figure)."""
    rows = list(csv.DictReader(open(Path(run_dir) / "log.csv")))
    loss = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
    val = [(int(r["step"]), float(r["val_dice"])) for r in rows if r.get("val_dice")]
    return {"step": [s for s, _ in loss], "loss": [v for _, v in loss],
            "val_step": [s for s, _ in val], "val_dice": [v for _, v in val]}


def report(results: Sequence, path: str | Path, n_cases: int = 4) -> Path:
    """PNG report of finished runs on the same data: the first test cases with ground truth and each
    run's prediction (its best checkpoint), plus loss and validation-Dice curves."""
    from . import evaluate as evaluation
    from .data.sources import open_data
    from .inference import predict_case
    from .run import Run

    store = open_data(results[0].config.data_root or results[0].config.suite)
    spec = store.spec
    cases = [store.read(i) for i in store.split("test")[:n_cases]]
    preds = {}
    for res in results:
        method = Run(res.run_dir).load_method()
        preds[res.config.method] = [predict_case(method.predict, c.image, spec.spatial_dims, spec.patch_size,
                                                 zoom=spec.zoom) for c in cases]
    curves = {res.config.method: read_curves(res.run_dir) for res in results}
    return evaluation.report_figure(path, cases, preds, curves=curves, class_names=spec.class_names)


def run_demo(suite: str = "fetal_head", method: Optional[str] = None, iters: Optional[int] = None,
             seed: int = 0, out: str = "runs/demo", progress: bool = True) -> list[dict]:
    """Train ``supervised`` and ``method`` on ``suite``; print the comparison; write ``report.png``.

    Returns:
        The table rows (one dict per method).
    """
    from .engine import train

    method = method or DEMO_METHOD
    t_start = time.perf_counter()
    rows, results = [], []
    for name in ("supervised", method):
        kw = {"max_iters": iters} if iters else {}
        cfg = load_config(method=name, suite=suite, seed=seed, out_dir=out, progress=progress, **kw)
        print(f"[demo] training {name} on {suite} ...", flush=True)
        res = train(cfg, overwrite=True)
        results.append(res)
        rows.append(summary_row(name, res))
    cfg = results[0].config
    print(f"\nminissl demo: {suite}, {cfg.budget} labeled cases, {cfg.max_iters} iterations, seed {seed} "
          f"(test means over {results[0].test['dice']['n']} cases)")
    print(format_table(rows, table_columns(*results)))
    path = report(results, Path(out) / "report.png")
    print(f"report: {path}   ({time.perf_counter() - t_start:.0f} s in all)")
    return rows
