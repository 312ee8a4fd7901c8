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
from typing import Optional

import torch

from .cli import _columns, format_table, summary_row
from .config import load_config

# The semi-supervised method shown by default on each suite.
DEMO_METHOD = {"fetal_head": "mean_teacher", "cardiac": "mean_teacher", "atrium": "mean_teacher"}


def _curves(run_dir: Path) -> dict:
    """``{"loss": (iterations, values), "val_dice": (iterations, values)}`` from a run's log.csv."""
    rows = list(csv.DictReader(open(run_dir / "log.csv")))
    out = {}
    for key in ("loss", "val_dice"):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        out[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def run_demo(suite: str = "fetal_head", method: Optional[str] = None, iters: Optional[int] = None,
             seed: int = 0, out: str = "runs/demo", progress: bool = True) -> list[dict]:
    """Train ``supervised`` and ``method`` on ``suite``; print the comparison; write ``report.png``.

    Returns:
        The table rows (one dict per method).
    """
    from . import evaluate as evaluation
    from .engine import open_data, train
    from .inference import predict_case
    from .methods import get_method

    method = method or DEMO_METHOD.get(suite, "mean_teacher")
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
    print(format_table(rows, _columns(*results)))

    # report figure: a few test cases, ground truth and each method's prediction, plus curves
    store = open_data(cfg)
    cases = [store.read(i) for i in store.split("test")[:4]]
    preds = {}
    for res in results:
        m = get_method(res.config.method)(res.config, store.spec)
        m.load_state_dict(torch.load(res.run_dir / "best.pt", map_location="cpu", weights_only=False)["method"])
        m.eval()
        preds[res.config.method] = [predict_case(m.predict, c.image, store.spec.spatial_dims, store.spec.patch_size)
                                    for c in cases]
    curves = {res.config.method: _curves(res.run_dir) for res in results}
    path = Path(out) / "report.png"
    evaluation.report_figure(path, [c.image for c in cases], [c.label for c in cases], preds, curves=curves,
                             class_names=store.spec.class_names, case_ids=[c.id for c in cases])
    print(f"report: {path}   ({time.perf_counter() - t_start:.0f} s in all)")
    return rows
